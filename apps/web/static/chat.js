// The chat page: multi-turn chat over POST /v1/chat/completions (stream: true), pictures from the file picker,
// drag-and-drop, paste or the browser's camera (a captured frame as a data URI), a video file; Stop aborts
// the stream, which the server sees as a closed connection and stops generating.
"use strict";

const history = [];      // the conversation sent with each request (OpenAI messages)
let attachments = [];    // {kind: "image" | "video", url: data URI, name}
let controller = null;   // the running request's AbortController
let modelName = "nvila-edge";

const $ = (id) => document.getElementById(id);

function scrollDown() { window.scrollTo(0, document.body.scrollHeight); }

function addMessage(role, text, media) {
  const box = el("div", "msg " + role);
  for (const a of media || []) {
    if (a.kind === "image") { const img = el("img", "thumb"); img.src = a.url; img.alt = a.name; box.append(img); }
    else box.append(el("span", "dim", "[video: " + a.name + "]\n"));
  }
  const body = el("span", "text", text);
  box.append(body);
  $("log").append(box);
  scrollDown();
  return { box, body };
}

function showError(message) {
  const { box } = addMessage("error", "");
  box.classList.add("error");
  box.querySelector(".text").textContent = message;
}

// ---- attachments ------------------------------------------------------------------------------------
function renderAttachments() {
  const list = $("attachments");
  list.replaceChildren();
  attachments.forEach((a, i) => {
    const item = el("div", "attachment");
    if (a.kind === "image") { const img = el("img"); img.src = a.url; img.alt = a.name; item.append(img); }
    else item.append(el("span", "label", "video: " + a.name));
    const x = el("button", "", "×");
    x.type = "button";
    x.title = "remove";
    x.addEventListener("click", () => { attachments.splice(i, 1); renderAttachments(); });
    item.append(x);
    list.append(item);
  });
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

// Any file is attached as the server will see it: its own type decides image or video part, and the server
// says what is wrong with one it cannot use (a non-image, a broken video, one over its size limit).
async function attachFiles(files) {
  for (const file of files) {
    let url = await readAsDataURL(file);
    if (url.startsWith("data:;")) url = "data:application/octet-stream;" + url.slice(6);
    attachments.push({ kind: file.type.startsWith("video/") ? "video" : "image", url, name: file.name });
  }
  renderAttachments();
}

// ---- the browser's camera -----------------------------------------------------------------------------
let cameraStream = null;

async function openCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showError("This browser gives no camera here (pages reached over plain http from another machine need https).");
    return;
  }
  try {
    cameraStream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  } catch (e) {
    showError("The camera could not be opened: " + e.message);
    return;
  }
  $("preview").srcObject = cameraStream;
  $("camerabox").hidden = false;
}

function closeCamera() {
  if (cameraStream) cameraStream.getTracks().forEach((t) => t.stop());
  cameraStream = null;
  $("preview").srcObject = null;
  $("camerabox").hidden = true;
}

function captureFrame() {
  const video = $("preview");
  if (!video.videoWidth) { showError("The camera has no frame yet; try again in a moment."); return; }
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  attachments.push({ kind: "image", url: canvas.toDataURL("image/jpeg", 0.9), name: "camera frame" });
  renderAttachments();
}

// ---- sending ------------------------------------------------------------------------------------------
function userContent(text, media) {
  if (!media.length) return text;
  const parts = media.map((a) => a.kind === "image" ? { type: "image_url", image_url: { url: a.url } }
                                                    : { type: "video_url", video_url: { url: a.url } });
  if (text) parts.push({ type: "text", text });
  return parts;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send() {
  const text = $("prompt").value.trim();
  if (controller || (!text && !attachments.length)) return;
  const media = attachments;
  const turn = { role: "user", content: userContent(text, media) };
  history.push(turn);
  const asked = addMessage("user", text, media);
  attachments = [];
  renderAttachments();
  $("prompt").value = "";
  const answer = addMessage("assistant", "");
  answer.box.classList.add("streaming");
  controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let first = null, tokens = 0, usage = null, reason = null, failed = null, reply = "";
  try {
    const resp = await postJSON("/v1/chat/completions", {
      model: modelName, messages: history, stream: true, stream_options: { include_usage: true },
      max_tokens: Number($("max-tokens").value) || 256 }, { signal: controller.signal });
    await readEvents(resp, (chunk) => {
      if (chunk.error) { failed = chunk.error.message; return; }  // reported in-band once streaming began
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices || []) {
        if (c.delta && c.delta.content) {
          if (first === null) first = performance.now();
          tokens += 1;
          reply += c.delta.content;
          answer.body.textContent = reply;
          scrollDown();
        }
        if (c.finish_reason) reason = c.finish_reason;
      }
    });
  } catch (e) {
    failed = e.name === "AbortError" ? null : e.message;
    if (e.name === "AbortError") reason = "stopped";
  } finally {
    controller = null;
    setBusy(false);
    answer.box.classList.remove("streaming");
  }
  if (failed !== null && !reply) {
    // nothing was answered: take the turn back so the user can fix it (remove an attachment, shorten the text)
    history.pop();
    asked.box.remove();
    answer.box.remove();
    attachments = media;
    renderAttachments();
    $("prompt").value = text;
    showError(failed);
    return;
  }
  history.push({ role: "assistant", content: reply });
  const done = performance.now();
  const n = usage ? usage.completion_tokens : tokens;
  const ttft = first === null ? null : first - t0;
  const rate = first !== null && n > 1 ? (n - 1) / ((done - first) / 1000) : null;
  const stats = [reason === "stopped" ? "stopped" : reason, `${n} tokens`,
                 ttft === null ? null : `TTFT ${ttft.toFixed(0)} ms`, rate === null ? null : `${rate.toFixed(1)} tok/s`,
                 usage && usage.visual_tokens ? `${usage.visual_tokens} visual tokens` : null].filter(Boolean);
  answer.box.append(el("span", "stats dim", stats.join(" · ")));
  if (failed !== null) showError(failed);
}

function stop() {
  if (controller) controller.abort();  // closes the connection: the server stops this answer
}

// ---- wiring -------------------------------------------------------------------------------------------
async function loadModel() {
  try {
    const resp = await apiFetch("/v1/models");
    const body = await resp.json();
    modelName = body.data[0].id;
    $("model").textContent = modelName;
  } catch (e) {
    $("model").textContent = e.status === 401 ? "needs an API key" : "not reachable: " + e.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setupKeyBar(loadModel);
  $("composer").addEventListener("submit", (ev) => { ev.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", stop);
  $("attach").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", async (ev) => { await attachFiles(ev.target.files); ev.target.value = ""; });
  $("camera").addEventListener("click", openCamera);
  $("camera-off").addEventListener("click", closeCamera);
  $("capture").addEventListener("click", captureFrame);
  $("clear").addEventListener("click", () => { stop(); history.length = 0; $("log").replaceChildren(); });
  document.addEventListener("paste", (ev) => {
    const files = [...(ev.clipboardData ? ev.clipboardData.files : [])];
    if (files.length) { ev.preventDefault(); attachFiles(files); }
  });
  document.addEventListener("dragover", (ev) => { ev.preventDefault(); document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
  document.addEventListener("drop", (ev) => {
    ev.preventDefault();
    document.body.classList.remove("dragging");
    if (ev.dataTransfer && ev.dataTransfer.files.length) attachFiles(ev.dataTransfer.files);
  });
  loadModel();
});
