// The live camera page: the frames (multipart JPEG read over fetch, so the API key can go with it), the
// answers as they stream (server-sent events), and the question / interval, applied to the next question.
// A lost connection is retried; a stopped source or a rejected frame is shown as a message.
"use strict";

const $ = (id) => document.getElementById(id);
let currentId = null;
let currentFresh = false;  // the last answer stays up until the next one's first token
let frameUrl = null;
let streamsRunning = 0;

function frameMessage(text, cls) {
  const m = $("frame-msg");
  m.hidden = !text;
  m.textContent = text || "";
  m.className = cls || "notice";
}

function fmt(x, digits, unit) { return typeof x === "number" && isFinite(x) ? x.toFixed(digits) + unit : "–"; }

// ---- events -------------------------------------------------------------------------------------------
function onEvent(ev) {
  switch (ev.type) {
    case "hello":
      $("source").textContent = ev.source;
      if (document.activeElement !== $("question")) $("question").value = ev.question;
      if (document.activeElement !== $("every")) $("every").value = ev.every;
      if (ev.ended) frameMessage(ev.ended);
      break;
    case "ask":
      currentId = ev.id;
      currentFresh = true;
      $("current").dataset.question = ev.question;
      $("current-stats").textContent = `Q: ${ev.question}  (frame at ${fmt(ev.at_s, 1, " s")})…`;
      break;
    case "token":
      if (ev.id !== currentId) break;
      if (currentFresh) { $("current").textContent = ""; currentFresh = false; }
      $("current").textContent += ev.text;
      break;
    case "answer": {
      if (ev.id === currentId) { $("current").textContent = ev.text; currentFresh = false; }
      const stats = `TTFT ${fmt(ev.ttft_ms, 0, " ms")} · ${fmt(ev.tokens_per_s, 1, " tok/s")} · ${ev.tiles} tiles · ` +
                    `${fmt(ev.latency_ms, 0, " ms")} total`;
      $("current-stats").textContent = `Q: ${ev.question} · ` + stats;
      const li = el("li", "answer");
      li.dataset.question = ev.question;
      li.append(el("div", "q", `[${fmt(ev.at_s, 1, " s")}] ${ev.question}`), el("div", "a", ev.text),
                el("div", "dim", stats));
      $("answers").prepend(li);
      while ($("answers").children.length > 20) $("answers").lastChild.remove();
      break;
    }
    case "failed":
      if (ev.id === currentId) $("current-stats").textContent = "answer failed: " + ev.message;
      break;
    case "camera":
      if (ev.kind === "rejected") frameMessage("bad frame skipped: " + ev.message);
      else if (["lost", "retry", "failed"].includes(ev.kind)) frameMessage(ev.message);
      else if (ev.kind === "reconnected" || ev.kind === "opened") frameMessage("");
      break;
    case "ended":
      frameMessage(ev.message + " — the page keeps the last frame and answers");
      break;
  }
}

// ---- the two streams, each retried while the page is open ---------------------------------------------
async function keepReading(path, read) {
  streamsRunning += 1;
  for (;;) {
    try {
      const resp = await apiFetch(path);
      $("conn").textContent = "live";
      await read(resp);
      $("conn").textContent = "stream ended; reconnecting…";
    } catch (e) {
      $("conn").textContent = e.status === 401 ? "needs an API key" : "connection lost; reconnecting…";
      if (e.status === 401) { streamsRunning -= 1; return; }  // retried once a key is entered
    }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

// multipart/x-mixed-replace: each part has a Content-Length header, then the JPEG bytes
async function readFrames(resp) {
  const reader = resp.body.getReader();
  let buf = new Uint8Array(0);
  const sep = [13, 10, 13, 10];
  const find = (a, pat, from) => {
    outer: for (let i = from; i <= a.length - pat.length; i++) {
      for (let j = 0; j < pat.length; j++) if (a[i + j] !== pat[j]) continue outer;
      return i;
    }
    return -1;
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    const next = new Uint8Array(buf.length + value.length);
    next.set(buf); next.set(value, buf.length);
    buf = next;
    for (;;) {
      const end = find(buf, sep, 0);
      if (end < 0) break;
      const head = new TextDecoder().decode(buf.slice(0, end));
      const m = /content-length:\s*(\d+)/i.exec(head);
      if (!m) { buf = buf.slice(end + 4); continue; }
      const len = Number(m[1]);
      if (buf.length < end + 4 + len) break;
      const jpeg = buf.slice(end + 4, end + 4 + len);
      buf = buf.slice(end + 4 + len);
      const url = URL.createObjectURL(new Blob([jpeg], { type: "image/jpeg" }));
      $("frame").src = url;
      if (frameUrl) URL.revokeObjectURL(frameUrl);
      frameUrl = url;
      $("frame").dataset.frames = String(Number($("frame").dataset.frames || 0) + 1);
    }
  }
}

function start() {
  if (streamsRunning) return;
  keepReading("/api/stream.mjpg", readFrames);
  keepReading("/api/events", (resp) => readEvents(resp, onEvent));
}

document.addEventListener("DOMContentLoaded", () => {
  setupKeyBar(start);
  $("settings").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const msg = $("settings-msg");
    try {
      const resp = await postJSON("/api/settings", { question: $("question").value, every: $("every").value === "" ? null : Number($("every").value) });
      const s = await resp.json();
      msg.className = "dim";
      msg.textContent = `applied: the next question is "${s.question}", every ${s.every} s`;
    } catch (e) {
      msg.className = "error";
      msg.textContent = e.message;
    }
  });
  $("ask").addEventListener("click", async () => {
    try { await postJSON("/api/ask", {}); $("settings-msg").textContent = "asking about the next frame…"; }
    catch (e) { $("settings-msg").className = "error"; $("settings-msg").textContent = e.message; }
  });
  start();
});
