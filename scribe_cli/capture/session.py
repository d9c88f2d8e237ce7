"""A recording session end to end: recover, record, upload alongside, drain.

The recorder runs in a worker thread; the uploader follows the spool on the
event loop, told of each new chunk.  Uploading is best effort while
recording: an unreachable server or a refused token never stops capture.
When capture ends the uploader drains for up to ``drain_timeout`` seconds;
whatever is left stays spooled for ``scribe resume``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Callable

from scribe_cli.capture.encode import check_format
from scribe_cli.capture.journal import recover_session
from scribe_cli.capture.recorder import Recorder, RecordState
from scribe_cli.config import Settings
from scribe_cli.errors import ConfigError, ScribeError
from scribe_cli.spool import FAILED, Spool
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
    recover_session(settings.journal_dir, spool, session)
    if spool.chunks(session) or spool.session_info(session):
        raise ConfigError(f"session {session} already exists in the local spool",
                          f"record into a new --session id; upload this one with scribe resume {session}")


def record(settings: Settings, spool: Spool, state: RecordState, source, chunk_seconds: float, fmt: str,
           max_frames: int | None, offline: bool, drain_timeout: float, listener: Listener,
           stop_hook: Callable[[Recorder], None] | None = None, server: str | None = None) -> RecordResult:
    """Record from ``source`` into the spool (and to the server unless ``offline``)."""
    check_format(fmt, state.rate)
    prepare(spool, settings, state.session)
    recorder = Recorder(spool, settings.journal_dir, state, chunk_seconds, fmt, on_event=listener)
    if stop_hook:
        stop_hook(recorder)
    upload_error: ScribeError | None = None
    if offline:
        recorder.run(source, max_frames)
    else:
        upload_error = asyncio.run(_record_online(settings, spool, recorder, source, max_frames, drain_timeout,
                                                  listener, server or settings.server))
    chunks = spool.chunks(state.session)
    return RecordResult(state, sum(1 for m in chunks if m.state != FAILED), sum(1 for m in chunks if m.state == FAILED),
                        spool.session_info(state.session).get("finalSeq"), upload_error)


async def _record_online(settings: Settings, spool: Spool, recorder: Recorder, source, max_frames: int | None,
                         drain_timeout: float, listener: Listener, server: str) -> ScribeError | None:
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
        listener(kind, data)

    state.connection = "connecting"

    def wire(uploader: Uploader, loop: asyncio.AbstractEventLoop) -> None:
        recorder.on_chunk = lambda seq: loop.call_soon_threadsafe(uploader.notify)

    return await upload_alongside(settings, spool, lambda: recorder.run(source, max_frames), [state.session],
                                  drain_timeout, on_upload, server, wire)


async def upload_alongside(settings: Settings, spool: Spool, work: Callable[[], None], sessions: list[str] | None,
                           drain_timeout: float, listener: Listener, server: str,
                           wire: Callable[[Uploader, asyncio.AbstractEventLoop], None]) -> ScribeError | None:
    """Run blocking ``work`` in a thread while an uploader follows the spool; then drain.

    Returns the error that stopped uploading (the work itself is never stopped by it).
    """
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
    try:
        await loop.run_in_executor(None, work)
    finally:  # also when the work failed: what was spooled still gets its chance to upload
        outcome["error"] = await _drain(uploader, upload, stop_upload, drain_timeout)
    return outcome["error"]


async def _drain(uploader: Uploader, upload: asyncio.Task, stop_upload: asyncio.Event,
                 drain_timeout: float) -> ScribeError | None:
    uploader.drain_now()
    try:
        await asyncio.wait_for(asyncio.shield(upload), timeout=drain_timeout)
    except asyncio.TimeoutError:
        stop_upload.set()
        upload.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await upload
    except ScribeError as exc:
        return exc
    return None


@dataclass
class WatchResult:
    taken: list
    rejected: list[dict]
    pending: int
    failed: int
    upload_error: ScribeError | None = None
    ignored: list[dict] | None = None
    still_writing: list[str] | None = None

    def to_json(self) -> dict:
        return {"taken": [t.to_json() for t in self.taken], "rejected": self.rejected, "pending": self.pending,
                "failed": self.failed, "uploadError": self.upload_error.message if self.upload_error else None,
                "ignored": self.ignored or [], "stillWriting": self.still_writing or []}


def watch(settings: Settings, spool: Spool, watcher, once: bool, offline: bool, drain_timeout: float,
          listener: Listener, server: str | None = None) -> WatchResult:
    """Take files from a folder into the spool (and upload them unless ``offline``)."""
    upload_error = None
    if offline:
        watcher.run(once=once)
    else:
        def wire(uploader: Uploader, loop: asyncio.AbstractEventLoop) -> None:
            watcher.on_chunk = lambda: loop.call_soon_threadsafe(uploader.notify)

        upload_error = asyncio.run(upload_alongside(settings, spool, lambda: watcher.run(once=once), None,
                                                    drain_timeout, listener, server or settings.server, wire))
    sessions = {t.session for t in watcher.taken}
    chunks = [m for m in spool.chunks() if m.session in sessions]
    return WatchResult(watcher.taken, watcher.rejected, sum(1 for m in chunks if m.state != FAILED),
                       sum(1 for m in chunks if m.state == FAILED), upload_error, watcher.ignored,
                       watcher.still_writing)
