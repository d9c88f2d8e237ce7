// Microphone capture, cut into chunks like `scribe record`: a fixed number of
// frames per chunk (the last one shorter), sequence numbers from 0, each chunk
// a standalone file.  Lossless by default (16-bit PCM WAV from an
// AudioWorklet); optionally Opus in WebM from MediaRecorder (one recorder per
// chunk, so every chunk decodes on its own; lossy).

export const CONSTRAINTS = {
  audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
};

export function wavFile(pcm, rate, channels) {
  const data = pcm.byteLength;
  const buf = new ArrayBuffer(44 + data);
  const v = new DataView(buf);
  const text = (off, s) => { for (let i = 0; i < s.length; i++) v.setUint8(off + i, s.charCodeAt(i)); };
  text(0, "RIFF"); v.setUint32(4, 36 + data, true); text(8, "WAVE");
  text(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, channels, true);
  v.setUint32(24, rate, true); v.setUint32(28, rate * channels * 2, true);
  v.setUint16(32, channels * 2, true); v.setUint16(34, 16, true);
  text(36, "data"); v.setUint32(40, data, true);
  new Uint8Array(buf, 44).set(new Uint8Array(pcm.buffer, pcm.byteOffset, data));
  return buf;
}

/**
 * PCM capture.  `onChunk({audio, mimeType, frames, durationMs})` gets every
 * chunk (awaited in order), `onLevel(0..1)` the peak of each batch.
 */
export class PcmCapture {
  constructor({ chunkSeconds, onChunk, onLevel }) {
    this.chunkSeconds = chunkSeconds;
    this.onChunk = onChunk;
    this.onLevel = onLevel;
    this.parts = [];
    this.frames = 0;
    this.chain = Promise.resolve();
  }

  async start() {
    this.stream = await navigator.mediaDevices.getUserMedia(CONSTRAINTS);
    const track = this.stream.getAudioTracks()[0];
    const settings = track.getSettings();
    this.channels = Math.min(2, settings.channelCount || 1);
    // A context at the track's own rate: no resampling between microphone and file.
    this.ctx = settings.sampleRate ? new AudioContext({ sampleRate: settings.sampleRate }) : new AudioContext();
    this.rate = this.ctx.sampleRate;
    this.chunkFrames = Math.max(1, Math.round(this.rate * this.chunkSeconds));
    await this.ctx.audioWorklet.addModule("/static/worklet.js");
    this.source = this.ctx.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.ctx, "scribe-capture", {
      numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
      channelCount: this.channels, channelCountMode: "explicit", channelInterpretation: "discrete",
      processorOptions: { channels: this.channels, batchFrames: 2048 },
    });
    this.node.port.onmessage = (e) => this.onMessage(e.data);
    // The node outputs silence; connecting it keeps the graph pulling it.
    this.mute = new GainNode(this.ctx, { gain: 0 });
    this.source.connect(this.node).connect(this.mute).connect(this.ctx.destination);
    await this.ctx.resume();
    this.label = `${this.rate} Hz, ${this.channels} channel(s), 16-bit WAV`;
  }

  onMessage(msg) {
    if (msg.flushed) { if (this.flushWaiter) this.flushWaiter(); return; }
    this.onLevel(msg.peak / 32768);
    let pcm = msg.pcm;
    while (pcm.length) {
      const room = (this.chunkFrames - this.frames) * this.channels;
      const part = pcm.subarray(0, room);
      pcm = pcm.subarray(part.length);
      this.parts.push(part);
      this.frames += part.length / this.channels;
      if (this.frames === this.chunkFrames) this.cut();
    }
  }

  /** Close the chunk in progress (also used on hide/freeze so nothing waits in memory). */
  cut() {
    if (this.frames === 0) return this.chain;
    const total = this.parts.reduce((n, p) => n + p.length, 0);
    const pcm = new Int16Array(total);
    let off = 0;
    for (const p of this.parts) { pcm.set(p, off); off += p.length; }
    const frames = this.frames;
    this.parts = [];
    this.frames = 0;
    const chunk = {
      audio: wavFile(pcm, this.rate, this.channels), mimeType: "audio/wav", frames,
      durationMs: Math.round((frames * 1000) / this.rate),
    };
    this.chain = this.chain.then(() => this.onChunk(chunk));
    return this.chain;
  }

  /** Move what the worklet holds to the page, then close the chunk in progress. */
  async flush() {
    if (!this.node) return;
    await new Promise((resolve) => { this.flushWaiter = resolve; this.node.port.postMessage("flush"); });
    await this.cut();
  }

  async stop() {
    await this.flush();
    this.source.disconnect();
    this.node.disconnect();
    this.node.port.onmessage = null;
    this.node = null;
    this.stream.getTracks().forEach((t) => t.stop());
    await this.ctx.close();
  }
}

/** Opus capture: one MediaRecorder per chunk, so each chunk is a whole WebM file. */
export class OpusCapture {
  constructor({ chunkSeconds, onChunk, onLevel }) {
    Object.assign(this, { chunkSeconds, onChunk, onLevel });
    this.chain = Promise.resolve();
    this.mimeType = "audio/webm;codecs=opus";
  }

  static supported() {
    return typeof MediaRecorder !== "undefined" && MediaRecorder.isTypeSupported("audio/webm;codecs=opus");
  }

  async start() {
    this.stream = await navigator.mediaDevices.getUserMedia(CONSTRAINTS);
    this.ctx = new AudioContext();
    const analyser = new AnalyserNode(this.ctx, { fftSize: 2048 });
    this.ctx.createMediaStreamSource(this.stream).connect(analyser);
    const buf = new Float32Array(analyser.fftSize);
    this.meter = setInterval(() => {
      analyser.getFloatTimeDomainData(buf);
      this.onLevel(buf.reduce((m, x) => Math.max(m, Math.abs(x)), 0));
    }, 100);
    this.running = true;
    this.next();
    this.label = "Opus in WebM (lossy)";
  }

  next() {
    const rec = new MediaRecorder(this.stream, { mimeType: this.mimeType, audioBitsPerSecond: 64000 });
    const started = performance.now();
    const blobs = [];
    rec.ondataavailable = (e) => { if (e.data.size) blobs.push(e.data); };
    rec.done = new Promise((resolve) => {
      rec.onstop = () => {
        const durationMs = Math.round(performance.now() - started);
        const blob = new Blob(blobs, { type: this.mimeType });
        this.chain = this.chain.then(async () => {
          if (blob.size) await this.onChunk({ audio: await blob.arrayBuffer(), mimeType: this.mimeType, durationMs });
        });
        resolve();
      };
    });
    rec.start();
    this.rec = rec;
    this.timer = setTimeout(() => this.cut(), this.chunkSeconds * 1000);
  }

  cut() {
    clearTimeout(this.timer);
    const rec = this.rec;
    if (!rec || rec.state === "inactive") return this.chain;
    rec.stop();
    if (this.running) this.next();
    return rec.done.then(() => this.chain);
  }

  async flush() { await this.cut(); }

  async stop() {
    this.running = false;
    await this.cut();
    clearInterval(this.meter);
    this.stream.getTracks().forEach((t) => t.stop());
    await this.ctx.close();
  }
}
