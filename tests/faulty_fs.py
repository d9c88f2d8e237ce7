"""A card whose reader fails: a read-only passthrough FUSE filesystem (fusepy over Debian's
libfuse2) that answers EIO to reads of chosen files past a byte offset, as a worn card or a
flaky reader does.  Run as ``python tests/faulty_fs.py SOURCE MOUNTPOINT [REL=OFFSET ...]``
(foreground; unmount to stop); ``FaultyCard`` does that around a test.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

STAT_FIELDS = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")
STATVFS_FIELDS = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
                  "f_frsize", "f_namemax")


def serve(source: str, mountpoint: str, faults: dict[str, int]) -> None:
    from fuse import FUSE, FuseOSError, Operations

    class Faulty(Operations):
        def _path(self, path: str) -> str:
            return os.path.join(source, path.lstrip("/"))

        def getattr(self, path, fh=None):
            st = os.lstat(self._path(path))
            return {name: getattr(st, name) for name in STAT_FIELDS} | {"st_mtime": st.st_mtime_ns / 1e9}

        def readdir(self, path, fh):
            return [".", ".."] + os.listdir(self._path(path))

        def open(self, path, flags):
            return os.open(self._path(path), os.O_RDONLY)

        def read(self, path, size, offset, fh):
            limit = faults.get(path.lstrip("/"))
            if limit is not None and offset + size > limit:
                raise FuseOSError(errno.EIO)
            return os.pread(fh, size, offset)

        def release(self, path, fh):
            os.close(fh)

        def statfs(self, path):
            st = os.statvfs(self._path(path))
            return {name: getattr(st, name) for name in STATVFS_FIELDS}

    FUSE(Faulty(), mountpoint, foreground=True, ro=True, direct_io=True)


class FaultyCard:
    """``source`` mounted at ``mountpoint`` with reads of ``faults`` (rel path -> offset) failing."""

    def __init__(self, source: Path, mountpoint: Path, faults: dict[str, int]):
        self.source, self.mountpoint, self.faults = source, mountpoint, faults
        self.proc: subprocess.Popen | None = None

    def mount(self) -> "FaultyCard":
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        args = [f"{rel}={offset}" for rel, offset in self.faults.items()]
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.source), str(self.mountpoint), *args],
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the faulty card did not mount: {self.proc.stderr.read() if self.proc.poll() is not None else 'timeout'}")
            time.sleep(0.05)
        return self

    def unmount(self) -> None:
        if self.proc is None:
            return
        subprocess.run(["umount", str(self.mountpoint)], check=False, capture_output=True)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False, capture_output=True)
        self.proc = None


if __name__ == "__main__":
    source, mountpoint, *faults = sys.argv[1:]
    serve(source, mountpoint, {rel: int(offset) for rel, offset in (fault.split("=") for fault in faults)})
