// ChatSpot Edge page: pick or drop an image, mark a point / box / polygon on it, ask, read the answer as it
// streams. Talks to this server's /api routes only (no other network access; see docs/serve.md).
// Regions are kept and sent in PIXELS of the original image (the server's width x height for the upload).
"use strict";

const PALETTE = ["#e5484d", "#2563eb", "#12a150", "#f59e0b", "#d6409f", "#0891b2", "#7c3aed", "#ea580c"];
const DRAG_PX = 4; // screen pixels a press must move to become a box

const $ = (id) => document.getElementById(id);
const state = {
  info: null,
  file: null, // the File, kept to open a new session when the old one expired or multi-turn is toggled
  session: null, // {session_id, width, height, history}
  tool: "auto",
  region: null, // {kind: "point"|"box"|"polygon", coords, closed?}
  drag: null, // pointer press in progress: {x0, y0, sx, sy, moved}
  turns: [], // {question, region, color, el}
  hot: -1, // history entry under the mouse
  busy: false,
  abort: null,
};

// ---- server ---------------------------------------------------------------------------------------------
async function api(path, options = {}) {
  const res = await fetch(path, options);
  if (!res.ok) throw await httpError(res);
  return res.status === 204 ? null : res.json();
}

async function httpError(res) {
  let message = `${res.status} ${res.statusText}`;
  try {
    const body = await res.json();
    if (typeof body.detail === "string") message = body.detail;
    else if (Array.isArray(body.detail)) message = body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  } catch (_) { /* not JSON */ }
  const err = new Error(message);
  err.status = res.status;
  err.retryAfter = Number(res.headers.get("Retry-After")) || 0;
  return err;
}

async function loadInfo() {
  try {
    state.info = await api("/api/info");
    const i = state.info;
    $("model").textContent = `${i.model}${i.preset ? " (" + i.preset + ")" : ""} · LLM ${i.llm} · vision ${i.vision} · ` +
      `${i.image.width}×${i.image.height}, ${i.image.tokens} image tokens`;
    $("max-tokens").max = i.limits.max_tokens;
    $("max-tokens").value = Math.min(Number($("max-tokens").value), i.limits.max_tokens);
  } catch (e) {
    $("model").textContent = "server unreachable";
    showError(e.message);
  }
}

async function openSession() {
  const form = new FormData();
  form.append("image", state.file);
  form.append("history", $("keep-history").checked ? "true" : "false");
  setStatus("encoding upload…");
  const s = await api("/api/sessions", { method: "POST", body: form });
  state.session = s;
  setStatus(`${s.width}×${s.height} px · session open`);
  return s;
}

async function closeSession() {
  const s = state.session;
  state.session = null;
  if (s) { try { await api(`/api/sessions/${encodeURIComponent(s.session_id)}`, { method: "DELETE" }); } catch (_) { /* gone already */ } }
}

// ---- image ----------------------------------------------------------------------------------------------
async function useFile(file) {
  hideError();
  if (!file) return;
  const limit = state.info ? state.info.limits.max_upload_bytes : Infinity;
  if (file.size > limit) { showError(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MiB; the server takes up to ${(limit / 2 ** 20).toFixed(0)} MiB.`); return; }
  if (state.busy) stopAnswer();
  await closeSession();
  state.file = file;
  state.region = null;
  state.turns = [];
  $("history").replaceChildren();
  $("empty-history").hidden = false;
  const photo = $("photo");
  if (photo.src) URL.revokeObjectURL(photo.src);
  photo.src = URL.createObjectURL(file);
  $("dropzone").hidden = true;
  $("canvas-wrap").hidden = false;
  $("toolbar").hidden = false;
  try {
    await openSession();
  } catch (e) {
    showError(e.message);
    photo.removeAttribute("src");
    $("dropzone").hidden = false;
    $("canvas-wrap").hidden = true;
    $("toolbar").hidden = true;
    state.file = null;
    updateControls();
    return;
  }
  updateRegion();
  updateControls();
  $("question").focus();
}

// the image as large as the stage allows (small images are scaled up, so regions are easy to draw)
function layoutPhoto() {
  const photo = $("photo"), stage = $("stage");
  if (!photo.naturalWidth || $("canvas-wrap").hidden) return;
  const cs = getComputedStyle(stage);
  const availW = stage.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
  const top = $("canvas-wrap").getBoundingClientRect().top;
  const availH = Math.max(200, window.innerHeight - top - 90);
  const scale = Math.min(availW / photo.naturalWidth, availH / photo.naturalHeight);
  photo.style.width = `${Math.floor(photo.naturalWidth * scale)}px`;
  photo.style.height = `${Math.floor(photo.naturalHeight * scale)}px`;
}

function fitCanvas() {
  const photo = $("photo"), canvas = $("overlay");
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(photo.clientWidth * dpr);
  canvas.height = Math.round(photo.clientHeight * dpr);
  draw();
}

// screen (CSS px on the canvas) <-> image pixels of the original
function toImage(ev) {
  const c = $("overlay"), r = c.getBoundingClientRect();
  const W = state.session.width, H = state.session.height;
  const x = Math.min(W, Math.max(0, ((ev.clientX - r.left) / r.width) * W));
  const y = Math.min(H, Math.max(0, ((ev.clientY - r.top) / r.height) * H));
  return [Math.round(x), Math.round(y)];
}

// ---- drawing regions ------------------------------------------------------------------------------------
function onPointerDown(ev) {
  if (!state.session || ev.button !== 0) return;
  ev.preventDefault();
  $("overlay").setPointerCapture(ev.pointerId);
  const [x, y] = toImage(ev);
  state.drag = { x0: x, y0: y, sx: ev.clientX, sy: ev.clientY, moved: false, shift: ev.shiftKey };
}

function onPointerMove(ev) {
  const d = state.drag;
  if (!d) return;
  if (!d.moved && Math.hypot(ev.clientX - d.sx, ev.clientY - d.sy) < DRAG_PX) return;
  if (state.tool === "point" || state.tool === "polygon" || (state.tool === "auto" && d.shift)) return;
  d.moved = true;
  const [x, y] = toImage(ev);
  state.region = { kind: "box", coords: [Math.min(d.x0, x), Math.min(d.y0, y), Math.max(d.x0, x), Math.max(d.y0, y)] };
  updateRegion();
}

function onPointerUp(ev) {
  const d = state.drag;
  state.drag = null;
  if (!d) return;
  if (d.moved) {
    const [x1, y1, x2, y2] = state.region.coords;
    if (x2 - x1 < 1 || y2 - y1 < 1) { state.region = null; hint("That box has no width or height: drag diagonally."); }
    updateRegion();
    return;
  }
  const polygonClick = state.tool === "polygon" || (state.tool === "auto" && d.shift);
  if (polygonClick) addCorner(d.x0, d.y0);
  else if (state.tool === "box") hint("Box tool: drag from one corner to the other.");
  else state.region = { kind: "point", coords: [d.x0, d.y0] };
  updateRegion();
}

function addCorner(x, y) {
  const r = state.region;
  if (!r || r.kind !== "polygon" || r.closed) state.region = { kind: "polygon", coords: [[x, y]], closed: false };
  else {
    const [fx, fy] = r.coords[0];
    const near = Math.hypot(fx - x, fy - y) <= (8 * state.session.width) / $("overlay").getBoundingClientRect().width;
    const [lx, ly] = r.coords[r.coords.length - 1];
    if (near && r.coords.length >= 3) r.closed = true; // clicking the first corner closes the polygon
    else if (lx !== x || ly !== y) r.coords.push([x, y]); // (a double-click's second click adds nothing)
  }
}

function closePolygon() {
  const r = state.region;
  if (r && r.kind === "polygon" && r.coords.length >= 3) { r.closed = true; updateRegion(); }
}

function regionLabel(r) {
  if (!r) return "No region: the question is about the whole image.";
  if (r.kind === "point") return `Point (${r.coords[0]}, ${r.coords[1]}) px`;
  if (r.kind === "box") return `Box (${r.coords[0]}, ${r.coords[1]}) → (${r.coords[2]}, ${r.coords[3]}) px`;
  const n = r.coords.length;
  const pts = r.coords.map(([x, y]) => `(${x}, ${y})`).join(" ");
  return `Polygon, ${n} corner${n === 1 ? "" : "s"}${n < 3 ? " (needs 3+)" : ""}: ${pts}`;
}

function updateRegion() {
  const out = $("region-readout"), r = state.region;
  out.textContent = regionLabel(r);
  out.dataset.kind = r ? r.kind : "";
  out.dataset.coords = r ? JSON.stringify(r.coords) : "";
  draw();
}

function nextColor() { return PALETTE[state.turns.length % PALETTE.length]; }

function draw() {
  const c = $("overlay"), ctx = c.getContext("2d");
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, c.width, c.height);
  if (!state.session) return;
  const sx = c.width / state.session.width, sy = c.height / state.session.height;
  const lw = Math.max(2, c.width / 400);
  state.turns.forEach((t, i) => {
    if (t.region && !sameRegion(t.region, state.region)) shape(ctx, t.region, t.color, sx, sy, lw * (i === state.hot ? 1.6 : 0.8), i === state.hot ? 0.25 : 0.0, String(i + 1));
  });
  if (state.region) shape(ctx, state.region, currentColor(), sx, sy, lw * 1.5, 0.18, null);
}

function currentColor() {
  const i = state.turns.findIndex((t) => sameRegion(t.region, state.region));
  return i >= 0 ? state.turns[i].color : nextColor();
}

function shape(ctx, r, color, sx, sy, lw, fill, label) {
  ctx.lineWidth = lw;
  ctx.strokeStyle = color;
  ctx.fillStyle = color;
  ctx.beginPath();
  let lx, ly;
  if (r.kind === "point") {
    const [x, y] = [r.coords[0] * sx, r.coords[1] * sy];
    const rad = lw * 4;
    ctx.arc(x, y, rad, 0, 2 * Math.PI);
    ctx.stroke();
    ctx.beginPath();
    ctx.arc(x, y, lw * 1.2, 0, 2 * Math.PI);
    ctx.fill();
    [lx, ly] = [x + rad, y - rad];
  } else if (r.kind === "box") {
    const [x1, y1, x2, y2] = [r.coords[0] * sx, r.coords[1] * sy, r.coords[2] * sx, r.coords[3] * sy];
    ctx.rect(x1, y1, x2 - x1, y2 - y1);
    [lx, ly] = [x1, y1];
  } else {
    r.coords.forEach(([x, y], i) => (i ? ctx.lineTo(x * sx, y * sy) : ctx.moveTo(x * sx, y * sy)));
    if (r.closed !== false || r.coords.length >= 3) ctx.closePath();
    [lx, ly] = [r.coords[0][0] * sx, r.coords[0][1] * sy];
  }
  if (r.kind !== "point") {
    if (fill > 0) { ctx.globalAlpha = fill; ctx.fill(); ctx.globalAlpha = 1; }
    ctx.stroke();
    if (r.kind === "polygon") r.coords.forEach(([x, y]) => { ctx.beginPath(); ctx.arc(x * sx, y * sy, lw * 1.3, 0, 2 * Math.PI); ctx.fill(); });
  }
  if (label) {
    const fs = Math.max(12, lw * 6);
    ctx.font = `bold ${fs}px system-ui, sans-serif`;
    const w = ctx.measureText(label).width + fs * 0.6;
    ctx.fillRect(lx, Math.max(0, ly - fs * 1.3), w, fs * 1.3);
    ctx.fillStyle = "#fff";
    ctx.fillText(label, lx + fs * 0.3, Math.max(fs, ly - fs * 0.3));
  }
}

function sameRegion(a, b) {
  return !!a && !!b && a.kind === b.kind && JSON.stringify(a.coords) === JSON.stringify(b.coords);
}

// ---- asking ---------------------------------------------------------------------------------------------
function regionPayload(r) {
  if (!r) return {};
  if (r.kind === "polygon" && r.coords.length < 3) throw new Error("A polygon needs 3 or more corners (shift+click them).");
  return { [r.kind]: r.coords };
}

async function ask(ev) {
  if (ev) ev.preventDefault();
  hideError();
  const question = $("question").value.trim();
  if (!question || state.busy || !state.session) return;
  let region;
  try { region = regionPayload(state.region); } catch (e) { showError(e.message); return; }
  if (state.region && state.region.kind === "polygon") state.region.closed = true;
  const snapshot = state.region ? JSON.parse(JSON.stringify(state.region)) : null;
  const color = snapshot ? currentColor() : "#98a2b3";
  const turn = addTurn(question, snapshot, color);
  const body = { question, ...region, max_tokens: Number($("max-tokens").value) || 64, stream: true };
  state.busy = true;
  updateControls();
  try {
    await streamAnswer(body, turn);
  } catch (e) {
    if (e.name === "AbortError") finishTurn(turn, "error", "(stopped)");
    else {
      finishTurn(turn, "error", e.message);
      if (e.status === 503 && e.retryAfter) showError(`The server is busy: try again in ${e.retryAfter} s.`);
    }
  } finally {
    state.busy = false;
    state.abort = null;
    updateControls();
    draw();
  }
}

async function streamAnswer(body, turn, retried = false) {
  state.abort = new AbortController();
  const url = `/api/sessions/${encodeURIComponent(state.session.session_id)}/ask`;
  const res = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal: state.abort.signal });
  if (res.status === 404 && !retried && state.file) { // the session expired: the same image again, then retry once
    await openSession();
    return streamAnswer(body, turn, true);
  }
  if (!res.ok) throw await httpError(res);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      handleEvent(block, turn);
    }
  }
  if (turn.el.dataset.state === "streaming") finishTurn(turn, "error", "(the stream ended early)");
}

function handleEvent(block, turn) {
  let event = "message", data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  const msg = data ? JSON.parse(data) : {};
  if (event === "token") {
    turn.el.querySelector(".a").textContent += msg.text;
    scrollHistory();
  } else if (event === "done") {
    turn.el.querySelector(".a").textContent = msg.answer;
    turn.timings = msg.timings;
    finishTurn(turn, "done");
  } else if (event === "error") {
    finishTurn(turn, "error", msg.message);
  }
}

function addTurn(question, region, color) {
  const li = document.createElement("li");
  li.dataset.state = "streaming";
  li.style.setProperty("--c", color);
  const n = state.turns.length + 1;
  const head = document.createElement("div");
  head.className = "region";
  head.textContent = `#${n} · ${region ? regionLabel(region) : "whole image"}`;
  const q = document.createElement("div");
  q.className = "q";
  q.textContent = question;
  const a = document.createElement("div");
  a.className = "a";
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = "waiting for the model…";
  li.append(head, q, a, meta);
  const turn = { question, region, color, el: li, timings: null };
  const idx = state.turns.length;
  li.addEventListener("mouseenter", () => { state.hot = idx; draw(); });
  li.addEventListener("mouseleave", () => { state.hot = -1; draw(); });
  li.addEventListener("click", () => { if (region) { state.region = JSON.parse(JSON.stringify(region)); updateRegion(); } });
  state.turns.push(turn);
  $("history").append(li);
  $("empty-history").hidden = true;
  scrollHistory();
  draw();
  return turn;
}

function finishTurn(turn, status, message) {
  turn.el.dataset.state = status;
  const meta = turn.el.querySelector(".meta");
  meta.replaceChildren();
  if (status !== "done") {
    if (message) { turn.el.querySelector(".a").textContent += (turn.el.querySelector(".a").textContent ? "\n" : "") + message; }
    meta.textContent = "no answer";
    return;
  }
  const t = turn.timings;
  const bold = (text) => { const b = document.createElement("b"); b.textContent = text; return b; };
  const tag = (text, cold) => { const s = document.createElement("span"); s.className = "tag" + (cold ? " cold" : ""); s.textContent = text; return s; };
  meta.append("TTFT ", bold(`${fmt(t.ttft_ms)} ms`));
  if (t.queue_ms >= 1) meta.append(` (+${fmt(t.queue_ms)} ms queued)`);
  meta.append(` · ${t.n_prompt} prompt tok · ${t.n_generated} tok at ${t.decode_tok_s.toFixed(1)} tok/s`);
  if (t.vision_ms > 0) meta.append(` · vision ${fmt(t.vision_ms)} ms`);
  if (t.prefix_reused) meta.append(tag("follow-up: image KV reused", false));
  else meta.append(tag(t.image_cached || t.vision_ms === 0 ? "image prefix prefilled" : "image encoded + prefilled", true));
  turn.el.dataset.ttft = String(t.ttft_ms);
  turn.el.dataset.prefixReused = String(t.prefix_reused);
}

function fmt(ms) { return ms >= 100 ? ms.toFixed(0) : ms.toFixed(1); }

function stopAnswer() { if (state.abort) state.abort.abort(); }

async function resetConversation() {
  if (!state.session || state.busy) return;
  hideError();
  try {
    await api(`/api/sessions/${encodeURIComponent(state.session.session_id)}/reset`, { method: "POST" });
  } catch (e) {
    if (e.status !== 404) { showError(e.message); return; }
    await openSession();
  }
  state.turns = [];
  $("history").replaceChildren();
  $("empty-history").hidden = false;
  setStatus("conversation reset; the image stays encoded");
  draw();
}

async function toggleHistory() {
  if (!state.file) return;
  await closeSession();
  state.turns = [];
  $("history").replaceChildren();
  $("empty-history").hidden = false;
  try { await openSession(); } catch (e) { showError(e.message); }
  setStatus($("keep-history").checked ? "multi-turn: earlier answers stay in context" : "each question stands alone");
  updateControls();
  draw();
}

// ---- small UI helpers -----------------------------------------------------------------------------------
function updateControls() {
  const ready = !!state.session;
  $("question").disabled = !ready;
  $("ask").disabled = !ready || state.busy;
  $("reset").disabled = !ready || state.busy;
  $("stop").hidden = !state.busy;
}

function setStatus(text) { $("status").textContent = text; }
function showError(text) { const e = $("error"); e.textContent = text; e.hidden = false; }
function hideError() { $("error").hidden = true; }
function hint(text) { $("hint").textContent = text; }
function scrollHistory() { const h = $("history"); h.scrollTop = h.scrollHeight; }

function setTool(tool) {
  state.tool = tool;
  document.querySelectorAll("[data-tool]").forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.tool === tool)));
  hint({
    auto: "Click = point · drag = box · shift+click = polygon corners · Esc clears.",
    point: "Point tool: click where you mean.",
    box: "Box tool: drag from one corner to the other.",
    polygon: "Polygon tool: click the corners; click the first corner, double-click or press Enter to close.",
  }[tool]);
}

function setupDrop() {
  const targets = [$("dropzone"), $("stage")];
  for (const t of targets) {
    t.addEventListener("dragover", (ev) => { ev.preventDefault(); t.classList.add("over"); });
    t.addEventListener("dragleave", () => t.classList.remove("over"));
    t.addEventListener("drop", (ev) => {
      ev.preventDefault();
      t.classList.remove("over");
      const f = ev.dataTransfer && ev.dataTransfer.files[0];
      if (f) useFile(f);
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  loadInfo();
  setupDrop();
  $("file").addEventListener("change", (ev) => useFile(ev.target.files[0]));
  $("file-again").addEventListener("change", (ev) => { useFile(ev.target.files[0]); ev.target.value = ""; });
  $("photo").addEventListener("load", () => { layoutPhoto(); fitCanvas(); });
  window.addEventListener("resize", layoutPhoto);
  $("photo").addEventListener("error", () => { // the server took it, the browser cannot show it (e.g. TIFF)
    if (state.session) showError("This browser cannot display the image, so regions cannot be drawn on it; questions about the whole image still work.");
  });
  new ResizeObserver(fitCanvas).observe($("photo"));
  const ov = $("overlay");
  ov.addEventListener("pointerdown", onPointerDown);
  ov.addEventListener("pointermove", onPointerMove);
  ov.addEventListener("pointerup", onPointerUp);
  ov.addEventListener("pointercancel", () => { state.drag = null; });
  ov.addEventListener("dblclick", closePolygon);
  document.querySelectorAll("[data-tool]").forEach((b) => b.addEventListener("click", () => setTool(b.dataset.tool)));
  $("clear-region").addEventListener("click", () => { state.region = null; updateRegion(); });
  $("ask-form").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (ev) => { if (ev.key === "Enter" && !ev.shiftKey) ask(ev); });
  $("stop").addEventListener("click", stopAnswer);
  $("reset").addEventListener("click", resetConversation);
  $("keep-history").addEventListener("change", toggleHistory);
  document.addEventListener("keydown", (ev) => {
    if (ev.target === $("question") || ev.target.tagName === "INPUT") return;
    if (ev.key === "Escape") { state.region = null; updateRegion(); }
    if (ev.key === "Enter") closePolygon();
    if (ev.key === "Backspace" && state.region && state.region.kind === "polygon" && !state.region.closed) {
      state.region.coords.pop();
      if (!state.region.coords.length) state.region = null;
      updateRegion();
    }
  });
  window.addEventListener("pagehide", () => { // best effort: free the session now rather than at its expiry
    if (state.session) fetch(`/api/sessions/${encodeURIComponent(state.session.session_id)}`, { method: "DELETE", keepalive: true });
  });
});
