// The browser's durable chunk queue, in IndexedDB.
//
// store "chunks":   {sessionId, sequence, audio (ArrayBuffer), checksum, size,
//                    mimeType, durationMs, timestamp, failed?}  key [sessionId, sequence]
// store "sessions": {sessionId, nextSeq, lastSeq?, finished?}   key sessionId
//
// Every write is one transaction with strict durability (flushed to disk
// before `complete` fires); a chunk is handed to the uploader only after its
// transaction completed, and deleted only after the server's ok ack.

const DB_NAME = "scribe-recorder";

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function done(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error || new DOMException("transaction aborted", "AbortError"));
  });
}

export class ChunkQueue {
  static async open() {
    const req = indexedDB.open(DB_NAME, 1);
    req.onupgradeneeded = () => {
      const db = req.result;
      db.createObjectStore("chunks", { keyPath: ["sessionId", "sequence"] });
      db.createObjectStore("sessions", { keyPath: "sessionId" });
    };
    return new ChunkQueue(await request(req));
  }

  constructor(db) { this.db = db; }

  tx(stores, mode) {
    return this.db.transaction(stores, mode, mode === "readwrite" ? { durability: "strict" } : undefined);
  }

  /** Commit chunk + the session's next sequence number in one transaction. */
  async add(chunk) {
    const tx = this.tx(["chunks", "sessions"], "readwrite");
    const sessions = tx.objectStore("sessions");
    tx.objectStore("chunks").add(chunk);
    const s = (await request(sessions.get(chunk.sessionId))) || { sessionId: chunk.sessionId, nextSeq: 0 };
    s.nextSeq = Math.max(s.nextSeq, chunk.sequence + 1);
    sessions.put(s);
    await done(tx);
  }

  async remove(sessionId, sequence) {
    const tx = this.tx(["chunks"], "readwrite");
    tx.objectStore("chunks").delete([sessionId, sequence]);
    await done(tx);
  }

  async markFailed(sessionId, sequence, error) {
    const tx = this.tx(["chunks"], "readwrite");
    const store = tx.objectStore("chunks");
    const c = await request(store.get([sessionId, sequence]));
    if (c) { c.failed = error; store.put(c); }
    await done(tx);
  }

  async get(sessionId, sequence) {
    return request(this.tx(["chunks"], "readonly").objectStore("chunks").get([sessionId, sequence]));
  }

  /** Metadata (no audio) of every queued chunk, in (session, seq) order. */
  async list() {
    const out = [];
    const store = this.tx(["chunks"], "readonly").objectStore("chunks");
    await new Promise((resolve, reject) => {
      const req = store.openCursor();
      req.onerror = () => reject(req.error);
      req.onsuccess = () => {
        const cur = req.result;
        if (!cur) return resolve();
        const { audio, ...meta } = cur.value;
        out.push(meta);
        cur.continue();
      };
    });
    return out;
  }

  async session(sessionId) {
    return request(this.tx(["sessions"], "readonly").objectStore("sessions").get(sessionId));
  }

  async sessions() {
    return request(this.tx(["sessions"], "readonly").objectStore("sessions").getAll());
  }

  async putSession(s) {
    const tx = this.tx(["sessions"], "readwrite");
    tx.objectStore("sessions").put(s);
    await done(tx);
  }
}
