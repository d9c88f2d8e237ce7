"""Audio file storage: durable, atomic, addressed by the identity of the data.

``AudioFiles`` is the interface the chunk store talks to; ``LocalAudioFiles``
keeps files in a directory (a local disk or a volume shared by several
nodes).  An object store can implement the same four methods later.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scribe_protocol import SESSION_ID_RE

TMP_SUFFIX = ".tmp"
#: ``<session>/<seq>.<sha16>.<ext>``: no separators, no ``..``, nothing else.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}/[0-9]{10}\.[0-9a-f]{16}\.[a-z0-9]{1,8}")


class AudioFiles(abc.ABC):
    """Where chunk bytes live.

    Contract: ``write`` is atomic and durable when it returns (a crash leaves
    either no file or the complete file under ``name``), and idempotent (the
    same name and bytes may be written any number of times, also
    concurrently).  ``read`` raises FileNotFoundError for an unknown name.
    """

    @staticmethod
    def name_for(session_id: str, seq: int, sha256: str, extension: str) -> str:
        """The storage name of a chunk, derived only from validated ids.

        The checksum is part of the name so that conflicting bytes under the
        same key can never overwrite the stored copy.
        """
        name = f"{session_id}/{seq:010d}.{sha256[:16]}.{extension}"
        if not SESSION_ID_RE.fullmatch(session_id) or not NAME_RE.fullmatch(name):
            raise ValueError("invalid storage name")
        return name

    @abc.abstractmethod
    def write(self, name: str, data: bytes, sync_dir: bool = True) -> None:
        """Write ``name`` atomically.  With ``sync_dir=False`` the caller must
        call ``sync(name)`` (or ``sync_all``) before relying on it."""

    def write_many(self, items: list[tuple[str, bytes]]) -> list[OSError | None]:
        """Write several files atomically (``sync_dir=False``); one outcome per item.

        A failure of one item (disk full, say) leaves no file for it and does
        not stop the others.  Call ``sync_all`` before relying on the names.
        """
        outcomes: list[OSError | None] = []
        for name, data in items:
            try:
                self.write(name, data, sync_dir=False)
                outcomes.append(None)
            except OSError as exc:
                outcomes.append(exc)
        return outcomes

    def sync_all(self, names: set[str]) -> None:
        """Make the given names' renames durable (one directory fsync per directory)."""

    @abc.abstractmethod
    def read(self, name: str) -> bytes: ...

    @abc.abstractmethod
    def remove(self, name: str) -> None: ...

    @abc.abstractmethod
    def cleanup_temp(self) -> int:
        """Remove temporary files left by crashed writers; return how many."""


class LocalAudioFiles(AudioFiles):
    """Files under ``root/<session>/``, written tmp -> fsync -> rename -> fsync(dir)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._root = str(self.root)
        self._syncers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")
        self._host = socket.gethostname().replace(".", "_")[:32] or "host"

    def _path(self, name: str) -> str:
        if not NAME_RE.fullmatch(name):
            raise OSError(errno.EINVAL, "not a storage name", name)
        return os.path.join(self._root, name)

    def write(self, name: str, data: bytes, sync_dir: bool = True) -> None:
        error = self.write_many([(name, data)])[0]
        if error is not None:
            raise error
        if sync_dir:
            _fsync_dir(os.path.dirname(self._path(name)))

    def write_many(self, items: list[tuple[str, bytes]]) -> list[OSError | None]:
        """Write every file to a temp name side by side (create, write, fsync), then rename.

        The files of a batch are written by several threads at once, so their
        fsyncs overlap on the device (a journal commit serves several of them):
        that is what makes a batch cheaper than its files written one by one.
        """
        outcomes: list[OSError | None] = [None] * len(items)
        paths: dict[int, str] = {}
        for index, (name, _) in enumerate(items):
            try:
                paths[index] = self._path(name)
            except OSError as exc:
                outcomes[index] = exc
        failed_dirs = self._make_dirs({os.path.dirname(path) for path in paths.values()})
        jobs: list[tuple[int, str, str, bytes]] = []  # (index, tmp, path, data)
        for index, path in paths.items():
            outcomes[index] = failed_dirs.get(os.path.dirname(path))
            if outcomes[index] is None:
                jobs.append((index, self._tmp_for(path), path, items[index][1]))
        for (index, tmp, path, _), error in zip(jobs, self._map(_write_synced, [(tmp, data) for _, tmp, _, data in jobs])):
            if error is None:
                try:
                    os.replace(tmp, path)
                except OSError as exc:
                    error = exc
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
            outcomes[index] = error
        return outcomes

    def _make_dirs(self, directories: set[str]) -> dict[str, OSError]:
        """Create the missing session directories, made durable by one fsync of the root
        (many recorders starting at once); returns the ones that failed."""
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
                _fsync_dir(self._root)
            except OSError as exc:
                failed.update(dict.fromkeys(created, exc))
        return failed

    def _tmp_for(self, path: str) -> str:
        return os.path.join(os.path.dirname(path),
                            f".{os.path.basename(path)}.{self._host}.{os.getpid()}.{time.monotonic_ns()}{TMP_SUFFIX}")

    def _map(self, fn, args: list) -> list:
        """``fn`` over ``args``, side by side when there are several (fsyncs overlap on the device)."""
        if len(args) <= 1:
            return [fn(arg) for arg in args]
        return list(self._syncers.map(fn, args))

    def sync_all(self, names: set[str]) -> None:
        directories = sorted({os.path.dirname(self._path(name)) for name in names})
        for error in self._map(_fsync_quiet_dir, directories):
            if error is not None:
                raise error

    def read(self, name: str) -> bytes:
        with open(self._path(name), "rb") as f:
            return f.read()

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(name))

    def cleanup_temp(self, older_than: float = 3600.0) -> int:
        """Remove tmp files of dead local writers, or of any writer after ``older_than`` s.

        Several nodes may share this directory; a tmp file of a live writer on
        another host is left alone until it is clearly abandoned.
        """
        removed = 0
        now = time.time()
        for tmp in self.root.glob(f"*/.*{TMP_SUFFIX}"):
            parts = tmp.name[: -len(TMP_SUFFIX)].rsplit(".", 3)
            host, pid = (parts[1], parts[2]) if len(parts) == 4 else ("", "")
            try:
                stale = now - tmp.stat().st_mtime > older_than
                dead_local = host == self._host and pid.isdigit() and not _pid_alive(int(pid))
                if stale or dead_local:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def temp_files(self) -> list[Path]:
        return sorted(self.root.glob(f"*/.*{TMP_SUFFIX}"))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_synced(job: tuple[str, bytes]) -> OSError | None:
    """Create ``tmp`` with ``data`` and fsync it; on failure remove it and return the error."""
    tmp, data = job
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except OSError as exc:
        return exc
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        return None
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return exc


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
