"""Reading a spool that cannot be written (a read-only ``SCRIBE_HOME``).

``diskcache.Cache`` opens its database read-write and creates directories, so
on a read-only disk (a mounted backup, a recorder's card, ``chattr +i``)
even listing the queue would fail.  Listing commands (``pending``,
``sessions``) fall back to this view: the same ``Spool`` listing code over a
SQLite connection opened with ``mode=ro&immutable=1``.  Nothing can change in
a read-only spool, so reading it without locks is safe.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from urllib.parse import quote

from diskcache.core import MODE_RAW

from scribe_cli.errors import SpoolError
from scribe_cli.spool import Spool


def writable(path: Path) -> bool:
    """Whether files can be created at ``path`` (or, when it does not exist, in its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.access(path, os.W_OK)


class _ReadOnlyCache:
    """The two ``diskcache.Cache`` calls ``Spool``'s listings make, on a read-only connection."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.conn: sqlite3.Connection | None = None
        db = directory / "cache.db"
        if db.exists():
            try:
                self.conn = sqlite3.connect(f"file:{quote(str(db))}?mode=ro&immutable=1", uri=True)
                self.conn.execute("SELECT 1 FROM Cache LIMIT 1")
            except sqlite3.Error as exc:
                raise SpoolError(f"cannot read the spool {db}: {exc}") from None

    def _sql(self, query: str, params=()):
        if self.conn is None:  # no spool yet: nothing is spooled
            return sqlite3.connect(":memory:").execute("SELECT NULL, NULL, NULL WHERE 0")
        return self.conn.execute(query, params)

    def get(self, key: str):
        if self.conn is None:
            return None
        row = self.conn.execute("SELECT mode, value, filename FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchone()
        if row is None:
            return None
        mode, value, filename = row
        if mode == MODE_RAW and isinstance(value, str):
            return value
        if filename:
            try:
                data = (self.directory / filename).read_bytes()
            except OSError:
                return None
            return data.decode("utf-8", "replace") if mode != MODE_RAW or value is None else data
        return value

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def open_readonly(directory: Path) -> Spool:
    """A ``Spool`` whose listings (chunks, pending, quarantined, sessions) read without writing anything."""
    spool = Spool.__new__(Spool)
    spool.directory = Path(directory)
    spool.cache = _ReadOnlyCache(Path(directory))
    return spool
