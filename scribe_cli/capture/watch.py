"""Tailing a folder that a field recorder writes into.

A file is taken only when it is complete: its size and mtime have not
changed for ``settle`` seconds, its name is not a temporary one (dotfiles,
``.part``, ``.tmp``, ...), and it is unchanged again after it was read.  It
is decoded with soundfile, cut into chunks (lossless by default) and
committed to the spool together with a ledger entry (path, size, mtime,
content hash) in one transaction, so a restart neither skips nor re-spools a
file.  Unsupported or corrupt files are reported and remembered as rejected
until they change; they never stop the watcher.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import soundfile as sf

from scribe_cli.capture.encode import duration_ms, encode
from scribe_cli.spool import Spool, spool_error

TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".swp", "~")
#: source subtype -> (dtype read, subtype written): integer PCM is kept sample for sample
#: (8-bit widened to 16); anything else (float, lossy codecs) is written as float WAV.
_KEEP = {"PCM_16": ("int16", "PCM_16"), "PCM_24": ("int32", "PCM_24"), "PCM_32": ("int32", "PCM_32"),
         "PCM_S8": ("int16", "PCM_16"), "PCM_U8": ("int16", "PCM_16")}

Listener = Callable[[str, dict], None]


class _Stopped(Exception):
    """A stop request arrived while a file was being cut."""


def is_candidate(path: Path) -> bool:
    name = path.name
    return path.is_file() and not name.startswith(".") and not name.lower().endswith(TEMP_SUFFIXES)


def session_for_file(path: Path, digest: str) -> str:
    """A stable session id for one file: its sanitized stem plus 8 hex of its content hash."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-._")[:50] or "file"
    if not stem[0].isalnum():
        stem = "f" + stem
    return f"{stem}-{digest[:8]}"


@dataclass
class Taken:
    path: str
    session: str
    first_seq: int
    chunks: int
    frames: int


class FolderWatcher:
    """Takes complete audio files from ``folder`` into the spool; see the module docstring."""

    def __init__(self, spool: Spool, folder: Path, chunk_seconds: float = 10.0, fmt: str = "flac",
                 session: str | None = None, settle: float = 2.0, listener: Listener | None = None,
                 on_chunk: Callable[[], None] | None = None):
        self.spool, self.folder = spool, Path(folder)
        self.chunk_seconds, self.fmt, self.session, self.settle = chunk_seconds, fmt, session, settle
        self.listener = listener or (lambda kind, data: None)
        self.on_chunk = on_chunk or (lambda: None)
        self._seen: dict[str, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, unchanged since)
        self.stop_event = threading.Event()
        self.taken: list[Taken] = []
        self.rejected: list[dict] = []

    # the ledger -----------------------------------------------------------------
    @staticmethod
    def _ledger_key(path: Path) -> str:
        return "w/" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()

    def _ledger(self, path: Path) -> dict | None:
        raw = self.spool.cache.get(self._ledger_key(path))
        return json.loads(raw) if raw else None

    def _known(self, path: Path, size: int, mtime_ns: int) -> bool:
        entry = self._ledger(path)
        return entry is not None and entry["size"] == size and entry["mtime_ns"] == mtime_ns

    # scanning -------------------------------------------------------------------
    def ready(self) -> list[Path]:
        """Complete files not taken yet, in name order."""
        now = time.monotonic()
        ready = []
        for path in sorted(self.folder.iterdir(), key=lambda p: p.name):
            if not is_candidate(path):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            key = str(path)
            size_mtime = (st.st_size, st.st_mtime_ns)
            previous = self._seen.get(key)
            if previous is None or previous[:2] != size_mtime:
                self._seen[key] = (*size_mtime, now)
                continue
            if now - previous[2] >= self.settle and st.st_size > 0 and not self._known(path, *size_mtime):
                ready.append(path)
        return ready

    def scan_once(self) -> int:
        """Take every ready file; return how many were taken or rejected."""
        count = 0
        for path in self.ready():
            if self.stop_event.is_set():
                break
            self.take(path)
            count += 1
        return count

    def run(self, once: bool = False, poll: float | None = None) -> None:
        """Watch until ``stop_event`` (or, with ``once``, until the files present are taken)."""
        poll = poll or max(0.1, min(1.0, self.settle / 4))
        if once:
            present = {str(p) for p in self.folder.iterdir() if is_candidate(p)}
            deadline = time.monotonic() + self.settle * 4 + 30
            while not self.stop_event.is_set() and time.monotonic() < deadline:
                self.scan_once()
                pending = [p for p in present if Path(p).exists() and not self._ledger(Path(p))]
                if not pending:
                    return
                time.sleep(poll)
            return
        while not self.stop_event.is_set():
            self.scan_once()
            self.stop_event.wait(poll)

    # taking a file --------------------------------------------------------------
    def take(self, path: Path) -> Taken | None:
        before = path.stat()
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        try:
            chunks, frames = self._cut(data)
        except _Stopped:  # a stop request: the file is not in the ledger, the next run takes it whole
            return None
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            return self._reject(path, before, digest, f"not decodable audio ({_plain_reason(exc)})")
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            self._seen.pop(str(path), None)  # still being written: wait for it to settle again
            return None
        if not chunks:
            return self._reject(path, before, digest, "no audio frames")
        return self._commit(path, before, digest, chunks, frames)

    def _cut(self, data: bytes) -> tuple[list[tuple[bytes, str, int]], int]:
        """Decode and cut into encoded chunks: [(bytes, mime, duration_ms)], total frames."""
        out, total = [], 0
        with sf.SoundFile(io.BytesIO(data)) as f:
            dtype, subtype = _KEEP.get(f.subtype, ("float32", "FLOAT"))
            block = max(1, int(round(f.samplerate * self.chunk_seconds)))
            for frames in f.blocks(blocksize=block, dtype=dtype, always_2d=True):
                if self.stop_event.is_set():
                    raise _Stopped
                audio, mime = encode(frames, f.samplerate, self.fmt, subtype)
                out.append((audio, mime, duration_ms(frames, f.samplerate)))
                total += len(frames)
        return out, total

    def _commit(self, path, st, digest, chunks, frames) -> Taken:
        try:
            return self._commit_once(path, st, digest, chunks, frames)
        except (OSError, sqlite3.Error) as exc:
            raise spool_error(exc, f"take {path.name}") from None  # disk full: stop taking files

    def _commit_once(self, path, st, digest, chunks, frames) -> Taken:
        session = self.session or session_for_file(path, digest)
        with self.spool.cache.transact():
            info = self.spool.session_info(session)
            first = int(info.get("nextSeq", 0))
            for i, (audio, mime, dur) in enumerate(chunks):
                self.spool.add(session, first + i, audio, mime, dur)
            info["nextSeq"] = first + len(chunks)
            self.spool.cache.set(f"s/{session}", json.dumps(info))
            if not self.session:
                self.spool.set_final_seq(session, first + len(chunks) - 1)
            self.spool.cache.set(self._ledger_key(path), json.dumps(
                {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest,
                 "status": "taken", "session": session, "firstSeq": first, "chunks": len(chunks)}))
        taken = Taken(str(path), session, first, len(chunks), frames)
        self.taken.append(taken)
        self.listener("taken", {"path": str(path), "session": session, "firstSeq": first, "chunks": len(chunks),
                                "frames": frames})
        self.on_chunk()
        return taken

    def _reject(self, path, st, digest, reason) -> None:
        self.spool.cache.set(self._ledger_key(path), json.dumps(
            {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest,
             "status": "rejected", "reason": reason}))
        self.rejected.append({"path": str(path), "reason": reason})
        self.listener("rejected", {"path": str(path), "reason": reason})
        return None


def _plain_reason(exc: Exception) -> str:
    """libsndfile's reason without the in-memory buffer's repr ("Error opening <_io.BytesIO ...>: ...")."""
    text = getattr(exc, "error_string", None) or str(exc)
    text = re.sub(r"^Error opening <[^>]*>:\s*", "", text).strip().rstrip(".")
    return (text[:1].lower() + text[1:]) or exc.__class__.__name__
