// Uploads the queued chunks with the same protocol as `scribe`: one Socket.IO
// connection with the token as auth, a pipelined window of `audio-chunk`
// emits each answered by its own ack, `session-state` on every (re)connect to
// drop what the server already holds with the same checksum, `session-finish`
// once a recording's last sequence number is known.  Reconnects forever.

// The codes scribe_protocol calls transient (tests/test_integration_seams.py keeps them equal).
const TRANSIENT = new Set(["too_many_in_flight", "server_busy", "storage_unavailable", "internal"]);
const ACK_TIMEOUT_MS = 30000;
const STATE_BATCH = 5000;

export class Uploader {
  /** `onChange()` is called whenever a counter or the connection state changed. */
  constructor(queue, onChange, onLog) {
    this.queue = queue;
    this.onChange = onChange;
    this.log = onLog;
    this.window = 8;
    this.waiting = new Map();   // "session:seq" -> meta, not yet sent on this connection
    this.inFlight = new Map();  // key -> meta sent on this connection, ack not yet in
    this.failed = new Map();    // key -> error (permanent refusal; kept in IndexedDB)
    this.acked = 0;
    this.connected = false;
    this.generation = 0;
    this.socket = null;
    this.resuming = null;   // generation whose session-state replies are awaited
    this.lastError = "";
  }

  static key(sessionId, seq) { return `${sessionId}:${seq}`; }

  get pending() { return this.waiting.size + this.inFlight.size + this.failed.size; }

  /** Load what an earlier visit left in IndexedDB; returns how many chunks wait. */
  async restore() {
    for (const meta of await this.queue.list()) {
      const key = Uploader.key(meta.sessionId, meta.sequence);
      if (meta.failed) this.failed.set(key, meta.failed); else this.waiting.set(key, meta);
    }
    this.onChange();
    return this.pending;
  }

  /** A chunk whose IndexedDB transaction completed. */
  enqueue(meta) {
    this.waiting.set(Uploader.key(meta.sessionId, meta.sequence), meta);
    this.onChange();
    this.pump();
  }

  start(getToken) {
    if (this.socket) return;
    let delay = 500;
    // The token travels in the Socket.IO CONNECT packet (auth), never in a URL.
    const socket = io({
      transports: ["websocket"],
      auth: (cb) => cb({ token: getToken() }),
      reconnection: true,
      reconnectionAttempts: Infinity,
      reconnectionDelay: 500,
      reconnectionDelayMax: 5000,
      randomizationFactor: 0.3,
    });
    this.socket = socket;
    socket.on("connect", () => {
      delay = 500;
      this.connected = true;
      this.lastError = "";
      this.generation++;
      this.requeueInFlight();
      this.onChange();
      const gen = this.generation;
      this.resume(gen).catch((e) => {
        this.log(`resume: ${e.message || e}`);
        if (gen === this.generation) this.pump(); // send anyway: duplicates are acknowledged as such
      });
    });
    socket.on("disconnect", (reason) => {
      this.connected = false;
      this.generation++;
      this.requeueInFlight();
      this.onChange();
      this.log(`disconnected (${reason}); will reconnect`);
      // A server-side disconnect is not retried by socket.io-client itself.
      if (reason === "io server disconnect") this.retryLater(delay);
    });
    socket.on("connect_error", (err) => {
      this.connected = false;
      this.lastError = err && err.data && err.data.code === "unauthorized"
        ? "the server refused the token" : `cannot connect (${err.message})`;
      this.onChange();
      // A refusal by the server (bad token, busy) stops socket.io's own
      // reconnection; keep trying with back-off, so a fixed token works.
      if (!socket.active) this.retryLater(delay);
      delay = Math.min(delay * 2, 10000);
    });
  }

  /** Connect again after `ms` unless something else did meanwhile: one CONNECT at a time. */
  retryLater(ms) {
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => { if (!this.socket.active) this.socket.connect(); }, ms);
  }

  /** Drop the connection and connect again now (the token changed). */
  reconnect() {
    if (!this.socket) return;
    clearTimeout(this.retryTimer);
    this.socket.disconnect();
    this.socket.connect();
  }

  requeueInFlight() {
    for (const [key, meta] of this.inFlight) this.waiting.set(key, meta);
    this.inFlight.clear();
  }

  call(event, payload, timeout = ACK_TIMEOUT_MS) {
    return new Promise((resolve, reject) => {
      this.socket.timeout(timeout).emit(event, payload, (err, reply) => (err ? reject(err) : resolve(reply)));
    });
  }

  /** After a (re)connect: skip what the server holds, send what it lacks, finish sessions. */
  async resume(gen) {
    // Nothing is sent until the server said what it holds: no needless duplicates.
    this.resuming = gen;
    try {
      await this.skipHeld(gen);
    } finally {
      if (this.resuming === gen) this.resuming = null;
    }
    this.pump();
    await this.finishSessions(gen);
  }

  async skipHeld(gen) {
    const bySession = new Map();
    for (const meta of this.waiting.values()) {
      if (!bySession.has(meta.sessionId)) bySession.set(meta.sessionId, []);
      bySession.get(meta.sessionId).push(meta);
    }
    for (const [sessionId, metas] of bySession) {
      for (let i = 0; i < metas.length; i += STATE_BATCH) {
        const part = metas.slice(i, i + STATE_BATCH);
        const reply = await this.call("session-state", { sessionId, seqs: part.map((m) => m.sequence) }, 10000);
        if (gen !== this.generation) return;
        if (!reply.ok) continue;
        const local = new Map(part.map((m) => [m.sequence, m]));
        let skipped = 0;
        for (const [seq, sha] of reply.held || []) {
          const meta = local.get(seq);
          if (meta && meta.checksum === sha) { await this.settled(meta); skipped++; }
        }
        if (skipped) this.log(`${sessionId}: the server already held ${skipped} queued chunk(s); not resent`);
      }
    }
  }

  async finishSessions(gen) {
    for (const s of await this.queue.sessions()) {
      if (gen !== this.generation || !this.connected) return;
      if (s.lastSeq === undefined || s.lastSeq < 0 || s.finished) continue;
      const reply = await this.call("session-finish", { sessionId: s.sessionId, lastSeq: s.lastSeq });
      if (reply.ok) {
        s.finished = true;
        await this.queue.putSession(s);
        this.log(`${s.sessionId}: finished at chunk ${s.lastSeq}`);
      } else if (!TRANSIENT.has(reply.error.code)) {
        s.finished = true;
        s.finishError = reply.error.message;
        await this.queue.putSession(s);
        this.log(`${s.sessionId}: the server refused the finish: ${reply.error.message}`);
      }
    }
    this.onChange();
  }

  async settled(meta) {
    const key = Uploader.key(meta.sessionId, meta.sequence);
    await this.queue.remove(meta.sessionId, meta.sequence);
    if (this.waiting.delete(key) || this.inFlight.delete(key)) this.acked++;
    this.onChange();
  }

  pump() {
    if (!this.connected || this.resuming === this.generation) return;
    const gen = this.generation;
    for (const [key, meta] of this.waiting) {
      if (this.inFlight.size >= this.window) break;
      this.waiting.delete(key);
      this.inFlight.set(key, meta);
      this.send(key, meta, gen);
    }
  }

  async send(key, meta, gen) {
    let reply;
    try {
      const chunk = await this.queue.get(meta.sessionId, meta.sequence);
      if (!chunk) { this.inFlight.delete(key); this.onChange(); return; }
      if (gen !== this.generation) return;
      const { failed, ...payload } = chunk;
      reply = await this.call("audio-chunk", payload);
    } catch (err) {
      // No reply in time, or the connection went: send again later (a
      // duplicate is acknowledged as such and stored once).
      if (gen === this.generation && this.inFlight.delete(key)) {
        this.waiting.set(key, meta);
        setTimeout(() => this.pump(), 1000);
      }
      return;
    }
    if (reply.ok) {
      await this.settled(meta);
    } else if (TRANSIENT.has(reply.error.code)) {
      this.inFlight.delete(key);
      this.waiting.set(key, meta);
      setTimeout(() => this.pump(), 1000);
    } else {
      this.inFlight.delete(key);
      this.failed.set(key, reply.error);
      await this.queue.markFailed(meta.sessionId, meta.sequence, reply.error);
      this.log(`chunk ${meta.sequence} of ${meta.sessionId} refused: ${reply.error.message} (kept in this browser)`);
    }
    this.onChange();
    this.pump();
  }
}
