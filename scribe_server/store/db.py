"""The database: schema, migrations and the engine, for SQLite and PostgreSQL.

SQLAlchemy Core keeps one schema for both engines.  SQLite runs in WAL mode
with ``synchronous=FULL`` so that a committed row survives power loss (the chunk
writer's rows may instead ride on the syncfs of their files: see ``ChunkStore``); the
``UNIQUE (session_id, seq)`` constraint is what makes a chunk exist once,
across connections, threads, processes and server nodes.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Engine

metadata = sa.MetaData()

schema_meta = sa.Table(
    "schema_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)

tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, index=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
)

#: A session is keyed by ``(owner, id)``: every token name has its own namespace of
#: session ids, so two owners can both have "interview-1" and neither can tell.
sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("owner", sa.String(64), primary_key=True),
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("final_seq", sa.BigInteger, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
)

chunks = sa.Table(
    "chunks",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("session_id", sa.String(64), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("audio_path", sa.String(256), nullable=False),
    sa.Column("duration_ms", sa.Integer, nullable=True),
    sa.Column("text", sa.Text, nullable=True),
    sa.Column("speaker", sa.String(128), nullable=True),
    sa.Column("confidence", sa.Float, nullable=True),
    sa.Column("status", sa.String(32), nullable=False, server_default="uploaded"),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("mime_type", sa.String(100), nullable=False),
    sa.Column("client_timestamp", sa.Float, nullable=True),
    sa.UniqueConstraint("owner", "session_id", "seq", name="chunks_owner_session_seq_key"),
    sa.ForeignKeyConstraint(["owner", "session_id"], ["sessions.owner", "sessions.id"], name="chunks_session_fkey"),
)

#: Chunk rows committed before the flush that makes them durable (SQLite beside the audio files:
#: the rows ride on the files' syncfs, see ``ChunkStore``): ids noted in the rows' own
#: transaction, cleared by a later one once the flush succeeded.  After a crash, the chunks
#: still noted here are checked against their files before the server serves.
unflushed_chunks = sa.Table(
    "unflushed_chunks",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
)

SCHEMA_VERSION = 2
MIGRATION_LOCK = 0x5C41BE  # advisory lock key for schema migrations

#: The database itself refuses a chunk above its session's final seq, in the
#: inserting transaction, whichever node inserts it (a cache cannot: see
#: ``ChunkStore``).  A refused row is skipped (not inserted, no error), and the
#: store answers ``beyond_final``.  On PostgreSQL the trigger takes a share lock
#: on the session row, so an insert and a ``session-finish`` (which updates that
#: row first) are serialized; on SQLite all writers are serialized anyway.
SQLITE_TRIGGERS = [
    """CREATE TRIGGER IF NOT EXISTS chunks_beyond_final BEFORE INSERT ON chunks
    WHEN EXISTS (SELECT 1 FROM sessions WHERE owner = NEW.owner AND id = NEW.session_id
                 AND final_seq IS NOT NULL AND NEW.seq > final_seq)
    BEGIN SELECT RAISE(IGNORE); END""",
]
POSTGRES_TRIGGERS = [
    """CREATE OR REPLACE FUNCTION chunks_beyond_final() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE fin BIGINT;
    BEGIN
        SELECT final_seq INTO fin FROM sessions WHERE owner = NEW.owner AND id = NEW.session_id FOR SHARE;
        IF fin IS NOT NULL AND NEW.seq > fin THEN
            RETURN NULL;
        END IF;
        RETURN NEW;
    END $$""",
    "DROP TRIGGER IF EXISTS chunks_beyond_final ON chunks",
    "CREATE TRIGGER chunks_beyond_final BEFORE INSERT ON chunks FOR EACH ROW EXECUTE FUNCTION chunks_beyond_final()",
]

#: Version 2 on PostgreSQL: sessions keyed by (owner, id); chunks carry their owner.
POSTGRES_V2 = [
    "ALTER TABLE chunks ADD COLUMN owner VARCHAR(64)",
    "UPDATE chunks SET owner = s.owner FROM sessions s WHERE s.id = chunks.session_id",
    "ALTER TABLE chunks ALTER COLUMN owner SET NOT NULL",
    "ALTER TABLE chunks DROP CONSTRAINT IF EXISTS chunks_session_id_fkey",
    "ALTER TABLE chunks DROP CONSTRAINT IF EXISTS chunks_session_seq_key",
    "ALTER TABLE sessions DROP CONSTRAINT IF EXISTS sessions_pkey",
    "DROP INDEX IF EXISTS ix_sessions_owner",
    "ALTER TABLE sessions ADD CONSTRAINT sessions_pkey PRIMARY KEY (owner, id)",
    "ALTER TABLE chunks ADD CONSTRAINT chunks_owner_session_seq_key UNIQUE (owner, session_id, seq)",
    "ALTER TABLE chunks ADD CONSTRAINT chunks_session_fkey FOREIGN KEY (owner, session_id) REFERENCES sessions (owner, id)",
]
_COPY_COLUMNS = ("id", "session_id", "seq", "audio_path", "duration_ms", "text", "speaker", "confidence", "status",
                 "created_at", "size", "sha256", "mime_type", "client_timestamp")


def durability_warnings(engine: Engine) -> list[str]:
    """Settings of the database that would break the durability contract."""
    if engine.dialect.name != "postgresql":
        return []
    with engine.connect() as conn:
        setting = conn.execute(sa.text("SHOW synchronous_commit")).scalar_one()
        fsync = conn.execute(sa.text("SHOW fsync")).scalar_one()
    out = []
    if setting == "off":
        out.append(f"synchronous_commit={setting}: an acknowledged chunk's row can be lost on a crash")
    if fsync == "off":
        out.append("fsync=off: committed rows are not durable")
    return out


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{Path(data_dir) / 'scribe.db'}"


def create_engine(url: str, synchronous: str = "FULL", pool_size: int = 8) -> Engine:
    """An engine with the durability settings of the contract applied.

    ``synchronous="NORMAL"`` (SQLite only) is for the chunk writer's commits that a
    syncfs of the same filesystem makes durable right after (``ChunkStore``): in WAL
    mode such a commit is atomic but not yet durable, and nothing else may use it.
    """
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite"):
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be FULL or NORMAL")
        engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False}, pool_size=pool_size)
        sa.event.listen(engine, "connect", partial(_sqlite_pragmas, synchronous=synchronous))
        return engine
    return sa.create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def sqlite_path(engine: Engine) -> Path | None:
    """The database file of a SQLite engine (None: another database, or in memory)."""
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return None
    return Path(engine.url.database)


def _sqlite_pragmas(dbapi_conn, _record, synchronous: str = "FULL") -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA synchronous={synchronous}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=60000")
    # Statement journals and the transient tables of large IN lists (a session-state of thousands
    # of seqs) stay in memory: no etilqs_* files in $TMPDIR, none left there by a killed server.
    cur.execute("PRAGMA temp_store=MEMORY")
    cur.close()


def migrate(engine: Engine) -> int:
    """Create the schema or bring it up to ``SCHEMA_VERSION``; return the version.

    Safe to run from several nodes at once: on PostgreSQL the nodes take turns
    through an advisory lock.  Each migration runs in one transaction together
    with the version it records, so a crash leaves the old or the new schema.

    Version 2 (sessions namespaced per owner) rewrites every chunk's
    ``audio_path`` to the per-owner layout; the files themselves are moved by
    ``AudioFiles.migrate_layout`` when the store opens.
    """
    if engine.dialect.name == "postgresql":
        with engine.connect() as lock_conn:
            lock_conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
            try:
                return _migrate(engine)
            finally:
                lock_conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
    return _migrate(engine)


def _migrate(engine: Engine) -> int:
    fresh = not sa.inspect(engine).has_table("sessions")
    metadata.create_all(engine, checkfirst=True)
    with engine.begin() as conn:
        row = conn.execute(sa.select(schema_meta.c.value).where(schema_meta.c.key == "version")).first()
        if row is None or fresh:
            conn.execute(insert_ignore(engine, schema_meta).values(key="version", value=str(SCHEMA_VERSION)))
            _run(conn, SQLITE_TRIGGERS if engine.dialect.name == "sqlite" else POSTGRES_TRIGGERS)
            return SCHEMA_VERSION
        version = int(row.value)
    if version < 2:
        (_v2_sqlite if engine.dialect.name == "sqlite" else _v2_postgres)(engine)
        version = 2
    return version


def _run(conn, statements: list[str]) -> None:
    for statement in statements:
        conn.exec_driver_sql(statement)


def _set_version(conn, version: int) -> None:
    conn.execute(schema_meta.update().where(schema_meta.c.key == "version").values(value=str(version)))


def _prefix_audio_paths(conn) -> None:
    """Every chunk's audio path gains its owner's directory (the v2 file layout)."""
    from scribe_server.store.files import owner_dir

    owners = conn.execute(sa.select(sessions.c.owner).distinct()).scalars().all()
    for owner in owners:
        conn.execute(chunks.update().where(chunks.c.owner == owner, ~chunks.c.audio_path.startswith("@"))
                     .values(audio_path=sa.literal(owner_dir(owner) + "/") + chunks.c.audio_path))


def _v2_postgres(engine: Engine) -> None:
    with engine.begin() as conn:
        _run(conn, POSTGRES_V2)
        _prefix_audio_paths(conn)
        _run(conn, POSTGRES_TRIGGERS)
        _set_version(conn, 2)


def _v2_sqlite(engine: Engine) -> None:
    """SQLite cannot change a primary key in place: the two tables are rebuilt
    (the documented 12-step procedure), in one IMMEDIATE transaction."""
    columns = ", ".join(_COPY_COLUMNS)
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        conn.commit()
        try:
            with conn.begin():
                _run(conn, ["BEGIN IMMEDIATE",  # pysqlite would not open a transaction before DDL itself
                            "ALTER TABLE chunks RENAME TO chunks_v1", "DROP INDEX IF EXISTS ix_sessions_owner",
                            "ALTER TABLE sessions RENAME TO sessions_v1"])
                for table in (sessions, chunks):
                    conn.execute(sa.schema.CreateTable(table))
                    for index in table.indexes:
                        conn.execute(sa.schema.CreateIndex(index))
                _run(conn, [
                    "INSERT INTO sessions (owner, id, created_at, final_seq, finished_at) "
                    "SELECT owner, id, created_at, final_seq, finished_at FROM sessions_v1",
                    f"INSERT INTO chunks (owner, {columns}) SELECT s.owner, "
                    + ", ".join(f"c.{name}" for name in _COPY_COLUMNS)
                    + " FROM chunks_v1 c JOIN sessions_v1 s ON s.id = c.session_id",
                    "DROP TABLE chunks_v1",
                    "DROP TABLE sessions_v1",
                ])
                _prefix_audio_paths(conn)
                _run(conn, SQLITE_TRIGGERS)
                _set_version(conn, 2)
        finally:
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            conn.commit()


def insert_ignore(engine_or_conn, table: sa.Table):
    """``INSERT ... ON CONFLICT DO NOTHING`` for the engine's dialect."""
    if engine_or_conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table).on_conflict_do_nothing()


def insert_new_rows(conn, table: sa.Table, rows: list[dict]) -> set:
    """Insert ``rows`` (dicts with the same keys), skipping those whose unique key is taken or
    that a trigger ignores; the ids of the rows that went in.

    On SQLite one plain multi-row ``INSERT ... ON CONFLICT DO NOTHING RETURNING id`` per
    500 rows goes straight to the driver: SQLAlchemy's per-row parameter handling was a
    tenth of the server's CPU per chunk (the columns are plain strings and numbers, so
    there is nothing to convert).  Other databases take SQLAlchemy's portable statement.
    """
    if not rows:
        return set()
    if conn.dialect.name != "sqlite":
        return set(conn.execute(insert_ignore(conn, table).returning(table.c.id), rows).scalars())
    inserted: set = set()
    for sql, params in _insert_statements(table, rows):
        inserted.update(row[0] for row in conn.exec_driver_sql(sql, params))
    return inserted


def note_unflushed(conn, new_ids, cleared_ids) -> None:
    """In a riding commit: note ``new_ids`` as not durable yet, clear the notes of ``cleared_ids``."""
    for sql, params in _note_statements(new_ids, cleared_ids):
        conn.exec_driver_sql(sql, params)


def commit_riding_rows(dbapi_conn, table: sa.Table, rows: list[dict], cleared_ids) -> set:
    """``insert_new_rows`` and ``note_unflushed`` in one transaction on a SQLite DBAPI
    connection, without SQLAlchemy: the chunk writer's riding commit runs beside the
    thread that writes the batch's files, and this way it holds the GIL for a few
    statements' worth of Python instead of SQLAlchemy's execution machinery (which,
    holding it, kept that thread from its next system call)."""
    cursor = dbapi_conn.cursor()
    try:
        inserted: set = set()
        for sql, params in _insert_statements(table, rows):
            inserted.update(row[0] for row in cursor.execute(sql, params).fetchall())
        for sql, params in _note_statements(inserted, cleared_ids):
            cursor.execute(sql, params)
        dbapi_conn.commit()
        return inserted
    except BaseException:
        dbapi_conn.rollback()
        raise
    finally:
        cursor.close()


def _insert_statements(table: sa.Table, rows: list[dict]) -> Iterator[tuple[str, tuple]]:
    if not rows:
        return
    columns = list(rows[0])
    one = "(" + ",".join("?" * len(columns)) + ")"
    for start in range(0, len(rows), 500):
        part = rows[start : start + 500]
        yield (f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES {', '.join([one] * len(part))} "
               f"ON CONFLICT DO NOTHING RETURNING {table.c.id.name}", tuple(row[c] for row in part for c in columns))


def _note_statements(new_ids, cleared_ids) -> Iterator[tuple[str, tuple]]:
    for start in range(0, len(new_ids := list(new_ids)), 500):
        part = new_ids[start : start + 500]
        yield f"INSERT OR IGNORE INTO unflushed_chunks (id) VALUES {', '.join(['(?)'] * len(part))}", tuple(part)
    for start in range(0, len(cleared_ids := list(cleared_ids)), 500):
        part = cleared_ids[start : start + 500]
        yield f"DELETE FROM unflushed_chunks WHERE id IN ({', '.join(['?'] * len(part))})", tuple(part)


def now() -> float:
    return time.time()
