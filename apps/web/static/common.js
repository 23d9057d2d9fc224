// Shared by both pages: the API key, fetch with the key, reading server-sent events, showing typed errors.
// No third-party code; the Content-Security-Policy allows only this server's scripts.
"use strict";

const KEY_ITEM = "nvila-edge-api-key";

function apiKey() { return sessionStorage.getItem(KEY_ITEM) || ""; }

// The server answers 401 when a key is set and ours is missing or wrong: show the key bar.
function askForKey(message) {
  const bar = document.getElementById("keybar");
  document.getElementById("keymsg").textContent = message || "This server needs an API key.";
  bar.hidden = false;
  document.getElementById("key").focus();
}

// The key bar, the same on both pages: built here, shown on a 401.
function setupKeyBar(onSaved) {
  const bar = el("div");
  bar.id = "keybar";
  bar.hidden = true;
  const form = el("form", "row");
  form.id = "keyform";
  const msg = el("span", "", "This server needs an API key.");
  msg.id = "keymsg";
  const input = el("input", "grow");
  Object.assign(input, { id: "key", type: "password", placeholder: "API key", autocomplete: "off" });
  const button = el("button", "", "Use key");
  button.type = "submit";
  form.append(msg, input, button);
  bar.append(form);
  document.body.prepend(bar);
  document.getElementById("keyform").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY_ITEM, document.getElementById("key").value.trim());
    document.getElementById("keybar").hidden = true;
    if (onSaved) onSaved();
  });
}

class ApiError extends Error {
  constructor(status, message, code) { super(message); this.status = status; this.code = code; }
}

// The server's own error message (OpenAI shape: {"error": {"message", "code"}}), whatever the status.
async function errorFrom(resp) {
  let message = `HTTP ${resp.status}`, code = null;
  try {
    const body = await resp.json();
    if (body && body.error) { message = body.error.message || message; code = body.error.code || null; }
  } catch (_) { /* not JSON: keep the status */ }
  if (resp.status === 401) askForKey(message);
  return new ApiError(resp.status, message, code);
}

async function apiFetch(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const key = apiKey();
  if (key) headers["Authorization"] = "Bearer " + key;
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (!resp.ok) throw await errorFrom(resp);
  return resp;
}

async function postJSON(path, body, options = {}) {
  return apiFetch(path, Object.assign({ method: "POST", headers: { "Content-Type": "application/json" },
                                        body: JSON.stringify(body) }, options));
}

// Server-sent events over fetch (EventSource cannot send the Authorization header): calls onEvent(obj) for
// each "data: {...}" and returns when the stream ends ("[DONE]" or closed).
async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
