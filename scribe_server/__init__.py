"""scribe-server: the exactly-once chunk store behind the resume protocol.

Layout (protocol -> store): ``events`` and ``http_api`` validate with
``scribe_protocol`` and call ``store.ChunkStore``, which keeps rows in a
database (``store.db``) and bytes in ``store.files``.
"""

__version__ = "0.1.0"
