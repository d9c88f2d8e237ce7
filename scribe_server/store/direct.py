"""Write a new file's bytes straight to the device (``O_DIRECT``), past the page cache.

A large chunk (a card's range of megabytes) is written once, fsynced at once and not
read again soon.  Written the ordinary way, its bytes are first copied into the page
cache, which must grow a page at a time: on the machines measured (a virtual machine,
where memory the guest had not touched lately costs the host a fault as well) that copy
was half the server's CPU on a card, 2.8 ms per MiB, while a direct write of the same
bytes costs ~0.15 ms per MiB and the device does the rest (see docs/performance.md).

``write_direct(fd, data)`` copies ``data`` into one of ``BUFFERS`` page-aligned buffers (the
memory they take is bounded however many threads write),
writes the largest multiple of ``ALIGN`` with ``O_DIRECT`` and the few bytes left over the
ordinary way.  Durability is unchanged: the caller still fsyncs the file (the
file's size and blocks, the tail, the device's cache) before relying on it.  Where direct
I/O is not available (another OS, a filesystem that refuses it, an alignment it rejects)
it returns False having written nothing that matters, and the caller writes the bytes the
ordinary way from offset 0.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading

#: what offsets, lengths and buffer addresses are aligned to: the largest logical block
#: size in use (512 or 4096 bytes); a page-aligned buffer satisfies both
ALIGN = 4096
#: a buffer is kept for the next file up to this size (larger ones are dropped after use)
KEEP_BUFFER = 8 << 20
#: direct writes at once, each with a page-aligned buffer of its own (more wait a few
#: milliseconds for one), so that their memory stays bounded (at most BUFFERS x the largest
#: chunk) however many flusher threads the store runs; two keep the device busy
BUFFERS = 2
O_DIRECT = getattr(os, "O_DIRECT", 0)
available = bool(O_DIRECT)

_free: list[mmap.mmap | None] = [None] * BUFFERS  # a slot each; None: free, nothing allocated yet
_returned = threading.Condition()


def _take(size: int) -> mmap.mmap | None:
    """A buffer of at least ``size`` bytes, once one is free (a direct write takes milliseconds);
    None when memory for it is short."""
    with _returned:
        while not _free:
            _returned.wait()
        buffer = _free.pop()
    if buffer is not None and len(buffer) >= size:
        return buffer
    if buffer is not None:
        buffer.close()
    try:
        return mmap.mmap(-1, -(-size // ALIGN) * ALIGN)  # anonymous: page-aligned
    except OSError:
        _give_back(None)
        return None


def _give_back(buffer: mmap.mmap | None) -> None:
    if buffer is not None and len(buffer) > KEEP_BUFFER:
        buffer.close()
        buffer = None
    with _returned:
        _free.append(buffer)
        _returned.notify()


def write_direct(fd: int, data: bytes | memoryview) -> bool:
    """Write ``data`` to the empty regular file ``fd`` from offset 0, its aligned part with
    ``O_DIRECT``; True when written (raises OSError for a device error: disk full, EIO),
    False when direct I/O is refused here (or memory for a buffer is short): then the caller
    writes it all, from offset 0."""
    view = memoryview(data).cast("B")
    aligned = len(view) - len(view) % ALIGN
    if not available or aligned == 0:
        return False
    buffer = _take(aligned)
    if buffer is None:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | O_DIRECT)
        except OSError:
            return False  # the filesystem has no direct I/O
        try:
            buffer[:aligned] = view[:aligned]
            with memoryview(buffer) as source:
                written = 0
                while written < aligned:
                    done = os.write(fd, source[written:aligned])
                    if done <= 0 or done % ALIGN:  # cannot go on aligned: finish the ordinary way
                        written += max(done, 0)
                        break
                    written += done
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return False  # an alignment this filesystem or device rejects
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    finally:
        _give_back(buffer)
    while written < len(view):
        written += os.pwrite(fd, view[written:], written)
    return True
