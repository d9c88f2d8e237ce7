"""The spool's one adapter to diskcache: a durable ``Disk`` and the private API the spool relies on.

Everything here depends on diskcache 5.x internals (pinned ``<6``;
``tests/test_spool_crash.py`` pins each assumption down):

* ``Cache._sql`` and the ``Cache`` table's ``key``/``raw``/``mode``/``value``/
  ``filename`` columns, for range queries and for the list of referenced
  value files;
* ``Cache._txn_id``, to know whether this thread's transaction is the
  outermost one;
* ``Cache._transact`` calls ``Disk.remove`` for the files of deleted or
  replaced rows when *its* block ends, which for a block nested in an outer
  ``transact()`` is before the outer transaction commits.  A crash in between
  used to leave rows whose audio was gone.  ``DurableDisk`` therefore defers
  every removal made inside ``deferred_removals`` until that block has
  committed; a crash then leaves, at worst, unreferenced files, which
  ``sweep_orphans`` removes.

A value file written inside ``unsynced`` is not fsynced (nor its directory):
``Spool.seal`` writes several so, then fsyncs them together with
``fsync_values`` before it lets their source go.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from typing import Iterator

import diskcache
from diskcache.core import MODE_BINARY, MODE_PICKLE, MODE_RAW, UNKNOWN

#: diskcache's value file names: two levels of hex directories, 28 hex digits, ``.val``.
VALUE_FILE = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{28}\.val$")


class DurableDisk(diskcache.Disk):
    """A diskcache ``Disk`` that fsyncs value files, never pickles, and unlinks only after commit."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._local = threading.local()

    def store(self, value, read, key=UNKNOWN):
        if type(value) not in (bytes, str):
            raise TypeError("the spool stores bytes and JSON text only")
        if type(value) is bytes and len(value) >= self.min_file_size:
            # diskcache writes bytes by iterating an io.BytesIO, i.e. line by line: for audio,
            # one write() per ~256 bytes (measured 1.97 against 1.15 ms CPU per MiB)
            filename, full_path = self.filename(key, value)
            self._write(full_path, iter((value,)), "xb")
            return len(value), MODE_BINARY, filename, None
        return super().store(value, read, key=key)

    def fetch(self, mode, filename, value, read):
        if mode == MODE_PICKLE:
            raise OSError("refusing to unpickle a spool value")
        return super().fetch(mode, filename, value, read)

    def remove(self, file_path):
        """Unlink a value file, or note it for after the commit when inside ``deferred_removals``.

        Unlike diskcache's, leave its (reused) directory in place: diskcache
        tries ``os.removedirs`` after every removal, an exception per chunk.
        """
        deferred = getattr(self._local, "deferred", None)
        if deferred is not None:
            deferred.append(file_path)
            return
        self.unlink(file_path)

    def unlink(self, file_path: str) -> None:
        with contextlib.suppress(OSError):  # already gone (another process swept it): fine
            os.remove(os.path.join(self._directory, file_path))

    def _write(self, full_path, iterator, mode, encoding=None):
        directory = os.path.dirname(full_path)
        new_dirs = not os.path.isdir(directory)
        size = super()._write(full_path, iterator, mode, encoding)
        if getattr(self._local, "unsynced", False):
            return size  # Spool.seal fsyncs it (and its directories) later
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


def fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def unsynced(cache: diskcache.Cache) -> Iterator[None]:
    """Value files written by this thread inside the block are not fsynced (see the module docstring)."""
    disk: DurableDisk = cache.disk
    disk._local.unsynced = True
    try:
        yield
    finally:
        disk._local.unsynced = False


def fsync_values(cache: diskcache.Cache, keys: list[str], threads: int = 4) -> int:
    """Fsync the value files of ``keys`` (absent keys and inline values skipped) and their
    directories, a few files at once (this kind of disk flushes in parallel); how many files."""
    from concurrent.futures import ThreadPoolExecutor

    names = []
    for start in range(0, len(keys), 500):
        part = keys[start : start + 500]
        names += [name for (name,) in rows(cache, "SELECT filename FROM Cache WHERE filename IS NOT NULL AND raw = 1 "
                                                 f"AND key IN ({','.join('?' * len(part))})", tuple(part))]
    if not names:
        return 0
    paths = [os.path.join(cache.directory, name) for name in names]
    directories = sorted({d for path in paths for d in _parents(os.path.dirname(path), cache.directory)})

    def fsync(path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
        except FileNotFoundError:
            return  # acknowledged and removed meanwhile
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(min(threads, len(paths))) as pool:
        list(pool.map(fsync, paths))
        list(pool.map(fsync, directories))
    return len(paths)


def _parents(directory: str, top: str) -> list[str]:
    """``directory`` and its parents up to and including ``top`` (a value file's two hex levels and the spool)."""
    out = [directory]
    while os.path.normpath(directory) != os.path.normpath(top) and len(out) < 4:
        directory = os.path.dirname(directory)
        out.append(directory)
    return out


def in_transaction(cache: diskcache.Cache) -> bool:
    """True when this thread already holds ``cache``'s write transaction."""
    return cache._txn_id == threading.get_ident()


@contextlib.contextmanager
def deferred_removals(cache: diskcache.Cache) -> Iterator[None]:
    """One write transaction whose value files are unlinked only once it has committed.

    Nested in another ``deferred_removals`` it joins the outer one.  Nested in
    a plain ``cache.transact()`` (which cannot tell us when it commits) the
    files are left behind for ``sweep_orphans``: leaking a file is safe,
    unlinking one a rolled-back row still points to is not.
    """
    disk: DurableDisk = cache.disk
    if getattr(disk._local, "deferred", None) is not None:
        with cache.transact():
            yield
        return
    outer = in_transaction(cache)
    disk._local.deferred = files = []
    try:
        with cache.transact():
            yield
    finally:
        disk._local.deferred = None
    if not outer:
        for name in files:
            disk.unlink(name)


def rows(cache: diskcache.Cache, statement: str, args: tuple = ()) -> list[tuple]:
    """Run a read-only query on diskcache's ``Cache`` table."""
    return cache._sql(statement, args).fetchall()


def raw_texts(cache: diskcache.Cache, keys: list[str]) -> list[tuple[str, str]]:
    """The (key, value) of those ``keys`` that exist and hold small text, in one query per 500 keys."""
    out = []
    for start in range(0, len(keys), 500):
        part = keys[start : start + 500]
        found = rows(cache, f"SELECT key, mode, value FROM Cache WHERE raw = 1 AND key IN ({','.join('?' * len(part))})",
                     tuple(part))
        for key, mode, value in found:
            text = value if mode == MODE_RAW and isinstance(value, str) else cache.get(key)
            if isinstance(text, str):
                out.append((key, text))
    return out


def delete_keys(cache: diskcache.Cache, keys: list[str]) -> None:
    """Delete the rows of string ``keys`` (absent ones ignored) in one statement per 500 keys.

    ``cache.delete`` costs two statements and a Python round per key; this does
    what it does (diskcache's triggers keep its count and size) for many at once.
    Call it inside ``deferred_removals``: the value files of the deleted rows are
    unlinked after the commit, like every other removal here.
    """
    for start in range(0, len(keys), 500):
        part = keys[start : start + 500]
        found = rows(cache, f"SELECT rowid, filename FROM Cache WHERE raw = 1 AND key IN ({','.join('?' * len(part))})",
                     tuple(part))
        if not found:
            continue
        cache._sql(f"DELETE FROM Cache WHERE rowid IN ({','.join('?' * len(found))})", tuple(r for r, _ in found))
        for _, filename in found:
            if filename:
                cache.disk.remove(filename)


def value_files(directory: str) -> set[str]:
    """Relative paths of the diskcache value files under ``directory``."""
    found = set()
    with contextlib.suppress(FileNotFoundError):
        for first in os.scandir(directory):
            if not (first.is_dir(follow_symlinks=False) and len(first.name) == 2):
                continue
            for second in os.scandir(first.path):
                if not second.is_dir(follow_symlinks=False):
                    continue
                for entry in os.scandir(second.path):
                    name = f"{first.name}/{second.name}/{entry.name}"
                    if VALUE_FILE.match(name):
                        found.add(name)
    return found


def referenced(cache: diskcache.Cache, names: Iterator[str] | None = None) -> set[str]:
    """The value files rows point to (all, or those among ``names``)."""
    if names is None:
        return {name for (name,) in rows(cache, "SELECT filename FROM Cache WHERE filename IS NOT NULL")}
    names = list(names)
    out: set[str] = set()
    for start in range(0, len(names), 500):
        part = names[start : start + 500]
        marks = ",".join("?" * len(part))
        out.update(name for (name,) in rows(cache, f"SELECT filename FROM Cache WHERE filename IN ({marks})",
                                            tuple(part)))
    return out


def sweep_orphans(cache: diskcache.Cache) -> tuple[int, int]:
    """Unlink value files no row points to; return (files, bytes).

    Safe while other processes write: a value file is written only inside a
    write transaction (``Spool.add`` holds one around ``set``), so once we
    hold the write lock ourselves, every file seen unreferenced before taking
    it belongs to a transaction that rolled back or died, or to a removal
    whose unlink the crash prevented.  Candidates are found without the lock
    and re-checked under it, so writers wait only for the re-check.
    """
    directory = cache.directory
    candidates = value_files(directory) - referenced(cache)
    if not candidates:
        return 0, 0
    count = size = 0
    with cache.transact():
        orphans = candidates - referenced(cache, iter(candidates))
        for name in sorted(orphans):
            path = os.path.join(directory, name)
            try:
                length = os.path.getsize(path)
                os.remove(path)
            except FileNotFoundError:
                continue
            count, size = count + 1, size + length
    return count, size


def missing_values(cache: diskcache.Cache, prefix: str) -> list[str]:
    """Keys under ``prefix`` whose row names a value file that is not on disk."""
    found = rows(cache, "SELECT key, filename FROM Cache WHERE key >= ? AND key < ? AND raw = 1 "
                        "AND filename IS NOT NULL", (prefix, prefix + "\uffff"))
    return [key for key, name in found if not os.path.exists(os.path.join(cache.directory, name))]
