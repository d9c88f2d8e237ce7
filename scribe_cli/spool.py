"""The local spool: every chunk is on disk before any attempt to send it.

Built on diskcache, with its defaults made durable (see docs/durability.md):

* ``eviction_policy='none'`` and no size limit: a spool never drops audio
  (a plain ``Cache`` culls past 1 GB);
* ``sqlite_synchronous=FULL``: a committed entry survives power loss
  (diskcache's default is NORMAL);
* ``DurableDisk`` fsyncs value files and their directories (diskcache writes
  files of 32 KiB and more without fsync) and refuses pickle both ways;
* audio under ``INLINE_MAX`` bytes lives in the SQLite row itself, not in a
  value file: adding it costs one commit instead of a file, two fsyncs and a
  commit, and removing it deletes a row instead of unlinking a file (which
  profiling showed to be the uploader's largest cost per chunk);
* metadata is JSON text, audio is raw bytes;
* reads verify the SHA-256 and quarantine a damaged or vanished entry
  instead of hanging (``peek`` can spin forever on a missing value file) or
  crashing.

Keys: ``c/<session>/<seq>`` chunk metadata (JSON), ``a/<session>/<seq>``
audio bytes, ``q/<session>/<seq>`` quarantined metadata, ``s/<session>``
session metadata.  Several processes may use one spool at once: every state
change is one SQLite transaction.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import diskcache
from diskcache.core import MODE_PICKLE, MODE_RAW, UNKNOWN

from scribe_cli.errors import SpoolConflict, SpoolError, SpoolFull

PENDING = "pending"
FAILED = "failed"

#: Audio of fewer bytes is stored in its SQLite row (durable at commit, synchronous=FULL);
#: larger audio in an fsynced value file, where a WAL copy would cost more than the file.
INLINE_MAX = 256 * 1024


class DurableDisk(diskcache.Disk):
    """A diskcache ``Disk`` that fsyncs value files and never pickles."""

    def store(self, value, read, key=UNKNOWN):
        if type(value) not in (bytes, str):
            raise TypeError("the spool stores bytes and JSON text only")
        return super().store(value, read, key=key)

    def fetch(self, mode, filename, value, read):
        if mode == MODE_PICKLE:
            raise OSError("refusing to unpickle a spool value")
        return super().fetch(mode, filename, value, read)

    def remove(self, file_path):
        """Unlink a value file; unlike diskcache's, leave its (reused) directory in place.

        diskcache tries ``os.removedirs`` after every removal, which fails on
        a non-empty directory: an exception per acknowledged chunk.
        """
        with contextlib.suppress(OSError):  # as diskcache: the row is gone, a stray file is harmless
            os.remove(os.path.join(self._directory, file_path))

    def _write(self, full_path, iterator, mode, encoding=None):
        directory = os.path.dirname(full_path)
        new_dirs = not os.path.isdir(directory)
        size = super()._write(full_path, iterator, mode, encoding)
        fd = os.open(full_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(directory)
        if new_dirs:
            fsync_dir(os.path.dirname(directory))
            fsync_dir(os.path.dirname(os.path.dirname(directory)))
        return size


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DamagedChunk(Exception):
    """Raised when a spooled chunk's bytes are missing or corrupt (it was quarantined)."""


@dataclass
class ChunkMeta:
    """What the spool knows of one chunk."""

    session: str
    seq: int
    size: int
    sha256: str
    mime_type: str
    duration_ms: int | None = None
    timestamp: float | None = None
    created: float = field(default_factory=time.time)
    attempts: int = 0
    last_error: str | None = None
    state: str = PENDING
    file: dict | None = None  # a watched file's byte range: {path, version, offset[, final]}

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "ChunkMeta":
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class SessionSummary:
    session: str
    pending: int = 0
    failed: int = 0
    quarantined: int = 0
    bytes: int = 0
    final_seq: int | None = None
    finish_acked: bool = False


def _key(kind: str, session: str, seq: int | None = None) -> str:
    return f"{kind}/{session}" if seq is None else f"{kind}/{session}/{seq:010d}"


class Spool:
    """A durable, multi-process queue of audio chunks keyed by ``(session, seq)``."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.cache = diskcache.Cache(
                str(self.directory),
                eviction_policy="none",
                size_limit=2**62,
                cull_limit=0,
                sqlite_synchronous=2,
                statistics=0,
                disk=DurableDisk,
                disk_min_file_size=INLINE_MAX,
                timeout=60,
            )
        except (OSError, sqlite3.Error) as exc:
            raise spool_error(exc, "open the spool") from None

    def close(self) -> None:
        self.cache.close()

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # writing ------------------------------------------------------------------
    def add(self, session: str, seq: int, audio: bytes, mime_type: str, duration_ms: int | None = None,
            timestamp: float | None = None, file: dict | None = None) -> ChunkMeta:
        """Persist a chunk durably; idempotent for the same bytes, SpoolConflict for others."""
        meta = ChunkMeta(session, seq, len(audio), hashlib.sha256(audio).hexdigest(), mime_type,
                         duration_ms, timestamp, file=file)
        try:
            with self.cache.transact():
                existing = self.cache.get(_key("c", session, seq))
                if existing is not None:
                    old = ChunkMeta.from_json(existing)
                    if old.sha256 != meta.sha256:
                        raise SpoolConflict(f"chunk {session}/{seq} is already spooled with different bytes")
                    return old
                self.cache.set(_key("a", session, seq), audio)
                self.cache.set(_key("c", session, seq), meta.to_json())
        except (OSError, sqlite3.Error) as exc:
            raise spool_error(exc, "write a chunk") from None
        return meta

    def _update(self, session: str, seq: int, **changes) -> None:
        with self.cache.transact():
            raw = self.cache.get(_key("c", session, seq))
            if raw is None:
                return
            meta = ChunkMeta.from_json(raw)
            for name, value in changes.items():
                setattr(meta, name, value)
            self.cache.set(_key("c", session, seq), meta.to_json())

    def record_attempt(self, session: str, seq: int, error: str | None = None) -> None:
        raw = self.cache.get(_key("c", session, seq))
        if raw is not None:
            self._update(session, seq, attempts=ChunkMeta.from_json(raw).attempts + 1, last_error=error)

    def mark_failed(self, session: str, seq: int, error: str) -> None:
        """Keep the chunk but stop retrying it (a permanent refusal)."""
        raw = self.cache.get(_key("c", session, seq))
        attempts = ChunkMeta.from_json(raw).attempts + 1 if raw else 1
        self._update(session, seq, state=FAILED, last_error=error, attempts=attempts)

    def retry_failed(self, session: str) -> int:
        """Put the session's failed chunks back to pending; return how many."""
        failed = [m for m in self.chunks(session) if m.state == FAILED]
        for meta in failed:
            self._update(session, meta.seq, state=PENDING)
        return len(failed)

    def remove_many(self, keys: Iterable[tuple[str, int]]) -> None:
        """Drop acknowledged chunks, in one transaction."""
        keys = list(keys)
        if not keys:
            return
        with self.cache.transact():
            for session, seq in keys:
                self.cache.delete(_key("a", session, seq))
                self.cache.delete(_key("c", session, seq))

    def set_final_seq(self, session: str, final_seq: int) -> None:
        info = self.session_info(session)
        info.update(finalSeq=final_seq, finishAcked=False)
        self.cache.set(_key("s", session), json.dumps(info))

    def mark_finish_acked(self, session: str) -> None:
        info = self.session_info(session)
        info["finishAcked"] = True
        self.cache.set(_key("s", session), json.dumps(info))

    def session_info(self, session: str) -> dict:
        raw = self.cache.get(_key("s", session))
        return json.loads(raw) if raw else {}

    def forget_session(self, session: str) -> None:
        self.cache.delete(_key("s", session))

    # reading ------------------------------------------------------------------
    def _values(self, prefix: str) -> Iterator[str]:
        return (value for _, value in self._items(prefix))

    def _items(self, prefix: str) -> Iterator[tuple[str, str]]:
        """The keys and values of all keys starting with ``prefix``, in key order.

        One range query on diskcache's table instead of a ``get`` per key:
        listing a backlog of 100,000 chunks stays well under a second.  This
        reads diskcache's (stable since 5.x) schema; values other than small
        raw text fall back to ``get``.
        """
        rows = self.cache._sql(
            "SELECT key, mode, value FROM Cache WHERE key >= ? AND key < ? AND raw = 1 ORDER BY key",
            (prefix, prefix + "\uffff"),
        ).fetchall()
        for key, mode, value in rows:
            if mode == MODE_RAW and isinstance(value, str):
                yield key, value
            else:
                fetched = self.cache.get(key)
                if isinstance(fetched, str):
                    yield key, fetched

    def chunks(self, session: str | None = None) -> list[ChunkMeta]:
        """Spooled chunks (pending and failed), ordered by session then seq."""
        prefix = _key("c", session) + "/" if session else "c/"
        return [ChunkMeta.from_json(value) for value in self._values(prefix)]

    def count(self, session: str) -> int:
        """How many chunks of ``session`` are spooled (pending or failed), by one range query."""
        prefix = _key("c", session) + "/"
        (count,) = self.cache._sql("SELECT COUNT(*) FROM Cache WHERE key >= ? AND key < ? AND raw = 1",
                                   (prefix, prefix + "\uffff")).fetchone()
        return count

    def pending_sessions(self) -> set[str]:
        """Names of the sessions with at least one pending chunk (no JSON parsing)."""
        rows = self.cache._sql(
            "SELECT key, value FROM Cache WHERE key >= 'c/' AND key < ? AND raw = 1", ("c/\uffff",)
        ).fetchall()
        return {key.split("/")[1] for key, value in rows if isinstance(value, str) and '"state":"pending"' in value}

    def pending(self, session: str | None = None) -> list[ChunkMeta]:
        return [m for m in self.chunks(session) if m.state == PENDING]

    def quarantined(self, session: str | None = None) -> list[dict]:
        prefix = _key("q", session) + "/" if session else "q/"
        return [json.loads(value) for value in self._values(prefix)]

    def sessions(self) -> list[SessionSummary]:
        summaries: dict[str, SessionSummary] = {}
        for meta in self.chunks():
            s = summaries.setdefault(meta.session, SessionSummary(meta.session))
            s.bytes += meta.size
            if meta.state == FAILED:
                s.failed += 1
            else:
                s.pending += 1
        for q in self.quarantined():
            summaries.setdefault(q["session"], SessionSummary(q["session"])).quarantined += 1
        for session, info in self.session_infos().items():
            summary = summaries.setdefault(session, SessionSummary(session))
            summary.final_seq = info.get("finalSeq")
            summary.finish_acked = bool(info.get("finishAcked"))
        return sorted(summaries.values(), key=lambda s: s.session)

    def session_infos(self) -> dict[str, dict]:
        """Session metadata (final seq, finish acknowledged, next seq) of every session."""
        return {key[2:]: json.loads(value) for key, value in self._items("s/")}

    def read_audio(self, meta: ChunkMeta, verify: bool = True) -> bytes | None:
        """The chunk's verified bytes; None when it was removed meanwhile.

        Raises DamagedChunk, after quarantining the entry, when the bytes are
        gone or do not match their checksum.  ``verify=False`` checks the
        length only, for a caller whose receiver verifies the SHA-256 anyway
        and who verifies here when told of a mismatch (the uploader).
        """
        missing = object()
        reason = "value file missing"
        try:
            audio = self.cache.get(_key("a", meta.session, meta.seq), default=missing)
        except OSError as exc:
            audio, reason = missing, f"unreadable: {exc.strerror or exc}"
        if audio is not missing:
            if isinstance(audio, bytes) and len(audio) == meta.size and (
                    not verify or hashlib.sha256(audio).hexdigest() == meta.sha256):
                return audio
            reason = "checksum mismatch"
        elif _key("c", meta.session, meta.seq) not in self.cache:
            return None  # acknowledged and removed meanwhile, e.g. by another process
        self.quarantine(meta, reason)
        raise DamagedChunk(reason)

    def quarantine(self, meta: ChunkMeta, reason: str) -> None:
        """Move a damaged entry aside so it is reported, never retried blindly."""
        record = {**asdict(meta), "reason": reason, "quarantined": time.time()}
        with self.cache.transact():
            self.cache.set(_key("q", meta.session, meta.seq), json.dumps(record))
            self.cache.delete(_key("c", meta.session, meta.seq))
            try:
                self.cache.delete(_key("a", meta.session, meta.seq))
            except OSError:
                pass


def spool_error(exc: Exception, action: str) -> SpoolError:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFull(f"the disk under the spool is full; could not {action}")
    if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower():
        return SpoolFull(f"the disk under the spool is full; could not {action}")
    return SpoolError(f"the spool could not {action}: {exc}")
