"""The chunk store: exactly-once, durable storage of audio chunks.

Reads are synchronous (the protocol layer runs them in worker threads).
Chunks are written in batches by the two-stage chunk writer (``submit``;
``put_chunk`` is the blocking form; see ``writer.py``).  The contract:

* ``put_chunk`` returns only after the audio file and its row are durable;
  the same ``(session, seq)`` with the same bytes is a duplicate, stored once,
  also when copies race; different bytes are a ``conflict``.
* A crash at any point leaves either nothing or a complete chunk (rows that
  rode on a flush the crash interrupted are checked against their files at the
  next start: ``recover_unflushed``); a leftover temp or orphan file never
  breaks a retry.
* Sessions are keyed by ``(owner, session_id)``: every operation takes the
  caller's identity (``owner``, a token name) and sees only that owner's
  sessions.  Two owners may both have a session "interview-1"; they are two
  sessions, and nothing either can do (reply, error, timing) depends on
  whether the other's exists.
* A chunk above its session's final seq is refused (``beyond_final``) by the
  database in the inserting transaction (a trigger, see ``db.py``), so it holds
  across server nodes; the in-process session cache is only a fast path.

All refusals are ``ProtocolError`` with a code from the protocol module.

The interface, every method keyed by ``(owner, session_id)``: writes
``put_chunk`` / ``submit``, ``finish_session``; reads ``owned_session`` (the
row, or ``not_found``), ``missing``, ``held_checksums``, ``list_sessions``,
``session_chunks`` (paged by ``after``/``limit``), ``read_chunk``,
``iter_audio`` (in ``reads.py``); health ``healthy`` / ``readiness``.  Something new stored per
session (a manifest, say) belongs in a table keyed ``(owner, session_id)`` with
a foreign key to ``sessions``, plus a migration in ``db.py``.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from scribe_protocol import AudioChunk, ErrorCode, ProtocolError
from scribe_protocol.gaps import MissingReport
from scribe_server.store import db
from scribe_server.store.db import chunks, sessions
from scribe_server.store.files import DIRECT_MIN, AudioFiles, LocalAudioFiles, owner_dir  # noqa: F401
from scribe_server.store.manifest import FileManifest
from scribe_server.store.reads import NOT_FOUND_MESSAGE, StoreReads  # noqa: F401  (re-exported)
from scribe_server.store.writer import BatchWriter, Job, ReadGate, share_work
from scribe_server.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class _Known:
    id: str
    sha256: str
    audio_path: str


@dataclass(eq=False)
class _RidingRows:
    """The rows of one written batch, committed while its files were written (``_begin_riding``)."""

    rows: list[dict]
    ranges: dict
    cleared: list[str]  # notes of rows flushed since, cleared in the same transaction
    inserted: set[str] | None = None  # the ids that were new; None: the commit failed
    future: Any = None

    def wait(self) -> None:
        self.future.result()


@dataclass(frozen=True)
class PutResult:
    chunk_id: str
    duplicate: bool
    #: the chunk's file range (``chunk.file``) was recorded in the manifest in the row's own transaction
    file_recorded: bool = False


class ChunkStore(StoreReads):
    """Sessions and chunks in a database plus audio files."""

    def __init__(self, engine: sa.Engine, files: AudioFiles, max_sessions_per_owner: int = 100_000,
                 riding_engine: sa.Engine | None = None):
        self.engine = engine
        self.files = files
        self.max_sessions_per_owner = max_sessions_per_owner
        #: commits whose rows ride on the syncfs of the batch's files (see ``_commit_riding``); None: off
        self.riding_engine = riding_engine
        self.gate = ReadGate()
        self._flushed: list[str] = []  # ids of rows flushed since, still noted as unflushed in the database
        self._flushed_lock = threading.Lock()
        self._sessions: dict[tuple[str, str], tuple] = {}  # (owner, id) -> (row, read at)
        self._recent: dict[tuple[str, str, int], _Known] = {}  # (owner, id, seq) -> known chunk
        self.writer = BatchWriter(self._write_batch, self._commit_batch)
        self.manifest = FileManifest(engine, self._chunk_names, files.read, self.gate)
        self.last_failure: tuple[float, str] | None = None  # (monotonic time, reason) of the last refused write
        self.refusals = RateLimitedLog(log)

    @classmethod
    def open(cls, data_dir: Path, database_url: str | None = None, flush: str = "auto", **kwargs) -> "ChunkStore":
        """Open (and create or migrate) the store under ``data_dir``; ``flush``: how a batch's
        new files are made durable (see ``LocalAudioFiles``)."""
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        engine = db.create_engine(database_url or db.sqlite_url(data_dir))
        db.migrate(engine)
        files = LocalAudioFiles(data_dir / "audio", flush=flush)
        with engine.connect() as conn:  # pre-v2 file layout: session dirs move under their owner's
            owners = dict(conn.execute(sa.select(sessions.c.id, sessions.c.owner)).all()) if _legacy_dirs(files) else {}
        if owners:
            moved = files.migrate_layout(owners)
            log.info("moved %d session directories to the per-owner layout", moved)
        riding = None
        if rows_can_ride(engine, files):
            riding = db.create_engine(database_url or db.sqlite_url(data_dir), synchronous="NORMAL", pool_size=1)
        store = cls(engine, files, riding_engine=riding, **kwargs)
        store.recover_unflushed()
        return store

    # writes -----------------------------------------------------------------
    def put_chunk(self, owner: str, chunk: AudioChunk) -> PutResult:
        """Store ``chunk`` once and durably (blocking); see the module docstring."""
        done = threading.Event()
        job = Job(owner, chunk, lambda job: done.set(), size=chunk.size)
        self.submit(job)
        done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def submit(self, job: Job) -> None:
        """Queue ``job`` for the chunk writer; ``job.done`` is called on its thread
        with ``job.result`` (a PutResult) or ``job.error`` (a ProtocolError)."""
        self.writer.submit(job)

    def _write_batch(self, jobs: list[Job]) -> list[Job]:
        """Writer stage 1: validate a batch, create its new sessions, write its files and
        start their flushes.  Settles what is refused or already stored; returns the jobs
        whose files are being written, for ``_commit_batch``."""
        if self.gate.broken is not None:  # rows that may have lost their audio are still visible
            for job in jobs:
                job.settle(error=self.gate.broken)
            return []
        parsed: list[tuple[Job, AudioChunk]] = []
        for job, chunk in zip(jobs, share_work(self.writer.helper, _parse, jobs, lambda job: job.size)):
            if isinstance(chunk, ProtocolError):
                job.settle(error=chunk)
            else:
                job.chunk = chunk
                parsed.append((job, chunk))
        refused = self._create_sessions({(job.owner, chunk.session_id) for job, chunk in parsed})
        todo: list[tuple[Job, AudioChunk, str]] = []
        for job, chunk in parsed:
            try:
                if (job.owner, chunk.session_id) in refused:
                    raise refused[(job.owner, chunk.session_id)]
                known = self._check(job.owner, chunk)
                if known is not None:
                    job.settle(known)
                    continue
                todo.append((job, chunk, AudioFiles.name_for(job.owner, chunk.session_id, chunk.sequence,
                                                             chunk.sha256, chunk.extension)))
            except ProtocolError as exc:
                job.settle(error=exc)
            except sa.exc.SQLAlchemyError as exc:
                self._failed("database read failed: %s", exc.__class__.__name__)
                job.settle(error=ProtocolError(ErrorCode.STORAGE_UNAVAILABLE,
                                               "the server could not check the session; retry later"))
        items = [(name, chunk.audio) for _, chunk, name in todo]
        # Rows riding on the batch's syncfs are committed by the helper thread while this one
        # writes the files (``_commit_riding``); otherwise the commit stage commits them once
        # the files are durable.  Either way the files' flushes run on while the next batch
        # is prepared.
        sync_fd = (self.files.syncfs_descriptor() if self.riding_engine is not None
                   and any(len(audio) < DIRECT_MIN for _, audio in items) else None)
        early = self._begin_riding(todo) if sync_fd is not None else None
        try:
            finish = self.files.start_many(items, defer_syncfs=early is not None, helper=self.writer.helper,
                                           sync_fd=sync_fd)
            if early is not None:
                early.wait()
        except BaseException:
            if early is not None:
                self._abandon_riding(early)
            raise
        for index, (job, _, name) in enumerate(todo):
            job.name, job.stored = name, (finish, index, early)
        return [job for job, _, _ in todo]

    def _failed(self, message: str, detail: object, reason: str = "database unavailable") -> None:
        """A refused write: logged at most every 10 s per kind, remembered for readiness."""
        self.last_failure = (time.monotonic(), reason)
        self.refusals(logging.ERROR, message, "chunk refused (storage_unavailable): " + message, detail)

    def _check(self, owner: str, chunk: AudioChunk) -> PutResult | None:
        """Refuse what cannot be stored; a known duplicate's result; None to store it."""
        session = self._session_cached(owner, chunk.session_id)
        known = self._recent.get((owner, chunk.session_id, chunk.sequence))
        if known is not None:
            return self._compare(known, chunk)
        if session is None:  # pragma: no cover - created by _create_sessions just before
            raise ProtocolError(ErrorCode.STORAGE_UNAVAILABLE, "the session could not be created; retry later")
        if session.final_seq is not None and chunk.sequence > session.final_seq:
            raise ProtocolError(ErrorCode.BEYOND_FINAL, f"session was finished at seq {session.final_seq}")
        return None

    def _session_cached(self, owner: str, session_id: str):
        """The session row, from a small cache; an unfinished session is re-read
        every few seconds to see its final seq (the database enforces it anyway)."""
        cached = self._sessions.get((owner, session_id))
        if cached is not None and (cached[0].final_seq is not None or time.monotonic() - cached[1] < 2.0):
            return cached[0]
        self._load_sessions([(owner, session_id)])
        cached = self._sessions.get((owner, session_id))
        return cached[0] if cached is not None else None

    def _load_sessions(self, keys: list[tuple[str, str]]) -> None:
        """Read the given ``(owner, id)`` sessions into the cache in one query (absent ones stay absent)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(sessions).where(sa.tuple_(sessions.c.owner, sessions.c.id).in_(keys))).all()
        if len(self._sessions) > 100_000:
            self._sessions.clear()
        now = time.monotonic()
        for row in rows:
            self._sessions[(row.owner, row.id)] = (row, now)

    def _remember(self, owner: str, session_id: str, seq: int, chunk_id: str, sha256: str, audio_path: str) -> None:
        """Recently stored chunks, so a duplicate is acked without touching the disk.
        The database stays the authority: a miss here falls through to it."""
        if len(self._recent) > 200_000:
            self._recent.clear()
        self._recent[(owner, session_id, seq)] = _Known(chunk_id, sha256, audio_path)

    def _durable(self, written: list[Job]) -> list[Job]:
        """Wait until the files of ``written`` are durable; settle those that failed and
        return the others."""
        durable = []
        for job in written:
            finish, index = job.stored[:2]
            error = finish()[index]
            if error is None:
                durable.append(job)
                continue
            self._failed("audio write failed: %s", error.strerror or error,
                         reason="disk full" if error.errno == errno.ENOSPC else "audio directory not writable")
            job.settle(error=ProtocolError(ErrorCode.STORAGE_UNAVAILABLE, "the server could not store the chunk; retry later"))
        return durable

    def _commit_batch(self, written: list[Job]) -> None:
        """Writer stage 2: commit the rows of the batches of stage 1 and settle the jobs,
        each row made durable no sooner than its file: after the files' flush (the
        database's own commit flush), or riding on their syncfs (``_commit_riding``)."""
        batches: dict[int, tuple[_RidingRows, list[Job]]] = {}
        others = []
        for job in written:
            early = job.stored[2]
            if early is None:
                others.append(job)
            else:
                batches.setdefault(id(early), (early, []))[1].append(job)
        for early, jobs in batches.values():
            try:
                self._commit_riding(early, jobs)
            finally:
                self.gate.end_write()
        if others:
            self._commit_durable(others)

    def _commit_durable(self, written: list[Job]) -> None:
        """Once the files of ``written`` are durable, commit their rows in one
        transaction (its own flush makes them durable) and settle the jobs."""
        written = self._durable(written)
        if not written:
            return
        rows = [self._row(job.owner, job.chunk, job.name) for job in written]
        ranges = {row["id"]: (job.owner, job.chunk) for job, row in zip(written, rows) if job.chunk.file is not None}
        try:
            inserted = self._commit_rows(rows, ranges)
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            if len(written) > 1:
                # One bad row must not fail its neighbours: commit them one by one.
                for one in written:
                    self._commit_durable([one])
                return
            self._failed("database write failed: %s", exc.__class__.__name__)
            written[0].settle(error=ProtocolError(ErrorCode.STORAGE_UNAVAILABLE,
                                                  "the server could not store the chunk; retry later"))
            return
        self._settle_committed(written, rows, ranges, inserted)

    def _begin_riding(self, todo: list[tuple[Job, AudioChunk, str]]) -> "_RidingRows":
        """Start committing the rows of a batch whose files are about to be written, on the
        writer's helper thread, without the database's own flush: the batch's syncfs (run
        by the commit stage once the files are written) makes the files and the rows durable
        in one flush of the device (SQLite beside the audio files: ``rows_can_ride``).

        From here until that flush has succeeded the rows are committed but not durable,
        and may even name files not written yet: no read sees them (the gate is held from
        before the commit until the commit stage is done), no caller hears of them, and
        their ids are noted in ``unflushed_chunks`` in their own transaction, so that after
        a crash they are checked against their files (``recover_unflushed``)."""
        rows = [self._row(job.owner, chunk, name) for job, chunk, name in todo]
        ranges = {row["id"]: (job.owner, chunk) for (job, chunk, _), row in zip(todo, rows) if chunk.file is not None}
        self.files.claim()  # before any row is noted: see recover_unflushed
        self.gate.begin_write()
        with self._flushed_lock:
            cleared, self._flushed = self._flushed, []
        early = _RidingRows(rows, ranges, cleared)
        try:
            early.future = self.writer.helper.submit(self._commit_early, early)
        except BaseException:  # (the writer is closing): nothing committed
            with self._flushed_lock:
                self._flushed = cleared + self._flushed
            self.gate.end_write()
            raise
        return early

    def _commit_early(self, early: "_RidingRows") -> None:
        try:
            early.inserted = self._commit_rows(early.rows, early.ranges, riding=True, cleared=early.cleared)
        except Exception as exc:
            if not isinstance(exc, (sa.exc.SQLAlchemyError, sqlite3.Error, OSError)):
                log.exception("chunk writer: committing a batch's rows failed")
            early.inserted = None  # nothing committed: the commit stage takes the careful way
            with self._flushed_lock:
                self._flushed = early.cleared + self._flushed

    def _abandon_riding(self, early: "_RidingRows") -> None:
        """The files of a riding batch could not be written at all (an unexpected error):
        take its rows back, with the database's own flush, and let go of the gate."""
        try:
            early.wait()
            if early.inserted:
                gone = [row for row in early.rows if row["id"] in early.inserted]
                self._take_back(gone, [row["id"] for row in gone])
        finally:
            self.gate.end_write()

    def _commit_riding(self, early: "_RidingRows", jobs: list[Job]) -> None:
        """Commit stage of a batch whose rows were committed while its files were written
        (``_begin_riding``): run the batch's syncfs, which makes the files and the rows
        durable together, then settle the jobs.  The caller lets go of the gate afterwards.

        A flush that fails takes the batch's rows back, the database's own flush making
        that removal and the rows that stay durable, and fails the whole batch (sent
        again, a chunk that stayed is a duplicate).  A chunk whose file could not be
        written (before the flush) loses its row alone, and its neighbours are stored."""
        flush = jobs[0].stored[0]
        outcomes = flush()  # the syncfs, also when no row was committed (it closes the files)
        if early.inserted is None:
            self._commit_durable(jobs)
            return
        rows = early.rows
        if flush.syncfs_error is not None or any(outcomes[job.stored[1]] is not None
                                                 and flush.early[job.stored[1]] is None for job in jobs):
            failed = [(job, rows[job.stored[1]]) for job in jobs if outcomes[job.stored[1]] is not None]
            self._undo_riding(jobs, rows, early.inserted, failed, flush.syncfs_error)
            return
        unwritten = [rows[job.stored[1]] for job in jobs if flush.early[job.stored[1]] is not None
                     and rows[job.stored[1]]["id"] in early.inserted]
        if unwritten:  # their rows go (the notes with them, in one transaction), the others stay
            try:
                with self.riding_engine.begin() as conn:
                    self._delete_rows(conn, unwritten)
                    db.note_unflushed(conn, [], [row["id"] for row in unwritten])
            except sa.exc.SQLAlchemyError as exc:
                self._broken(exc)
                for job in jobs:
                    job.settle(error=ProtocolError(ErrorCode.STORAGE_UNAVAILABLE,
                                                   "the server could not store the chunk; retry later"))
                return
            early.inserted -= {row["id"] for row in unwritten}
        with self._flushed_lock:
            self._flushed.extend(early.inserted)
        durable = {id(job) for job in self._durable(jobs)}  # (settles the unwritten ones)
        kept = [job for job in jobs if id(job) in durable]
        self._settle_committed(kept, [rows[job.stored[1]] for job in kept], early.ranges, early.inserted)

    def _undo_riding(self, written: list[Job], rows: list[dict], inserted: set[str],
                     failed: list[tuple[Job, dict]], syncfs_error: OSError | None = None) -> None:
        """A riding batch whose flush failed: remove its failed rows (and their files),
        commit with the database's own flush (which makes the rows that stay durable),
        and fail every job of the batch."""
        errors = [job.stored[0]()[job.stored[1]] for job, _ in failed] or [syncfs_error]
        for error in errors:
            self._failed("audio write failed: %s", error.strerror or error,
                         reason="disk full" if error.errno == errno.ENOSPC else "audio directory not writable")
        gone = [row for job, row in failed if row["id"] in inserted]
        self._take_back(gone, [row["id"] for row in rows])
        # (their files are gone already: a failed flush removes its files while the names are still theirs)
        for job in written:
            job.settle(error=ProtocolError(ErrorCode.STORAGE_UNAVAILABLE, "the server could not store the chunk; retry later"))

    def _take_back(self, gone: list[dict], noted: list[str]) -> None:
        """Delete the rows ``gone`` and the notes of ``noted`` (and of the rows flushed
        since), with the database's own flush, which also makes every row that stays
        durable.  If even that fails, reads and writes stop until a restart checks them."""
        with self._flushed_lock:
            flushed, self._flushed = self._flushed, []
        try:
            with self.engine.begin() as conn:
                self._delete_rows(conn, gone)
                conn.execute(db.unflushed_chunks.delete().where(db.unflushed_chunks.c.id.in_(noted + flushed)))
        except sa.exc.SQLAlchemyError as exc:
            with self._flushed_lock:
                self._flushed = flushed + self._flushed
            self._broken(exc)

    def _broken(self, exc: BaseException) -> None:
        # Rows that may point at lost audio stay visible: nothing may be read or acked
        # until a restart checks them (their ids are noted in unflushed_chunks).
        self._failed("database write failed after a failed flush: %s", exc.__class__.__name__,
                     reason="restart needed: unflushed rows could not be removed")
        self.gate.broken = ProtocolError(ErrorCode.STORAGE_UNAVAILABLE,
                                         "the server must restart to check its storage; retry later")

    def _delete_rows(self, conn, rows) -> None:
        """Delete chunk rows (mappings with id, owner, session_id, seq) and what the manifest
        recorded for them."""
        if not rows:
            return
        for row in rows:
            self.manifest.forget_in(conn, row["owner"], row["session_id"], row["seq"])
        conn.execute(chunks.delete().where(chunks.c.id.in_([row["id"] for row in rows])))

    def recover_unflushed(self) -> int:
        """After a crash: check the chunks whose rows were committed before their flush
        finished (noted in ``unflushed_chunks``) against their files; remove each whose
        file is not complete (its client was never told it was stored and sends it
        again), make the others durable.  Returns how many were removed."""
        if self.engine.dialect.name != "sqlite":
            return 0
        unflushed = db.unflushed_chunks
        with self.engine.connect() as conn:
            noted = conn.execute(sa.select(unflushed.c.id)).scalars().all()
            if not noted:
                return 0
            # A store that writes claims its files before it notes a row; asked after the notes
            # were read, so a writer that claims later only notes rows not among them.  While
            # one is open (a running server, when this is `scribe-server export`), its rows may
            # name files still being written: they are its business, not a crash's remains.
            if self.files.writers_elsewhere():
                log.info("%d chunk(s) are noted as not yet flushed, by a store open elsewhere (a running server): "
                         "left to it", len(noted))
                return 0
            rows = conn.execute(sa.select(chunks.c.id, chunks.c.owner, chunks.c.session_id, chunks.c.seq,
                                          chunks.c.audio_path, chunks.c.size, chunks.c.sha256)
                                .where(chunks.c.id.in_(noted))).mappings().all()
        bad = [row for row in rows if not self.files.verify(row["audio_path"], row["size"], row["sha256"])]
        with self.engine.begin() as conn:
            self._delete_rows(conn, bad)
            # only the notes checked here: a server running meanwhile (this is another command)
            # may have noted rows of a batch it is flushing
            for start in range(0, len(noted), 500):
                conn.execute(unflushed.delete().where(unflushed.c.id.in_(noted[start : start + 500])))
        for row in bad:
            self.files.remove(row["audio_path"])
        log.warning("checked the %d chunk(s) whose flush a crash interrupted: %d kept, %d removed (their audio had "
                    "not reached the disk; their clients send them again)", len(rows), len(rows) - len(bad), len(bad))
        return len(bad)

    def _settle_committed(self, written: list[Job], rows: list[dict], ranges: dict, inserted: set[str]) -> None:
        for job, row in zip(written, rows):
            chunk = job.chunk
            try:
                result = self._settle_row(job.owner, chunk, job.name, row["id"], row["id"] in inserted)
                job.settle(PutResult(result.chunk_id, result.duplicate, file_recorded=row["id"] in inserted
                                     and row["id"] in ranges))
            except ProtocolError as exc:
                job.settle(error=exc)
            except (sa.exc.SQLAlchemyError, OSError) as exc:
                self._failed("database read failed: %s", exc.__class__.__name__)
                job.settle(error=ProtocolError(ErrorCode.STORAGE_UNAVAILABLE, "the server could not check the chunk; retry later"))

    def _commit_rows(self, rows: list[dict], ranges: dict[str, tuple[str, AudioChunk]], riding: bool = False,
                     cleared: list[str] = ()) -> set[str]:
        """Insert ``rows`` (ignoring existing keys and rows beyond their session's
        final seq) in one transaction; the ids that were new.  Rows go in key
        order, so that batches on several nodes take session locks in one order.
        The file ranges (``ranges``: row id -> owner and chunk of a watched file) of
        the rows that were new are recorded in the manifest in the same transaction,
        which saves each such chunk a commit of its own before its ack; the others
        (duplicates) are recorded by the caller as before.  ``riding``: on the riding
        engine (no flush of its own), noting the new ids as unflushed and clearing the
        notes of ``cleared`` (rows flushed since)."""
        rows = sorted(rows, key=lambda row: (row["owner"], row["session_id"], row["seq"]))
        if riding and not ranges:
            dbapi_conn = self.riding_engine.raw_connection()
            try:
                return db.commit_riding_rows(dbapi_conn, chunks, rows, cleared)
            finally:
                dbapi_conn.close()
        with (self.riding_engine if riding else self.engine).begin() as conn:
            inserted = db.insert_new_rows(conn, chunks, rows)
            for row in rows:
                if row["id"] in inserted and row["id"] in ranges:
                    self.manifest.record_in(conn, *ranges[row["id"]])
            if riding:
                db.note_unflushed(conn, inserted, cleared)
            return inserted

    @staticmethod
    def _row(owner: str, chunk: AudioChunk, name: str) -> dict:
        return dict(
            id=str(uuid.uuid4()),
            owner=owner,
            session_id=chunk.session_id,
            seq=chunk.sequence,
            audio_path=name,
            duration_ms=chunk.duration_ms,
            status="uploaded",
            created_at=db.now(),
            size=chunk.size,
            sha256=chunk.sha256,
            mime_type=chunk.mime_type,
            client_timestamp=chunk.timestamp,
        )

    def _settle_row(self, owner: str, chunk: AudioChunk, name: str, chunk_id: str, inserted: bool) -> PutResult:
        if inserted:
            self._remember(owner, chunk.session_id, chunk.sequence, chunk_id, chunk.sha256, name)
            return PutResult(chunk_id, duplicate=False)
        # Another copy won (a racing one, or one of the same batch): the same bytes
        # (same file name) or a conflict.  No row at all: the database refused it
        # as beyond the session's final seq.
        existing = self._find_chunk(owner, chunk.session_id, chunk.sequence)
        if existing is None:
            self.files.remove(name)
            session = self._session_row(owner, chunk.session_id)
            if session is not None and session.final_seq is not None and chunk.sequence > session.final_seq:
                self._sessions.pop((owner, chunk.session_id), None)
                raise ProtocolError(ErrorCode.BEYOND_FINAL, f"session was finished at seq {session.final_seq}")
            raise ProtocolError(ErrorCode.INTERNAL, "the chunk was not stored; retry")  # pragma: no cover
        if existing.audio_path != name:
            self.files.remove(name)
        self._remember(owner, chunk.session_id, chunk.sequence, existing.id, existing.sha256, existing.audio_path)
        return self._compare(existing, chunk)

    @staticmethod
    def _compare(existing, chunk: AudioChunk) -> PutResult:
        if existing.sha256 != chunk.sha256:
            raise ProtocolError(
                ErrorCode.CONFLICT,
                f"seq {chunk.sequence} of this session is already stored with different bytes",
            )
        return PutResult(existing.id, duplicate=True)

    def _create_sessions(self, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], ProtocolError]:
        """Create the ``(owner, id)`` sessions of ``wanted`` that do not exist yet,
        all in one transaction (many recorders starting at once share one commit).

        Returns the refusals by key (limit reached, database unavailable).
        """
        refused: dict[tuple[str, str], ProtocolError] = {}
        unknown = set(wanted)
        try:
            uncached = [key for key in wanted if key not in self._sessions]
            if uncached:
                self._load_sessions(uncached)
            unknown = {key for key in wanted if key not in self._sessions}
            if not unknown:
                return {}
            with self.engine.begin() as conn:
                owners = {owner for owner, _ in unknown}
                counts = dict(conn.execute(
                    sa.select(sessions.c.owner, sa.func.count()).where(sessions.c.owner.in_(owners))
                    .group_by(sessions.c.owner)).all())
                rows = []
                for owner, sid in sorted(unknown):
                    if counts.get(owner, 0) >= self.max_sessions_per_owner:
                        refused[(owner, sid)] = ProtocolError(
                            ErrorCode.TOO_MANY_SESSIONS, f"this token already has {counts[owner]} sessions (the limit)")
                        continue
                    counts[owner] = counts.get(owner, 0) + 1
                    rows.append({"owner": owner, "id": sid, "created_at": db.now()})
                if rows:
                    conn.execute(db.insert_ignore(conn, sessions), rows)
            if rows:
                self._load_sessions([(row["owner"], row["id"]) for row in rows])
        except sa.exc.SQLAlchemyError as exc:
            self._failed("database write failed for new sessions: %s", exc.__class__.__name__)
            error = ProtocolError(ErrorCode.STORAGE_UNAVAILABLE, "the server could not store the session; retry later")
            return {key: error for key in unknown}
        return refused

    def finish_session(self, owner: str, session_id: str, last_seq: int) -> MissingReport:
        """Record the session's last sequence number; idempotent for the same value.

        The session row is updated *before* its chunks are counted, in one
        transaction: on PostgreSQL the update waits for inserts of the session
        in flight on any node (they hold a share lock on the row), so a chunk
        is either counted here or refused as ``beyond_final`` by the database.
        """
        session = self._session_row(owner, session_id)
        if session is None:
            refused = self._create_sessions({(owner, session_id)})
            if refused:
                raise refused[(owner, session_id)]
            session = self._session_row(owner, session_id)
        if session.final_seq is not None and session.final_seq != last_seq:
            raise ProtocolError(ErrorCode.CONFLICT, f"session was already finished at seq {session.final_seq}")
        if session.final_seq is None:
            key = (sessions.c.owner == owner, sessions.c.id == session_id)
            with self.engine.begin() as conn:
                updated = conn.execute(sessions.update().where(*key, sessions.c.final_seq.is_(None))
                                       .values(final_seq=last_seq, finished_at=db.now())).rowcount
                if not updated:  # finished meanwhile (another node)
                    final = conn.execute(sa.select(sessions.c.final_seq).where(*key)).scalar_one()
                    if final != last_seq:
                        raise ProtocolError(ErrorCode.CONFLICT, f"session was already finished at seq {final}")
                max_seq = conn.execute(
                    sa.select(sa.func.max(chunks.c.seq)).where(chunks.c.owner == owner, chunks.c.session_id == session_id)
                ).scalar_one()
                if max_seq is not None and max_seq > last_seq:
                    raise ProtocolError(ErrorCode.CONFLICT, f"lastSeq {last_seq} is below the stored seq {max_seq}")
        self._sessions.pop((owner, session_id), None)
        return self.missing(owner, session_id)

    def healthy(self) -> bool:
        """True when the database answers."""
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except sa.exc.SQLAlchemyError:
            return False

    def readiness(self, min_free_bytes: int = 0) -> str | None:
        """None when a chunk can be stored now, else why not (readiness for ``/healthz``).

        Checks what storing needs: the database answers and commits a write,
        and the audio directory takes a synced file with room to spare.
        """
        if self.gate.broken is not None:
            return "restart needed: unflushed rows could not be removed"
        if self.last_failure is not None and time.monotonic() - self.last_failure[0] < 5.0:
            return self.last_failure[1]
        if not self.healthy():
            return "database unreachable"
        disk = self.files.probe(min_free_bytes)
        if disk is not None:
            return disk
        try:
            with self.engine.begin() as conn:
                probe = {"key": "ready-probe", "value": str(db.now())}
                if conn.execute(db.schema_meta.update().where(db.schema_meta.c.key == "ready-probe")
                                .values(value=probe["value"])).rowcount == 0:
                    conn.execute(db.insert_ignore(conn, db.schema_meta).values(**probe))
        except sa.exc.SQLAlchemyError as exc:
            log.warning("readiness: the database refuses writes: %s", exc.__class__.__name__)
            return "database not writable"
        return None

    def close(self) -> None:
        self.writer.close()
        if self._flushed:  # a clean stop leaves nothing for recover_unflushed to check
            try:
                with self.engine.begin() as conn:
                    db.note_unflushed(conn, [], self._flushed)
                self._flushed = []
            except sa.exc.SQLAlchemyError:
                log.warning("could not clear the notes of flushed chunks: the next start checks them")
        self.files.close()
        self.engine.dispose()
        if self.riding_engine is not None:
            self.riding_engine.dispose()


def _parse(job: Job) -> AudioChunk | ProtocolError:
    """A job's chunk, validated (and hashed) on a writer thread if it came unparsed; the
    refusal is returned, not raised (see ``share_work``)."""
    try:
        return job.chunk() if callable(job.chunk) else job.chunk
    except ProtocolError as exc:
        return exc


def rows_can_ride(engine: sa.Engine, files: AudioFiles) -> bool:
    """Whether the chunk writer's rows may ride on the syncfs of its files: SQLite (one
    process writes it), its database file on the same filesystem as the audio files
    (so the syncfs covers its log), and the files flushed by syncfs."""
    path = db.sqlite_path(engine)
    if path is None or not getattr(files, "group_flush", False):
        return False
    try:
        return path.resolve().parent.stat().st_dev == Path(files.root).stat().st_dev
    except OSError:
        return False


def _legacy_dirs(files: AudioFiles) -> bool:
    """Whether the audio directory still holds session directories of the pre-v2 layout."""
    root = getattr(files, "root", None)
    return root is not None and any(
        not p.name.startswith((".", "@")) and p.is_dir() for p in Path(root).iterdir())
