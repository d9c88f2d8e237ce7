"""Reading the spool without writing anything: the view behind ``pending``, ``sessions`` and ``gaps``.

Opening a ``diskcache.Cache`` writes: it creates directories and stores its
settings, about 16 fsynced commits each time (cheap on an idle disk, tens of ms
on a busy one, issue 16); on a read-only disk (a mounted backup, a recorder's
card, ``chattr +i``) it fails, so even listing the queue would.  Listing
commands read through this view instead: the same ``Spool`` listing code over a
SQLite connection opened with ``mode=ro``.  On a spool other processes may be
writing (a recorder, an upload), that connection reads consistent snapshots
like any SQLite reader of a WAL database; on a read-only ``SCRIBE_HOME`` it is
also ``immutable=1`` (nothing can change there, so no locks are needed, and none
could be taken).
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

    def __init__(self, directory: Path, immutable: bool = True):
        self.directory = directory
        self.conn: sqlite3.Connection | None = None
        db = directory / "cache.db"
        if db.exists():
            try:
                if immutable:
                    self.conn = sqlite3.connect(f"file:{quote(str(db))}?mode=ro&immutable=1", uri=True)
                else:  # as patient with a writer as the Spool itself (diskcache's timeout)
                    self.conn = sqlite3.connect(f"file:{quote(str(db))}?mode=ro", uri=True, timeout=60)
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


def open_readonly(directory: Path, immutable: bool = True) -> Spool:
    """A ``Spool`` whose listings (chunks, pending, quarantined, sessions) read without writing anything.

    ``immutable``: the spool cannot change meanwhile (a read-only ``SCRIBE_HOME``); without it, other
    processes may write it while this one reads.  Raises SpoolError when the database cannot be read."""
    spool = Spool.__new__(Spool)
    spool.directory = Path(directory)
    spool.cache = _ReadOnlyCache(Path(directory), immutable)
    return spool
