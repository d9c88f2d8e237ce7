"""``scribe-server``: the command-line face of the server (thin: parse, resolve, call)."""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn, Optional

import sqlalchemy as sa
import typer

from scribe_protocol import DEFAULT_MAX_CHUNK_BYTES
from scribe_protocol.memory import keep_freed_memory
from scribe_server.config import DEFAULT_HOST, DEFAULT_PORT, ServerConfig, resolve_data_dir, resolve_database_url


class Exit(enum.IntEnum):
    """Exit codes of ``scribe-server`` (documented in ``--help`` and docs/operations.md)."""

    OK = 0
    ERROR = 1  # unexpected error
    USAGE = 2  # bad command line (typer's own code)
    ADDRESS_IN_USE = 3  # the port is taken
    STORAGE = 4  # data dir, database or Redis unusable
    TOKEN = 5  # a token command was refused
    CONFIG = 6  # a setting needs an optional package that is not installed
    INTERRUPTED = 130  # Ctrl-C


EXIT_CODES_HELP = "Exit codes: " + ", ".join(f"{c.value} {c.name.lower()}" for c in Exit) + "."


def _version(value: bool) -> None:
    if value:
        from scribe_server import __version__

        typer.echo(f"scribe-server {__version__}")
        raise typer.Exit()


app = typer.Typer(
    help="scribe-server: stores each audio chunk exactly once and answers what is missing.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # rich markup would eat "[env: ...; default ...]" in option help
    context_settings={"help_option_names": ["-h", "--help"]},
)
token_app = typer.Typer(help="Create, list and revoke API tokens.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(token_app, name="token")


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """scribe-server: stores each audio chunk exactly once and answers what is missing."""

DataDir = typer.Option(None, "--data-dir", help="Server state directory [env: SCRIBE_SERVER_HOME; default: user data dir].")
DatabaseUrl = typer.Option(None, "--database-url", help="sqlite:///... or postgresql://... [env: SCRIBE_SERVER_DATABASE_URL; default: SQLite in the data dir].")


def fail(message: str, hint: str, code: Exit) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    typer.echo(f"Try: {hint}", err=True)
    raise typer.Exit(int(code))


def _require_module(module: str, what: str, extra: str) -> None:
    """Fail with an install hint when an optional dependency is missing."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        fail(f"{what} needs the Python package {module!r}, which is not installed",
             f"pip install 'scribe[{extra}]'", Exit.CONFIG)


def _database_message(exc: sa.exc.SQLAlchemyError, data_dir: Path, database_url: Optional[str]) -> str:
    """One line naming the database and the driver's own reason (never a password)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    reason = text.splitlines()[0] if text else exc.__class__.__name__
    if database_url:
        where = sa.engine.make_url(database_url).render_as_string(hide_password=True)
    else:
        where = str(data_dir / "scribe.db")
    return f"cannot open the database {where}: {reason}"


def open_store(data_dir: Optional[Path], database_url: Optional[str], redis_url: Optional[str] = None):
    """Open the server's store, turning every foreseeable failure into ``Error:``/``Try:`` and an exit code."""
    from scribe_server.store import ChunkStore

    data_dir = resolve_data_dir(data_dir)
    database_url = resolve_database_url(database_url)
    if database_url and database_url.startswith(("postgresql", "postgres:")):
        _require_module("psycopg", "--database-url postgresql://...", "postgres")
    if redis_url:
        _require_module("redis", "--redis-url", "redis")
    if data_dir.exists() and not data_dir.is_dir():
        fail(f"the data dir {data_dir} is a file, not a directory", "give --data-dir (or SCRIBE_SERVER_HOME) a directory",
             Exit.STORAGE)
    try:
        if not database_url:
            _probe_writable(data_dir)
        return ChunkStore.open(data_dir, database_url)
    except OSError as exc:
        fail(f"cannot use the data dir {exc.filename or data_dir}: {exc.strerror or exc}",
             "check that the data dir is a directory this user can write (ls -ld, lsattr -d)", Exit.STORAGE)
    except sa.exc.ArgumentError as exc:
        fail(f"--database-url is malformed: {exc}", "use sqlite:///PATH or postgresql://USER@HOST/DB", Exit.STORAGE)
    except sa.exc.SQLAlchemyError as exc:
        hint = ("check that PostgreSQL is running and --database-url (or SCRIBE_SERVER_DATABASE_URL) is right"
                if database_url else "check that the data dir is writable by this user and its disk is not full")
        fail(_database_message(exc, data_dir, database_url), hint, Exit.STORAGE)


def _check_flush(flush: str) -> None:
    from scribe_server.store.files import FLUSH_MODES
    from scribe_server.store.writeback import syncfs_available

    if flush not in FLUSH_MODES:
        fail(f"--flush {flush!r} is not one of {', '.join(FLUSH_MODES)}", "--flush auto (the default)", Exit.USAGE)
    if flush == "syncfs" and not syncfs_available:
        fail("--flush syncfs needs Linux 5.8 or later (syncfs reporting write errors)", "--flush fsync", Exit.USAGE)


def _probe_writable(data_dir: Path) -> None:
    """Raise OSError (with the path) when files cannot be created in ``data_dir``."""
    import tempfile

    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(data_dir)) from None


def _open_tokens(data_dir: Optional[Path], database_url: Optional[str]):
    from scribe_server.store.tokens import TokenStore

    store = open_store(data_dir, database_url)
    return TokenStore(store.engine)


def _warn_without_tokens(store, data_dir: Path, database_url: Optional[str]) -> None:
    """Say so on stderr when no client could connect: the store holds no active token."""
    from scribe_server.store.tokens import TokenStore

    if any(row["active"] for row in TokenStore(store.engine).list()):
        return
    where = f"--database-url {database_url}" if database_url else f"--data-dir {data_dir}"
    typer.echo(f"Warning: the store ({where}) holds no active token, so every client will be refused. "
               f"Create one with: scribe-server token create NAME {where}", err=True)


@app.command()
def serve(
    host: str = typer.Option(DEFAULT_HOST, help="Address to listen on."),
    port: int = typer.Option(DEFAULT_PORT, min=0, max=65535, help="TCP port (0 picks a free one)."),
    data_dir: Optional[Path] = DataDir,
    database_url: Optional[str] = DatabaseUrl,
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help="redis://... to share events between several nodes."),
    max_chunk_bytes: int = typer.Option(DEFAULT_MAX_CHUNK_BYTES, help="Largest accepted chunk in bytes."),
    max_in_flight: int = typer.Option(64, help="Chunks one connection may have in flight before it is told to back off."),
    max_batch_chunks: int = typer.Option(16, min=1, max=64, help="Chunks one audio-chunks event may carry (1 turns the event off)."),
    max_sessions_per_token: int = typer.Option(10_000, help="Sessions one token may create."),
    max_connections: int = typer.Option(1_000, help="Open Socket.IO connections accepted at once."),
    max_connections_per_token: Optional[int] = typer.Option(
        None, min=1, help="Open Socket.IO connections one token may hold [default: --max-connections less a tenth, "
                          "kept for the other tokens]."),
    max_sockets: Optional[int] = typer.Option(None, help="Open sockets of any kind at once [default: RLIMIT_NOFILE - 64]."),
    max_connection_bytes: int = typer.Option(32 * 2**20, help="Audio bytes one connection may have in flight."),
    max_in_flight_bytes: int = typer.Option(256 * 2**20, help="Audio bytes the server may have in flight in all."),
    max_exports_per_token: int = typer.Option(2, min=1, help="Exports (WAV/FLAC or file downloads) one token may run at once."),
    export_workers: int = typer.Option(4, min=1, help="Threads that assemble exports, apart from those storing chunks."),
    handshake_timeout: float = typer.Option(10.0, help="Seconds a new socket has to authenticate."),
    idle_timeout: float = typer.Option(10.0, help="Seconds an HTTP connection has to send its request headers."),
    ping_interval: float = typer.Option(10.0, help="Seconds between Engine.IO heartbeats."),
    flush: str = typer.Option("auto", help="How each batch of chunk files is made durable before its ack: syncfs (one "
                              "flush of the data directory's filesystem), fsync (each file and directory), or auto "
                              "(syncfs on Linux 5.8+). Choose fsync when that filesystem is shared with heavy writers."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Run the server (Socket.IO + HTTP API) until Ctrl-C or SIGTERM.

    Example: scribe-server serve --port 3001 --data-dir ./server-data
    """
    _check_flush(flush)
    keep_freed_memory()  # before the store's threads start (see scribe_protocol/memory.py)
    store = open_store(data_dir, database_url, redis_url)
    try:
        _warn_without_tokens(store, resolve_data_dir(data_dir), resolve_database_url(database_url))
    finally:
        store.close()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    config = ServerConfig(
        data_dir=resolve_data_dir(data_dir),
        host=host,
        port=port,
        database_url=resolve_database_url(database_url),
        redis_url=redis_url,
        max_chunk_bytes=max_chunk_bytes,
        max_in_flight=max_in_flight,
        max_batch_chunks=max_batch_chunks,
        max_sessions_per_token=max_sessions_per_token,
        max_connections=max_connections,
        max_connections_per_token=max_connections_per_token,
        max_sockets=max_sockets,
        max_connection_bytes=max_connection_bytes,
        max_in_flight_bytes=max_in_flight_bytes,
        max_exports_per_token=max_exports_per_token,
        export_workers=export_workers,
        handshake_timeout=handshake_timeout,
        idle_timeout=idle_timeout,
        ping_interval=ping_interval,
        flush=flush,
        unsafe_ack_before_store=os.environ.get("SCRIBE_SERVER_UNSAFE_ACK_BEFORE_STORE") == "1",
    )
    if config.unsafe_ack_before_store:
        logging.getLogger("scribe_server").warning(
            "SCRIBE_SERVER_UNSAFE_ACK_BEFORE_STORE=1: acknowledging chunks BEFORE storing them; "
            "acknowledged audio WILL be lost on a crash. This mode exists only to test scribe chaos.")
    from scribe_server.app import serve as run

    try:
        asyncio.run(run(config))
    except KeyboardInterrupt:
        raise typer.Exit(int(Exit.INTERRUPTED))
    except OSError as exc:
        if exc.errno == 98:
            fail(f"port {port} on {host} is already in use", "--port N, or stop the other server", Exit.ADDRESS_IN_USE)
        fail(f"cannot start: {exc.strerror or exc}", "check --host and --data-dir permissions", Exit.STORAGE)
    except sa.exc.SQLAlchemyError as exc:
        fail(_database_message(exc, config.data_dir, config.database_url),
             "check --database-url and that the database is up", Exit.STORAGE)


@token_app.command("create")
def token_create(name: str = typer.Argument(..., help="Who the token is for (owns its sessions)."),
                 data_dir: Optional[Path] = DataDir, database_url: Optional[str] = DatabaseUrl) -> None:
    """Create a token and print it alone on stdout (it is shown only once).

    Example: export SCRIBE_TOKEN=$(scribe-server token create field-kit-1)
    """
    from scribe_server.store.tokens import TokenError

    try:
        typer.echo(_open_tokens(data_dir, database_url).create(name))
    except TokenError as exc:
        fail(str(exc), "scribe-server token list", Exit.TOKEN)


@token_app.command("list")
def token_list(data_dir: Optional[Path] = DataDir, database_url: Optional[str] = DatabaseUrl,
               as_json: bool = typer.Option(False, "--json", help="One JSON document for scripts.")) -> None:
    """List tokens by name (secrets are never stored, so never shown).

    Example: scribe-server token list --json
    """
    rows = _open_tokens(data_dir, database_url).list()
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for row in rows:
        state = "active" if row["active"] else "revoked"
        typer.echo(f"{row['name']}\t{state}")


@token_app.command("revoke")
def token_revoke(name: str = typer.Argument(..., help="Name of the token(s) to revoke."),
                 data_dir: Optional[Path] = DataDir, database_url: Optional[str] = DatabaseUrl) -> None:
    """Revoke a token: new connections are refused at once, open ones closed within seconds.

    Example: scribe-server token revoke field-kit-1
    """
    from scribe_server.store.tokens import TokenError

    try:
        count = _open_tokens(data_dir, database_url).revoke(name)
    except TokenError as exc:
        fail(str(exc), "scribe-server token list", Exit.TOKEN)
    typer.echo(f"revoked {count} token(s) named {name}", err=True)


def main() -> None:
    app()
