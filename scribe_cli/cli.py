"""``scribe``: the command-line face of the client (thin: parse, resolve, call, map errors)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import typer

from scribe_cli import config
from scribe_cli.cli_params import ScribeTyper
from scribe_cli.errors import ConfigError, ExitCode, Incomplete, Interrupted, ScribeError

if TYPE_CHECKING:  # jobs, stopping (asyncio) and display (rich) are imported by the commands that use them
    from scribe_cli import stopping

EXIT_CODES_HELP = "Exit codes: " + ", ".join(f"{c.value} {c.name.lower()}" for c in ExitCode) + "."

app = ScribeTyper(
    help=(
        "scribe: record audio, keep every chunk in a durable local spool, and upload it to "
        "scribe-server through any network trouble.\n\n" + EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"scribe {version('scribe')}")
        except PackageNotFoundError:
            typer.echo("scribe (not installed)")
        raise typer.Exit()


@app.callback()
def _main(show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                            help="Print the version and exit.")) -> None:
    """scribe: record, spool durably, upload through any network trouble."""


ServerOpt = typer.Option(None, "--server", help="Server URL [env: SCRIBE_SERVER; default http://127.0.0.1:3001].")
TokenOpt = typer.Option(None, "--token", help="API token [env: SCRIBE_TOKEN].")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document (camelCase keys) for scripts instead of tables.")
JsonLinesOpt = typer.Option(False, "--json", help="Print JSON Lines for scripts: one JSON object (camelCase keys) "
                                                  "per event, the last one {\"event\": \"done\", ...}.")

_pipe_closed = False  # set when the reader of stdout went away (e.g. `| head`)
_emitted = 0  # JSON objects written to stdout so far
STREAMING_COMMANDS = {"record", "watch", "demo", "follow", "chaos"}  # --json prints JSON Lines


def handle_errors(fn: Callable) -> Callable:
    """Map foreseeable failures to ``Error:`` / ``Try:`` and an exit code; never a traceback.

    With ``--json``, stdout also gets ``{"error": {"code", "message", "hint"}}``
    so a script never reads an empty document: as the document when none was
    printed yet (a document that was printed, like an incomplete resume's, already
    tells), or as a last ``{"event": "error", "error": ...}`` line of a stream.
    A reader that closes stdout early (``| head``) ends the command quietly with
    exit 141, as for other Unix tools.
    """
    streaming = fn.__name__ in STREAMING_COMMANDS

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:
            _silence_stdout()
            raise typer.Exit(int(ExitCode.PIPE_CLOSED))
        except ScribeError as exc:
            if _pipe_closed and isinstance(exc, Interrupted):  # stopped by emit_json's interrupt_main
                raise typer.Exit(int(ExitCode.PIPE_CLOSED))
            _fail(exc.message, exc.hint, exc.exit_code, as_json, streaming)
        except KeyboardInterrupt:
            if _pipe_closed:
                raise typer.Exit(int(ExitCode.PIPE_CLOSED))
            _fail("interrupted", "run the same command again; spooled audio is kept", ExitCode.INTERRUPTED, as_json,
                  streaming)
        except BaseException as exc:  # asyncio.run may end in CancelledError when it was interrupted for a closed pipe
            if _pipe_closed and exc.__class__.__name__ == "CancelledError":
                raise typer.Exit(int(ExitCode.PIPE_CLOSED))
            raise

    return wrapper


def _fail(message: str, hint: str, code: ExitCode, as_json: bool, streaming: bool):
    from scribe_cli import display

    error = {"error": {"code": code.name.lower(), "exitCode": int(code), "message": message, "hint": hint}}
    if as_json and not _pipe_closed and (streaming or not _emitted):
        with contextlib.suppress(BrokenPipeError):
            emit_json({"event": "error", **error} if _emitted else error)
    display.error(message, hint)
    raise typer.Exit(int(code))


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so later writes and the final flush do not fail again."""
    global _pipe_closed
    _pipe_closed = True
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


_SNAKE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)+$")


def camel_keys(data):
    """The one key style of all JSON output: camelCase, as the protocol (``final_seq`` -> ``finalSeq``)."""
    if isinstance(data, dict):
        return {(_camel(k) if isinstance(k, str) and _SNAKE.match(k) else k): camel_keys(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [camel_keys(v) for v in data]
    return data


def _camel(key: str) -> str:
    first, *rest = key.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


def emit_json(data) -> None:
    """Write one JSON document (or one JSON Lines event) on stdout, camelCase keys.

    When the reader has gone (``| head``), stdout is silenced and the main
    thread is interrupted, which ends the command as Ctrl-C would but quietly.
    """
    global _emitted
    if _pipe_closed:
        return
    try:
        _emitted += 1
        sys.stdout.write(json.dumps(camel_keys(data), default=str) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        import _thread
        import asyncio
        import threading

        _silence_stdout()
        try:
            asyncio.get_running_loop()
            in_loop = True
        except RuntimeError:
            in_loop = False
        if threading.current_thread() is threading.main_thread() and not in_loop:
            raise  # plain code on the main thread: handle_errors ends the command
        _thread.interrupt_main()  # from a thread or an event loop callback: stop as Ctrl-C would


@app.command()
@handle_errors
def resume(
    session: str = typer.Argument(..., help="Session id to upload."),
    server: Optional[str] = ServerOpt,
    token: Optional[str] = TokenOpt,
    window: Optional[int] = typer.Option(None, help="Chunks in flight at once [env: SCRIBE_WINDOW; default 32]."),
    give_up_after: float = typer.Option(60.0, min=0.0, help="Stop after this many seconds without reaching the server (0: never)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Try chunks marked failed once more."),
    as_json: bool = JsonOpt,
) -> None:
    """Upload everything spooled for SESSION, then check the server for gaps.

    Exits 0 only when the server holds every chunk this spool ever captured
    for SESSION (including those uploaded and removed earlier) and reports no
    gaps; 5 when something is still pending, failed or missing, or when the
    server (or token) is not the one the audio went to.

    Example: scribe resume field-2026-11-30 --server http://10.0.0.5:3001
    """
    from scribe_cli import jobs, stopping

    settings = config.resolve(server, token, window)
    limit = give_up_after or None
    stop = stopping.on_signals()
    if as_json:
        result = jobs.resume(settings, session, give_up_after=limit, retry_failed=retry_failed, stop=stop)
        emit_json(result.to_json())
    else:
        from scribe_cli import display

        with jobs.open_spool(settings) as spool:
            queued = spool.pending(session)
        with display.UploadProgress(len(queued), sum(m.size for m in queued), session) as progress:
            result = jobs.resume(settings, session, listener=progress, give_up_after=limit, retry_failed=retry_failed,
                                 stop=stop)
        display.print_resume(result)
    if not result.uploaded:
        raise Incomplete(*result.problem())


@app.command()
@handle_errors
def pending(
    session: Optional[str] = typer.Argument(None, help="Only this session."),
    as_json: bool = JsonOpt,
) -> None:
    """List the chunks waiting in the local spool: session, seq, size, age, attempts, last error.

    Example: scribe pending field-2026-11-30 --json
    """
    from scribe_cli import jobs

    settings = config.resolve()
    result = jobs.pending(settings, session)
    if as_json:
        emit_json(result.to_json())
        return
    from scribe_cli import display

    display.print_pending(result)


@app.command()
@handle_errors
def gaps(
    session: str = typer.Argument(..., help="Session id to check."),
    server: Optional[str] = ServerOpt,
    token: Optional[str] = TokenOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Show the server's missing sequences and whether the local spool can repair each.

    Exits 0 when nothing is missing, 5 when something is: a gap on the
    server, chunks still in the local spool, or chunks this spool uploaded
    that the server does not hold (wrong server or token).

    Example: scribe gaps field-2026-11-30
    """
    from scribe_cli import jobs

    result = jobs.gaps(config.resolve(server, token), session)
    if as_json:
        emit_json(result.to_json())
    else:
        from scribe_cli import display

        display.print_gaps(result)
    if result.problem():
        raise Incomplete(*result.problem())
    if result.server.get("missingCount"):
        raise typer.Exit(int(ExitCode.INCOMPLETE))


@app.command()
@handle_errors
def fsck(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only report; change nothing."),
    as_json: bool = JsonOpt,
) -> None:
    """Check the local spool after a crash and repair it.

    Removes value files no entry points to (left by a crash while adding or
    removing chunks) and quarantines chunks whose audio file is gone (scribe
    resume then tells whether the server holds them). Safe while other scribe
    commands use the spool. Exits 0 when the spool is (now) consistent, 5
    when --dry-run found something to repair.

    Example: scribe fsck --dry-run
    """
    from scribe_cli import jobs

    report = jobs.fsck(config.resolve(), repair=not dry_run)
    if as_json:
        emit_json(report.to_json())
    else:
        from scribe_cli import display

        display.print_fsck(report)
    if dry_run and (report.orphan_files or report.missing_audio):
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
    from scribe_cli import jobs

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
    output: Path = typer.Option(..., "-o", "--output", help="Output file (.wav or .flac decides the format); "
                                                            "a folder with --files."),
    allow_gaps: bool = typer.Option(False, "--allow-gaps", help="Join what is there even when chunks are missing."),
    files: bool = typer.Option(False, "--files", help="Give back the original files of a watched session "
                                                      "under -o, by their paths in the watched folder."),
    all_versions: bool = typer.Option(False, "--all-versions", help="With --files: also write each earlier "
                                      "version of a file taken more than once, as NAME.vN.EXT beside it."),
    server: Optional[str] = ServerOpt,
    token: Optional[str] = TokenOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Download the whole session as one audio file, or (--files) the original files scribe watch took.

    Float stays float and 32-bit stays 32-bit: such sessions export as .wav only.

    \b
    Example: scribe export field-2026-11-30 -o field.flac
    Example: scribe export site-a --files -o restored/
    Example: scribe export site-a --files --all-versions -o restored/
    """
    from scribe_cli import jobs, stopping

    if all_versions and not files:
        raise ConfigError("--all-versions goes with --files", f"scribe export {session} --files --all-versions -o DIR")
    stopping.on_signals()  # Ctrl-C or SIGTERM: the partial file is removed, exit 130
    if files:
        result = jobs.export_files(config.resolve(server, token), session, output, all_versions=all_versions)
        if as_json:
            emit_json(result)
        else:
            for entry in result["files"]:
                typer.echo(f"wrote {entry['file']} ({entry['bytes']} bytes, sha256 {entry['sha256'][:12]}..."
                           f"{_version_note(entry, all_versions)})")
        return
    result = jobs.export(config.resolve(server, token), session, output, allow_gaps)
    if as_json:
        emit_json(result)
    else:
        typer.echo(f"wrote {result['file']} ({result['bytes']} bytes, {result['format']})")


def _version_note(entry: dict, all_versions: bool) -> str:
    """What ``export --files`` says of a file taken more than once."""
    if entry["versions"] < 2:
        return ""
    if all_versions:
        return f", version {entry['version']} of {entry['versions']}"
    return (f", version {entry['version']} of {entry['versions']}: the earlier ones stay on the server, "
            "--all-versions writes them too")


def _new_session_id() -> str:
    import secrets
    import time

    return time.strftime("rec-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def _json_listener():
    import threading

    lock = threading.Lock()

    def listen(kind: str, data: dict) -> None:
        with lock:
            emit_json({"event": kind, **data})

    return listen


class _status_ticker:
    """Emit a ``status`` event every second while recording (``--json``)."""

    def __init__(self, state, listener, every: float = 1.0):
        import threading

        self.state, self.listener, self.every = state, listener, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self.listener("status", {**self.state.to_json(), "frames": self.state.frames})

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(2)


def _parse_device(device: Optional[str]):
    if device is None:
        return None
    return int(device) if device.isdigit() else device


@app.command()
@handle_errors
def record(
    session: Optional[str] = typer.Option(None, "--session", help="Session id (generated and printed when not given)."),
    device: Optional[str] = typer.Option(None, "--device", help="Input device number or name (see scribe devices)."),
    rate: int = typer.Option(16000, min=1000, max=384000, help="Sample rate in Hz."),
    channels: int = typer.Option(1, min=1, max=64, help="Number of input channels."),
    chunk_seconds: float = typer.Option(10.0, min=0.1, max=3600, help="Seconds of audio per chunk."),
    fmt: str = typer.Option("flac", "--format", help="flac (lossless), opus (small) or wav."),
    duration: Optional[float] = typer.Option(None, help="Stop after this many seconds (default: until Ctrl-C)."),
    offline: bool = typer.Option(False, "--offline", help="Only spool; upload later with scribe resume."),
    drain_timeout: float = typer.Option(30.0, min=0.0, help="Seconds to wait for uploads after recording stops "
                                                   "(at most 5 after Ctrl-C or SIGTERM)."),
    server: Optional[str] = ServerOpt,
    token: Optional[str] = TokenOpt,
    as_json: bool = JsonLinesOpt,
) -> None:
    """Record from the microphone into chunks, spool each one durably, and upload as you go.

    Ctrl-C (or SIGTERM) is the normal end: it commits the partial chunk, tells
    the server the last sequence number and uploads for up to 5 s more; exit 0
    when everything reached the server, 5 when some chunks stay spooled (then
    scribe resume SESSION). A second Ctrl-C stops uploading at once (exit 130).
    A crash costs at most about a second of audio: the next record or resume
    of the session recovers it.

    Example: scribe record --session interview-1 --duration 600
    """
    from scribe_cli import jobs, stopping
    from scribe_cli.capture import session as capture
    from scribe_cli.capture.encode import check_format
    from scribe_cli.capture.recorder import RecordState
    from scribe_cli.capture.sources import MicSource

    settings = config.resolve(server, token)
    check_format(fmt, rate)
    session = jobs.check_session_id(session or _new_session_id())
    if not offline:
        settings.require_token()
    source = MicSource(_parse_device(device), rate, channels)
    state = RecordState(session, rate, channels, connection="offline" if offline else "connecting")
    stop = stopping.on_signals()
    max_frames = int(duration * rate) if duration else None
    if as_json:
        listener = _json_listener()
        listener("session", {"session": session, "rate": rate, "channels": channels, "format": fmt})
        with jobs.open_spool(settings) as spool, _status_ticker(state, listener):
            result = capture.record(settings, spool, state, source, chunk_seconds, fmt, max_frames, offline,
                                    drain_timeout, listener, stop=stop)
        listener("done", result.to_json())
    else:
        from scribe_cli import display

        typer.echo(f"session: {session}")
        with jobs.open_spool(settings) as spool, display.LiveRecord(state):
            result = capture.record(settings, spool, state, source, chunk_seconds, fmt, max_frames, offline,
                                    drain_timeout, lambda kind, data: None, stop=stop)
    _finish_recording(session, result, offline, stop)


def _finish_recording(session: str, result, offline: bool, stop: stopping.StopRequest) -> None:
    if stop.aborted and (result.pending or result.failed):
        raise Interrupted(f"stopped before the upload finished: {result.pending} chunk(s) of {session} wait "
                          f"in the spool", f"scribe resume {session}")
    if result.upload_error is not None:
        raise result.upload_error.__class__(
            f"recorded {result.state.captured} chunk(s) into the spool, but uploading stopped: "
            f"{result.upload_error.message}", result.upload_error.hint)
    if offline:
        typer.echo(f"spooled {result.state.captured} chunk(s); upload them with: scribe resume {session}", err=True)
        return
    if result.pending or result.failed:
        raise Incomplete(f"{result.pending} chunk(s) of {session} still wait in the spool, {result.failed} failed",
                         f"scribe resume {session}")


@app.command()
@handle_errors
def watch(
    folder: Path = typer.Argument(..., help="Folder or card root a recorder writes into (scanned recursively)."),
    session: Optional[str] = typer.Option(None, "--session", help="Put all files, in path order, into this session."),
    session_per_file: bool = typer.Option(False, "--session-per-file",
                                          help="One session per file, named <stem>-<hash8> (the default without --session)."),
    chunk_seconds: Optional[float] = typer.Option(None, min=0.1, max=3600,
                                                  help="Seconds of audio per chunk, turned into bytes by each "
                                                       "file's data rate (never above --chunk-bytes)."),
    chunk_bytes: int = typer.Option(4 << 20, min=4096, max=64 << 20,
                                    help="Largest chunk in bytes: a chunk is a byte range of the file "
                                         "(never above what the server accepts)."),
    fmt: str = typer.Option("flac", "--format", help="Kept for old scripts: files are uploaded as they are."),
    settle: float = typer.Option(2.0, min=0.0, max=3600.0, help="A file is complete when its size and mtime are unchanged this long."),
    once: bool = typer.Option(False, "--once", help="Take what is there, upload it, exit (5 when a file was "
                                                    "rejected, is still being written or could not be read)."),
    offline: bool = typer.Option(False, "--offline", help="Only spool; upload later with scribe resume."),
    drain_timeout: float = typer.Option(60.0, min=0.0, help="Seconds to wait for uploads when stopping "
                                                   "(at most 5 after Ctrl-C or SIGTERM)."),
    server: Optional[str] = ServerOpt,
    token: Optional[str] = TokenOpt,
    as_json: bool = JsonLinesOpt,
) -> None:
    """Tail a folder or card: upload every audio file byte for byte, with its metadata, as it grows.

    Subfolders are scanned too. A file's chunks are byte ranges of the file
    itself; the server keeps each original file (sha256-checked) and what its
    headers say (bext, iXML, INFO, GUANO, tags). A file still being written is
    sent as it grows and closed when it is unchanged for --settle seconds; a
    file changed later becomes a new version (only changed ranges are sent).
    Non-audio files are listed once; empty or broken audio files, and names the
    server cannot take (not UTF-8, a backslash, a control character), are
    reported; symbolic links are not followed. A file is taken again only when
    its size, mtime or fingerprint (its first and last 64 KiB) changed: another
    recorder's card with the same file names is not mistaken for this one.
    A file the card cannot read (an I/O error) is reported and skipped, the
    others are taken, and the next run continues it from what was read (exit 5).
    A file reported "took" is durable in the spool or on the server: the card may
    then be removed (until then the card is the durable copy of what was read).
    Get the files back with: scribe export SESSION --files -o DIR

    \b
    Example: scribe watch /media/recorder --session site-a --once
    Example: scribe watch /media/ZOOM_F6 --session site-a-f6 --once --json
    """
    from scribe_cli import jobs, stopping
    from scribe_cli.capture import session as capture
    from scribe_cli.capture.encode import check_format
    from scribe_cli.capture.watch import FolderWatcher, printable

    settings = config.resolve(server, token)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder", "give the folder your recorder writes into")
    check_format(fmt, 16000 if fmt == "opus" else 44100)  # still checked: old scripts pass it
    if session and session_per_file:
        raise ConfigError("--session and --session-per-file exclude each other")
    if session:
        jobs.check_session_id(session)
    if not offline:
        settings.require_token()
    listener = _json_listener() if as_json else _watch_printer(session)
    stop = stopping.on_signals()
    with jobs.open_spool(settings) as spool:
        watcher = FolderWatcher(spool, folder, chunk_seconds, fmt, session, settle, listener, chunk_bytes=chunk_bytes)
        result = capture.watch(settings, spool, watcher, once, offline, drain_timeout, listener, stop=stop)
    if as_json:
        listener("done", result.to_json())
    else:
        left = "left for the next run" if stop.requested else "still being written"
        typer.echo(f"took {len(result.taken)} file(s), rejected {len(result.rejected)}, ignored "
                   f"{len(result.ignored or [])}, {left} {len(result.still_writing or [])}"
                   + (f", unreadable {len(result.unreadable)}" if result.unreadable else "") + "; "
                   f"{result.pending} chunk(s) still pending, {result.failed} failed", err=True)
    resume_hint = f"scribe resume {session}" if session else "scribe pending shows them; scribe resume SESSION uploads them"
    if stop.aborted and (result.pending or result.failed):
        raise Interrupted(f"stopped before the upload finished: {result.pending} chunk(s) wait in the spool",
                          resume_hint)
    if result.upload_error is not None:
        raise result.upload_error
    if not offline and (result.pending or result.failed):  # ended by --once or by Ctrl-C / SIGTERM
        raise Incomplete(f"{result.pending} chunk(s) still wait in the spool, {result.failed} failed", resume_hint)
    if result.unreadable:  # after the rest: every file the card would give is taken first
        first = result.unreadable[0]
        raise Incomplete(f"{len(result.unreadable)} file(s) could not be read from the card (first: "
                         f"{first['relPath']}: {first['reason'].removeprefix('read error on the card: ')})",
                         "check the card and its reader (another reader, fsck), or copy what is readable with "
                         f"ddrescue and watch the copy; what was read is kept: run scribe watch {folder} again")
    if stop.requested and result.still_writing:  # (with --once too: not "still being written")
        raise Incomplete(f"stopped before {len(result.still_writing)} file(s) were taken whole",
                         f"run scribe watch {folder} again: it continues each file where it stopped")
    if once and (result.rejected or result.still_writing):
        problems, hints = [], []
        if result.rejected:
            first = result.rejected[0]
            problems.append(f"{len(result.rejected)} file(s) rejected (first: {first['relPath']}: {first['reason']})")
            hints.append("fix or remove the rejected files")
        if result.still_writing:
            problems.append(f"{len(result.still_writing)} file(s) still being written (first: "
                            f"{printable(result.still_writing[0])})")
            hints.append("wait until the recorder stops (or watch without --once)")
        raise Incomplete("; ".join(problems), f"{' and '.join(hints)}, then run scribe watch {folder} --once again")


def _watch_printer(session: str | None = None):
    def show(kind: str, data: dict) -> None:
        if kind == "taken":
            version = f" (version {data['version']})" if data.get("version", 1) > 1 else ""
            typer.echo(f"took {data['path']}{version}: {data['bytes']} bytes in {data['chunks']} chunk(s) -> "
                       f"{data['session']} from seq {data['firstSeq']}", err=True)
            for warning in data.get("warnings") or []:
                typer.echo(f"  warning: {warning}", err=True)
            if session and data.get("version", 1) > 1:  # (without --session a new version is its own session)
                typer.echo(f"  note: {data['relPath']} was taken into {data['session']} before, with other bytes: "
                           "export --files gives its latest version (--all-versions every one); another card's "
                           "file of the same name? give each card its own --session", err=True)
        elif kind == "rejected":
            typer.echo(f"skipped {data['path']}: {data['reason']}", err=True)
        elif kind == "ignored":
            once = "" if data.get("everyRun") else " (listed once)"
            typer.echo(f"ignored {data['path']}: {data['reason']}{once}", err=True)
        elif kind == "unreadable":
            typer.echo(f"could not read {data['path']}: {data['reason']} (tried again later; what was read is kept)",
                       err=True)
        elif kind == "still-writing":
            typer.echo(f"still being written: {data['path']} (its full chunks are spooled)", err=True)
        elif kind == "held":  # the reason starts with "held: "
            typer.echo(f"warning: chunk {data['session']}/{data['seq']} {data['reason']}", err=True)
        elif kind == "quarantined":
            typer.echo(f"warning: chunk {data['session']}/{data['seq']} quarantined: {data['reason']}", err=True)
        elif kind == "upload-stopped":
            typer.echo(f"uploading stopped: {data['error']}", err=True)
        elif kind == "stopping":
            typer.echo(f"stopping: uploading what is left for up to {data['drainSeconds']:.0f} s "
                       "(Ctrl-C again to stop now)", err=True)

    return show


@app.command()
@handle_errors
def demo(
    output: Path = typer.Option(Path("scribe-demo.flac"), "-o", "--output", help="Where to export the session (.flac or .wav)."),
    seconds: float = typer.Option(15.0, min=1.0, max=3600.0, help="Seconds to record (1-3600)."),
    generated: bool = typer.Option(False, "--generated", help="Use the generated signal even when a microphone exists."),
    as_json: bool = JsonLinesOpt,
) -> None:
    """Record ~15 s through an embedded server while the network drops, then prove nothing was lost.

    Starts scribe-server (SQLite, local files, a temporary folder) on a free
    loopback port, records from the default input (or a generated speech-like
    signal when there is none), cuts the connection half-way and restores it,
    then shows the server's gap report and exports the session to a file.

    Example: scribe demo -o demo.flac
    """
    from scribe_cli import demo as demo_job, stopping
    from scribe_cli.errors import ConfigError

    if output.suffix.lower() not in (".flac", ".wav"):
        raise ConfigError(f"cannot tell the format of {output.name}", "name the output file .flac or .wav")
    from scribe_cli.jobs import check_output

    check_output(output)  # before recording, not after
    use_input = False if generated else None
    stop = stopping.on_signals()
    if as_json:
        listener = _json_listener()
        result = demo_job.run(output, seconds, listener, lambda state: _status_ticker(state, listener), use_input,
                              stop=stop)
        listener("done", result.to_json())
    else:
        from scribe_cli import display

        def show(kind: str, data: dict) -> None:
            if kind == "start":
                display.err_console.print(f"[bold]scribe demo[/]: embedded server at {data['server']}, "
                                          f"recording from the {data['source']}")
            elif kind == "network-cut":
                display.err_console.print(f"[yellow]network cut at {data['at']} s, down for {data['downFor']} s")

        result = demo_job.run(output, seconds, show, display.LiveRecord, use_input, stop=stop)
        display.print_demo(result)
    if result.report.get("missingCount") or not result.report.get("complete"):
        raise Incomplete(f"the server reports {result.report.get('missingCount')} missing chunk(s)")


@app.command()
@handle_errors
def chaos(
    chunks: int = typer.Option(300, min=1, max=1_000_000, help="Chunks to upload."),
    chunk_bytes: int = typer.Option(16384, min=1, max=8 << 20, help="Bytes per chunk."),
    seconds: float = typer.Option(0.0, min=0.0, max=86400.0,
                                  help="Spool the chunks over this many seconds (0: all up front)."),
    cut_every: float = typer.Option(1.0, min=0.0, max=86400.0,
                                    help="Mean seconds between connection cuts (0: none); stalls come 4x rarer."),
    latency: float = typer.Option(0.0, "--latency", min=0.0, max=60_000.0, help="Added one-way latency in milliseconds."),
    server_kills: int = typer.Option(1, min=0, max=1000, help="SIGKILL the server this many times (restarted on the same data)."),
    client_kills: int = typer.Option(1, min=0, max=1000, help="SIGKILL the uploader this many times (restarted on the same spool)."),
    duplicates: float = typer.Option(0.05, min=0.0, max=1.0, help="Fraction of acknowledged chunks to send again (0-1)."),
    seed: int = typer.Option(1, help="Seed of the fault schedule and the chunk contents."),
    server: Optional[str] = typer.Option(None, "--server", help="Run against this server (through the proxy) instead of an own one."),
    token: Optional[str] = TokenOpt,
    as_json: bool = JsonLinesOpt,
) -> None:
    """Prove on this machine that nothing is lost: upload through cuts, stalls, latency and kills, then verify.

    Exits 0 when every chunk is stored exactly once, byte for byte, the spool
    is empty and no temporary file is left; 1 on any violation.

    Example: scribe chaos --chunks 2000 --cut-every 0.5 --server-kills 3 --client-kills 3 --seed 7
    """
    import os

    from scribe_cli import stopping
    from scribe_cli.chaos.run import ChaosConfig, run as run_chaos
    from scribe_cli.errors import ExitCode

    cfg = ChaosConfig(chunks=chunks, chunk_bytes=chunk_bytes, seconds=seconds, cut_every=cut_every or None,
                      latency_ms=latency, server_kills=server_kills, client_kills=client_kills,
                      duplicates=duplicates, seed=seed, server=config.check_server_url(server) if server else None,
                      token=token or os.environ.get("SCRIBE_TOKEN"))
    stop = stopping.on_signals()
    if as_json:
        listener = _json_listener()
        report = run_chaos(cfg, listener, stop)
        listener("done", report.to_json())
    else:
        from scribe_cli import display

        def show(kind: str, data: dict) -> None:
            if kind != "start":
                display.err_console.print(f"[yellow]{kind}[/] {display.plain_fields(data)}")

        with display.err_console.status("chaos run: uploading through faults..."):
            report = run_chaos(cfg, show, stop)
        display.print_chaos(report)
    if not report.ok:
        raise typer.Exit(int(ExitCode.ERROR))


@app.command()
@handle_errors
def follow(
    session: str = typer.Argument(..., help="Session id to follow."),
    forever: bool = typer.Option(False, "--forever", help="Keep following after the session is complete."),
    wait: float = typer.Option(0.0, "--wait", min=0, help="Seconds to wait for a session that does not exist yet "
                                                           "(default: exit 6 at once)."),
    server: Optional[str] = ServerOpt,
    token: Optional[str] = TokenOpt,
    as_json: bool = JsonLinesOpt,
) -> None:
    """Watch chunks of a session arrive live, whichever server node stores them, with its timeline.

    Ends when the session is complete (its last chunk stored and no gaps),
    or with Ctrl-C. A session the server does not know exits 6 at once,
    unless --wait gives it time to appear.

    Example: scribe follow interview-1
    """
    import asyncio

    from scribe_cli import jobs, stopping
    from scribe_cli.follow import FollowState, follow as follow_session

    settings = config.resolve(server, token)
    jobs.check_session_id(session)
    state = FollowState(session)
    stop = stopping.on_signals()
    stopped = (f"stopped following {session}", f"scribe follow {session} to watch again; scribe gaps {session}")
    if as_json:
        listener = _json_listener()
        asyncio.run(stopping.cancel_on_stop(
            follow_session(settings, session, listener, state, until_complete=not forever, give_up_after=wait),
            stop, *stopped))
        listener("done", state.to_json())
        return
    from scribe_cli import display

    with display.LiveFollow(state):
        asyncio.run(stopping.cancel_on_stop(
            follow_session(settings, session, _follow_lines(state) if not display.err_console.is_terminal
                           else lambda kind, data: None, state, until_complete=not forever, give_up_after=wait),
            stop, *stopped))
    display.console.print(f"[green]{session} is complete: {state.report.get('totalChunks')} chunk(s), no gaps")


def _follow_lines(state):
    """``scribe follow`` into a log or a pipe (no live display there): a line per event."""
    last: dict = {}

    def show(kind: str, data: dict) -> None:
        if kind == "stored":
            typer.echo(f"stored {data.get('sessionId')} seq {data.get('sequence')} ({len(state.stored)} this run)",
                       err=True)
        elif kind == "state":
            summary = (data.get("totalChunks"), data.get("missingCount"), data.get("complete"))
            if summary != last.get("summary"):
                last["summary"] = summary
                typer.echo(f"{state.session}: {summary[0]} chunk(s), {summary[1]} missing"
                           + (", complete" if summary[2] else ""), err=True)
        elif kind in ("following", "waiting", "disconnected"):
            typer.echo(f"{kind} {state.session}" + (f": {data['reason']}" if data.get("reason") else ""), err=True)

    return show


@app.command()
@handle_errors
def devices(as_json: bool = JsonOpt) -> None:
    """List audio input devices with their default sample rates.

    Example: scribe devices
    """
    from scribe_cli.capture.sources import list_devices

    found = list_devices()
    if as_json:
        emit_json({"devices": found})
        return
    if not found:
        from scribe_cli.errors import NoAudioDevice

        raise NoAudioDevice("no audio input device found", "connect a microphone, or use scribe watch FOLDER")
    for d in found:
        mark = "*" if d["default"] else " "
        typer.echo(f"{mark} {d['index']:>3}  {d['name']}  ({d['channels']} ch, {d['defaultRate']} Hz)")


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        if exc.code == ExitCode.USAGE and "--json" in sys.argv[1:] and not _emitted:
            _usage_error_as_json(exc.__context__)
        if exc.code == 1 and isinstance(exc.__context__, BrokenPipeError):  # click's own output (--help) to a closed pipe
            exc.code = int(ExitCode.PIPE_CLOSED)
        from scribe_cli.fastexit import exit_now

        exit_now(exc.code)  # skips the interpreter's teardown (see fastexit.py); returns when unsafe
        raise


def _usage_error_as_json(error: BaseException | None) -> None:
    """A command line that cannot be parsed still gives ``--json`` readers an error object.

    The parser has already printed its usage message on stderr and is exiting 2;
    ``error`` is its exception (the context of that exit) when there is one."""
    message = error.format_message() if hasattr(error, "format_message") else "the command line cannot be parsed"
    ctx = getattr(error, "ctx", None)
    command = getattr(ctx, "command_path", None) or "scribe"
    with contextlib.suppress(BrokenPipeError):
        emit_json({"error": {"code": "usage", "exitCode": int(ExitCode.USAGE), "message": message,
                             "hint": f"{command} -h"}})
