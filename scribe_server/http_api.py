"""The HTTP face of the server: health, metrics and the read-only session API.

Every ``/api/sessions`` route needs ``Authorization: Bearer TOKEN`` and sees
only the token's own sessions (an unknown id is 404 ``not_found``).  Every
answer, errors included, is JSON with a documented code (``/metrics`` is the
Prometheus text format; an export is audio); numbers in paths and queries are
ASCII digits only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

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


def ascii_int(text: str | None, name: str, default: int | None = None, maximum: int = proto.MAX_SEQ) -> int:
    """A non-negative integer written in ASCII digits (``int()`` also takes '١' and '²')."""
    if text is None and default is not None:
        return default
    if text is None or not DIGITS.fullmatch(text) or int(text) > maximum:
        raise ProtocolError(ErrorCode.INVALID_PAYLOAD, f"{name} must be an integer 0..{maximum} in ASCII digits")
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


class HttpApi:
    def __init__(self, handlers: EventHandlers):
        self.h = handlers
        self._ready: tuple[float, str | None] = (0.0, None)

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
        up to 10,000); ``chunksTruncated`` and ``nextAfter`` say when there is more."""
        after = ascii_int(request.query.get("after"), "after", default=-1) if "after" in request.query else -1
        limit = ascii_int(request.query.get("limit"), "limit", default=MAX_PAGE, maximum=MAX_PAGE)

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

        out, entry = await self.h.run(rebuild)
        headers = {"Content-Type": "application/octet-stream", "X-File-Sha256": entry["sha256"],
                   "X-File-Version": str(entry["version"])}
        return await self._stream(request, out, headers)

    async def _stream(self, request: web.Request, out, headers: dict) -> web.StreamResponse:
        """Stream a temporary file; a client that stops reading is dropped, not waited for forever."""
        with out:
            response = web.StreamResponse(headers=headers)
            response.content_length = out.seek(0, 2)
            out.seek(0)
            await response.prepare(request)
            try:
                while block := await self.h.run(out.read, 1 << 20):
                    await asyncio.wait_for(response.write(block), timeout=EXPORT_WRITE_TIMEOUT)
            except asyncio.TimeoutError:
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
        out = await self.h.run(export.assemble, self.h.store, owner, session_id, fmt, allow_gaps)
        return await self._stream(request, out, {"Content-Type": export.CONTENT_TYPES[fmt]})


def add_routes(app: web.Application, handlers: EventHandlers) -> None:
    app.add_routes(HttpApi(handlers).routes())
