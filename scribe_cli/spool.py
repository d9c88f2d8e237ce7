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
* removing audio does not rewrite the database at every commit: diskcache's
  ``auto_vacuum=FULL`` relocated pages to shrink the file at each removal, and
  Debian's SQLite zeroes every freed page (``secure_delete``), together 0.16 ms
  of CPU per acknowledged 46 KiB chunk, a third of the uploader's; with
  ``auto_vacuum=INCREMENTAL`` and ``secure_delete=FAST`` freed pages are kept for
  the next chunks (0.03 ms), and ``compact`` gives them back to the disk when an
  upload run ends with the spool (nearly) empty, by a ``VACUUM`` whose cost is
  the live data, a few milliseconds for a drained spool;
* the byte ranges of a watched card file are the one exception to "written to
  the spool before sent": the card holds them durably, so ``add(source=...)``
  spools a reference (the chunk's ``source`` and a ``u/`` marker with the card
  path and offset), ``read_audio`` reads them from the card, and ``seal`` copies
  those not yet acknowledged into the spool, durably, before the card may go
  (docs/durability.md); a card that is gone or changed holds the chunk as failed;
* metadata is JSON text, audio is raw bytes;
* reads verify the SHA-256 and quarantine a damaged or vanished entry
  instead of hanging (``peek`` can spin forever on a missing value file) or
  crashing.

Keys: ``c/<session>/<seq>`` chunk metadata (JSON), ``a/<session>/<seq>``
audio bytes, ``q/<session>/<seq>`` quarantined metadata, ``s/<session>``
session metadata, ``m/<session>`` the memory of what was acknowledged and
removed (seq ranges, count, bytes and a digest of the checksums), so that
``resume`` can tell a server that holds the session from one that does not,
``u/<session>/<seq>`` a chunk spooled by reference to its source (see above).
Several processes may use one spool at once: every state change is one SQLite
transaction, and value files are unlinked only after it commits
(``spool_disk.deferred_removals``).
"""

from __future__ import annotations

import bisect
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
from diskcache.core import DBNAME, MODE_RAW

from scribe_cli import spool_disk
from scribe_cli.errors import SpoolConflict, SpoolError, SpoolFull
from scribe_cli.spool_disk import DurableDisk, fsync_dir  # noqa: F401  (re-exported)

PENDING = "pending"
FAILED = "failed"

#: Audio of fewer bytes is stored in its SQLite row (durable at commit, synchronous=FULL);
#: larger audio in an fsynced value file, where a WAL copy would cost more than the file.
INLINE_MAX = 256 * 1024
#: ``compact`` shrinks the database once this many bytes of it are free and the live data it
#: has to copy is small: under a third of the free space and under ``COMPACT_MAX_LIVE``.
COMPACT_MIN_FREE = 16 * 2**20
COMPACT_MAX_LIVE = 64 * 2**20


#: how a chunk whose source could not be read explains itself (and is recognised by ``retry_held``)
HELD = "held: its card file is not readable"


class HeldChunk(Exception):
    """Raised when a chunk spooled by reference cannot be read from its source (it was held as failed)."""


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
    source: str | None = None  # spooled by reference: the card file holding the bytes (see Spool.add)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "ChunkMeta":
        data = json.loads(text)
        if data.keys() == _META_FIELDS:  # what to_json wrote: the fields as they are (listings of 100,000)
            meta = object.__new__(cls)
            meta.__dict__.update(data)
            return meta
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


_META_FIELDS = ChunkMeta.__dataclass_fields__.keys()


@dataclass
class SessionSummary:
    session: str
    pending: int = 0
    failed: int = 0
    quarantined: int = 0
    bytes: int = 0
    final_seq: int | None = None
    finish_acked: bool = False


@dataclass
class SessionMemory:
    """What the spool acknowledged and removed of one session: enough to check a server's answer."""

    session: str
    ranges: list[list[int]] = field(default_factory=list)
    count: int = 0
    bytes: int = 0
    digest: str = "0" * 64
    final_seq: int | None = None

    def to_json(self) -> dict:
        return {"ranges": self.ranges, "count": self.count, "bytes": self.bytes, "digest": self.digest,
                "finalSeq": self.final_seq}

    def contains(self, seq: int) -> bool:
        index = bisect.bisect_right(self.ranges, [seq, float("inf")]) - 1
        return index >= 0 and self.ranges[index][0] <= seq <= self.ranges[index][1]

    def add(self, metas: list[ChunkMeta]) -> None:
        """Remember acknowledged chunks (a seq already remembered is not counted twice)."""
        fresh = {m.seq: m for m in metas if not self.contains(m.seq)}
        digest = int(self.digest, 16)
        for meta in fresh.values():
            digest ^= chunk_digest(meta.seq, meta.sha256)
            self.count += 1
            self.bytes += meta.size
        self.digest = f"{digest:064x}"
        self.ranges = merge_ranges(self.ranges, sorted(fresh))


def chunk_digest(seq: int, sha256: str) -> int:
    """One chunk's share of a session digest: XOR of these over the chunks is order-free and incremental."""
    return int.from_bytes(hashlib.sha256(f"{seq}:{sha256}".encode()).digest(), "big")


def session_digest(chunks: Iterable[tuple[int, str]]) -> str:
    digest = 0
    for seq, sha in chunks:
        digest ^= chunk_digest(seq, sha)
    return f"{digest:064x}"


def merge_ranges(ranges: list[list[int]], seqs: list[int]) -> list[list[int]]:
    """``ranges`` (sorted, disjoint) with the sorted ``seqs`` added, adjacent ranges joined."""
    items = sorted([*ranges, *([q, q] for q in seqs)])
    out: list[list[int]] = []
    for first, last in items:
        if out and first <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], last)
        else:
            out.append([first, last])
    return out


@dataclass
class FsckReport:
    """What ``Spool.fsck`` found and did."""

    orphan_files: int = 0
    orphan_bytes: int = 0
    missing_audio: list[dict] = field(default_factory=list)
    repaired: bool = False

    def to_json(self) -> dict:
        return {"orphanFiles": self.orphan_files, "orphanBytes": self.orphan_bytes,
                "missingAudio": self.missing_audio, "repaired": self.repaired}


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
                sqlite_auto_vacuum=2,  # INCREMENTAL (switchable from diskcache's FULL on an existing spool)
                sqlite_secure_delete="FAST",
                sqlite_temp_store=2,  # MEMORY: no etilqs_* file in $TMPDIR (a compaction's copy is <= COMPACT_MAX_LIVE)
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
            timestamp: float | None = None, file: dict | None = None,
            source: tuple[str, int] | None = None) -> ChunkMeta:
        """Persist a chunk durably; idempotent for the same bytes, SpoolConflict for others.

        ``source`` (a file's absolute path and the chunk's offset in it) says that file holds
        these bytes durably already (a recorder's card): then only a reference is spooled
        (the chunk's ``source`` and a ``u/`` marker), its bytes are read from the card when
        sent, and ``seal`` copies them into the spool if they must outlive the card (see the
        module docstring).
        """
        by_reference = source is not None and len(audio) >= INLINE_MAX
        meta = ChunkMeta(session, seq, len(audio), hashlib.sha256(audio).hexdigest(), mime_type,
                         duration_ms, timestamp, file=file, source=source[0] if by_reference else None)
        try:
            with self.transaction():
                existing = self.cache.get(_key("c", session, seq))
                if existing is not None:
                    old = ChunkMeta.from_json(existing)
                    if old.sha256 != meta.sha256:
                        raise SpoolConflict(f"chunk {session}/{seq} is already spooled with different bytes")
                    return old
                if by_reference:
                    self.cache.set(_key("u", session, seq), json.dumps({"path": source[0], "offset": source[1]}))
                else:
                    self.cache.set(_key("a", session, seq), audio)
                self.cache.set(_key("c", session, seq), meta.to_json())
        except (OSError, sqlite3.Error) as exc:
            raise spool_error(exc, "write a chunk") from None
        return meta

    def seal(self, session: str | None = None, through: int | None = None) -> list[dict]:
        """Copy the chunks spooled by reference (of ``session``, or all; with ``through``, those
        of ``session`` up to that seq) into the spool, durably.

        Each is read from its source and kept only with its SHA-256; the values are written,
        then fsynced together, then the markers go: a crash (or a power cut) at any point
        leaves the marker, and the source stays the chunk's copy until the next ``seal``.
        A source that cannot be read (the card is out) leaves the chunk held (failed, marker
        kept); one that holds other bytes now (the file changed) quarantines it: the bytes as
        read are gone.  Returns what was held or quarantined (``outcome``)."""
        prefix = _key("u", session) + "/" if session else "u/"
        held, copied = [], []
        try:
            for marker_key, text in list(self._items(prefix)):
                _, name, seq_text = marker_key.split("/")
                if through is not None and session and int(seq_text) > through:  # (as in unsealed)
                    continue
                raw = self.cache.get(_key("c", name, int(seq_text)))
                if raw is None:  # acknowledged (or quarantined) meanwhile
                    self.cache.delete(marker_key)
                    continue
                meta = ChunkMeta.from_json(raw)
                try:
                    data = self._read_source(meta, json.loads(text), verify=True)
                except (HeldChunk, DamagedChunk) as exc:
                    held.append({"session": name, "seq": meta.seq, "path": meta.source, "reason": str(exc),
                                 "outcome": "held" if isinstance(exc, HeldChunk) else "quarantined"})
                    continue
                with self.transaction(), spool_disk.unsynced(self.cache):
                    if _key("c", name, meta.seq) in self.cache:  # not acknowledged while the card was read
                        self.cache.set(_key("a", name, meta.seq), data)
                copied.append(marker_key)
            spool_disk.fsync_values(self.cache, ["a" + key[1:] for key in copied])
            with self.transaction():
                spool_disk.delete_keys(self.cache, copied)
        except (OSError, sqlite3.Error) as exc:
            raise spool_error(exc, "copy the spooled ranges of a card file") from None
        return held

    def unsealed(self, session: str | None = None, through: int | None = None) -> int:
        """How many chunks (of ``session``, or all; with ``through``, those of ``session`` up to
        that seq) are spooled by reference, their source not yet let go."""
        prefix = _key("u", session) + "/" if session else "u/"
        end = (prefix, prefix + "\uffff") if through is None or not session else (prefix, _key("u", session, through))
        ((count,),) = spool_disk.rows(self.cache, "SELECT COUNT(*) FROM Cache WHERE key >= ? AND key <= ? AND raw = 1",
                                      end)
        return count

    def retry_held(self) -> int:
        """Put the chunks held because their source could not be read back to pending (their card
        may be back: the next read tells, and holds them again if not); how many."""
        count = 0
        for marker_key, _ in list(self._items("u/")):
            _, name, seq_text = marker_key.split("/")
            raw = self.cache.get(_key("c", name, int(seq_text)))
            if raw is not None:
                meta = ChunkMeta.from_json(raw)
                if meta.state == FAILED and (meta.last_error or "").startswith(HELD):
                    self._update(name, meta.seq, state=PENDING)
                    count += 1
        return count

    def _read_source(self, meta: ChunkMeta, marker: dict, verify: bool) -> bytes:
        """A by-reference chunk's bytes from its source.

        HeldChunk (the chunk held as failed, to be retried) when the source cannot be read: the
        card is out.  DamagedChunk (quarantined) when it holds other bytes now: the file changed
        since the range was read, and the bytes as read exist nowhere else."""
        path, offset = marker.get("path") or meta.source or "", int(marker.get("offset", 0))
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(meta.size)
        except OSError as exc:
            reason = (f"{HELD}: {path} cannot be read ({exc.strerror or exc}): put the card back (at "
                      f"{os.path.dirname(path) or path}) and run scribe resume {meta.session} --retry-failed")
            self.mark_failed(meta.session, meta.seq, reason)
            raise HeldChunk(reason) from None
        if len(data) == meta.size and (not verify or hashlib.sha256(data).hexdigest() == meta.sha256):
            return data
        reason = f"its card file {path} changed before this range was copied in: the bytes as read are gone"
        self.quarantine(meta, reason)
        raise DamagedChunk(reason)

    def transaction(self):
        """One write transaction; value files it drops are unlinked only after it commits."""
        return spool_disk.deferred_removals(self.cache)

    def _update(self, session: str, seq: int, **changes) -> None:
        with self.transaction():
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
        """Drop acknowledged chunks and remember them (``memory``), in one transaction.

        Their value files are unlinked after the commit: a crash before it
        leaves every chunk spooled with its audio, a crash after it leaves
        only unreferenced files (``sweep``).
        """
        keys = list(keys)
        if not keys:
            return
        with self.transaction():
            acked: dict[str, list[ChunkMeta]] = {}
            gone = []
            for key, raw in spool_disk.raw_texts(self.cache, [_key("c", session, seq) for session, seq in keys]):
                meta = ChunkMeta.from_json(raw)  # a key not found was removed meanwhile, by another process
                acked.setdefault(meta.session, []).append(meta)
                gone += (_key("a", meta.session, meta.seq), _key("u", meta.session, meta.seq), key)
            spool_disk.delete_keys(self.cache, gone)
            for session, metas in acked.items():
                memory = self.memory(session)
                memory.add(metas)
                self.cache.set(_key("m", session), json.dumps(memory.to_json(), separators=(",", ":")))

    def memory(self, session: str) -> SessionMemory:
        """What this spool acknowledged and removed of ``session`` (empty when nothing)."""
        raw = self.cache.get(_key("m", session))
        memory = SessionMemory(session)
        if raw:
            data = json.loads(raw)
            memory = SessionMemory(session, data.get("ranges", []), data.get("count", 0), data.get("bytes", 0),
                                   data.get("digest", "0" * 64), data.get("finalSeq"))
        if memory.final_seq is None:
            memory.final_seq = self.session_info(session).get("finalSeq")
        return memory

    def set_final_seq(self, session: str, final_seq: int) -> None:
        with self.transaction():
            info = self.session_info(session)
            info.update(finalSeq=final_seq, finishAcked=False)
            self.cache.set(_key("s", session), json.dumps(info))
            memory = self.memory(session)
            if memory.count or self.cache.get(_key("m", session)) is not None:
                memory.final_seq = final_seq
                self.cache.set(_key("m", session), json.dumps(memory.to_json(), separators=(",", ":")))

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
        rows = spool_disk.rows(
            self.cache, "SELECT key, mode, value FROM Cache WHERE key >= ? AND key < ? AND raw = 1 ORDER BY key",
            (prefix, prefix + "\uffff"))
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
        ((count,),) = spool_disk.rows(self.cache, "SELECT COUNT(*) FROM Cache WHERE key >= ? AND key < ? AND raw = 1",
                                      (prefix, prefix + "\uffff"))
        return count

    def pending_sessions(self) -> set[str]:
        """Names of the sessions with at least one pending chunk (no JSON parsing)."""
        rows = spool_disk.rows(
            self.cache, "SELECT key, value FROM Cache WHERE key >= 'c/' AND key < ? AND raw = 1", ("c/\uffff",))
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
        if meta.source is not None:
            marker = self.cache.get(_key("u", meta.session, meta.seq))
            if marker is not None:  # not copied in yet: the card holds it
                return self._read_source(meta, json.loads(marker), verify)
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
        with self.transaction():
            self.cache.set(_key("q", meta.session, meta.seq), json.dumps(record))
            self.cache.delete(_key("c", meta.session, meta.seq))
            self.cache.delete(_key("a", meta.session, meta.seq))
            self.cache.delete(_key("u", meta.session, meta.seq))

    def resolve_quarantined(self, session: str, seqs: Iterable[int]) -> None:
        """Forget quarantine records of chunks the server turned out to hold with the same checksum."""
        with self.transaction():
            metas = []
            for seq in seqs:
                raw = self.cache.get(_key("q", session, seq))
                if raw is not None:
                    metas.append(ChunkMeta.from_json(raw))
                    self.cache.delete(_key("q", session, seq))
            if metas:
                memory = self.memory(session)
                memory.add(metas)
                self.cache.set(_key("m", session), json.dumps(memory.to_json(), separators=(",", ":")))

    # checking -----------------------------------------------------------------
    def missing_audio(self, session: str | None = None) -> list[ChunkMeta]:
        """Spooled chunks whose value file is gone (a crash of an older scribe, or outside damage)."""
        prefix = _key("a", session) + "/" if session else "a/"
        gone = {tuple(key.split("/")[1:]) for key in spool_disk.missing_values(self.cache, prefix)}
        if not gone:
            return []
        return [m for m in self.chunks(session) if (m.session, f"{m.seq:010d}") in gone]

    def compact(self) -> int:
        """Give the space of removed chunks back to the disk when that is cheap; the bytes given back.

        Freed pages stay in the database for the next chunks (see the module docstring)
        until this runs: when at least ``COMPACT_MIN_FREE`` bytes are free and the live data
        is under a third of that (and under ``COMPACT_MAX_LIVE``), a ``VACUUM`` (its cost is
        the live data, not the free space) and a checkpoint shrink the file.  Best effort: another process holding the
        database (a second ``record``) makes it give up after a moment, never fail.
        """
        try:
            page_size, pages, free = (spool_disk.rows(self.cache, f"PRAGMA {name}")[0][0]
                                      for name in ("page_size", "page_count", "freelist_count"))
            live = (pages - free) * page_size
            if free * page_size < COMPACT_MIN_FREE or live * 3 > free * page_size or live > COMPACT_MAX_LIVE:
                return 0
            con = sqlite3.connect(self.directory / DBNAME, timeout=0.5, isolation_level=None)
            try:
                con.execute("VACUUM")
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                con.close()
        except sqlite3.Error:
            return 0
        return free * page_size

    def sweep(self) -> tuple[int, int]:
        """Remove value files no entry points to (left by a crash); return (files, bytes)."""
        try:
            return spool_disk.sweep_orphans(self.cache)
        except (OSError, sqlite3.Error) as exc:
            raise spool_error(exc, "sweep unreferenced files") from None

    def fsck(self, repair: bool = True) -> FsckReport:
        """Check the spool: sweep unreferenced files, find (and quarantine) chunks whose audio is gone."""
        report = FsckReport(repaired=repair)
        if repair:
            report.orphan_files, report.orphan_bytes = self.sweep()
        else:
            names = spool_disk.value_files(str(self.directory)) - spool_disk.referenced(self.cache)
            report.orphan_files = len(names)
            report.orphan_bytes = sum(_size(self.directory / name) for name in names)
        for meta in self.missing_audio():
            report.missing_audio.append({"session": meta.session, "seq": meta.seq})
            if repair:
                self.quarantine(meta, "value file missing")
        return report


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


#: what to do when the spool's disk is so full that the spool cannot even be opened for writing
FULL_AT_OPEN_HINT = ("free some space on that disk, or copy the whole SCRIBE_HOME folder to a disk with room "
                     "(cp -a) and run scribe resume SESSION with SCRIBE_HOME pointing at the copy; everything "
                     "spooled so far is intact (scribe pending still lists it)")


def spool_error(exc: Exception, action: str) -> SpoolError:
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower())
    if full:
        return SpoolFull(f"the disk under the spool is full; could not {action}",
                         FULL_AT_OPEN_HINT if action == "open the spool" else None)
    if isinstance(exc, sqlite3.DatabaseError) and any(
            words in str(exc).lower() for words in ("malformed", "not a database")):
        return SpoolError(f"the spool's database is damaged ({exc}); could not {action}",
                          "keep it and start a new one: mv SCRIBE_HOME/spool SCRIBE_HOME/spool.damaged (sqlite3's "
                          "'.recover' on its cache.db rebuilds what is readable); what the server acknowledged is "
                          "safe there: scribe gaps SESSION shows what it misses")
    if action == "open the spool":
        return SpoolError(f"cannot open the spool: {exc}")
    return SpoolError(f"the spool could not {action}: {exc}")
