"""Recorder overhead: CPU of capture + encoding + spooling, and memory over a long recording.

1. CPU: a speech-like 16 kHz mono signal is fed through the recorder at 10x real time
   (an ArraySource standing in for PortAudio: same queue hand-off, same consumer thread),
   chunks encoded as FLAC and committed to a real spool with its journal.  Reported as
   CPU seconds per second of audio, i.e. the share of one core a real-time recording uses.
2. Memory: a one-hour recording fed as fast as the recorder takes it; the process's
   resident memory is sampled along the way.  Flat means no growth with length.

Usage: python bench/recorder.py [--cpu-seconds 120] [--memory-seconds 3600] [--smoke]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scribe_cli.capture.recorder import Recorder, RecordState  # noqa: E402
from scribe_cli.capture.sources import ArraySource, speech_like  # noqa: E402
from scribe_cli.spool import Spool  # noqa: E402

RATE = 16000


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class LoopSource(ArraySource):
    """Plays a 60-second signal in a loop for ``seconds`` (no hour-long array in memory)."""

    def __init__(self, seconds: float, speed: float):
        super().__init__(speech_like(RATE, 60), RATE, speed)
        self.total = int(seconds * RATE)

    def start(self, out) -> None:
        def play():
            started, sent = time.monotonic(), 0
            while sent < self.total and not self._stop.is_set():
                block = self.frames[sent % len(self.frames): sent % len(self.frames) + self.block]
                if self.speed:
                    delay = started + sent / self.rate / self.speed - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                elif out.qsize() > 50:  # as fast as the recorder takes it, without piling up
                    time.sleep(0.001)
                    continue
                out.put(block.copy())
                sent += len(block)

        self._thread = threading.Thread(target=play, daemon=True)
        self._thread.start()


def record(work: Path, seconds: float, speed: float, samples: list | None = None) -> float:
    """Record ``seconds`` of audio; return the CPU seconds used by the whole process."""
    with Spool(work / "spool") as spool:
        state = RecordState(f"bench-{int(speed)}-{int(seconds)}", RATE, 1)
        recorder = Recorder(spool, work / "journal", state, 10.0, "flac")
        if samples is not None:
            def sample():
                while recorder.error is None and state.frames < seconds * RATE:
                    samples.append((state.frames / RATE, rss_mib()))
                    time.sleep(0.5)
            threading.Thread(target=sample, daemon=True).start()
        before = resource.getrusage(resource.RUSAGE_SELF)
        recorder.run(LoopSource(seconds, speed), int(seconds * RATE))
        after = resource.getrusage(resource.RUSAGE_SELF)
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-seconds", type=float, default=120.0, help="seconds of audio for the CPU measure")
    parser.add_argument("--memory-seconds", type=float, default=3600.0, help="seconds of audio for the memory run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.cpu_seconds, args.memory_seconds, args.repeats = 10.0, 60.0, 1
    work = Path(tempfile.mkdtemp(prefix="scribe-rec-"))
    try:
        shares = []
        for r in range(args.repeats):
            cpu = record(work / f"cpu{r}", args.cpu_seconds, speed=10.0)
            shares.append(cpu / args.cpu_seconds)
        samples: list[tuple[float, float]] = []
        started = time.monotonic()
        record(work / "mem", args.memory_seconds, speed=0.0, samples=samples)
        wall = time.monotonic() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    share = float(np.median(shares))
    print(f"recorder overhead: 16 kHz mono, FLAC chunks of 10 s, fed at 10x real time, median of {args.repeats}")
    print(f"  CPU per second of audio: {share * 1000:.2f} ms = {share:.2%} of one core in real time (target < 2%)")
    if samples:
        points = [samples[int(i * (len(samples) - 1) / 4)] for i in range(5)]
        print(f"  memory over a {args.memory_seconds / 60:.0f}-minute recording (fed in {wall:.0f} s): "
              + ", ".join(f"{rss:.0f} MiB at {t / 60:.0f} min" for t, rss in points))
        print(f"  growth from 25% to 100% of the recording: {points[-1][1] - points[1][1]:+.1f} MiB")


if __name__ == "__main__":
    main()
