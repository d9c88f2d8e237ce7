"""Start writing a file's dirty pages to the device without waiting: Linux's ``sync_file_range``.

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

SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start write-out of dirty pages, do not wait


def _load():
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load()
available = _sync_file_range is not None


def start_writeback(fd: int) -> None:
    """Start writing back the whole file ``fd`` (a no-op where unsupported; errors are left
    for the ``fsync`` that follows to report, except a bad descriptor)."""
    if _sync_file_range is not None and _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) != 0:
        error = ctypes.get_errno()
        if error == errno.EBADF:  # a bug in the caller, not a device problem
            raise OSError(error, os.strerror(error))
