"""The chunk store's reads: sessions, gaps, checksums, listings and chunk bytes.

A mixin of ``ChunkStore`` (``__init__.py``), which supplies ``engine``, ``files``
and ``gate``.  Every read that could tell a client a chunk is stored holds
``gate.reading()`` around its query (never across a ``yield``, never nested), so
that rows committed ahead of their flush are never seen (see
``ChunkStore._commit_riding``).
"""

from __future__ import annotations

from typing import Iterator

import sqlalchemy as sa

from scribe_protocol import ErrorCode, ProtocolError
from scribe_protocol.gaps import MissingReport, missing_report
from scribe_server.store.db import chunks, sessions

NOT_FOUND_MESSAGE = "session not found"


class StoreReads:
    """Reads keyed by ``(owner, session_id)``; each owner sees only its own sessions."""

    def _session_row(self, owner: str, session_id: str):
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sessions).where(sessions.c.owner == owner, sessions.c.id == session_id)).first()

    def _find_chunk(self, owner: str, session_id: str, seq: int):
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(chunks.c.id, chunks.c.sha256, chunks.c.audio_path).where(
                    chunks.c.owner == owner, chunks.c.session_id == session_id, chunks.c.seq == seq
                )
            ).first()

    def owned_session(self, owner: str, session_id: str):
        """The owner's session row, or ``not_found``."""
        session = self._session_row(owner, session_id)
        if session is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, NOT_FOUND_MESSAGE)
        return session

    def missing(self, owner: str, session_id: str) -> MissingReport:
        """Gaps of a session in one ordered pass over its sequence numbers.

        The numbers come straight from the driver's cursor (an index-only scan
        of ``UNIQUE (session_id, seq)``), skipping SQLAlchemy's per-row result
        processing: 100,000 chunks answer in well under 100 ms.
        """
        session = self.owned_session(owner, session_id)
        with self.gate.reading(), self.engine.connect() as conn:
            cursor = conn.connection.driver_connection.cursor()
            mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
            try:
                cursor.execute(f"SELECT seq FROM chunks WHERE owner = {mark} AND session_id = {mark} ORDER BY seq",
                               (owner, session_id))
                rows = cursor.fetchall()
            finally:
                cursor.close()
        return missing_report((row[0] for row in rows), session.final_seq)

    def held_checksums(self, owner: str, session_id: str, seqs: list[int]) -> dict[int, str]:
        """The checksums of the chunks among ``seqs`` that the server holds."""
        self.owned_session(owner, session_id)
        out: dict[int, str] = {}
        with self.gate.reading(), self.engine.connect() as conn:
            for start in range(0, len(seqs), 500):
                batch = seqs[start : start + 500]
                rows = conn.execute(
                    sa.select(chunks.c.seq, chunks.c.sha256).where(
                        chunks.c.owner == owner, chunks.c.session_id == session_id, chunks.c.seq.in_(batch)
                    )
                )
                out.update({row.seq: row.sha256 for row in rows})
        return out

    def list_sessions(self, owner: str) -> list[dict]:
        """The owner's sessions with chunk counts, newest first."""
        stats = (
            sa.select(
                chunks.c.session_id,
                sa.func.count().label("total"),
                sa.func.max(chunks.c.seq).label("max_seq"),
                sa.func.coalesce(sa.func.sum(chunks.c.size), 0).label("bytes"),
            )
            .where(chunks.c.owner == owner)
            .group_by(chunks.c.session_id)
            .subquery()
        )
        query = (
            sa.select(sessions, stats.c.total, stats.c.max_seq, stats.c.bytes)
            .select_from(sessions.outerjoin(stats, stats.c.session_id == sessions.c.id))
            .where(sessions.c.owner == owner)
            .order_by(sessions.c.created_at.desc())
        )
        with self.gate.reading(), self.engine.connect() as conn:
            return [
                {
                    "sessionId": row.id,
                    "createdAt": row.created_at,
                    "finalSeq": row.final_seq,
                    "totalChunks": row.total or 0,
                    "maxSeq": -1 if row.max_seq is None else row.max_seq,
                    "bytes": int(row.bytes or 0),
                }
                for row in conn.execute(query)
            ]

    def session_chunks(self, owner: str, session_id: str, after: int = -1, limit: int = 10_000) -> list[dict]:
        """Chunk metadata of a session in seq order (no paths, no bytes): at most
        ``limit`` chunks with a seq above ``after`` (page with the last seq seen)."""
        self.owned_session(owner, session_id)
        query = (
            sa.select(chunks)
            .where(chunks.c.owner == owner, chunks.c.session_id == session_id, chunks.c.seq > after)
            .order_by(chunks.c.seq)
            .limit(limit)
        )
        with self.gate.reading(), self.engine.connect() as conn:
            return [
                {
                    "chunkId": row.id,
                    "sequence": row.seq,
                    "size": row.size,
                    "sha256": row.sha256,
                    "mimeType": row.mime_type,
                    "durationMs": row.duration_ms,
                    "status": row.status,
                    "createdAt": row.created_at,
                }
                for row in conn.execute(query)
            ]

    def read_chunk(self, owner: str, session_id: str, seq: int) -> tuple[str, bytes]:
        """``(mime_type, bytes)`` of one stored chunk, exactly as received."""
        self.owned_session(owner, session_id)
        with self.gate.reading(), self.engine.connect() as conn:
            row = conn.execute(sa.select(chunks.c.mime_type, chunks.c.audio_path).where(
                chunks.c.owner == owner, chunks.c.session_id == session_id, chunks.c.seq == seq)).first()
        if row is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"the session holds no chunk {seq}")
        return row.mime_type, self.files.read(row.audio_path)

    def _chunk_names(self, owner: str, session_id: str, seqs: list[int]) -> dict[int, str]:
        """Storage names of some chunks of a session (for rebuilding watched files)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(chunks.c.seq, chunks.c.audio_path).where(
                chunks.c.owner == owner, chunks.c.session_id == session_id, chunks.c.seq.in_(seqs))).all()
        return {row.seq: row.audio_path for row in rows}

    def iter_audio(self, owner: str, session_id: str, with_duration: bool = False) -> Iterator[tuple]:
        """Yield ``(seq, mime_type, bytes)`` of every stored chunk in seq order
        (``(seq, mime_type, bytes, duration_ms)`` with ``with_duration``), one at a time."""
        self.owned_session(owner, session_id)
        after = -1
        while True:
            with self.gate.reading(), self.engine.connect() as conn:
                rows = conn.execute(
                    sa.select(chunks.c.seq, chunks.c.mime_type, chunks.c.audio_path, chunks.c.duration_ms)
                    .where(chunks.c.owner == owner, chunks.c.session_id == session_id, chunks.c.seq > after)
                    .order_by(chunks.c.seq)
                    .limit(256)
                ).all()
            if not rows:
                return
            for row in rows:
                data = self.files.read(row.audio_path)
                yield (row.seq, row.mime_type, data, row.duration_ms) if with_duration else (row.seq, row.mime_type, data)
            after = rows[-1].seq
