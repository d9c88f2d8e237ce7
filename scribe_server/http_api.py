"""The HTTP face of the server: health, metrics and the read-only session API.

Every ``/api/sessions`` route needs ``Authorization: Bearer TOKEN`` and sees
only the token's own sessions (an unknown id is 404 ``not_found``).  Every
answer, errors included, is JSON with a documented code (``/metrics`` is the
Prometheus text format; an export is audio); numbers in paths and queries are
ASCII digits only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable, Callable

import sqlalchemy as sa
from aiohttp import web

import scribe_protocol as proto
from scribe_protocol import ErrorCode, ProtocolError
from scribe_server import export
from scribe_server.events import EventHandlers

log = logging.getLogger(__name__)

STATUS = {
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.STORAGE_UNAVAILABLE: 503,
    ErrorCode.SERVER_BUSY: 503,
    ErrorCode.TOO_MANY_IN_FLIGHT: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.CONFLICT: 409,
    ErrorCode.INCOMPLETE: 409,
    ErrorCode.UNSUPPORTED_MIME_TYPE: 415,
    ErrorCode.DECODE_LIMIT: 422,
}
DIGITS = re.compile(r"[0-9]{1,10}")
#: Chunks listed per page of ``GET /api/sessions/{id}`` (``?limit=`` up to this).
MAX_PAGE = 10_000
#: Seconds an export may wait for the client to take the next MiB.
EXPORT_WRITE_TIMEOUT = 60
#: Seconds a readiness answer is reused (each check writes to the database and the disk).
READY_CACHE_SECONDS = 1.0


def error_response(exc: ProtocolError, status: int | None = None) -> web.Response:
    return web.json_response({"ok": False, "error": exc.to_error()}, status=status or STATUS.get(exc.code, 400))


def ascii_int(text: str | None, name: str, default: int | None = None, maximum: int = proto.MAX_SEQ,
              minimum: int = 0) -> int:
    """An integer ``minimum..maximum`` written in ASCII digits (``int()`` also takes '١' and '²')."""
    if text is None and default is not None:
        return default
    if text is None or not DIGITS.fullmatch(text) or not minimum <= int(text) <= maximum:
        raise ProtocolError(ErrorCode.INVALID_PAYLOAD,
                            f"{name} must be an integer {minimum}..{maximum} in ASCII digits")
    return int(text)


@web.middleware
async def json_errors(request: web.Request, handler):
    """Turn every failure into a JSON answer with a code; never a text traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: ErrorCode.NOT_FOUND, 401: ErrorCode.UNAUTHORIZED}.get(exc.status, ErrorCode.INVALID_PAYLOAD)
        return web.json_response({"ok": False, "error": {"code": code.value, "message": exc.reason.lower()}},
                                 status=exc.status, headers={k: v for k, v in exc.headers.items() if k == "Allow"})
    except ProtocolError as exc:
        return error_response(exc)
    except sa.exc.SQLAlchemyError as exc:
        log.error("database error while answering %s %s: %s", request.method, request.path, exc.__class__.__name__)
        return error_response(ProtocolError(ErrorCode.STORAGE_UNAVAILABLE, "the database is unavailable; retry later"))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unexpected error while answering %s %s", request.method, request.path)
        return error_response(ProtocolError(ErrorCode.INTERNAL, "internal error; retry later"))


class Exports:
    """Exports run apart from everything else: an export decodes for seconds to minutes, so on the
    store's pool 16 of them would make every login and API call wait (a Socket.IO login must finish
    within the handshake deadline).  They get their own ``workers`` threads, and one token may run
    ``per_token`` exports at once (assembly and download); another is answered 429
    ``too_many_in_flight`` at once, so one token cannot queue more than that ahead of the others.
    An export whose client went away keeps its place until its thread is done (a thread cannot
    be stopped), so disconnecting and asking again does not pile up work."""

    def __init__(self, workers: int, per_token: int):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="export")
        self.per_token = per_token
        self.running: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def slot(self, owner: str) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
        """Yields ``run(fn, *args)``, which calls ``fn`` on the export pool (raises ProtocolError when the
        token already runs ``per_token`` exports)."""
        if self.running.get(owner, 0) >= self.per_token:
            raise ProtocolError(ErrorCode.TOO_MANY_IN_FLIGHT, f"this token already runs {self.per_token} export(s) "
                                                              "at once; retry when one has finished")
        self.running[owner] = self.running.get(owner, 0) + 1
        work: list[Future] = []
        loop = asyncio.get_running_loop()

        def run(fn: Callable, *args: Any) -> Awaitable[Any]:
            work.append(self.pool.submit(fn, *args))
            return asyncio.wrap_future(work[-1])

        try:
            yield run
        finally:
            if work and not work[-1].done():  # the client went away mid-assembly: release when the thread is done
                work[-1].add_done_callback(lambda _: _call_soon(loop, self._release, owner))
            else:
                self._release(owner)

    def _release(self, owner: str) -> None:
        self.running[owner] -= 1
        if not self.running[owner]:
            del self.running[owner]


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
        loop.call_soon_threadsafe(fn, *args)


class HttpApi:
    def __init__(self, handlers: EventHandlers):
        self.h = handlers
        self._ready: tuple[float, str | None] = (0.0, None)
        self.exports = Exports(handlers.config.export_workers, handlers.config.max_exports_per_token)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.healthz),
            web.get("/livez", self.livez),
            web.get("/metrics", self.metrics),
            web.get("/api/info", self.info),
            web.get("/api/sessions", self.list_sessions),
            web.get("/api/sessions/{session_id}", self.get_session),
            web.get("/api/sessions/{session_id}/missing-chunks", self.missing_chunks),
            web.get("/api/sessions/{session_id}/audio", self.audio),
            web.get("/api/sessions/{session_id}/chunks/{seq}", self.chunk),
            web.get("/api/sessions/{session_id}/file", self.file),
        ]

    async def healthz(self, request: web.Request) -> web.Response:
        """Readiness: 200 when the server can store a chunk now, else 503 with the reason."""
        checked, reason = self._ready
        if time.monotonic() - checked > READY_CACHE_SECONDS:
            reason = await self.h.run(self.h.store.readiness)
            self._ready = (time.monotonic(), reason)
        if reason is None:
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "unavailable", "reason": reason}, status=503)

    async def livez(self, request: web.Request) -> web.Response:
        """Liveness: the process answers (restart it only when this fails)."""
        return web.json_response({"status": "alive"})

    async def metrics(self, request: web.Request) -> web.Response:
        guard = getattr(self.h, "guard", None)
        if guard is not None:
            self.h.metrics.sockets.set(len(guard.open))
        self.h.metrics.in_flight_bytes.set(self.h.in_flight_bytes)
        return web.Response(body=self.h.metrics.render(), content_type="text/plain")

    async def info(self, request: web.Request) -> web.Response:
        c = self.h.config
        return web.json_response(
            {"protocol": proto.PROTOCOL_VERSION, "maxChunkBytes": c.max_chunk_bytes, "maxInFlight": c.max_in_flight,
             "maxConnectionBytes": c.max_connection_bytes,
             "maxBatchChunks": c.max_batch_chunks if c.max_batch_chunks > 1 else None}
        )

    async def _owner(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        secret = header[7:].strip() if header.lower().startswith("bearer ") else None
        address = request.remote or "?"
        delay = self.h.throttle.delay(address)
        if delay:
            await asyncio.sleep(delay)
        principal = await self.h.run(self.h.tokens.authenticate, secret)
        if principal is None:
            self.h.throttle.failed(address)
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "missing or invalid token")
        self.h.throttle.succeeded(address)
        return principal.name

    @staticmethod
    def _session_id(request: web.Request) -> str:
        try:
            return proto.validate_session_id(request.match_info["session_id"])
        except ProtocolError:
            raise ProtocolError(ErrorCode.NOT_FOUND, "session not found") from None

    async def _call(self, request: web.Request, fn, *args) -> web.Response:
        owner = await self._owner(request)
        session_id = self._session_id(request) if "session_id" in request.match_info else ""
        return web.json_response(await self.h.run(fn, owner, session_id, *args))

    async def list_sessions(self, request: web.Request) -> web.Response:
        return await self._call(request, lambda owner, _sid: {"sessions": self.h.store.list_sessions(owner)})

    async def get_session(self, request: web.Request) -> web.Response:
        """The gap report and one page of chunks: ``?after=SEQ&limit=N`` (default all
        up to 10,000; a limit below 1 is 400 ``invalid_payload``, as a page without chunks has no
        ``nextAfter`` to go on from); ``chunksTruncated`` and ``nextAfter`` say when there is more."""
        after = ascii_int(request.query.get("after"), "after", default=-1) if "after" in request.query else -1
        limit = ascii_int(request.query.get("limit"), "limit", default=MAX_PAGE, maximum=MAX_PAGE, minimum=1)

        def work(owner: str, session_id: str) -> dict:
            report = self.h.store.missing(owner, session_id)
            page = self.h.store.session_chunks(owner, session_id, after=after, limit=limit + 1)
            more = len(page) > limit
            page = page[:limit]
            return {"sessionId": session_id, **report.to_json(), "chunks": page, "chunksTruncated": more,
                    "nextAfter": page[-1]["sequence"] if more else None,
                    "files": self.h.store.manifest.files(owner, session_id)}

        return await self._call(request, work)

    async def missing_chunks(self, request: web.Request) -> web.Response:
        return await self._call(request, lambda owner, sid: self.h.store.missing(owner, sid).to_json())

    async def chunk(self, request: web.Request) -> web.Response:
        """One chunk's bytes exactly as stored (for verification and repair)."""
        owner = await self._owner(request)
        session_id = self._session_id(request)
        seq_text = request.match_info["seq"]
        if not DIGITS.fullmatch(seq_text) or int(seq_text) > proto.MAX_SEQ:
            raise ProtocolError(ErrorCode.NOT_FOUND, "no such chunk")
        mime, data = await self.h.run(self.h.store.read_chunk, owner, session_id, int(seq_text))
        return web.Response(body=data, content_type="application/octet-stream", headers={"X-Chunk-Mime-Type": mime})

    async def file(self, request: web.Request) -> web.StreamResponse:
        """One watched file exactly as the recorder wrote it: ``?path=REL[&version=N]`` (latest by default)."""
        owner = await self._owner(request)
        session_id = self._session_id(request)
        path = proto.validate_file_path(request.query.get("path"))
        version = ascii_int(request.query.get("version"), "version") if "version" in request.query else None

        if request.method == "HEAD":  # answers from the manifest: no rebuild, as HEAD of an export runs none
            def row():
                self.h.store.owned_session(owner, session_id)
                return self.h.store.manifest.version(owner, session_id, path, version)

            found = await self.h.run(row)
            return web.Response(headers={"Content-Type": "application/octet-stream", "X-File-Sha256": found.sha256,
                                         "X-File-Version": str(found.version), "Content-Length": str(found.size)})

        def rebuild():
            self.h.store.owned_session(owner, session_id)
            return self.h.store.manifest.rebuild(owner, session_id, path, version)

        async with self.exports.slot(owner) as run:
            out, entry = await run(rebuild)
            headers = {"Content-Type": "application/octet-stream", "X-File-Sha256": entry["sha256"],
                       "X-File-Version": str(entry["version"])}
            return await self._stream(request, out, headers)

    async def _stream(self, request: web.Request, out, headers: dict) -> web.StreamResponse:
        """Stream a temporary file; a client that stops reading is dropped, not waited for forever, and
        one that went away while its export was assembled is let go quietly (it is not there to tell)."""
        with out:
            response = web.StreamResponse(headers=headers)
            response.content_length = out.seek(0, 2)
            out.seek(0)
            try:
                await response.prepare(request)
                while block := await self.h.run(out.read, 1 << 20):
                    await asyncio.wait_for(response.write(block), timeout=EXPORT_WRITE_TIMEOUT)
            except (asyncio.TimeoutError, ConnectionResetError):
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write_eof()
        return response

    async def audio(self, request: web.Request) -> web.StreamResponse:
        """The whole session as one WAV or FLAC file, chunks decoded in seq order.
        A HEAD request checks access and format but does not run the export."""
        fmt = request.query.get("format", "wav").lower()
        allow_gaps = request.query.get("allowGaps", "0").lower() in ("1", "true", "yes")
        owner = await self._owner(request)
        session_id = self._session_id(request)
        if fmt not in export.CONTENT_TYPES:
            raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "format must be wav or flac")
        if request.method == "HEAD":
            await self.h.run(self.h.store.owned_session, owner, session_id)
            return web.Response(headers={"Content-Type": export.CONTENT_TYPES[fmt]})
        async with self.exports.slot(owner) as run:
            out = await run(export.assemble, self.h.store, owner, session_id, fmt, allow_gaps)
            return await self._stream(request, out, {"Content-Type": export.CONTENT_TYPES[fmt]})


def add_routes(app: web.Application, handlers: EventHandlers) -> None:
    api = HttpApi(handlers)
    app.add_routes(api.routes())

    async def stop_exports(app: web.Application) -> None:
        api.exports.pool.shutdown(wait=True, cancel_futures=True)

    app.on_cleanup.append(stop_exports)
