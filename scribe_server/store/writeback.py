"""Linux's flush calls that Python's ``os`` lacks: ``sync_file_range`` and ``syncfs``.

``start_writeback(fd)``: start writing a file's dirty pages to the device without waiting.

Python's ``os`` module has no ``sync_file_range``, so it is called through ctypes from the
C library.  ``start_writeback(fd)`` is a hint with no effect on durability: the caller
still ``fsync``s every file before relying on it.  Its use is that when a batch's files
are fsynced one after another, each file's data is already on its way to the device and
each ``fsync`` waits for little more than the flush.  Where the call does not exist (not
Linux, not glibc/musl) it does nothing and the ``fsync`` does all the work.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import sys

SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start write-out of dirty pages, do not wait


def _load(name: str, *argtypes):
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
available = _sync_file_range is not None
_syncfs = _load("syncfs", ctypes.c_int)


def _reports_errors(release: str) -> bool:
    """Linux 5.8 and later report writeback errors from ``syncfs`` (earlier ones returned 0)."""
    match = re.match(r"(\d+)\.(\d+)", release)
    return match is not None and (int(match[1]), int(match[2])) >= (5, 8)


#: ``syncfs`` exists and reports every writeback error of its filesystem since its descriptor was opened
syncfs_available = _syncfs is not None and sys.platform.startswith("linux") and _reports_errors(os.uname().release)


def start_writeback(fd: int) -> None:
    """Start writing back the whole file ``fd`` (a no-op where unsupported; errors are left
    for the ``fsync`` that follows to report, except a bad descriptor)."""
    if _sync_file_range is not None and _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) != 0:
        error = ctypes.get_errno()
        if error == errno.EBADF:  # a bug in the caller, not a device problem
            raise OSError(error, os.strerror(error))


def syncfs(fd: int) -> None:
    """Make everything written to the filesystem of ``fd`` durable: each file's data and
    metadata, as an ``fsync`` of every file would (syncfs(2)), in one flush of the device.
    Raises OSError for any writeback error on that filesystem since ``fd`` was opened (so
    open ``fd`` before writing what it must cover)."""
    if _syncfs is None:  # pragma: no cover - callers check syncfs_available
        raise OSError(errno.ENOSYS, "syncfs is not available")
    if _syncfs(fd) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
