// AudioWorklet processor: turns the microphone's float samples back into the
// 16-bit integers they came from and posts them to the page in batches.
// Chromium delivers 16-bit input as int/32768 (negative) and int/32767
// (positive); inverting exactly that mapping makes the capture lossless.
class ScribeCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.channels = options.processorOptions.channels;
    this.batch = options.processorOptions.batchFrames;
    this.buf = new Int16Array(this.batch * this.channels);
    this.filled = 0;
    this.peak = 0;
    this.port.onmessage = (e) => {
      if (e.data === "flush") { this.post(); this.port.postMessage({ flushed: true }); }
    };
  }

  post() {
    if (this.filled === 0) return;
    const out = this.buf.slice(0, this.filled * this.channels);
    this.port.postMessage({ pcm: out, frames: this.filled, peak: this.peak }, [out.buffer]);
    this.filled = 0;
    this.peak = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const n = input[0].length;
    for (let i = 0; i < n; i++) {
      for (let c = 0; c < this.channels; c++) {
        const ch = input[Math.min(c, input.length - 1)];
        let x = ch[i];
        if (x > 1) x = 1; else if (x < -1) x = -1;
        const v = x < 0 ? Math.round(x * 32768) : Math.round(x * 32767);
        this.buf[this.filled * this.channels + c] = v;
        const a = v < 0 ? -v : v;
        if (a > this.peak) this.peak = a;
      }
      this.filled++;
      if (this.filled === this.batch) this.post();
    }
    return true;
  }
}

registerProcessor("scribe-capture", ScribeCapture);
