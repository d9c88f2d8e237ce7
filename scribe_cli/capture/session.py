"""A recording session end to end: recover, record, upload alongside, drain.

The recorder runs in a worker thread; the uploader follows the spool on the
event loop, told of each new chunk.  Uploading is best effort while
recording: an unreachable server or a refused token never stops capture.
When capture ends the uploader drains for up to ``drain_timeout`` seconds;
whatever is left stays spooled for ``scribe resume``.

A stop request (first Ctrl-C / SIGTERM / SIGHUP, see ``stopping``) ends capture the
normal way (partial chunk committed, final seq recorded) and cuts the drain
to ``STOP_DRAIN_SECONDS``; an abort (second one) ends the drain at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Callable

from typing import TYPE_CHECKING

from scribe_cli import stopping
from scribe_cli.capture.encode import check_format
from scribe_cli.config import Settings
from scribe_cli.errors import ConfigError, NotScribeServer, ScribeError, ServerUnreachable
from scribe_cli.spool import FAILED, Spool
from scribe_cli.stopping import REQUEST, STOP_DRAIN_SECONDS, StopRequest

if TYPE_CHECKING:  # the recorder (numpy, libsndfile) and the uploader (Socket.IO) load when used
    from scribe_cli.capture.recorder import RecordState
    from scribe_cli.upload import Uploader

Listener = Callable[[str, dict], None]


@dataclass
class RecordResult:
    state: RecordState
    pending: int
    failed: int
    final_seq: int | None
    upload_error: ScribeError | None = None

    def to_json(self) -> dict:
        return {**self.state.to_json(), "pendingAfterDrain": self.pending, "failedChunks": self.failed,
                "finalSeq": self.final_seq,
                "uploadError": self.upload_error.message if self.upload_error else None}


def prepare(spool: Spool, settings: Settings, session: str) -> None:
    """Recover an abandoned journal of ``session`` and refuse to record into an existing session."""
    from scribe_cli.capture.journal import recover_session

    recover_session(settings.journal_dir, spool, session)
    if spool.chunks(session) or spool.session_info(session):
        raise ConfigError(f"session {session} already exists in the local spool",
                          f"record into a new --session id; upload this one with scribe resume {session}")


def record(settings: Settings, spool: Spool, state: RecordState, source, chunk_seconds: float, fmt: str,
           max_frames: int | None, offline: bool, drain_timeout: float, listener: Listener,
           stop: StopRequest | None = None, server: str | None = None) -> RecordResult:
    """Record from ``source`` into the spool (and to the server unless ``offline``) until
    ``max_frames`` or a stop request."""
    from scribe_cli.capture.recorder import Recorder

    check_format(fmt, state.rate)
    prepare(spool, settings, state.session)
    recorder = Recorder(spool, settings.journal_dir, state, chunk_seconds, fmt, on_event=listener)
    upload_error: ScribeError | None = None
    with _stopping(stop, REQUEST, recorder.stop):
        if offline:
            recorder.run(source, max_frames)
        else:
            upload_error = asyncio.run(_record_online(settings, spool, recorder, source, max_frames, drain_timeout,
                                                      listener, server or settings.server, stop))
    chunks = spool.chunks(state.session)
    return RecordResult(state, sum(1 for m in chunks if m.state != FAILED), sum(1 for m in chunks if m.state == FAILED),
                        spool.session_info(state.session).get("finalSeq"), upload_error)


def _stopping(stop: StopRequest | None, level: int, callback: Callable[[], None]):
    return stop.on(level, callback) if stop is not None else contextlib.nullcontext()


async def _record_online(settings: Settings, spool: Spool, recorder: Recorder, source, max_frames: int | None,
                         drain_timeout: float, listener: Listener, server: str,
                         stop: StopRequest | None) -> ScribeError | None:
    state = recorder.state

    def on_upload(kind: str, data: dict) -> None:
        if kind == "acked" or kind == "skipped":
            state.acked += 1
        elif kind == "failed":
            state.failed += 1
        elif kind == "connected":
            state.connection = "connected"
        elif kind in ("disconnected", "waiting"):
            state.connection = "reconnecting"
        elif kind == "upload-stopped":
            state.connection = "refused: bad token" if "token" in data.get("error", "") else "stopped"
            state.error = data.get("error")
        elif kind == "stopping":
            state.connection = f"stopping: uploading the rest for up to {data['drainSeconds']:.0f} s (Ctrl-C: now)"
        listener(kind, data)

    state.connection = "connecting"

    def wire(uploader: Uploader, loop: asyncio.AbstractEventLoop) -> None:
        recorder.on_chunk = lambda seq: loop.call_soon_threadsafe(uploader.notify)

    return await upload_alongside(settings, spool, lambda: recorder.run(source, max_frames), [state.session],
                                  drain_timeout, on_upload, server, wire, stop)


async def upload_alongside(settings: Settings, spool: Spool, work: Callable[[], None], sessions: list[str] | None,
                           drain_timeout: float, listener: Listener, server: str,
                           wire: Callable[[Uploader, asyncio.AbstractEventLoop], None],
                           stop: StopRequest | None = None) -> ScribeError | None:
    """Run blocking ``work`` in a thread while an uploader follows the spool; then drain.

    ``work`` must end by itself on a stop request; the drain then lasts at most
    ``STOP_DRAIN_SECONDS``, and an abort ends it at once.  Returns the error
    that stopped uploading (the work itself is never stopped by it).
    """
    from scribe_cli.upload import Uploader

    loop = asyncio.get_running_loop()
    uploader = Uploader(spool, server, settings.require_token(), window=settings.window,
                        ack_timeout=settings.ack_timeout, listener=listener)
    wire(uploader, loop)
    stop_upload = asyncio.Event()
    upload = asyncio.create_task(uploader.run(sessions, until_empty=False, stop=stop_upload))

    def upload_ended(task: asyncio.Task) -> None:
        if not task.cancelled() and isinstance(task.exception(), ScribeError):
            listener("upload-stopped", {"error": task.exception().message})

    upload.add_done_callback(upload_ended)
    outcome: dict = {}
    with stopping.loop_events(stop) as (requested, aborted):
        try:
            await loop.run_in_executor(None, work)
        finally:  # also when the work failed: what was spooled still gets its chance to upload
            outcome["error"] = await _drain(uploader, upload, stop_upload, drain_timeout, requested, aborted,
                                            listener)
    return outcome["error"]


async def _drain(uploader: Uploader, upload: asyncio.Task, stop_upload: asyncio.Event, drain_timeout: float,
                 requested: asyncio.Event, aborted: asyncio.Event, listener: Listener) -> ScribeError | None:
    """Let the uploader finish for up to ``drain_timeout`` s (``STOP_DRAIN_SECONDS`` once a stop
    is requested, nothing once aborted); then cancel it, leaving the rest in the spool."""
    loop = asyncio.get_running_loop()
    uploader.drain_now()
    deadline = loop.time() + drain_timeout
    shortened = False
    while not upload.done() and not aborted.is_set():
        if requested.is_set() and not shortened:
            shortened = True
            deadline = min(deadline, loop.time() + STOP_DRAIN_SECONDS)
            listener("stopping", {"drainSeconds": round(max(0.0, deadline - loop.time()), 1)})
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        wake = [asyncio.ensure_future(aborted.wait())] + ([] if shortened else [asyncio.ensure_future(requested.wait())])
        try:
            await asyncio.wait([upload, *wake], timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in wake:
                waiter.cancel()
    if not upload.done():
        stop_upload.set()
        upload.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await upload
        return None
    error = None if upload.cancelled() else upload.exception()
    if error is not None and not isinstance(error, ScribeError):
        raise error
    return error


@dataclass
class WatchResult:
    taken: list
    rejected: list[dict]
    pending: int
    failed: int
    upload_error: ScribeError | None = None
    ignored: list[dict] | None = None
    still_writing: list[str] | None = None
    unreadable: list[dict] | None = None  # files the card would not give (read errors), looked at again next run

    def to_json(self) -> dict:
        return {"taken": [t.to_json() for t in self.taken], "rejected": self.rejected, "pending": self.pending,
                "failed": self.failed, "uploadError": self.upload_error.message if self.upload_error else None,
                "ignored": self.ignored or [], "stillWriting": self.still_writing or [],
                "unreadable": self.unreadable or []}


def watch(settings: Settings, spool: Spool, watcher, once: bool, offline: bool, drain_timeout: float,
          listener: Listener, server: str | None = None, stop: StopRequest | None = None) -> WatchResult:
    """Take files from a folder into the spool (and upload them unless ``offline``) until
    done (``once``) or a stop request."""
    upload_error = None
    if not offline:  # (a server that does not answer within SERVER_QUESTION_TIMEOUT is not asked again)
        if fit_server_chunk_limit(server or settings.server, settings.token, watcher) and watcher.session:
            continue_after_server(server or settings.server, settings.token, spool, watcher.session)
    watcher.uploading = not offline
    with _stopping(stop, REQUEST, watcher.stop_event.set):
        if offline:
            watcher.run(once=once)
        else:
            def wire(uploader: Uploader, loop: asyncio.AbstractEventLoop) -> None:
                watcher.on_chunk = lambda: loop.call_soon_threadsafe(uploader.notify)

            upload_error = asyncio.run(upload_alongside(settings, spool, lambda: watcher.run(once=once), None,
                                                        drain_timeout, listener, server or settings.server, wire,
                                                        stop))
    sessions = {t.session for t in watcher.taken}
    chunks = [m for m in spool.chunks() if m.session in sessions]
    return WatchResult(watcher.taken, watcher.rejected, sum(1 for m in chunks if m.state != FAILED),
                       sum(1 for m in chunks if m.state == FAILED), upload_error, watcher.ignored,
                       watcher.still_writing, list(watcher.unreadable.values()))


#: seconds ``scribe watch`` waits for the server's answers before it starts taking files: a server
#: that accepts connections and never answers must not keep the card's files from the spool
SERVER_QUESTION_TIMEOUT = 4.0


def fit_server_chunk_limit(server: str, token: str | None, watcher) -> bool:
    """Cut watched files into ranges no larger than the server accepts (its ``--max-chunk-bytes``):
    a byte range over it would be refused for good, and no ``scribe resume`` can cut it again.
    A server that cannot be asked now leaves ``--chunk-bytes`` as given (the upload checks again);
    False when it could not be reached or did not answer."""
    from scribe_cli.api import Api
    from scribe_cli.capture.watch import MIN_CHUNK_BYTES

    try:
        limit = int(Api(server, token, timeout=SERVER_QUESTION_TIMEOUT).info().get("maxChunkBytes", 0))
    except (ServerUnreachable, NotScribeServer):
        return False
    except (ScribeError, ValueError, TypeError, AttributeError):
        return True
    if limit > 0:
        watcher.chunk_bytes = max(MIN_CHUNK_BYTES, min(watcher.chunk_bytes, limit))
    return True


def continue_after_server(server: str, token: str | None, spool: Spool, session: str) -> None:
    """A ``--session`` this spool has never written to may already hold chunks on the server (another
    machine's watch, a browser recording): number the new chunks after them instead of colliding with
    them (a ``conflict`` no ``scribe resume`` can fix).  A session finished on the server takes no more
    chunks: refused before anything is spooled.  A server that cannot be asked now changes nothing."""
    import json

    from scribe_cli.api import Api
    from scribe_cli.errors import NotFound

    if spool.session_info(session).get("nextSeq") is not None or spool.chunks(session):
        return
    try:
        report = Api(server, token, timeout=SERVER_QUESTION_TIMEOUT).missing(session)
    except NotFound:
        return  # a new session
    except ScribeError:
        return
    if not isinstance(report, dict):
        return
    if report.get("finalSeq") is not None:
        raise ConfigError(f"session {session} is finished on the server (last chunk {report['finalSeq']}): "
                          "it takes no more chunks", "watch into a new --session id")
    top = report.get("maxSeq")
    if isinstance(top, int) and top >= 0:
        with spool.transaction():
            info = spool.session_info(session)
            info["nextSeq"] = top + 1
            spool.cache.set(f"s/{session}", json.dumps(info))
