"""The database: schema, migrations and the engine, for SQLite and PostgreSQL.

SQLAlchemy Core keeps one schema for both engines.  SQLite runs in WAL mode
with ``synchronous=FULL`` so that a committed row survives power loss; the
``UNIQUE (session_id, seq)`` constraint is what makes a chunk exist once,
across connections, threads, processes and server nodes.
"""

from __future__ import annotations

import time
from pathlib import Path

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

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("final_seq", sa.BigInteger, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
)

chunks = sa.Table(
    "chunks",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("session_id", sa.String(64), sa.ForeignKey("sessions.id"), nullable=False),
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
    sa.UniqueConstraint("session_id", "seq", name="chunks_session_seq_key"),
)

#: Ordered migrations after the initial schema: (version, list of SQL statements).
MIGRATIONS: list[tuple[int, list[str]]] = []
SCHEMA_VERSION = 1 + len(MIGRATIONS)
MIGRATION_LOCK = 0x5C41BE  # advisory lock key for schema migrations


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


def create_engine(url: str) -> Engine:
    """An engine with the durability settings of the contract applied."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False}, pool_size=8)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.close()


def migrate(engine: Engine) -> int:
    """Create the schema or bring it up to ``SCHEMA_VERSION``; return the version.

    Safe to run from several nodes at once: on PostgreSQL the nodes take turns
    through an advisory lock; each migration step records its version in the
    same transaction.
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
    metadata.create_all(engine, checkfirst=True)
    with engine.begin() as conn:
        row = conn.execute(sa.select(schema_meta.c.value).where(schema_meta.c.key == "version")).first()
        if row is None:
            conn.execute(insert_ignore(engine, schema_meta).values(key="version", value=str(SCHEMA_VERSION)))
            return SCHEMA_VERSION
        version = int(row.value)
    for target, statements in MIGRATIONS:
        if target <= version:
            continue
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
            conn.execute(schema_meta.update().where(schema_meta.c.key == "version").values(value=str(target)))
        version = target
    return version


def insert_ignore(engine_or_conn, table: sa.Table):
    """``INSERT ... ON CONFLICT DO NOTHING`` for the engine's dialect."""
    if engine_or_conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table).on_conflict_do_nothing()


def now() -> float:
    return time.time()
