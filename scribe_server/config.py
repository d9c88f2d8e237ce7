"""Server settings and the one function that resolves them.

Precedence, highest first: command-line flag > ``SCRIBE_SERVER_*`` environment
variable > default.  ``SCRIBE_SERVER_HOME`` relocates all server state (the
SQLite database and the audio files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from scribe_protocol import DEFAULT_MAX_CHUNK_BYTES

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3001


@dataclass
class ServerConfig:
    """Everything ``scribe-server serve`` needs; each limit has a flag."""

    data_dir: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    database_url: str | None = None
    redis_url: str | None = None
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
    max_in_flight: int = 64
    #: Chunks one ``audio-chunks`` event may carry (1: the event is not offered).
    max_batch_chunks: int = 16
    max_sessions_per_token: int = 10_000
    max_connections: int = 1_000
    #: Authenticated connections one token (by name) may hold, so no token takes every slot of ``max_connections``;
    #: None: ``max_connections`` less a tenth (``connections_per_token``).
    max_connections_per_token: int | None = None
    #: Every open socket (HTTP, Engine.IO, authenticated or not); None: derived from RLIMIT_NOFILE.
    max_sockets: int | None = None
    max_connection_bytes: int = 32 * 1024 * 1024  # audio bytes in flight per connection
    max_in_flight_bytes: int = 256 * 1024 * 1024  # audio bytes in flight in the whole process
    handshake_timeout: float = 10.0  # an Engine.IO socket must authenticate within this
    idle_timeout: float = 10.0  # an HTTP connection must send its request headers within this
    revoke_check_seconds: float = 2.0
    ping_interval: float = 10.0
    ping_timeout: float = 10.0
    #: how a batch's new chunk files are made durable: "syncfs", "fsync" or "auto" (see store/files.py)
    flush: str = "auto"
    workers: int = 16
    #: Threads that assemble exports, apart from ``workers`` (logins and API calls never wait behind an export).
    export_workers: int = 4
    #: Exports (assembly and download) one token may run at once; more are answered 429 ``too_many_in_flight``.
    max_exports_per_token: int = 2
    #: Deliberately broken durability (acks before storing, stores a second later),
    #: only for the test that proves ``scribe chaos`` detects loss.  Never in production.
    unsafe_ack_before_store: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def audio_dir(self) -> Path:
        return self.data_dir / "audio"

    @property
    def connections_per_token(self) -> int:
        """``max_connections_per_token``, or ``max_connections`` less a tenth kept for the other tokens
        (a fleet of recorders sharing one token gets 900 of the default 1,000)."""
        if self.max_connections_per_token is not None:
            return self.max_connections_per_token
        return self.max_connections - self.max_connections // 10

    @property
    def engineio_buffer_bytes(self) -> int:
        """Engine.IO's message limit: room for a base64 or JSON-wrapped chunk
        twice over the chunk limit, so an oversize chunk gets a ``too_large``
        reply instead of a silently dropped connection."""
        return 2 * self.max_chunk_bytes + 1024 * 1024


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("scribe-server", appauthor=False))


def resolve_data_dir(flag: Path | None) -> Path:
    """Flag > ``SCRIBE_SERVER_HOME`` > the platform's user data dir."""
    if flag is not None:
        return Path(flag).expanduser()
    env = os.environ.get("SCRIBE_SERVER_HOME")
    if env:
        return Path(env).expanduser()
    return default_data_dir()


def resolve_database_url(flag: str | None) -> str | None:
    """Flag > ``SCRIBE_SERVER_DATABASE_URL`` > None (SQLite in the data dir)."""
    return flag or os.environ.get("SCRIBE_SERVER_DATABASE_URL") or None
