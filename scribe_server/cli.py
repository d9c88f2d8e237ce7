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
from scribe_server.config import DEFAULT_HOST, DEFAULT_PORT, ServerConfig, resolve_data_dir, resolve_database_url


class Exit(enum.IntEnum):
    """Exit codes of ``scribe-server``."""

    OK = 0
    ERROR = 1
    USAGE = 2
    ADDRESS_IN_USE = 3
    STORAGE = 4
    TOKEN = 5
    INTERRUPTED = 130


app = typer.Typer(
    help="scribe-server: stores each audio chunk exactly once and answers what is missing.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
token_app = typer.Typer(help="Create, list and revoke API tokens.", no_args_is_help=True)
app.add_typer(token_app, name="token")

DataDir = typer.Option(None, "--data-dir", help="Server state directory [env: SCRIBE_SERVER_HOME; default: user data dir].")
DatabaseUrl = typer.Option(None, "--database-url", help="sqlite:///... or postgresql://... [env: SCRIBE_SERVER_DATABASE_URL; default: SQLite in the data dir].")


def fail(message: str, hint: str, code: Exit) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    typer.echo(f"Try: {hint}", err=True)
    raise typer.Exit(int(code))


def _open_tokens(data_dir: Optional[Path], database_url: Optional[str]):
    from scribe_server.store import ChunkStore
    from scribe_server.store.tokens import TokenStore

    try:
        store = ChunkStore.open(resolve_data_dir(data_dir), resolve_database_url(database_url))
    except (OSError, sa.exc.SQLAlchemyError) as exc:
        fail(f"cannot open the server's storage: {exc.__class__.__name__}", "check --data-dir / --database-url", Exit.STORAGE)
    return TokenStore(store.engine)


@app.command()
def serve(
    host: str = typer.Option(DEFAULT_HOST, help="Address to listen on."),
    port: int = typer.Option(DEFAULT_PORT, help="TCP port (0 picks a free one)."),
    data_dir: Optional[Path] = DataDir,
    database_url: Optional[str] = DatabaseUrl,
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help="redis://... to share events between several nodes."),
    max_chunk_bytes: int = typer.Option(DEFAULT_MAX_CHUNK_BYTES, help="Largest accepted chunk in bytes."),
    max_in_flight: int = typer.Option(64, help="Chunks one connection may have in flight before it is told to back off."),
    max_sessions_per_token: int = typer.Option(10_000, help="Sessions one token may create."),
    max_connections: int = typer.Option(1_000, help="Open Socket.IO connections accepted at once."),
    ping_interval: float = typer.Option(10.0, help="Seconds between Engine.IO heartbeats."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Run the server (Socket.IO + HTTP API) until Ctrl-C or SIGTERM.

    Example: scribe-server serve --port 3001 --data-dir ./server-data
    """
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
        max_sessions_per_token=max_sessions_per_token,
        max_connections=max_connections,
        ping_interval=ping_interval,
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
        fail(f"cannot open the database: {exc.__class__.__name__}", "check --database-url and that the database is up", Exit.STORAGE)


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
