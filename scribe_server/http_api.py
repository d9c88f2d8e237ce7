"""The HTTP face of the server: health, metrics and the read-only session API.

Every ``/api/sessions`` route needs ``Authorization: Bearer TOKEN``; a
session of another token answers 404 exactly as an unknown one.
"""

from __future__ import annotations

import asyncio
import logging

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
    ErrorCode.INTERNAL: 500,
    ErrorCode.CONFLICT: 409,
    ErrorCode.INCOMPLETE: 409,
    ErrorCode.UNSUPPORTED_MIME_TYPE: 415,
}


def error_response(exc: ProtocolError) -> web.Response:
    return web.json_response({"ok": False, "error": exc.to_error()}, status=STATUS.get(exc.code, 400))


class HttpApi:
    def __init__(self, handlers: EventHandlers):
        self.h = handlers

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/healthz", self.healthz),
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
        ok = await self.h.run(self.h.store.healthy)
        return web.json_response({"status": "ok" if ok else "unavailable"}, status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.h.metrics.render(), content_type="text/plain")

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"protocol": proto.PROTOCOL_VERSION, "maxChunkBytes": self.h.config.max_chunk_bytes,
             "maxInFlight": self.h.config.max_in_flight}
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

    async def _call(self, request: web.Request, fn, *args) -> web.Response:
        try:
            owner = await self._owner(request)
            session_id = proto.validate_session_id(request.match_info.get("session_id", "x"))
            return web.json_response(await self.h.run(fn, owner, session_id, *args))
        except ProtocolError as exc:
            if exc.code == ErrorCode.INVALID_SESSION_ID:
                exc = ProtocolError(ErrorCode.NOT_FOUND, "session not found")
            return error_response(exc)

    async def list_sessions(self, request: web.Request) -> web.Response:
        return await self._call(request, lambda owner, _sid: {"sessions": self.h.store.list_sessions(owner)})

    async def get_session(self, request: web.Request) -> web.Response:
        def work(owner: str, session_id: str) -> dict:
            report = self.h.store.missing(owner, session_id)
            return {"sessionId": session_id, **report.to_json(), "chunks": self.h.store.session_chunks(owner, session_id),
                    "files": self.h.store.manifest.files(owner, session_id)}

        return await self._call(request, work)

    async def missing_chunks(self, request: web.Request) -> web.Response:
        return await self._call(request, lambda owner, sid: self.h.store.missing(owner, sid).to_json())

    async def chunk(self, request: web.Request) -> web.Response:
        """One chunk's bytes exactly as stored (for verification and repair)."""
        try:
            owner = await self._owner(request)
            session_id = proto.validate_session_id(request.match_info["session_id"])
            seq_text = request.match_info["seq"]
            seq = proto.validate_seq(int(seq_text) if seq_text.isdigit() else -1)
            mime, data = await self.h.run(self.h.store.read_chunk, owner, session_id, seq)
        except ProtocolError as exc:
            if exc.code in (ErrorCode.INVALID_SESSION_ID, ErrorCode.INVALID_SEQUENCE):
                exc = ProtocolError(ErrorCode.NOT_FOUND, "no such chunk")
            return error_response(exc)
        return web.Response(body=data, content_type="application/octet-stream",
                            headers={"X-Chunk-Mime-Type": mime})

    async def file(self, request: web.Request) -> web.StreamResponse:
        """One watched file exactly as the recorder wrote it: ``?path=REL[&version=N]`` (latest by default)."""
        version_text = request.query.get("version")
        try:
            owner = await self._owner(request)
            session_id = proto.validate_session_id(request.match_info["session_id"])
            path = proto.validate_file_path(request.query.get("path"))
            version = None
            if version_text is not None:
                if not version_text.isdigit():
                    raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "version must be a positive integer")
                version = int(version_text)
            def rebuild():
                self.h.store.owned_session(owner, session_id)
                return self.h.store.manifest.rebuild(owner, session_id, path, version)

            out, entry = await self.h.run(rebuild)
        except ProtocolError as exc:
            if exc.code == ErrorCode.INVALID_SESSION_ID:
                exc = ProtocolError(ErrorCode.NOT_FOUND, "session not found")
            return error_response(exc)
        headers = {"Content-Type": "application/octet-stream", "X-File-Sha256": entry["sha256"],
                   "X-File-Version": str(entry["version"])}
        return await self._stream(request, out, headers)

    async def _stream(self, request: web.Request, out, headers: dict) -> web.StreamResponse:
        with out:
            response = web.StreamResponse(headers=headers)
            response.content_length = out.seek(0, 2)
            out.seek(0)
            await response.prepare(request)
            while block := await self.h.run(out.read, 1 << 20):
                await response.write(block)
            await response.write_eof()
        return response

    async def audio(self, request: web.Request) -> web.StreamResponse:
        """The whole session as one WAV or FLAC file, chunks decoded in seq order."""
        fmt = request.query.get("format", "wav").lower()
        allow_gaps = request.query.get("allowGaps", "0").lower() in ("1", "true", "yes")
        try:
            owner = await self._owner(request)
            session_id = proto.validate_session_id(request.match_info["session_id"])
            if fmt not in export.CONTENT_TYPES:
                raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "format must be wav or flac")
            out = await self.h.run(export.assemble, self.h.store, owner, session_id, fmt, allow_gaps)
        except ProtocolError as exc:
            if exc.code == ErrorCode.INVALID_SESSION_ID:
                exc = ProtocolError(ErrorCode.NOT_FOUND, "session not found")
            return error_response(exc)
        return await self._stream(request, out, {"Content-Type": export.CONTENT_TYPES[fmt]})


def add_routes(app: web.Application, handlers: EventHandlers) -> None:
    app.add_routes(HttpApi(handlers).routes())
