"""Tailing a recorder's card or folder: every file uploaded byte for byte, as it is.

The folder is scanned recursively (dot-folders and temporary names such as
``.part``/``.tmp`` are skipped).  A watched file is never decoded: its chunks
are byte ranges of the file itself, ``chunk_bytes`` long (``chunk_seconds``
mapped to bytes by the file's data rate, capped at ``chunk_bytes``), read
from disk one at a time, so memory does not grow with the file.  Each chunk
names its file, version and offset (the optional ``file`` field of
``audio-chunk``, see docs/protocol.md); the server keeps a manifest per
session and gives the original files back.

Growing and changing files.  Range *i* of a file always covers bytes
``[i*B, (i+1)*B)``; the spool remembers the SHA-256 of what was last sent for
every range.  While a file grows, its full ranges are sent as they appear
(never twice).  When it has been unchanged for ``settle`` seconds it is
*closed*: read once more from start to end, every range whose bytes differ
from what was sent (a header the recorder rewrote, say) is sent again, and
the last range goes out with the file's size, SHA-256 and metadata.  The
server rebuilds a version by laying the chunks of that path, in sequence
order, at their offsets, so the session ends holding exactly the file's final
bytes.  A file that changes after it was closed (in-place edit, more audio
after a pause longer than ``settle``) becomes the next *version*; only the
ranges that differ are sent.  All of this is restart-safe: every chunk is
spooled with its range hash and the ledger in one transaction.

Written once.  While a settled file is read for closing, the card itself is
the durable copy of its bytes: its ranges are spooled by reference
(``Spool.add``'s ``source``: the chunk's SHA-256 and where on the card its
bytes are), sent read from the card, and most are acknowledged without ever
being written to this disk.  Before the file is reported taken (its closing
range), the watcher waits for the uploader to acknowledge the ranges still
spooled, as long as acknowledgements keep coming, then copies the rest into
the spool, durably (``Spool.seal``): a file reported taken is durable here or
on the server, and the card may go.

Files that are no audio (CONFIG.TXT) are listed once and ignored from then
on; empty, truncated or undecodable audio files are reported with a plain
reason and retried only when they change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

from scribe_cli.capture.metadata import BadAudio, NotAudio, ProbeError, probe
from scribe_protocol import ProtocolError, validate_file_path
from scribe_protocol.memory import keep_freed_memory
from scribe_cli.spool import Spool, spool_error

TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".swp", "~")
DEFAULT_CHUNK_BYTES = 4 << 20  # 8 MiB (the server's limit) measured ~10% faster but 184 MB peak RSS (target 150)
MIN_CHUNK_BYTES = 4096
#: seconds the watcher waits for the uploader's next acknowledgement before flushing a closed
#: file's ranges itself (see "Written once" above)
SEAL_PATIENCE = 1.0
#: seconds an mtime must be older than ``settle`` to count as settled (FAT keeps mtimes to 2 s)
MTIME_SLACK = 2.0
FILE_MIME = "application/octet-stream"

Listener = Callable[[str, dict], None]


def is_candidate(path: Path) -> bool:
    name = path.name
    return not name.startswith(".") and not name.lower().endswith(TEMP_SUFFIXES)


def session_for_file(path: Path, digest: str) -> str:
    """A stable session id for one file: its sanitized stem plus 8 hex of a content hash."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-._")[:50] or "file"
    if not stem[0].isalnum():
        stem = "f" + stem
    return f"{stem}-{digest[:8]}"


def walk(folder: Path, links: list[tuple[str, Path]] | None = None) -> list[tuple[str, Path]]:
    """Candidate files under ``folder`` as ``(relative posix path, path)``, sorted by relative path.

    Symbolic links are not followed, to files or to folders (a card has none; a link in a
    folder on a computer may lead out of it, or to a file already taken under its own
    name): they are appended to ``links`` when given, to be reported."""
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        for name in [d for d in dirs if (base / d).is_symlink()] + files:
            path = base / name
            if not is_candidate(path):
                continue
            if path.is_symlink():
                if links is not None:
                    links.append((path.relative_to(folder).as_posix(), path))
            elif path.is_file():
                found.append((path.relative_to(folder).as_posix(), path))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (base / d).is_symlink())
    if links is not None:
        links.sort()
    return sorted(found)


def printable(name: str) -> str:
    """``name`` as it can be shown on one line and sent as JSON: bytes that are not UTF-8 as ``\\xNN``,
    control characters as ``\\n``, ``\\t``, ``\\xNN``."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if 32 <= ord(c) != 127 else c.encode("unicode_escape").decode() for c in text)


def name_problem(rel: str) -> str | None:
    """Why a file's path in the watched folder cannot be sent as the path of its chunks
    (``file.path``, the server's own check), None when it can: such a file is reported, never taken."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return ("its name is not valid UTF-8 (written in another character set): rename it, or mount "
                "the card with the character set it was written in")
    try:
        validate_file_path(rel)
    except ProtocolError as exc:
        return f"its path {exc.message.removeprefix('file.path ')}, which the server does not accept: rename it"
    return None


@dataclass
class Taken:
    path: str
    rel_path: str
    session: str
    first_seq: int
    chunks: int
    frames: int | None
    version: int = 1
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"path": self.path, "relPath": self.rel_path, "session": self.session, "firstSeq": self.first_seq,
                "chunks": self.chunks, "frames": self.frames, "version": self.version, "bytes": self.bytes,
                "warnings": self.warnings}


class CardUnreadable(Exception):
    """A file on the card could not be read (an I/O error of the card or its reader): the file
    is skipped for now and looked at again later; nothing of it that was spooled is lost."""

    def __init__(self, error: OSError):
        super().__init__(error.strerror or str(error))
        self.error = error


@contextlib.contextmanager
def card_reads():
    """Turn the OSErrors of reading a card file (not a vanished file) into CardUnreadable."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CardUnreadable(exc) from None


class _CardFile:
    """A card file opened for reading whose read errors are CardUnreadable (the spool's own
    errors, raised around it, stay what they are)."""

    def __init__(self, path: Path):
        with card_reads():
            self._f = open(path, "rb")

    def read(self, size: int = -1) -> bytes:
        with card_reads():
            return self._f.read(size)

    def seek(self, offset: int) -> int:
        with card_reads():
            return self._f.seek(offset)

    def __enter__(self) -> "_CardFile":
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


#: seconds before a file that could not be read is tried again (when it has not changed meanwhile)
UNREADABLE_RETRY = 30.0


class FolderWatcher:
    """Takes the files under ``folder`` into the spool; see the module docstring."""

    def __init__(self, spool: Spool, folder: Path, chunk_seconds: float | None = None, fmt: str = "flac",
                 session: str | None = None, settle: float = 2.0, listener: Listener | None = None,
                 on_chunk: Callable[[], None] | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.spool, self.folder = spool, Path(folder)
        self.chunk_seconds, self.fmt, self.session, self.settle = chunk_seconds, fmt, session, settle
        self.chunk_bytes = max(MIN_CHUNK_BYTES, int(chunk_bytes))
        self.listener = listener or (lambda kind, data: None)
        self.on_chunk = on_chunk or (lambda: None)
        self._seen: dict[str, tuple[int, int, float]] = {}  # rel -> (size, mtime_ns, unchanged since)
        self._done: dict[str, tuple[int, int] | str] = {}  # path -> (size, mtime_ns) closed, or "ignored"
        self.stop_event = threading.Event()
        self.taken: list[Taken] = []
        self.rejected: list[dict] = []
        self.ignored: list[dict] = []
        self.still_writing: list[str] = []
        self.unreadable: dict[str, dict] = {}  # rel -> {path, relPath, reason} of files the card would not give
        self._unreadable_at: dict[str, tuple[int, int, float]] = {}  # rel -> (size, mtime_ns, when)
        self.uploading = False  # an uploader follows the spool in this process (scribe watch without --offline)
        self._closing: _Closing | None = None  # a settled file's close waiting for the uploader (_close_version)
        self._unsendable: set[str] = set()  # files whose names cannot be sent (name_problem), reported
        self._links: set[str] = set()  # symbolic links in the folder, reported
        self._by_session: dict[str, dict] | None = None  # without --session: taken files by session (_taken_elsewhere)
        keep_freed_memory()

    # the ledger -----------------------------------------------------------------
    def _key(self, path: Path) -> str:
        """The ledger key of a file: its path in the watched folder within ``--session`` (so a card
        mounted elsewhere next time is recognised), else its absolute path."""
        if self.session:
            rel = path.relative_to(self.folder).as_posix()
            return hashlib.sha1(f"{self.session}\0{rel}".encode("utf-8", "surrogateescape")).hexdigest()
        return hashlib.sha1(str(path.resolve()).encode("utf-8", "surrogateescape")).hexdigest()

    def _ledger(self, path: Path) -> dict | None:
        raw = self.spool.cache.get("w/" + self._key(path))
        return json.loads(raw) if raw else None

    def _set_ledger(self, path: Path, entry: dict) -> None:
        self.spool.cache.set("w/" + self._key(path), json.dumps(entry))

    def _range_hashes(self, key: str) -> dict[int, str]:
        prefix = f"wr/{key}/"
        return {int(k[len(prefix):]): v for k, v in self.spool._items(prefix)}

    def done(self, path: Path, st: os.stat_result) -> bool:
        """True when nothing is left to do for ``path`` as it is now (remembered in memory once known)."""
        now = (st.st_size, st.st_mtime_ns)
        if self._done.get(str(path)) in (now, "ignored"):
            return True
        entry = self._ledger(path)
        if entry is None:
            return False
        if entry["status"] == "ignored":
            self._done[str(path)] = "ignored"
            return True
        finished = entry["status"] in ("taken", "rejected") and (entry["size"], entry["mtime_ns"]) == now
        if finished and entry.get("fingerprint"):  # the same size and mtime, but is it the same file?
            try:
                finished = fingerprint(path, st.st_size) == entry["fingerprint"]
            except (OSError, CardUnreadable):
                finished = False  # looked at (and reported) like any file the card will not give
        if finished:
            self._done[str(path)] = now
        return finished

    # scanning -------------------------------------------------------------------
    def scan_once(self) -> int:
        """One pass over the folder: take growing files' new ranges, close settled ones.

        Returns how many files were closed, rejected or ignored in this pass.
        """
        count = 0
        now = time.monotonic()
        self._closing = None  # one left by a pass that failed: its file is looked at again
        links: list[tuple[str, Path]] = []
        for rel, path in walk(self.folder, links):
            if self.stop_event.is_set():
                break
            if rel in self._unsendable:
                continue
            problem = name_problem(rel)
            if problem is not None:
                count += self._cannot_send(rel, path, problem)
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if self.done(path, st):
                continue
            failed = self._unreadable_at.get(rel)
            if failed is not None and failed[:2] == (st.st_size, st.st_mtime_ns) and now - failed[2] < UNREADABLE_RETRY:
                continue
            try:
                count += self._look_at(rel, path, st, now)
            except CardUnreadable as exc:
                self._cannot_read(rel, path, st, exc)
                continue
            if rel in self.unreadable and self.done(path, st):
                del self.unreadable[rel]  # read whole this time
                self._unreadable_at.pop(rel, None)
        for rel, path in links:
            count += self._link(rel, path)
        return count + self._finish_closing()

    def _cannot_send(self, rel: str, path: Path, reason: str) -> int:
        """A file whose name cannot be sent (``name_problem``): rejected, reported once per watch."""
        self._unsendable.add(rel)
        self.rejected.append({"path": printable(str(path)), "relPath": printable(rel), "reason": reason})
        self.listener("rejected", self.rejected[-1])
        return 1

    def _link(self, rel: str, path: Path) -> int:
        """A symbolic link in the folder: not followed (``walk``), reported once per watch."""
        if rel in self._links:
            return 0
        self._links.add(rel)
        where = "a folder" if path.is_dir() else "a file" if path.exists() else "nothing (dangling)"
        self.ignored.append({"path": printable(str(path)), "relPath": printable(rel),
                             "reason": f"a symbolic link to {where}: not followed (watch what it points to)",
                             "everyRun": True})
        self.listener("ignored", self.ignored[-1])
        return 1

    def _look_at(self, rel: str, path: Path, st: os.stat_result, now: float) -> int:
        """Take a growing file's new ranges, or close a settled one; 1 when closed, rejected or ignored."""
        key = (st.st_size, st.st_mtime_ns)
        previous = self._seen.get(rel)
        if previous is None and self._settled_by_mtime(st) and not _unfinished(path):
            return self._close(rel, path, st)
        if previous is None or previous[:2] != key:
            self._seen[rel] = (*key, now)
            if previous is not None and st.st_size > previous[0]:
                self._take_pieces(rel, path, st)
            return 0
        if now - previous[2] >= self.settle:
            return self._close(rel, path, st)
        return 0

    def _cannot_read(self, rel: str, path: Path, st: os.stat_result, exc: CardUnreadable) -> None:
        """A read error on the card: report the file (once per error), skip it, try it again later.
        What was spooled of it stays; the next attempt goes on from there."""
        self._unreadable_at[rel] = (st.st_size, st.st_mtime_ns, time.monotonic())
        self._seen.pop(rel, None)
        record = {"path": str(path), "relPath": rel, "reason": f"read error on the card: {exc}"}
        if self.unreadable.get(rel) != record:
            self.unreadable[rel] = record
            self.listener("unreadable", record)

    def _settled_by_mtime(self, st: os.stat_result) -> bool:
        """True when the file's own mtime says it has been unchanged for ``settle`` seconds already
        (a card's recordings usually are): closed on first sight instead of after a wait.

        ``MTIME_SLACK`` more is asked for, since FAT keeps mtimes to 2 s.  A WAV whose header was
        never finished (``_unfinished``) is not settled by its mtime: it waits for ``settle`` seconds
        without a change like any other file seen growing.  An mtime in the future
        (a recorder's clock ahead) never counts.  Closing a file too early loses nothing: a change
        seen later is taken like any change to a closed file (its next version).
        """
        return time.time() - st.st_mtime_ns / 1e9 >= self.settle + MTIME_SLACK

    def run(self, once: bool = False, poll: float | None = None) -> None:
        """Watch until ``stop_event`` (or, with ``once``, until the files present are closed).

        With ``once``, files still changing ``3 x settle + 2`` seconds after the start
        (or after the last pass that closed a file) are
        left (their full ranges spooled) and listed in ``still_writing``; so are
        the files not yet taken whole when a stop request ends the watch (the
        next run continues them where this one stopped).
        """
        try:
            self._run(once, poll or max(0.05, min(1.0, self.settle / 4)))
        finally:  # ranges of a file left half-read (a stop request) are copied in too
            self._report_held(self.spool.seal())

    def _report_held(self, held: list[dict]) -> None:
        for found in held:
            self.listener(found["outcome"], found)

    def _run(self, once: bool, poll: float) -> None:
        deadline = time.monotonic() + self.settle * 3 + 2
        while not self.stop_event.is_set():
            if self.scan_once():  # closing files takes time: the files seen since get their full wait
                deadline = max(deadline, time.monotonic() + self.settle * 3 + 2)
            if once:
                pending = self._pending()
                if not pending:
                    return
                if time.monotonic() > deadline:
                    return self._left(pending)
            self.stop_event.wait(poll)
        self._left(self._pending())

    def _left(self, pending: list[str]) -> None:
        self.still_writing = pending
        for rel in pending:
            self.listener("still-writing", {"path": str(self.folder / rel), "relPath": rel})

    def _pending(self) -> list[str]:
        out = []
        for rel, path in walk(self.folder):
            try:
                if rel in self._unsendable:
                    continue
                if rel not in self.unreadable and not self.done(path, path.stat()):
                    out.append(rel)
            except FileNotFoundError:
                continue
        return out

    # taking a file --------------------------------------------------------------
    def _state(self, rel: str, path: Path, entry: dict | None, first_range: bytes) -> dict:
        """The ledger entry of a file about to get chunks, opening a new version when needed."""
        if entry is None or entry["status"] not in ("taken", "open"):
            try:
                info = probe(path)
                rate = info.byte_rate
            except ProbeError:
                rate = None
            size = self.chunk_bytes
            if self.chunk_seconds and rate:
                size = max(MIN_CHUNK_BYTES, min(self.chunk_bytes, int(self.chunk_seconds * rate)))
            session = self.session or session_for_file(path, _identity(rel, path, first_range))
            return {"path": str(path), "rel": rel, "session": session, "chunkBytes": size, "version": 1,
                    "status": "open", "size": 0, "mtime_ns": 0, "ranges": 0, "byteRate": rate}
        if entry["status"] == "taken":  # closed before: this is a new version
            entry = {**entry, "version": entry["version"] + 1, "status": "open"}
            if not self.session:  # the per-file session was finished: the new version gets its own
                base = entry.setdefault("baseSession", entry["session"])
                entry["session"] = f"{base[:56]}-v{entry['version']}"
                self._clear_ranges(self._key(path))
                entry["ranges"] = 0
        return entry

    def _clear_ranges(self, key: str) -> None:
        with self.spool.cache.transact():
            for k, _ in list(self.spool._items(f"wr/{key}/")):
                self.spool.cache.delete(k)

    def _read_range(self, f, index: int, size: int) -> bytes:
        f.seek(index * size)
        return f.read(size)

    def _take_pieces(self, rel: str, path: Path, st: os.stat_result) -> None:
        """Spool the full ranges a growing file gained since its last piece."""
        entry = self._ledger(path)
        if entry is not None and entry["status"] == "ignored":
            return
        try:
            with _CardFile(path) as f:
                first = f.read(MIN_CHUNK_BYTES)
                if entry is None and probe_kind(path) == "not-audio":
                    return
                entry = self._state(rel, path, entry, first)
                size, key = entry["chunkBytes"], self._key(path)
                hashes = self._range_hashes(key)
                for index in range(entry["ranges"], st.st_size // size):
                    if self.stop_event.is_set():
                        return
                    data = self._read_range(f, index, size)
                    if len(data) < size:
                        break
                    if _same(hashes.get(index), data):
                        entry["ranges"] = index + 1
                        continue
                    entry = self._spool_range(path, entry, index, data)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                return
            raise spool_error(exc, f"take {rel}") from None

    def _close(self, rel: str, path: Path, st: os.stat_result) -> int:
        """Close a settled file: send what differs, then its last range with the manifest entry."""
        entry = self._ledger(path)
        try:
            with card_reads():
                info = probe(path)
        except NotAudio as exc:
            self._set_ledger(path, {"path": str(path), "rel": rel, "status": "ignored", "reason": exc.reason,
                                    "size": st.st_size, "mtime_ns": st.st_mtime_ns})
            self.ignored.append({"path": str(path), "relPath": rel, "reason": exc.reason})
            self.listener("ignored", self.ignored[-1])
            return 1
        except BadAudio as exc:
            if entry is None or entry["status"] != "open":
                return self._reject(rel, path, st, entry, exc.reason)
            info = None  # an open file that no longer parses is still kept byte for byte
        except FileNotFoundError:
            return 0
        try:
            return self._send_version(rel, path, st, entry, info)
        except FileNotFoundError:
            return 0
        except (OSError, sqlite3.Error) as exc:
            raise spool_error(exc, f"take {rel}") from None

    def _send_version(self, rel: str, path: Path, st: os.stat_result, entry: dict | None, info) -> int:
        """Send the ranges that differ from what was sent, then the closing range; 1 when closed."""
        with _CardFile(path) as f:
            job = _Pass(rel, path, st, entry, first=f.read(MIN_CHUNK_BYTES))
            if entry is None and not self.session:
                known = self._taken_elsewhere(rel, path, st, job.first)
                if known is not None:
                    self._set_ledger(path, known)
                    return 1
            f.seek(0)
            if entry is None or not entry.get("chunkBytes"):
                job.opened = self._state(rel, path, entry, job.first)
            else:
                job.hashes = self._range_hashes(self._key(path))
            tail = self._send_changed_ranges(f, job)
        if tail is None:
            return 0  # stopped
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            self._seen.pop(rel, None)  # changed while read: what was spooled stays, close it later
            return 0
        if not job.changed and job.sent(*tail):
            entry.update(status="taken", mtime_ns=st.st_mtime_ns,  # touched, not changed: no new version
                         fingerprint=_fingerprint_if_readable(path, st.st_size))
            self._set_ledger(path, entry)
            return 1
        return self._close_version(job, tail, info)

    def _identity_session(self, job: "_Pass") -> str | None:
        """Without ``--session``: the session this very content would be given as a new file
        (a later version's session is named after its first version's), for ``_taken_elsewhere``."""
        if self.session:
            return None
        return session_for_file(job.path, _identity(job.rel, job.path, job.first, job.st.st_mtime_ns))

    def _taken_elsewhere(self, rel: str, path: Path, st: os.stat_result, first: bytes) -> dict | None:
        """Without ``--session``: the ledger entry of this very file taken before under another
        absolute path (the card mounted elsewhere: ``/media/ZOOM1`` beside a stale ``/media/ZOOM``),
        for this path; None when it was not.  The same file is the same session id (its path in
        the folder, mtime and first bytes, ``_identity``), size and mtime."""
        if self._by_session is None:
            self._by_session = {}
            for _, raw in self.spool._items("w/"):
                known = json.loads(raw)
                if known.get("status") == "taken" and known.get("session"):
                    self._by_session[known.get("identity") or known["session"]] = known
        known = self._by_session.get(session_for_file(path, _identity(rel, path, first)))
        if known is None or (known.get("size"), known.get("mtime_ns")) != (st.st_size, st.st_mtime_ns):
            return None
        if known.get("fingerprint") and known["fingerprint"] != _fingerprint_if_readable(path, st.st_size):
            return None
        return {**known, "path": str(path)}

    def _send_changed_ranges(self, f, job: "_Pass") -> tuple[int, bytes] | None:
        """Read the file range by range (hashing it whole), spool every range but the last that differs
        from what was sent; return the last range ``(index, bytes)``, None when stopped."""
        size = (job.opened or job.entry)["chunkBytes"]
        count = -(-job.st.st_size // size)
        previous = job.entry or {}
        job.changed = count != previous.get("ranges", 0) or previous.get("size") != job.st.st_size
        with contextlib.closing(read_ahead(f, size, count, job.whole)) as ranges:
            for index, data in ranges:
                if self.stop_event.is_set():
                    return None
                if index == count - 1:
                    return index, data
                if job.sent(index, data):
                    continue
                job.changed = True
                if job.opened is None:  # the first difference opens the version (maybe a new one)
                    job.opened = self._state(job.rel, job.path, job.entry, job.first)
                    job.hashes = self._range_hashes(self._key(job.path))
                    if job.sent(index, data):
                        continue
                job.spooled(self._spool_range(job.path, job.opened, index, data, from_card=True))
        return None  # not reached: a file of at least one byte has a last range

    def _close_version(self, job: "_Pass", tail: tuple[int, bytes], info) -> int:
        """Close the version: its last range is spooled with the file's size, sha256 and metadata
        once its other ranges are let go (``_let_go``).  While the uploader is still sending
        them, the close waits (``_closing``) and the next file's ranges are read and spooled
        meanwhile, so that the uploader never runs dry between two files of a card; it is
        finished when the next file comes to its own close, or at the end of the pass.
        Returns how many files were closed (this one and a close that waited)."""
        st, rel, path = job.st, job.rel, job.path
        opened = job.opened or self._state(rel, path, job.entry, job.first)
        sha = job.whole.hexdigest()
        headers = info.to_manifest() if info is not None else {"warnings": ["the headers could not be read"]}
        manifest = {"size": st.st_size, "sha256": sha, "mtime": st.st_mtime_ns / 1e9, **headers}
        closing = _Closing(job, opened, tail, info, manifest, sha)
        closed = self._finish_closing()
        if self.uploading and not self.stop_event.is_set() and self._unsealed(closing):
            self._closing = closing
            return closed
        return closed + self._close_now(closing)

    def _finish_closing(self) -> int:
        """Finish the close that waits for its ranges to be let go, if any; 1 when the file was closed."""
        closing, self._closing = self._closing, None
        return self._close_now(closing) if closing is not None else 0

    def _unsealed(self, closing: "_Closing") -> int:
        try:
            return self.spool.unsealed(closing.opened["session"], closing.opened.get("lastSeq"))
        except sqlite3.Error as exc:
            raise spool_error(exc, "count the spooled ranges of a card file") from None

    def _close_now(self, closing: "_Closing") -> int:
        job, st, path, sha = closing.job, closing.job.st, closing.job.path, closing.sha
        if not self._let_go(closing):
            self._seen.pop(job.rel, None)  # the card went or changed under us: not taken, looked at again
            return 0
        job.spooled(self._spool_range(path, closing.opened, *closing.tail, final=closing.manifest,
                                      closing={"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha,
                                               "fingerprint": _fingerprint_if_readable(path, st.st_size),
                                               "identity": self._identity_session(job)}))
        info = closing.info
        taken = Taken(str(path), job.rel, job.opened["session"], job.first_seq, job.count,
                      info.frames if info else None, job.opened["version"], st.st_size, info.warnings if info else [])
        self.taken.append(taken)
        self.listener("taken", {**taken.to_json(), "sha256": sha})
        return 1

    def _let_go(self, closing: "_Closing") -> bool:
        """Make every range of the closing file's session spooled from the card (up to the file's
        last range so far: with ``--session`` the next file's ranges may follow) durable here or
        on the server: wait while the uploader acknowledges them (an acknowledged range is never
        copied at all), then copy what is left into the spool.  Without an uploader, or once it
        stalls for ``SEAL_PATIENCE``, at once.  False when a range could not be read back from
        the card as it was (the file is then not taken now: it is looked at again)."""
        left, since = self._unsealed(closing), time.monotonic()
        while self.uploading and left and not self.stop_event.is_set() and time.monotonic() - since < SEAL_PATIENCE:
            self.stop_event.wait(0.01)
            now = self._unsealed(closing)
            if now < left:
                left, since = now, time.monotonic()
        held = self.spool.seal(closing.opened["session"], closing.opened.get("lastSeq"))
        self._report_held(held)
        return not held

    def _spool_range(self, path: Path, entry: dict, index: int, data: bytes,
                     final: dict | None = None, closing: dict | None = None, from_card: bool = False) -> dict:
        """Spool one range with its hash (the one ``Spool.add`` computes) and the ledger in one
        transaction; return the new ledger entry.  ``from_card``: the file is the range's durable
        copy until ``_let_go`` (see "Written once" in the module docstring)."""
        session, size = entry["session"], entry["chunkBytes"]
        file_field = {"path": entry["rel"], "version": entry["version"], "offset": index * size}
        if final is not None:
            file_field["final"] = final
        rate = entry.get("byteRate")
        duration = int(round(len(data) * 1000 / rate)) if rate else None
        entry = dict(entry)
        try:
            with self.spool.cache.transact():
                info = self.spool.session_info(session)
                seq = int(info.get("nextSeq", 0))
                source = (os.path.abspath(path), index * size) if from_card else None
                meta = self.spool.add(session, seq, data, FILE_MIME, duration, time.time(), file=file_field,
                                      source=source)
                info["nextSeq"] = seq + 1
                self.spool.cache.set(f"s/{session}", json.dumps(info))
                key = self._key(path)
                self.spool.cache.set(f"wr/{key}/{index:08d}", f"{meta.sha256}:{len(data)}")
                entry["ranges"] = max(entry.get("ranges", 0), index + 1)
                entry["lastSeq"] = seq
                if closing is not None:
                    for stale in range(index + 1, entry["ranges"]):  # the file shrank
                        self.spool.cache.delete(f"wr/{key}/{stale:08d}")
                    entry.update(ranges=index + 1, status="taken", **closing)
                    if not self.session:
                        self.spool.set_final_seq(session, seq)
                self._set_ledger(path, entry)
        except (OSError, sqlite3.Error) as exc:
            raise spool_error(exc, f"take {entry['rel']}") from None  # disk full: stop taking files
        self.on_chunk()
        return entry

    def _reject(self, rel: str, path: Path, st: os.stat_result, entry: dict | None, reason: str) -> int:
        record = dict(entry or {}, path=str(path), rel=rel, status="rejected", reason=reason, size=st.st_size,
                      mtime_ns=st.st_mtime_ns)
        self._set_ledger(path, record)
        self.rejected.append({"path": str(path), "relPath": rel, "reason": reason})
        self.listener("rejected", self.rejected[-1])
        return 1


@dataclass
class _Pass:
    """One read of a settled file: what was sent before, what this pass opened and spooled."""

    rel: str
    path: Path
    st: os.stat_result
    entry: dict | None
    first: bytes = b""
    opened: dict | None = None
    hashes: dict = field(default_factory=dict)
    first_seq: int | None = None
    count: int = 0  # ranges spooled in this pass (with --session, other files' ranges may come between)
    changed: bool = False
    whole: "hashlib._Hash" = field(default_factory=hashlib.sha256)

    def sent(self, index: int, data: bytes) -> bool:
        """True when range ``index`` was last sent with exactly these bytes."""
        return _same(self.hashes.get(index), data)

    def spooled(self, entry: dict) -> None:
        self.opened = entry
        self.count += 1
        if self.first_seq is None:
            self.first_seq = entry["lastSeq"]


@dataclass
class _Closing:
    """A settled file's close, waiting for its ranges to be let go: its last range and manifest."""

    job: _Pass
    opened: dict
    tail: tuple[int, bytes]
    info: Any
    manifest: dict
    sha: str


def _same(known: str | None, data: bytes) -> bool:
    """True when ``data`` is what the range hash ``known`` (``sha256:length``) describes; a range never
    sent is not hashed here (``Spool.add`` hashes what it spools)."""
    return known is not None and known == f"{hashlib.sha256(data).hexdigest()}:{len(data)}"


def read_ahead(f, size: int, count: int, whole) -> Iterator[tuple[int, bytes]]:
    """The next ``count`` ranges of ``size`` bytes of ``f`` as ``(index, bytes)``, each also fed to
    the hash ``whole`` in order.  The next range is read and hashed in a thread while the caller
    spools this one (file reads, SHA-256 and the spool's fsyncs all release the GIL), so at most
    two ranges are held at once."""
    def read() -> bytes:
        data = f.read(size)
        whole.update(data)
        return data

    if count <= 0:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="watch-read") as pool:
        pending = pool.submit(read)
        for index in range(count):
            data = pending.result()
            if index + 1 < count:
                pending = pool.submit(read)
            yield index, data


def _identity(rel: str, path: Path, first_range: bytes, mtime_ns: int | None = None) -> str:
    """What names a file's own session: its path, its mtime when first taken and its first bytes
    (two recordings may share a header and a silent start, rarely also a path and an mtime)."""
    if mtime_ns is None:
        mtime_ns = path.stat().st_mtime_ns
    digest = hashlib.sha256(f"{rel}\0{mtime_ns}\0".encode("utf-8", "surrogateescape"))
    digest.update(first_range)
    return digest.hexdigest()


#: bytes read from each end of a file for its fingerprint
FINGERPRINT_BYTES = 64 << 10


def fingerprint(path: Path, size: int) -> str:
    """A taken file's fingerprint: the SHA-256 of its first and last ``FINGERPRINT_BYTES``.

    A file is done when its size, mtime and fingerprint are those it was taken with: two
    recorders of one model write files of the same name and size (fixed-length recordings)
    with the same FAT mtime (2-second steps, clocks set together), so size and mtime alone
    took another card's recording for one already taken.  Headers (serial numbers, iXML)
    and audio differ at either end; reading both ends costs two small reads per file, once
    per run."""
    digest = hashlib.sha256()
    with card_reads(), open(path, "rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(f.read(FINGERPRINT_BYTES))
    return digest.hexdigest()[:32]


def _fingerprint_if_readable(path: Path, size: int) -> str | None:
    """``fingerprint``, None when the card does not give the file now (the entry then has none,
    and the file is done by its size and mtime alone)."""
    try:
        return fingerprint(path, size)
    except (OSError, CardUnreadable):
        return None


def _unfinished(path: Path) -> bool:
    """True when the file's header says its recorder has not closed it (see ``AudioInfo.unfinished``):
    its mtime alone does not make it settled (a filesystem may set mtimes only on close)."""
    try:
        with card_reads():
            return probe(path).unfinished
    except (ProbeError, OSError, CardUnreadable):
        return False


def probe_kind(path: Path) -> str:
    """'audio', 'not-audio' or 'bad' for a file as it is now."""
    try:
        with card_reads():
            probe(path)
        return "audio"
    except NotAudio:
        return "not-audio"
    except BadAudio:
        return "bad"
