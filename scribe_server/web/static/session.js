// The session view: one mark per chunk (stored / missing), gap ranges,
// duration, file manifest, the export in an audio player; live via session-follow.
const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "scribe.token";
const sessionId = decodeURIComponent(location.pathname.split("/").pop());
let token = localStorage.getItem(TOKEN_KEY) || "";
let refreshTimer = null, audioUrl = null;

function fail(text) { $("error").hidden = !text; $("error").textContent = text || ""; }

async function api(path) {
  const res = await fetch(path, { headers: { Authorization: `Bearer ${token}` } });
  if (!res.ok) {
    let msg = `${res.status}`;
    try { msg = (await res.json()).error.message; } catch (e) { /* not JSON */ }
    const err = new Error(msg);
    err.status = res.status;
    throw err;
  }
  return res;
}

function fmtDuration(ms) {
  const s = Math.round(ms / 1000);
  return `${Math.floor(s / 3600)}:${String(Math.floor(s / 60) % 60).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
}

function render(data) {
  const stored = new Set(data.chunks.map((c) => c.sequence));
  const last = Math.max(data.maxSeq, data.finalSeq ?? -1);
  const marks = $("marks");
  marks.replaceChildren();
  const limit = Math.min(last, 20000);
  for (let seq = 0; seq <= limit; seq++) {
    const m = document.createElement("span");
    m.className = `mark ${stored.has(seq) ? "stored" : "missing"}`;
    m.title = `chunk ${seq}: ${stored.has(seq) ? "stored" : "missing"}`;
    marks.append(m);
  }
  const summary = $("summary");
  summary.dataset.loaded = "true";
  summary.dataset.stored = data.totalChunks;
  summary.dataset.missing = data.missingCount;
  summary.dataset.complete = String(data.complete);
  $("stored-text").textContent = `${data.totalChunks}`;
  $("missing-text").textContent = `${data.missingCount}`;
  $("gaps-text").textContent = data.ranges.length
    ? data.ranges.map(([a, b]) => (a === b ? `${a}` : `${a}–${b}`)).join(", ") : "none";
  const ms = data.chunks.reduce((n, c) => n + (c.durationMs || 0), 0);
  $("duration-text").textContent = fmtDuration(ms);
  const bytes = data.chunks.reduce((n, c) => n + c.size, 0);
  $("size-text").textContent = `${(bytes / 1024 / 1024).toFixed(2)} MB`;
  $("final-text").textContent = data.finalSeq === null ? "not yet" : `yes, last chunk ${data.finalSeq}`;
  const badge = $("badge");
  badge.className = `badge ${data.complete ? "complete" : data.missingCount ? "gaps" : "open"}`;
  badge.textContent = data.complete ? "complete" : data.missingCount ? "gaps" : "open";
  renderFiles(data.files);
}

function fileDetails(f) {
  // One line per part: the audio format, when and what, then the parsed headers (bext, iXML, INFO, GUANO, tags).
  const parts = [];
  if (f.sampleRate) parts.push(`${f.sampleRate} Hz × ${f.channels}, ${f.sampleFormat || "?"}`);
  if (f.frames && f.sampleRate) parts.push(`duration ${fmtDuration((f.frames / f.sampleRate) * 1000)}`);
  if (f.startTime) parts.push(`recorded ${f.startTime}`);
  if (f.sha256) parts.push(`sha256 ${f.sha256.slice(0, 12)}…`);
  for (const [k, v] of Object.entries(f.metadata || {})) parts.push(`${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`);
  for (const w of f.warnings || []) parts.push(`warning: ${w}`);
  return parts.join(" · ");
}

function renderFiles(files) {
  // `files` of GET /api/sessions/{id}: the latest version of each watched file (docs/protocol.md).
  $("files-card").hidden = !Array.isArray(files) || files.length === 0;
  if ($("files-card").hidden) return;
  const rows = files.map((f) => {
    const tr = document.createElement("tr");
    tr.dataset.path = f.path;
    const size = `${(f.size / 1024 / 1024).toFixed(2)} MB${f.version > 1 ? `, version ${f.version}` : ""}`;
    for (const text of [f.path, size, fileDetails(f)]) {
      const td = document.createElement("td"); td.textContent = text; tr.append(td);
    }
    return tr;
  });
  $("files").replaceChildren(...rows);
}

async function refresh() {
  try {
    const data = await (await api(`/api/sessions/${encodeURIComponent(sessionId)}`)).json();
    fail("");
    render(data);
  } catch (err) {
    if (err.status === 401) { $("token-card").hidden = false; fail("The server refused the token."); }
    else fail(err.status === 404 ? `No session ${sessionId} for this token (yet).` : `Cannot load: ${err.message}`);
  }
}

function scheduleRefresh() {
  if (!refreshTimer) refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 300);
}

async function loadAudio() {
  // <audio src> cannot send the Authorization header: fetch into a blob instead.
  $("load-audio").disabled = true;
  try {
    const blob = await (await api(`/api/sessions/${encodeURIComponent(sessionId)}/audio?format=wav&allowGaps=1`)).blob();
    if (audioUrl) URL.revokeObjectURL(audioUrl);
    audioUrl = URL.createObjectURL(blob);
    $("player").src = audioUrl;
    $("player").dataset.bytes = blob.size;
  } catch (err) {
    fail(`Cannot load the audio: ${err.message}`);
  } finally {
    $("load-audio").disabled = false;
  }
}

let socket = null;
function follow() {
  if (socket) { socket.disconnect(); socket.connect(); return; } // the token changed
  socket = io({ transports: ["websocket"], auth: (cb) => cb({ token }), reconnectionDelayMax: 5000 });
  const live = (on) => { $("summary").dataset.live = String(on); $("live-text").textContent = on ? "following new chunks" : "not connected"; };
  socket.on("connect", () => {
    const join = () => socket.timeout(10000).emit("session-follow", { sessionId }, (err, reply) => {
      const ok = !err && reply && reply.ok;
      live(ok);
      scheduleRefresh();
      // Not there yet (no chunk stored) or no reply: ask again while connected.
      if (!ok && socket.connected) setTimeout(() => { if (socket.connected) join(); }, 3000);
    });
    join();
  });
  socket.on("disconnect", () => live(false));
  socket.on("connect_error", () => {
    live(false);
    if (!socket.active) setTimeout(() => { if (!socket.active) socket.connect(); }, 3000);
  });
  socket.on("chunk-stored", (ev) => { if (ev.sessionId === sessionId) scheduleRefresh(); });
}

function main() {
  $("session-name").textContent = sessionId;
  document.title = `scribe · ${sessionId}`;
  $("load-audio").addEventListener("click", loadAudio);
  $("use-token").addEventListener("click", () => {
    token = $("token").value.trim();
    localStorage.setItem(TOKEN_KEY, token);
    $("token-card").hidden = true;
    refresh();
    follow();
  });
  if (!token) { $("token-card").hidden = false; return; }
  refresh();
  follow();
}

main();
