"""Audio file storage: durable, atomic, addressed by the identity of the data.

``AudioFiles`` is the interface the chunk store talks to; ``LocalAudioFiles``
keeps files in a directory (a local disk or a volume shared by several
nodes).  An object store can implement the same methods later.

Layout: ``<owner-dir>/<session>/<seq>.<sha16>.<ext>`` where the owner directory
is ``@`` + the token name (``@_`` + a hash for a name that is not plain ASCII),
so that two owners' sessions of the same id never share a directory.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import socket
import threading
import time
import uuid
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable

from scribe_protocol import SESSION_ID_RE
from scribe_server.store.direct import write_direct
from scribe_server.store.writeback import start_writeback, syncfs, syncfs_available
from scribe_server.store.writer import share_work

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
OWNER_DIR_RE = re.compile(rf"@(?:{_ID}|_[0-9a-f]{{32}})")
#: ``@<owner>/<session>/<seq>.<sha16>.<ext>``: no other separators, no ``..``, nothing else.
NAME_RE = re.compile(rf"{OWNER_DIR_RE.pattern}/{_ID}/[0-9]{{10}}\.[0-9a-f]{{16}}\.[a-z0-9]{{1,8}}")
#: Where each live writer process holds a lock on ``<instance>.lock`` (see ``cleanup_temp``).
INSTANCES_DIR = ".instances"
#: files fsynced one after another by each flusher thread of a batch (see ``LocalAudioFiles.write_many``)
FILES_PER_FLUSHER = 4
#: files at least this large (a card's range) are written straight to the device (``O_DIRECT``, see ``direct``),
#: each by a flusher thread of its own, which then fsyncs it
DIRECT_MIN = 4 << 20
#: how a batch's new files (under DIRECT_MIN) are made durable: one ``syncfs`` of their filesystem
#: ("syncfs"), an fsync of each file and directory ("fsync"), or syncfs where Linux supports it ("auto")
FLUSH_MODES = ("auto", "syncfs", "fsync")


def owner_dir(owner: str) -> str:
    """The directory of an owner's sessions: ``@name``, or ``@_<hash>`` for a name
    that is not a plain ASCII id (``_`` cannot start a plain name: no collision)."""
    if SESSION_ID_RE.fullmatch(owner):
        return "@" + owner
    return "@_" + hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class AudioFiles(abc.ABC):
    """Where chunk bytes live.

    Contract: when ``write_many`` reports success for a name, the complete
    bytes are durable under that name (data and directory entry).  Writes are
    idempotent: the same name and bytes may be written any number of times,
    also concurrently, and a name always ends up holding its complete bytes.
    A name that was never reported written (a crash or an error mid-write) may
    be left incomplete; the chunk store never points a row at such a name, and
    the next write of the name replaces it.  ``read`` raises FileNotFoundError
    for an unknown name.
    """

    @staticmethod
    def name_for(owner: str, session_id: str, seq: int, sha256: str, extension: str) -> str:
        """The storage name of a chunk, derived only from validated ids.

        The checksum is part of the name so that conflicting bytes under the
        same key can never overwrite the stored copy.
        """
        name = f"{owner_dir(owner)}/{session_id}/{seq:010d}.{sha256[:16]}.{extension}"
        if not SESSION_ID_RE.fullmatch(session_id) or not NAME_RE.fullmatch(name):
            raise ValueError("invalid storage name")
        return name

    @abc.abstractmethod
    def write_many(self, items: list[tuple[str, bytes]]) -> list[OSError | None]:
        """Write several files durably; one outcome per item (None: written).

        A failure of one item (disk full, say) does not stop the others.
        """

    def start_many(self, items: list[tuple[str, bytes]], defer_syncfs: bool = False,
                   helper: Executor | None = None, sync_fd: int | None = None) -> "Flush":
        """Begin ``write_many``: returns ``finish()``, which waits until the files are
        durable and returns their outcomes (the same list on every call).  Between the
        two the caller may prepare the next batch while these files are being flushed.
        ``helper``: a thread that may write some of the files meanwhile (``share_work``).

        ``defer_syncfs``: where the batch is made durable by one ``syncfs`` of the
        storage's filesystem, run it only inside ``finish()`` (``finish.syncfs`` is
        then True), so that it also covers what the caller writes to that filesystem
        meanwhile (the database's log, see ``ChunkStore``).  ``sync_fd``: the descriptor
        for that syncfs (``syncfs_descriptor``), opened by the caller before it began
        writing what the syncfs must cover; it is closed here, whatever happens."""
        if sync_fd is not None:
            os.close(sync_fd)
        return Flush(self.write_many(items))

    def syncfs_descriptor(self) -> int | None:
        """A descriptor for the ``syncfs`` of ``start_many(defer_syncfs=True)``, or None
        where the files are not flushed that way."""
        return None

    def verify(self, name: str, size: int, sha256: str) -> bool:
        """Whether ``name`` holds exactly ``size`` bytes hashing to ``sha256``, made durable
        (crash recovery: see ``ChunkStore.recover_unflushed``)."""
        try:
            data = self.read(name)
        except OSError:
            return False
        return len(data) == size and hashlib.sha256(data).hexdigest() == sha256

    def write(self, name: str, data: bytes) -> None:
        """Write one file durably (raises OSError)."""
        error = self.write_many([(name, data)])[0]
        if error is not None:
            raise error

    @abc.abstractmethod
    def read(self, name: str) -> bytes: ...

    @abc.abstractmethod
    def remove(self, name: str) -> None: ...

    @abc.abstractmethod
    def cleanup_temp(self) -> int:
        """Remove temporary files left by crashed writers; return how many."""

    def claim(self) -> None:
        """Mark this store as writing here for as long as it is open (``writers_elsewhere``)."""

    def writers_elsewhere(self) -> bool:
        """Whether another open store (this process or another) has claimed these files."""
        return False

    def close(self) -> None:
        """Release what the storage holds (threads, locks)."""

    def probe(self, min_free_bytes: int = 0) -> str | None:
        """None when a file can be stored now, else why not (for readiness)."""
        return None

    def migrate_layout(self, owners: dict[str, str]) -> int:
        """Move sessions of the pre-v2 layout (``<session>/...``) under their
        owner's directory; ``owners`` maps session id -> owner.  Idempotent;
        returns how many session directories were moved."""
        return 0


class Flush:
    """What ``start_many`` returns: call it to wait for the batch's outcomes (one per item,
    None: durable).  ``syncfs``: a syncfs of the storage's filesystem runs in the call.
    ``early``: the outcomes known before the flush (a write that already failed).
    ``syncfs_error``: once called, why that syncfs failed (None: it succeeded or did not run)."""

    def __init__(self, outcomes: list[OSError | None] | None = None,
                 wait: Callable[[], list[OSError | None]] | None = None, syncfs: bool = False,
                 early: list[OSError | None] | None = None):
        self._outcomes, self._wait, self.syncfs = outcomes, wait, syncfs
        self.early = list(early if early is not None else outcomes or [])
        self.syncfs_error: OSError | None = None

    def __call__(self) -> list[OSError | None]:
        if self._outcomes is None:
            self._outcomes = self._wait()
        return self._outcomes


class LocalAudioFiles(AudioFiles):
    """Files under ``root/<owner>/<session>/``, each created under its final name and fsynced with its directory."""

    def __init__(self, root: Path, flush: str = "auto"):
        if flush not in FLUSH_MODES:
            raise ValueError(f"flush must be one of {', '.join(FLUSH_MODES)}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._root = str(self.root)
        self._syncers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")
        self._host = socket.gethostname().replace(".", "_")[:32] or "host"
        self._instance = uuid.uuid4().hex
        self._lock_fd: int | None = None
        self._instance_guard = threading.Lock()
        #: a batch's small new files made durable by one ``syncfs`` instead of an fsync each (see start_many)
        self.group_flush = flush == "syncfs" or (flush == "auto" and syncfs_available)
        if flush == "syncfs" and not syncfs_available:
            raise ValueError("syncfs is not available here (Linux 5.8 or later needed): use --flush fsync")

    def _path(self, name: str) -> str:
        if not NAME_RE.fullmatch(name):
            raise OSError(errno.EINVAL, "not a storage name", name)
        return os.path.join(self._root, name)

    def write_many(self, items: list[tuple[str, bytes]]) -> list[OSError | None]:
        return self.start_many(items)()

    def start_many(self, items: list[tuple[str, bytes]], defer_syncfs: bool = False,
                   helper: Executor | None = None, sync_fd: int | None = None) -> Flush:
        """Write every file under its final name in one round of flushes.

        Each new file is created under its final name (``O_EXCL``) and its bytes
        written, on this thread (and ``helper``'s: see ``share_work``), each file's write-back started
        at once (``sync_file_range``); then the files are fsynced, by a few
        threads of up to ``FILES_PER_FLUSHER`` files each, while every directory
        that gained a name is fsynced beside them (the names exist from the
        moment of creation, so the directory's flush need not wait for the
        data).  A name is reported written only when its data and its directory
        entry are both durable: one round of flushes instead of three in a row
        (file, rename, directory).  Few threads: a thread per file cost the
        server a quarter more CPU per chunk in hand-offs (see docs/performance.md),
        and a handful of fsyncs in a row are cheap once their write-back is under
        way, while several flushers still overlap the device's flushes.

        With ``group_flush`` (``--flush syncfs``, or ``auto`` on Linux 5.8+) the
        small files are neither started nor fsynced one by one: a single
        ``syncfs`` of their filesystem, on a flusher thread, makes all of them and
        their directory entries durable in one flush of the device (it gives the
        guarantees of an fsync of every file there; see docs/durability.md).  Its
        descriptor is opened before the first file is written, so any write-back
        error since reaches it; it fails every small file of the batch.  With
        ``defer_syncfs`` it runs inside ``finish()``, on the caller's thread, after
        whatever the caller wrote to the filesystem meanwhile.

        A name that exists already (left incomplete by a crashed or failed
        write, or being written right now by another copy of the same chunk, on
        this node or another) is written the careful way instead: temporary
        file -> fsync -> atomic rename over it -> directory fsync, so that the
        name holds either what it held or complete bytes at every moment.  A
        write that fails empties its file and removes it only while the name is
        still its own: by then the name may hold another writer's complete copy.
        """
        outcomes: list[OSError | None] = [None] * len(items)
        # Opened before any file is written, so that its syncfs reports every write-back error since.
        if not any(len(data) < DIRECT_MIN for _, data in items):
            if sync_fd is not None:
                os.close(sync_fd)
            sync_fd = None
        elif sync_fd is None:
            sync_fd = self.syncfs_descriptor()
        paths: dict[int, str] = {}
        for index, (name, _) in enumerate(items):
            try:
                paths[index] = self._path(name)
            except OSError as exc:
                outcomes[index] = exc
        failed_dirs = self._make_dirs({os.path.dirname(path) for path in paths.values()})
        created: list[tuple[int, int]] = []  # (index, fd) of the files created and filled here
        large: list[tuple[int, int]] = []  # created here, filled (directly) and fsynced by a flusher each
        existing: list[int] = []
        for index, path in paths.items():
            outcomes[index] = failed_dirs.get(os.path.dirname(path))
            if outcomes[index] is not None:
                continue
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            except FileExistsError:
                existing.append(index)
                continue
            except OSError as exc:
                outcomes[index] = exc
                continue
            if len(items[index][1]) >= DIRECT_MIN:
                large.append((index, fd))
            else:
                created.append((index, fd))
        # Under a syncfs the flush writes them back; starting it here would only hold this thread up.
        filled = share_work(helper, lambda item: _fill(item[1], items[item[0]][1], writeback=sync_fd is None), created,
                           lambda item: len(items[item[0]][1]))
        for (index, _), error in zip(created, filled):
            outcomes[index] = error
        deferred = defer_syncfs and sync_fd is not None
        sync_failures: list[OSError] = []
        if sync_fd is not None and (created or deferred):
            # One syncfs makes the small files and their directory entries durable together
            # (deferred, also what the caller wrote: even when no file was created here).
            groups, flush = [created], partial(_syncfs_and_close, sync_fd, always=deferred, failures=sync_failures)
            directories = sorted({os.path.dirname(paths[index]) for index, _ in large})
        else:
            flushers = -(-len(created) // FILES_PER_FLUSHER)
            groups, flush = [created[start::flushers] for start in range(flushers)], _sync_and_close
            directories = sorted({os.path.dirname(paths[index]) for index, _ in created + large})
            if sync_fd is not None:
                os.close(sync_fd)
        tasks = ([partial(flush, [(fd, paths[index], outcomes[index]) for index, fd in group]) for group in groups]
                 + [partial(_fill_sync_and_close, fd, paths[index], items[index][1]) for index, fd in large]
                 + [partial(_fsync_quiet_dir, directory) for directory in directories]
                 + [partial(self._replace_synced, paths[index], items[index][1]) for index in existing])
        futures = [None if deferred and position == 0 else self._syncers.submit(task)
                   for position, task in enumerate(tasks)]

        def finish() -> list[OSError | None]:
            results = [tasks[0]() if future is None else future.result() for future in futures]
            flushers = len(groups)
            for group, errors in zip(groups, results[:flushers]):
                for (index, _), error in zip(group, errors):
                    outcomes[index] = error
            for (index, _), error in zip(large, results[flushers : flushers + len(large)]):
                outcomes[index] = error
            results = results[flushers + len(large) :]
            directory_errors = dict(zip(directories, results[: len(directories)]))
            for index, _ in created + large:
                outcomes[index] = outcomes[index] or directory_errors.get(os.path.dirname(paths[index]))
            for index, error in zip(existing, results[len(directories) :]):
                outcomes[index] = error
            flushed.syncfs_error = sync_failures[0] if sync_failures else None
            return outcomes

        flushed = Flush(wait=finish, syncfs=deferred, early=outcomes)
        return flushed

    def syncfs_descriptor(self) -> int | None:
        """A descriptor of the root for ``syncfs``, when small files are flushed that way."""
        if not self.group_flush:
            return None
        try:
            return os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None  # the files' own fsyncs will report what is wrong

    def _replace_synced(self, path: str, data: bytes) -> OSError | None:
        """Write ``path`` atomically over what it holds: temp -> fsync -> rename -> directory fsync."""
        try:
            tmp = self._tmp_for(path)
        except OSError as exc:
            return exc
        error = _write_synced((tmp, data))
        if error is None:
            try:
                os.replace(tmp, path)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                return exc
            error = _fsync_quiet_dir(os.path.dirname(path))
        return error

    def _make_dirs(self, directories: set[str]) -> dict[str, OSError]:
        """Create the missing session directories (and owner directories), made durable by
        an fsync of each directory that gained an entry: the owner directories that hold the
        new session directories and the root (many recorders starting at once share them);
        returns the ones that failed."""
        failed: dict[str, OSError] = {}
        created = []
        for directory in directories:
            if not os.path.isdir(directory):
                try:
                    os.makedirs(directory, exist_ok=True)
                    created.append(directory)
                except OSError as exc:
                    failed[directory] = exc
        if created:
            try:
                for parent in sorted({os.path.dirname(directory) for directory in created}) + [self._root]:
                    _fsync_dir(parent)
            except OSError as exc:
                failed.update(dict.fromkeys(created, exc))
        return failed

    def _tmp_for(self, path: str) -> str:
        self._hold_instance_lock()
        return os.path.join(os.path.dirname(path),
                            f".{os.path.basename(path)}.{self._instance}.{time.monotonic_ns()}{TMP_SUFFIX}")

    def _hold_instance_lock(self) -> None:
        """Hold an exclusive lock on ``.instances/<instance>.lock`` for the life of the
        process: the kernel drops it when the process dies (also on kill -9), so a
        tmp file whose instance lock can be taken belongs to a dead writer."""
        if self._lock_fd is not None:
            return
        with self._instance_guard:  # temp files are made on several flusher threads at once
            if self._lock_fd is not None:
                return
            directory = os.path.join(self._root, INSTANCES_DIR)
            os.makedirs(directory, exist_ok=True)
            fd = os.open(os.path.join(directory, f"{self._instance}.lock"), os.O_RDWR | os.O_CREAT, 0o640)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._lock_fd = fd

    def read(self, name: str) -> bytes:
        with open(self._path(name), "rb") as f:
            return f.read()

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(name))

    def verify(self, name: str, size: int, sha256: str) -> bool:
        """Whether ``name`` holds exactly ``size`` bytes hashing to ``sha256``; if so its data
        and directory entry are fsynced (they may have been only in the page cache, the
        process having died and not the machine)."""
        try:
            path = self._path(name)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                digest, read = hashlib.sha256(), 0
                while block := os.read(fd, 1 << 20):
                    digest.update(block)
                    read += len(block)
                if read != size or digest.hexdigest() != sha256:
                    return False
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(os.path.dirname(path))
            return True
        except OSError:
            return False

    def cleanup_temp(self, older_than: float = 3600.0) -> int:
        """Remove the tmp files of writers that are gone; return how many.

        A tmp file names the writer instance that made it (a random id per
        process, never a PID, which a container's PID 1 reuses on every
        restart).  The instance is alive exactly while it holds the lock on its
        ``.instances/<id>.lock``; several nodes may share this directory, and a
        live writer's files are left alone.  Files of the older
        ``<host>.<pid>`` naming are removed when of this host or older than
        ``older_than`` seconds.
        """
        removed = 0
        now = time.time()
        alive: dict[str, bool] = {}
        for tmp in list(self.root.glob(f"*/*/.*{TMP_SUFFIX}")) + list(self.root.glob(f"*/.*{TMP_SUFFIX}")):
            stem = tmp.name[: -len(TMP_SUFFIX)]
            instance = stem.rsplit(".", 2)[-2] if stem.count(".") >= 2 else ""
            try:
                if re.fullmatch(r"[0-9a-f]{32}", instance):
                    if instance not in alive:
                        alive[instance] = self._instance_alive(instance)
                    dead = not alive[instance]
                else:  # the older <name>.<host>.<pid>.<ns> naming
                    parts = stem.rsplit(".", 3)
                    dead = (len(parts) == 4 and parts[1] == self._host) or now - tmp.stat().st_mtime > older_than
                if dead:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        self._forget_dead_instances()
        return removed

    def _instance_alive(self, instance: str) -> bool:
        """Whether a writer instance still holds its lock (a missing lock file: dead)."""
        if instance == self._instance:
            return True
        try:
            fd = os.open(os.path.join(self._root, INSTANCES_DIR, f"{instance}.lock"), os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops the lock we may have taken
        return False

    def claim(self) -> None:
        self._hold_instance_lock()

    def writers_elsewhere(self) -> bool:
        directory = Path(self._root, INSTANCES_DIR)
        locks = directory.glob("*.lock") if directory.is_dir() else []
        return any(lock.stem != self._instance and self._instance_alive(lock.stem) for lock in locks)

    def _forget_dead_instances(self) -> None:
        """Remove the lock files of instances that are gone (no tmp files refer to them now);
        a young one may belong to a writer between creating and locking it."""
        directory = Path(self._root, INSTANCES_DIR)
        for lock in directory.glob("*.lock") if directory.is_dir() else []:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - lock.stat().st_mtime < 60:
                    continue
            if not self._instance_alive(lock.stem):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()

    def probe(self, min_free_bytes: int = 0) -> str | None:
        try:
            stat = os.statvfs(self._root)
            if stat.f_bavail * stat.f_frsize < min_free_bytes:
                return "disk full"
            self._hold_instance_lock()
            path = os.path.join(self._root, INSTANCES_DIR, f"probe-{self._instance}{TMP_SUFFIX}")
            error = _write_synced((path, b"ready"))
            with contextlib.suppress(OSError):
                os.unlink(path)
        except OSError as exc:
            error = exc
        if error is None:
            return None
        log.warning("readiness: the audio directory refuses writes: %s", error.strerror or error)
        return "disk full" if error.errno == errno.ENOSPC else "audio directory not writable"

    def close(self) -> None:
        """Release this writer's instance lock (the kernel does it too when the process dies)."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self._root, INSTANCES_DIR, f"{self._instance}.lock"))
            os.close(self._lock_fd)
            self._lock_fd = None
        self._syncers.shutdown(wait=False)

    def temp_files(self) -> list[Path]:
        return sorted(self.root.glob(f"*/*/.*{TMP_SUFFIX}"))

    def migrate_layout(self, owners: dict[str, str]) -> int:
        moved = 0
        for entry in sorted(os.listdir(self._root)):
            if entry.startswith((".", "@")) or not SESSION_ID_RE.fullmatch(entry):
                continue
            owner = owners.get(entry)
            source = os.path.join(self._root, entry)
            if owner is None or not os.path.isdir(source):
                log.warning("audio/%s belongs to no session: left where it is", entry)
                continue
            parent = os.path.join(self._root, owner_dir(owner))
            target = os.path.join(parent, entry)
            os.makedirs(parent, exist_ok=True)
            if not os.path.exists(target):
                os.rename(source, target)
            else:  # a half-done earlier move: move what is left file by file
                for name in os.listdir(source):
                    if not name.startswith("."):
                        os.replace(os.path.join(source, name), os.path.join(target, name))
                    else:
                        os.unlink(os.path.join(source, name))
                os.rmdir(source)
            _fsync_dir(parent)
            moved += 1
        if moved:
            _fsync_dir(self._root)
        return moved


def _fill(fd: int, data: bytes, writeback: bool = True) -> OSError | None:
    """Write ``data`` to the new file ``fd`` and (``writeback``) start its write-back; the
    error, if any.  Large data goes straight to the device where it can (see ``direct``)."""
    try:
        if len(data) >= DIRECT_MIN and write_direct(fd, data):
            return None
        view, offset = memoryview(data), 0
        while offset < len(view):  # from offset 0 also after a direct write that was refused midway
            offset += os.pwrite(fd, view[offset:], offset)
        if writeback:
            start_writeback(fd)
        return None
    except OSError as exc:
        return exc


def _fill_sync_and_close(fd: int, path: str, data: bytes) -> OSError | None:
    """``_fill`` then ``_sync_and_close`` one file, on a flusher thread."""
    [error] = _sync_and_close([(fd, path, _fill(fd, data))])
    return error


def _sync_and_close(files: list[tuple[int, str, OSError | None]], fsync: bool = True) -> list[OSError | None]:
    """fsync each filled file ``(fd, path, error)`` (one after another) and close it.  A file
    whose write or fsync failed is emptied, giving its space back, and removed while its
    name is still its own (another writer of the same chunk may have put a complete copy
    under the name meanwhile, the careful way: that one stays).  One outcome per file."""
    outcomes = []
    for fd, path, error in files:
        try:
            if error is None and fsync:
                os.fsync(fd)
        except OSError as exc:
            error = exc
        if error is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            with contextlib.suppress(OSError):
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    os.unlink(path)
        os.close(fd)
        outcomes.append(error)
    return outcomes


def _syncfs_and_close(sync_fd: int, files: list[tuple[int, str, OSError | None]],
                      always: bool = False, failures: list[OSError] | None = None) -> list[OSError | None]:
    """Make the filled files ``(fd, path, error)`` durable with one ``syncfs`` of their
    filesystem (``sync_fd`` was opened before they were written), then close them like
    ``_sync_and_close``.  A write-back error anywhere on the filesystem fails them all:
    syncfs cannot say whose it was, and a refused chunk is simply sent again.
    ``always``: run the syncfs even with no file to flush (it covers the caller's
    writes too); its error, if any, is also appended to ``failures``."""
    try:
        if always or any(error is None for _, _, error in files):
            syncfs(sync_fd)
        failure = None
    except OSError as exc:
        failure = exc
        if failures is not None:
            failures.append(exc)
    finally:
        os.close(sync_fd)
    return _sync_and_close([(fd, path, error or failure) for fd, path, error in files], fsync=False)


def _write_synced(job: tuple[str, bytes]) -> OSError | None:
    """Create ``tmp`` with ``data`` and fsync it; on failure remove it and return the error."""
    tmp, data = job
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        return exc
    [error] = _sync_and_close([(fd, tmp, _fill(fd, data))])
    return error


def _fsync_quiet_dir(directory: str) -> OSError | None:
    try:
        _fsync_dir(directory)
        return None
    except OSError as exc:
        return exc


def _fsync_dir(directory: str | Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
