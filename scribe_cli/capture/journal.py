"""The crash-safe journal of the chunk being recorded.

Frames of the chunk in progress are appended as raw PCM to
``SCRIBE_HOME/journal/<session>/<seq>.pcm`` and fsynced at least once a
second, so a crash or power cut costs at most about a second of audio.  When
a chunk is complete it is encoded and committed to the spool, and only then
is its journal file removed.

A live journal is locked (``flock``) by the process recording into it.  The
next ``record`` or ``resume`` of a session whose journal is *not* locked (its
recorder died) turns the leftover frames into the session's final chunk.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scribe_cli.capture.encode import duration_ms, encode
from scribe_cli.spool import Spool, fsync_dir as _fsync_dir

SYNC_EVERY = 0.5  # seconds between fsyncs of the journal (the loss bound is about this)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Journal:
    """The journal of one recording session, held (locked) by its recorder."""

    def __init__(self, root: Path, session: str, rate: int, channels: int, fmt: str):
        self.dir = Path(root) / session
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.dir / "lock", "a")
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.session, self.rate, self.channels, self.fmt = session, rate, channels, fmt
        _write_atomic(self.dir / "header.json",
                      json.dumps({"rate": rate, "channels": channels, "format": fmt, "created": time.time()}))
        self._fd: int | None = None
        self._seq: int | None = None
        self._last_sync = time.monotonic()

    def begin(self, seq: int) -> None:
        """Start journaling chunk ``seq``."""
        self._seq = seq
        self._fd = os.open(self.dir / f"{seq:010d}.pcm", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _fsync_dir(self.dir)

    def append(self, frames: np.ndarray) -> None:
        """Append int16 frames; fsync when the last fsync is older than SYNC_EVERY."""
        data = np.ascontiguousarray(frames, dtype=np.int16).tobytes()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        if time.monotonic() - self._last_sync >= SYNC_EVERY:
            self.sync()

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
        self._last_sync = time.monotonic()

    def complete(self) -> None:
        """The current chunk is in the spool: drop its journal file."""
        if self._fd is not None:
            os.close(self._fd)
            os.unlink(self.dir / f"{self._seq:010d}.pcm")
            _fsync_dir(self.dir)
        self._fd, self._seq = None, None

    def close(self) -> None:
        """A clean end: nothing is left to recover."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for path in self.dir.glob("*"):
            path.unlink(missing_ok=True)
        self.dir.rmdir()
        self._lock.close()


@dataclass
class Recovered:
    session: str
    seq: int
    frames: int
    duration_ms: int


def recover_session(journal_root: Path, spool: Spool, session: str) -> Recovered | None:
    """Turn an abandoned journal of ``session`` into its final chunk in the spool.

    Returns None when there is no journal, or when a live recorder holds it.
    """
    directory = Path(journal_root) / session
    if not (directory / "header.json").exists():
        return None
    with open(directory / "lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # a recorder is writing it right now
        header = json.loads((directory / "header.json").read_text())
        result = None
        final_seq = None
        for path in sorted(directory.glob("*.pcm")):
            seq = int(path.stem)
            raw = path.read_bytes()
            frame_bytes = 2 * header["channels"]
            usable = len(raw) - len(raw) % frame_bytes
            frames = np.frombuffer(raw[:usable], dtype=np.int16).reshape(-1, header["channels"])
            if len(frames):
                known = {m.seq for m in spool.chunks(session)}
                if seq not in known:
                    audio, mime = encode(frames, header["rate"], header["format"])
                    spool.add(session, seq, audio, mime, duration_ms(frames, header["rate"]))
                result = Recovered(session, seq, len(frames), duration_ms(frames, header["rate"]))
                final_seq = seq
            elif final_seq is None:
                final_seq = seq - 1
        if final_seq is not None and final_seq >= 0:
            spool.set_final_seq(session, final_seq)
        for path in directory.glob("*"):
            if path.name != "lock":
                path.unlink(missing_ok=True)
        (directory / "lock").unlink(missing_ok=True)
    directory.rmdir()
    return result


def abandoned_sessions(journal_root: Path) -> list[str]:
    root = Path(journal_root)
    return sorted(p.name for p in root.iterdir() if (p / "header.json").exists()) if root.exists() else []
