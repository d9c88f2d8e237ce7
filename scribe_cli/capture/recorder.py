"""The recorder: frames from a source -> journal -> encoded chunks in the spool.

Thread model: the source (PortAudio's callback thread, or a player thread)
only copies blocks into a queue.  One consumer thread appends them to the
journal (fsynced at least every ``SYNC_EVERY`` seconds), cuts them into
chunks, encodes each chunk and commits it to the spool.  Memory holds at
most one chunk of frames plus ``QUEUED_BLOCKS`` blocks waiting in the queue,
whatever the length of the recording: a source that delivers faster than the
consumer can take (a slow disk, a device not paced like a microphone) drops
blocks and counts them as overflows instead of growing the queue until the
kernel kills the process, and a stop request then has at most that much to
commit before it ends.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from scribe_cli.capture.encode import duration_ms, encode
from scribe_cli.capture.journal import Journal
from scribe_cli.spool import Spool, spool_error

#: Blocks (0.1 s each from the sources here) that may wait between the source and the consumer.
QUEUED_BLOCKS = 300


@dataclass
class RecordState:
    """What the live display shows; updated from the consumer and the uploader."""

    session: str
    rate: int
    channels: int
    started: float = field(default_factory=time.monotonic)
    frames: int = 0
    level: float = 0.0  # peak of the last block, 0..1
    captured: int = 0
    captured_bytes: int = 0
    acked: int = 0
    failed: int = 0
    connection: str = "offline"
    overflows: int = 0
    last_seq: int = -1
    error: str | None = None

    @property
    def elapsed(self) -> float:
        return self.frames / self.rate

    def to_json(self) -> dict:
        return {"session": self.session, "elapsed": round(self.elapsed, 2), "level": round(self.level, 3),
                "captured": self.captured, "acked": self.acked, "pending": self.captured - self.acked,
                "failed": self.failed, "connection": self.connection, "overflows": self.overflows}


class Recorder:
    """Cuts a stream of int16 blocks into chunks; see the module docstring."""

    def __init__(self, spool: Spool, journal_root: Path, state: RecordState, chunk_seconds: float, fmt: str,
                 first_seq: int = 0, on_chunk: Callable[[int], None] | None = None,
                 on_event: Callable[[str, dict], None] | None = None):
        self.spool, self.state, self.fmt = spool, state, fmt
        self.chunk_frames = max(1, int(round(state.rate * chunk_seconds)))
        self.seq = first_seq
        self.on_chunk = on_chunk or (lambda seq: None)
        self.on_event = on_event or (lambda kind, data: None)
        self.blocks: queue.Queue = queue.Queue(maxsize=QUEUED_BLOCKS)
        self.journal = Journal(journal_root, state.session, state.rate, state.channels, fmt)
        self._buffer: list[np.ndarray] = []
        self._filled = 0
        self._stop = threading.Event()
        self.error: BaseException | None = None

    def stop(self) -> None:
        """Finish the current chunk and end (from any thread)."""
        self._stop.set()

    def run(self, source, max_frames: int | None = None) -> None:
        """Record until ``stop()`` or ``max_frames``; then commit the partial chunk
        and record the session's last seq.  Runs in the calling thread."""
        self.journal.begin(self.seq)
        try:
            source.start(self.blocks)
        except BaseException:
            self.journal.close()  # nothing was recorded: leave nothing to recover
            raise
        limit_reached = False
        try:
            while not self._stop.is_set():
                try:
                    block = self.blocks.get(timeout=0.2)
                except queue.Empty:
                    continue
                self.state.overflows = source.overflows
                if max_frames is not None and self.state.frames + len(block) >= max_frames:
                    self._take(block[: max_frames - self.state.frames])
                    limit_reached = True
                    break
                self._take(block)
            source.stop()
            self._finish(drain_queue=not limit_reached)
        except BaseException as exc:
            self.error = exc
            source.stop()
            if isinstance(exc, (OSError, sqlite3.Error)):
                raise spool_error(exc, "record") from None  # disk full: stop with what is spooled intact
            raise

    def _take(self, block: np.ndarray) -> None:
        if len(block) == 0:
            return
        self.state.level = float(np.abs(block).max()) / 32768.0
        self.state.frames += len(block)
        while len(block):
            room = self.chunk_frames - self._filled
            part, block = block[:room], block[room:]
            self.journal.append(part)
            self._buffer.append(part)
            self._filled += len(part)
            if self._filled == self.chunk_frames:
                self._commit()
                self.journal.begin(self.seq)

    def _commit(self) -> None:
        """Encode the buffered frames into chunk ``seq`` and commit it to the spool."""
        frames = np.concatenate(self._buffer)
        self.journal.sync()
        audio, mime = encode(frames, self.state.rate, self.fmt)
        self.spool.add(self.state.session, self.seq, audio, mime, duration_ms(frames, self.state.rate),
                       timestamp=time.time() * 1000)
        self.journal.complete()
        self.state.captured += 1
        self.state.captured_bytes += len(audio)
        self.state.last_seq = self.seq
        self.on_event("captured", {"seq": self.seq, "bytes": len(audio), "frames": len(frames)})
        self.on_chunk(self.seq)
        self._buffer, self._filled = [], 0
        self.seq += 1

    def _finish(self, drain_queue: bool) -> None:
        while drain_queue:  # blocks already handed off belong to the recording
            try:
                self._take(self.blocks.get_nowait())
            except queue.Empty:
                break
        if self._filled:
            self._commit()
        if self.state.last_seq >= 0:
            self.spool.set_final_seq(self.state.session, self.state.last_seq)
        self.journal.close()
        self.on_chunk(self.state.last_seq)
