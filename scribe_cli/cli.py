"""``scribe``: the command-line face of the client (thin: parse, resolve, call, map errors)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

from scribe_cli import config, jobs
from scribe_cli.errors import ExitCode, Incomplete, ScribeError

EXIT_CODES_HELP = "Exit codes: " + ", ".join(f"{c.value} {c.name.lower()}" for c in ExitCode) + "."

app = typer.Typer(
    help=(
        "scribe: record audio, keep every chunk in a durable local spool, and upload it to "
        "scribe-server through any network trouble.\n\n" + EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ServerOpt = typer.Option(None, "--server", help="Server URL [env: SCRIBE_SERVER; default http://127.0.0.1:3001].")
TokenOpt = typer.Option(None, "--token", help="API token [env: SCRIBE_TOKEN].")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document for scripts instead of tables.")


def handle_errors(fn: Callable) -> Callable:
    """Map foreseeable failures to ``Error:`` / ``Try:`` and an exit code; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from scribe_cli import display

        try:
            return fn(*args, **kwargs)
        except ScribeError as exc:
            display.error(exc.message, exc.hint)
            raise typer.Exit(int(exc.exit_code))
        except KeyboardInterrupt:
            display.error("interrupted", "run the same command again; spooled audio is kept")
            raise typer.Exit(int(ExitCode.INTERRUPTED))

    return wrapper


def emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


@app.command()
@handle_errors
def resume(
    session: str = typer.Argument(..., help="Session id to upload."),
    server: Optional[str] = ServerOpt,
    token: Optional[str] = TokenOpt,
    window: Optional[int] = typer.Option(None, help="Chunks in flight at once [env: SCRIBE_WINDOW; default 32]."),
    give_up_after: float = typer.Option(60.0, help="Stop after this many seconds without reaching the server (0: never)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Try chunks marked failed once more."),
    as_json: bool = JsonOpt,
) -> None:
    """Upload everything spooled for SESSION, then check the server for gaps.

    Exits 0 only when the server holds every chunk the spool knew of and
    reports no gaps; 5 when something is still pending, failed or missing.

    Example: scribe resume field-2026-11-30 --server http://10.0.0.5:3001
    """
    settings = config.resolve(server, token, window)
    limit = give_up_after or None
    if as_json:
        result = jobs.resume(settings, session, give_up_after=limit, retry_failed=retry_failed)
        emit_json(result.to_json())
    else:
        from scribe_cli import display

        with jobs.open_spool(settings) as spool:
            queued = spool.pending(session)
        with display.UploadProgress(len(queued), sum(m.size for m in queued), session) as progress:
            result = jobs.resume(settings, session, listener=progress, give_up_after=limit, retry_failed=retry_failed)
        display.print_resume(result)
    if not result.complete:
        raise Incomplete(
            f"session {session} is not complete: {result.pending} pending, {len(result.failed)} failed, "
            f"{len(result.quarantined)} quarantined, {result.server.get('missingCount', 0)} missing on the server"
        )


@app.command()
@handle_errors
def pending(
    session: Optional[str] = typer.Argument(None, help="Only this session."),
    as_json: bool = JsonOpt,
) -> None:
    """List the chunks waiting in the local spool: session, seq, size, age, attempts, last error.

    Example: scribe pending field-2026-11-30 --json
    """
    settings = config.resolve()
    chunks, quarantined = jobs.pending(settings, session)
    if as_json:
        from dataclasses import asdict

        emit_json({"chunks": [asdict(m) for m in chunks], "quarantined": quarantined})
        return
    from scribe_cli import display

    display.print_pending(chunks, quarantined)


@app.command()
@handle_errors
def gaps(
    session: str = typer.Argument(..., help="Session id to check."),
    server: Optional[str] = ServerOpt,
    token: Optional[str] = TokenOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Show the server's missing sequences and whether the local spool can repair each.

    Exits 0 when nothing is missing, 5 when something is.

    Example: scribe gaps field-2026-11-30
    """
    result = jobs.gaps(config.resolve(server, token), session)
    if as_json:
        emit_json(result.to_json())
    else:
        from scribe_cli import display

        display.print_gaps(result)
    if result.server.get("missingCount"):
        raise typer.Exit(int(ExitCode.INCOMPLETE))


@app.command()
@handle_errors
def sessions(
    server: Optional[str] = ServerOpt,
    token: Optional[str] = TokenOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List local sessions with pending/failed counts, and the server's view of yours.

    Example: scribe sessions --json
    """
    result = jobs.sessions(config.resolve(server, token))
    if as_json:
        emit_json(result.to_json())
        return
    from scribe_cli import display

    display.print_sessions(result)


@app.command()
@handle_errors
def export(
    session: str = typer.Argument(..., help="Session id to export."),
    output: Path = typer.Option(..., "-o", "--output", help="Output file; .wav or .flac decides the format."),
    allow_gaps: bool = typer.Option(False, "--allow-gaps", help="Join what is there even when chunks are missing."),
    server: Optional[str] = ServerOpt,
    token: Optional[str] = TokenOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Download the whole session as one audio file, assembled by the server in seq order.

    Example: scribe export field-2026-11-30 -o field.flac
    """
    result = jobs.export(config.resolve(server, token), session, output, allow_gaps)
    if as_json:
        emit_json(result)
    else:
        typer.echo(f"wrote {result['file']} ({result['bytes']} bytes, {result['format']})")


def main() -> None:
    app()
