// The recorder page: capture -> IndexedDB (committed) -> upload -> delete on ok ack.
import { ChunkQueue } from "/static/queue.js";
import { Uploader } from "/static/uploader.js";
import { OpusCapture, PcmCapture } from "/static/capture.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "scribe.token";
const SESSION_KEY = "scribe.session";
const SESSION_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

const ui = { state: "idle", captured: 0, level: 0, bytesPerSecond: 0 };
let queue, uploader, capture = null, sessionId = null, nextSeq = 0, leftOver = 0;

function log(text) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("log").prepend(li);
  while ($("log").children.length > 200) $("log").lastChild.remove();
}

function warn(text) { $("warning").hidden = !text; $("warning").textContent = text || ""; }
function notice(text) { $("notice").hidden = !text; $("notice").textContent = text || ""; }

function render() {
  const st = $("status");
  const connected = uploader ? uploader.connected : false;
  st.dataset.state = ui.state;
  st.dataset.captured = ui.captured;
  st.dataset.acked = uploader ? uploader.acked : 0;
  st.dataset.pending = uploader ? uploader.pending : 0;
  st.dataset.connected = String(connected);
  $("state-text").textContent = ui.state;
  $("conn-text").textContent = connected ? "connected" : (uploader && uploader.lastError) || "not connected";
  $("captured-text").textContent = ui.captured;
  $("acked-text").textContent = st.dataset.acked;
  const failed = uploader ? uploader.failed.size : 0;
  $("pending-text").textContent = st.dataset.pending + (failed ? ` (${failed} refused by the server)` : "");
  $("start").disabled = ui.state !== "idle";
  $("stop").disabled = ui.state !== "recording";
  $("session").disabled = $("format").disabled = $("chunk-seconds").disabled = ui.state !== "idle";
  const id = $("session").value.trim();
  $("session-link").href = SESSION_RE.test(id) ? `/sessions/${encodeURIComponent(id)}` : "#";
  $("session-link").textContent = SESSION_RE.test(id) ? `session view: ${id}` : "session view";
  if (leftOver && uploader && uploader.pending === 0) {
    notice(`All ${leftOver} chunk(s) left by an earlier visit are uploaded.`);
    leftOver = 0;
  }
}

function newSessionId() {
  const d = new Date();
  const p = (n) => String(n).padStart(2, "0");
  const rnd = crypto.getRandomValues(new Uint16Array(1))[0].toString(16).padStart(4, "0");
  return `rec-${d.getFullYear()}${p(d.getMonth() + 1)}${p(d.getDate())}-${p(d.getHours())}${p(d.getMinutes())}${p(d.getSeconds())}-${rnd}`;
}

async function sha256(buf) {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", buf));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

const MB = 1024 * 1024;
let lastEstimate = 0;
async function showStorage(force = false) {
  if (!navigator.storage || !navigator.storage.estimate) { $("storage-text").textContent = "unknown"; return; }
  if (!force && performance.now() - lastEstimate < 5000) return;
  lastEstimate = performance.now();
  const [{ usage, quota }, persisted] = await Promise.all([
    navigator.storage.estimate(), navigator.storage.persisted ? navigator.storage.persisted() : false,
  ]);
  const free = quota - usage;
  $("storage-text").textContent =
    `${persisted ? "persistent" : "not persistent (the browser may evict it under pressure)"} · ` +
    `${(free / MB).toFixed(0)} MB free of ${(quota / MB).toFixed(0)} MB`;
  const minutesLeft = ui.bytesPerSecond ? free / ui.bytesPerSecond / 60 : Infinity;
  if (free < 50 * MB || minutesLeft < 10) {
    warn(`Browser storage is nearly full: ${(free / MB).toFixed(0)} MB left` +
      (isFinite(minutesLeft) ? ` (about ${Math.floor(minutesLeft)} min of audio)` : "") +
      ". Get online so queued chunks upload and free it.");
  } else if (!$("warning").dataset.sticky) {
    warn("");
  }
}

async function onChunk(chunk) {
  const seq = nextSeq++;
  const record = {
    sessionId, sequence: seq, timestamp: Date.now(), size: chunk.audio.byteLength, mimeType: chunk.mimeType,
    audio: chunk.audio, checksum: await sha256(chunk.audio), durationMs: chunk.durationMs,
  };
  try {
    await queue.add(record); // committed (strict durability) before any send
  } catch (err) {
    nextSeq--;
    $("warning").dataset.sticky = "1";
    warn(`Could not store chunk ${seq} in this browser (${err.name}: ${err.message}); recording stopped.`);
    log(`storing chunk ${seq} failed: ${err.name}`);
    setTimeout(stop, 0);
    throw err;
  }
  ui.captured++;
  const { audio, ...meta } = record;
  uploader.enqueue(meta);
  showStorage();
}

async function start() {
  const token = $("token").value.trim();
  const id = $("session").value.trim();
  if (!token) return warn("Enter a token first (scribe-server token create NAME prints one).");
  if (!SESSION_RE.test(id)) return warn("The session id must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}.");
  warn("");
  delete $("warning").dataset.sticky;
  ui.state = "stopping"; // busy until the microphone runs
  render();
  try {
    const local = await queue.session(id);
    if (local && local.lastSeq !== undefined) throw new Error(`session ${id} was finished here; take a new id`);
    nextSeq = local ? local.nextSeq : 0;
    for (let i = 0; i < 30 && !uploader.connected; i++) await new Promise((r) => setTimeout(r, 100));
    if (uploader.connected) {
      // No answer in time: go on with what this browser knows (the server refuses a clash).
      const state = await uploader.call("session-state", { sessionId: id, seqs: [] }, 10000).catch(() => ({}));
      if (state.ok && state.finalSeq !== null) throw new Error(`session ${id} is finished on the server; take a new id`);
      if (state.ok) nextSeq = Math.max(nextSeq, state.maxSeq + 1);
    }
    if (navigator.storage && navigator.storage.persist) {
      const granted = await navigator.storage.persist();
      log(granted ? "persistent storage granted" : "persistent storage not granted: the browser may evict queued chunks");
    }
    const opts = { chunkSeconds: Number($("chunk-seconds").value) || 10, onChunk, onLevel: (l) => { ui.level = l; } };
    capture = $("format").value === "opus" && OpusCapture.supported() ? new OpusCapture(opts) : new PcmCapture(opts);
    await capture.start();
    sessionId = id;
    localStorage.setItem(SESSION_KEY, id);
    ui.captured = 0;
    ui.bytesPerSecond = capture instanceof PcmCapture ? capture.rate * capture.channels * 2 : 8000;
    $("format-text").textContent = capture.label;
    ui.state = "recording";
    log(`recording ${id} from chunk ${nextSeq} (${capture.label})`);
  } catch (err) {
    capture = null;
    ui.state = "idle";
    warn(err.name === "NotAllowedError" ? "The microphone was not allowed." : `Cannot start: ${err.message}`);
  }
  render();
  showStorage(true);
}

async function stop() {
  if (ui.state !== "recording") return;
  ui.state = "stopping";
  render();
  try {
    await capture.stop();
  } catch (err) {
    log(`stopping: ${err.message}`);
  }
  capture = null;
  const s = (await queue.session(sessionId)) || { sessionId, nextSeq };
  if (nextSeq > 0) {
    s.lastSeq = nextSeq - 1;
    await queue.putSession(s); // the finish is queued too: sent now or after a reconnect
    if (uploader.connected) uploader.finishSessions(uploader.generation).catch((e) => log(`finish: ${e}`));
  }
  log(`stopped ${sessionId} after chunk ${nextSeq - 1}`);
  ui.state = "idle";
  ui.level = 0;
  render();
}

let frozenAt = 0;
function onResume() {
  if (!frozenAt || !capture) return;
  const seconds = (Date.now() - frozenAt) / 1000;
  frozenAt = 0;
  log(`the page was frozen for ${seconds.toFixed(1)} s; the browser captured no audio meanwhile`);
}

function flushOnHide(sync) {
  if (!capture) return;
  // Nothing captured should wait in memory while the page may be discarded.
  if (sync) capture.cut(); else capture.flush();
}

async function main() {
  queue = await ChunkQueue.open();
  uploader = new Uploader(queue, render, log);
  $("token").value = localStorage.getItem(TOKEN_KEY) || "";
  $("session").value = localStorage.getItem(SESSION_KEY) || newSessionId();
  leftOver = await uploader.restore();
  if (leftOver) {
    notice(`${leftOver} chunk(s) recorded earlier are waiting in this browser; ` +
      "they upload as soon as the server is reachable with your token.");
    log(`${leftOver} chunk(s) from an earlier visit found in this browser`);
  }
  fetch("/api/info").then((r) => r.json()).then((info) => {
    uploader.window = Math.max(1, Math.min(8, info.maxInFlight || 8));
  }).catch(() => {});
  const connect = () => { if ($("token").value.trim()) uploader.start(() => localStorage.getItem(TOKEN_KEY) || ""); };
  $("token").addEventListener("change", () => {
    localStorage.setItem(TOKEN_KEY, $("token").value.trim());
    if (uploader.socket) uploader.reconnect(); else connect();
  });
  for (const id of ["chunk-seconds", "format"]) {  // options are remembered like the token
    const saved = localStorage.getItem(`scribe.${id}`);
    if (saved) $(id).value = saved;
    $(id).addEventListener("change", () => localStorage.setItem(`scribe.${id}`, $(id).value));
  }
  $("session").addEventListener("input", render);
  $("new-session").addEventListener("click", () => { $("session").value = newSessionId(); render(); });
  $("start").addEventListener("click", () => {
    localStorage.setItem(TOKEN_KEY, $("token").value.trim());
    connect();
    start();
  });
  $("stop").addEventListener("click", stop);
  document.addEventListener("visibilitychange", () => { if (document.visibilityState === "hidden") flushOnHide(false); });
  document.addEventListener("freeze", () => { frozenAt = Date.now(); flushOnHide(true); });
  document.addEventListener("resume", onResume);
  window.addEventListener("pagehide", () => flushOnHide(true));
  // Closing or reloading while recording loses the chunk in progress: ask first.
  window.addEventListener("beforeunload", (e) => { if (ui.state !== "idle") { e.preventDefault(); e.returnValue = ""; } });
  setInterval(() => { $("level").style.width = `${Math.min(100, Math.sqrt(ui.level) * 100).toFixed(1)}%`; }, 100);
  connect();
  render();
  showStorage(true);
  document.body.dataset.ready = "true";
}

main().catch((err) => { warn(`The recorder could not start: ${err.message}`); });
