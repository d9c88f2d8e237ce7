"""Where frames come from: a PortAudio input (sounddevice), a generated
speech-like signal (demo, machines without a microphone), or a file.

A source pushes int16 blocks of shape (frames, channels) into a queue and
counts input overflows.  ``sounddevice`` is imported only here, inside
``MicSource``: every other command works without PortAudio.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np

from scribe_cli.errors import CaptureError, NoAudioDevice


def _sounddevice():
    try:
        import sounddevice
    except OSError:  # the PortAudio shared library is missing
        raise NoAudioDevice("PortAudio is not installed",
                            "apt-get install libportaudio2 (or use scribe watch FOLDER / scribe demo)") from None
    return sounddevice


def list_devices() -> list[dict]:
    """Input devices with their default sample rates."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        default_in = sd.default.device[0]
    except sd.PortAudioError as exc:
        raise NoAudioDevice(f"PortAudio cannot list devices: {exc}") from None
    return [
        {"index": i, "name": d["name"], "channels": d["max_input_channels"],
         "defaultRate": int(d["default_samplerate"]), "default": i == default_in}
        for i, d in enumerate(devices) if d["max_input_channels"] > 0
    ]


def has_input_device() -> bool:
    try:
        return bool(list_devices())
    except NoAudioDevice:
        return False


class MicSource:
    """A PortAudio input stream; the callback only copies frames and hands them off."""

    def __init__(self, device: int | str | None, rate: int, channels: int, block_seconds: float = 0.1):
        self.device, self.rate, self.channels = device, rate, channels
        self.blocksize = max(1, int(rate * block_seconds))
        self.overflows = 0
        self._stream = None

    def start(self, out: queue.Queue) -> None:
        sd = _sounddevice()

        def callback(indata, frames, time_info, status):  # PortAudio's thread: copy and hand off, nothing else
            if status.input_overflow:
                self.overflows += 1
            try:
                out.put_nowait(indata.copy())
            except queue.Full:  # the consumer is far behind: drop rather than grow without bound
                self.overflows += 1

        try:
            self._stream = sd.InputStream(device=self.device, samplerate=self.rate, channels=self.channels,
                                          dtype="int16", blocksize=self.blocksize, callback=callback)
            self._stream.start()
        except (sd.PortAudioError, ValueError) as exc:
            raise NoAudioDevice(f"cannot open the input device: {exc}",
                                "scribe devices lists inputs; pick one with --device, or check --rate/--channels") from None

    def stop(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None


def speech_like(rate: int, seconds: float, seed: int = 1) -> np.ndarray:
    """A deterministic speech-like signal: voiced syllables with pauses (int16, mono)."""
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    t = np.arange(n) / rate
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.3 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllables = np.clip(np.sin(2 * np.pi * 3.5 * t), 0, None) ** 2
    pauses = (np.sin(2 * np.pi * 0.25 * t + 1) > -0.6).astype(float)
    signal = voiced * syllables * pauses + 0.01 * rng.standard_normal(n)
    return (signal / np.max(np.abs(signal)) * 0.6 * 32767).astype(np.int16).reshape(-1, 1)


class ArraySource:
    """Plays frames from an array into the queue, paced at ``speed`` times real time
    (the demo's generated signal, and benchmarks fed from a file)."""

    def __init__(self, frames: np.ndarray, rate: int, speed: float = 1.0, block_seconds: float = 0.1):
        if frames.ndim != 2:
            raise CaptureError("frames must be 2-D (frames x channels)")
        self.frames, self.rate, self.channels, self.speed = frames, rate, frames.shape[1], speed
        self.block = max(1, int(rate * block_seconds))
        self.overflows = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, out: queue.Queue) -> None:
        def play():
            started = time.monotonic()
            for i, start in enumerate(range(0, len(self.frames), self.block)):
                if self._stop.is_set():
                    return
                if self.speed:
                    delay = started + i * self.block / self.rate / self.speed - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                block = self.frames[start : start + self.block].copy()
                while not self._stop.is_set():
                    try:
                        out.put(block, timeout=0.1)  # a full queue holds the player back (paced or not)
                        break
                    except queue.Full:
                        continue

        self._thread = threading.Thread(target=play, name="array-source", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
