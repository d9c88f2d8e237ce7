"""The per-session manifest of watched files: which chunk holds which bytes of which file.

A chunk sent by ``scribe watch`` carries ``file: {path, version, offset}``
(see docs/protocol.md); the chunk that closes a version also carries
``final``: the file's size, SHA-256 and the metadata its headers hold.  Two
tables keep this beside the chunks:

* ``file_chunks``: ``(owner, session, seq) -> (path, version, offset, size)``;
* ``file_versions``: one row per closed ``(owner, session, path, version)``.

Version *v* of a file is rebuilt by laying, in sequence order, the bytes of
every chunk of that path with a version <= *v* at its offset, then cutting at
the version's size; the result must hash to the version's SHA-256.  Writes
are idempotent (insert-or-ignore), so recording a chunk again after a retry
is harmless.  Sessions are referenced by ``(owner, session_id)`` only here,
so that a store keyed by owner adapts by changing the chunk lookup in
``_chunk_paths``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from typing import IO, Callable

import sqlalchemy as sa

from scribe_protocol import AudioChunk, ErrorCode, ProtocolError
from scribe_server.store import db

file_chunks = sa.Table(
    "file_chunks",
    db.metadata,
    sa.Column("owner", sa.String(64), primary_key=True),
    sa.Column("session_id", sa.String(64), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("path_key", sa.String(40), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("offset", sa.BigInteger, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Index("file_chunks_path", "owner", "session_id", "path_key"),
)

file_versions = sa.Table(
    "file_versions",
    db.metadata,
    sa.Column("owner", sa.String(64), primary_key=True),
    sa.Column("session_id", sa.String(64), primary_key=True),
    sa.Column("path_key", sa.String(40), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("closing_seq", sa.BigInteger, nullable=False),
    sa.Column("info", sa.Text, nullable=False),  # the JSON of ``final`` (metadata, rate, ...)
    sa.Column("created_at", sa.Float, nullable=False),
)


def path_key(path: str) -> str:
    return hashlib.sha1(path.encode("utf-8")).hexdigest()


class FileManifest:
    """Reads and writes the two tables; ``read_chunk(owner, session, seq) -> bytes`` fetches chunk bytes."""

    def __init__(self, engine: sa.Engine, chunk_paths: Callable[[str, str, list[int]], dict[int, str]],
                 read_file: Callable[[str], bytes], gate=None):
        self.engine = engine
        self._chunk_paths = chunk_paths
        self._read_file = read_file
        #: the store's ``ReadGate``: reads never see rows that are not durable yet
        self._reading = gate.reading if gate is not None else contextlib.nullcontext

    # writes -----------------------------------------------------------------
    def record(self, owner: str, chunk: AudioChunk) -> None:
        """Note where ``chunk`` belongs (and, for a closing chunk, the version it closes); idempotent."""
        if chunk.file is None:
            return
        with self.engine.begin() as conn:
            self.record_in(conn, owner, chunk)

    @staticmethod
    def record_in(conn: sa.Connection, owner: str, chunk: AudioChunk) -> None:
        """``record`` inside the caller's transaction (the chunk writer's, beside the chunk's row)."""
        ref = chunk.file
        if ref is None:
            return
        key = path_key(ref.path)
        conn.execute(db.insert_ignore(conn, file_chunks).values(
            owner=owner, session_id=chunk.session_id, seq=chunk.sequence, path_key=key, path=ref.path,
            version=ref.version, offset=ref.offset, size=chunk.size))
        if ref.final is not None:
            row = dict(size=ref.final["size"], sha256=ref.final["sha256"], closing_seq=chunk.sequence,
                       info=json.dumps(ref.final))
            conn.execute(db.insert_ignore(conn, file_versions).values(
                owner=owner, session_id=chunk.session_id, path_key=key, version=ref.version, path=ref.path,
                created_at=db.now(), **row))
            # A later close of the same version (a client that lost its spool and took the
            # file again) describes what the chunks now rebuild: the latest close wins.
            conn.execute(file_versions.update().where(
                file_versions.c.owner == owner, file_versions.c.session_id == chunk.session_id,
                file_versions.c.path_key == key, file_versions.c.version == ref.version,
                file_versions.c.closing_seq < chunk.sequence).values(**row))

    @staticmethod
    def forget_in(conn: sa.Connection, owner: str, session_id: str, seq: int) -> None:
        """Remove what was recorded for a chunk whose row is removed (in the caller's transaction)."""
        conn.execute(file_chunks.delete().where(file_chunks.c.owner == owner, file_chunks.c.session_id == session_id,
                                                file_chunks.c.seq == seq))
        conn.execute(file_versions.delete().where(file_versions.c.owner == owner,
                                                  file_versions.c.session_id == session_id,
                                                  file_versions.c.closing_seq == seq))

    # reads ------------------------------------------------------------------
    def files(self, owner: str, session_id: str) -> list[dict]:
        """The latest closed version of every file of the session, in path order."""
        with self._reading(), self.engine.connect() as conn:
            rows = conn.execute(sa.select(file_versions).where(
                file_versions.c.owner == owner, file_versions.c.session_id == session_id)
                .order_by(file_versions.c.path, file_versions.c.version)).all()
        latest: dict[str, dict] = {}
        for row in rows:
            info = json.loads(row.info)
            latest[row.path] = {
                "path": row.path, "version": row.version, "versions": row.version, "size": row.size,
                "sha256": row.sha256, "mtime": info.get("mtime"), "startTime": info.get("startTime"),
                "sampleRate": info.get("sampleRate"), "channels": info.get("channels"),
                "sampleFormat": info.get("sampleFormat"), "container": info.get("container"),
                "frames": info.get("frames"), "metadata": info.get("metadata") or {},
                "warnings": info.get("warnings") or [], "closingSeq": row.closing_seq,
            }
        return [latest[path] for path in sorted(latest)]

    def chunk_count(self, owner: str, session_id: str) -> int:
        """How many of the session's chunks are byte ranges of watched files."""
        with self._reading(), self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(file_chunks).where(
                file_chunks.c.owner == owner, file_chunks.c.session_id == session_id)).scalar_one()

    def version(self, owner: str, session_id: str, path: str, version: int | None = None):
        """The row of one closed version (the latest when ``version`` is None); not_found when absent."""
        query = sa.select(file_versions).where(
            file_versions.c.owner == owner, file_versions.c.session_id == session_id,
            file_versions.c.path_key == path_key(path))
        if version is not None:
            query = query.where(file_versions.c.version == version)
        with self._reading(), self.engine.connect() as conn:
            row = conn.execute(query.order_by(file_versions.c.version.desc()).limit(1)).first()
        if row is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, "the session holds no such file (or version)")
        return row

    def rebuild(self, owner: str, session_id: str, path: str, version: int | None = None) -> tuple[IO[bytes], dict]:
        """A temporary file holding the version's exact bytes (sha256-checked), and its manifest row as a dict.

        Memory stays at one chunk; raises ``incomplete`` while chunks are missing.
        """
        row = self.version(owner, session_id, path, version)
        with self._reading(), self.engine.connect() as conn:
            parts = conn.execute(sa.select(file_chunks.c.seq, file_chunks.c.offset, file_chunks.c.size).where(
                file_chunks.c.owner == owner, file_chunks.c.session_id == session_id,
                file_chunks.c.path_key == row.path_key, file_chunks.c.version <= row.version)
                .order_by(file_chunks.c.seq)).all()
        if not _covers(parts, row.size):
            raise ProtocolError(ErrorCode.INCOMPLETE, f"{path} (version {row.version}) is not complete on the "
                                "server yet: some of its chunks are missing")
        out = tempfile.TemporaryFile()
        try:
            for start in range(0, len(parts), 500):
                batch = parts[start : start + 500]
                names = self._chunk_paths(owner, session_id, [p.seq for p in batch])
                for part in batch:
                    if part.offset >= row.size:
                        continue
                    data = self._read_file(names[part.seq])
                    out.seek(part.offset)
                    out.write(data[: row.size - part.offset])
            out.truncate(row.size)
            out.seek(0)
            digest = hashlib.sha256()
            while block := out.read(1 << 20):
                digest.update(block)
            if digest.hexdigest() != row.sha256:
                raise ProtocolError(ErrorCode.INCOMPLETE, f"{path} (version {row.version}) does not match its "
                                    "sha256 yet: a chunk is missing or stale")
            out.seek(0)
        except BaseException:
            out.close()
            raise
        return out, {"path": row.path, "version": row.version, "size": row.size, "sha256": row.sha256,
                     **{k: v for k, v in json.loads(row.info).items() if k not in ("size", "sha256")}}


def _covers(parts, size: int) -> bool:
    """True when the chunks' byte ranges cover ``[0, size)``."""
    reach = 0
    for offset, length in sorted((p.offset, p.size) for p in parts):
        if offset > reach:
            return False
        reach = max(reach, offset + length)
    return reach >= size
