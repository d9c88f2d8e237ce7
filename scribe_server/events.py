"""The Socket.IO face of the server: authentication, events, replies.

Every handler validates its payload with the protocol module, calls the
chunk store in a worker thread and answers with an ok or an error reply.  A
handler never raises into the event loop and never sends a traceback or a
file path to a client.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import socketio
import sqlalchemy as sa

import scribe_protocol as proto
from scribe_protocol import ErrorCode, ProtocolError
from scribe_server.config import ServerConfig
from scribe_server.metrics import Metrics
from scribe_server.ratelog import RateLimitedLog
from scribe_server.sio_adapter import ACK_REQUESTED, HardenedServer
from scribe_server.store import ChunkStore, PutResult
from scribe_server.store.writer import Job
from scribe_server.store.tokens import Principal, TokenStore

log = logging.getLogger(__name__)

MAX_STATE_SEQS = 5_000


@dataclass
class Connection:
    principal: Principal
    address: str
    in_flight: int = 0
    in_flight_bytes: int = 0


class AuthThrottle:
    """Slows down repeated failed authentication from one address."""

    def __init__(self, base: float = 0.05, cap: float = 3.0, forget_after: float = 300.0):
        self.base, self.cap, self.forget_after = base, cap, forget_after
        self._failures: dict[str, tuple[int, float]] = {}

    def delay(self, address: str) -> float:
        count, last = self._failures.get(address, (0, 0.0))
        if time.monotonic() - last > self.forget_after:
            return 0.0
        return min(self.cap, self.base * (2 ** max(0, count - 1))) if count else 0.0

    def failed(self, address: str) -> None:
        count, last = self._failures.get(address, (0, 0.0))
        if time.monotonic() - last > self.forget_after:
            count = 0
        self._failures[address] = (count + 1, time.monotonic())
        if len(self._failures) > 100_000:
            self._failures.clear()

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


class LoopSettler:
    """Resolves event-loop futures from another thread, one loop wake-up per burst.

    The chunk writer settles a whole batch at once; instead of one
    ``call_soon_threadsafe`` (and one self-pipe write) per chunk, outcomes are
    collected and the loop is woken once for all that arrived meanwhile.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Future, Any]] = []

    def settle(self, future: asyncio.Future, value: Any) -> None:
        with self._lock:
            self._pending.append((future, value))
            first = len(self._pending) == 1
        if first:
            try:
                future.get_loop().call_soon_threadsafe(self._run)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _run(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for future, value in pending:
            if not future.done():
                future.set_result(value)


def room_of(owner: str, session_id: str) -> str:
    """The live-feed room of one owner's session ('/' is in neither name)."""
    return f"session:{owner}/{session_id}"


class EventHandlers:
    """Binds the protocol's events on ``sio`` to the chunk store."""

    def __init__(self, sio: HardenedServer, store: ChunkStore, tokens: TokenStore, config: ServerConfig, metrics: Metrics):
        self.sio, self.store, self.tokens, self.config, self.metrics = sio, store, tokens, config, metrics
        self.executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="store")
        self.settler = LoopSettler()
        self.connections: dict[str, Connection] = {}
        self.in_flight_bytes = 0  # audio bytes of all connections waiting to be stored
        self.throttle = AuthThrottle()
        self.refusals = RateLimitedLog(log)
        self.guard: Any = None  # the SocketGuard, when the server runs behind one (app.serve)
        sio.is_authenticated = self.connections.__contains__
        self._background: set[asyncio.Task] = set()
        sio.on("connect", self.on_connect)
        sio.on("disconnect", self.on_disconnect)
        sio.on(proto.AUDIO_CHUNK, self.on_audio_chunk)
        if config.max_batch_chunks > 1:
            sio.on(proto.AUDIO_CHUNKS, self.on_audio_chunks)
        sio.on(proto.SESSION_STATE, self.on_session_state)
        sio.on(proto.SESSION_FINISH, self.on_session_finish)
        sio.on(proto.SESSION_FOLLOW, self.on_session_follow)

    async def run(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))

    # connection lifecycle ---------------------------------------------------
    async def on_connect(self, sid: str, environ: dict, auth: Any = None) -> None:
        address = environ.get("REMOTE_ADDR") or "?"
        secret = auth.get("token") if isinstance(auth, dict) else None
        header = environ.get("HTTP_AUTHORIZATION", "")
        if secret is None and header.lower().startswith("bearer "):
            secret = header[7:].strip()
        delay = self.throttle.delay(address)
        if delay:
            await asyncio.sleep(delay)
        try:
            principal = await self.run(self.tokens.authenticate, secret)
        except sa.exc.SQLAlchemyError as exc:
            self.refusals(logging.ERROR, "auth-db", "cannot check a token: the database failed (%s)",
                          exc.__class__.__name__)
            raise socketio.exceptions.ConnectionRefusedError(
                "storage_unavailable: the server cannot check tokens right now; retry later",
                {"code": ErrorCode.STORAGE_UNAVAILABLE.value}) from None
        if principal is None:
            self.throttle.failed(address)
            self.metrics.auth_failures.inc()
            raise socketio.exceptions.ConnectionRefusedError(
                "unauthorized: missing or invalid token", {"code": ErrorCode.UNAUTHORIZED.value}
            )
        self._check_connection_limits(principal)
        self.throttle.succeeded(address)
        if self.guard is not None:  # from now on its messages may be as large as a chunk
            self.guard.authenticated(environ.get("aiohttp.request"))
        self.connections[sid] = Connection(principal, address)
        self.metrics.connections.set(len(self.connections))

    def _check_connection_limits(self, principal: Principal) -> None:
        """Refuse (transiently) a connection over ``--max-connections`` (``server_busy``) or over the
        token's ``--max-connections-per-token`` (``too_many_in_flight``), so no token takes every slot."""
        if len(self.connections) >= self.config.max_connections:
            self.refusals(logging.WARNING, "connections", "refused a connection: %d open (the limit is %d)",
                          len(self.connections), self.config.max_connections)
            raise socketio.exceptions.ConnectionRefusedError(
                "busy: the server is at its connection limit; retry later", {"code": ErrorCode.SERVER_BUSY.value})
        held = sum(1 for conn in self.connections.values() if conn.principal.name == principal.name)
        if held >= self.config.connections_per_token:
            self.refusals(logging.WARNING, "token-connections", "refused a connection of token %s: it holds %d",
                          principal.name, held)
            raise socketio.exceptions.ConnectionRefusedError(
                f"busy: this token already holds {held} connections (the limit per token); close one or retry later",
                {"code": ErrorCode.TOO_MANY_IN_FLIGHT.value})

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        self.connections.pop(sid, None)
        self.metrics.connections.set(len(self.connections))

    async def watch_revocations(self) -> None:
        """Disconnect open connections whose token was revoked, every few seconds."""
        while True:
            await asyncio.sleep(self.config.revoke_check_seconds)
            try:
                ids = {c.principal.token_id for c in self.connections.values()}
                active = await self.run(self.tokens.active_ids, ids)
                for sid, conn in list(self.connections.items()):
                    # only tokens that were asked about: a connection made during the query (its token maybe
                    # not in ``ids``) is not revoked for being missing from the answer
                    if conn.principal.token_id in ids and conn.principal.token_id not in active:
                        log.info("disconnecting %s: token %s was revoked", sid, conn.principal.name)
                        self.connections.pop(sid, None)
                        await self.sio.disconnect(sid)
            except Exception:  # keep watching; a database hiccup is not fatal
                log.exception("revocation check failed")

    def has_followers(self, owner: str, session_id: str) -> bool:
        """Whether a ``chunk-stored`` event can reach anyone: always with Redis
        (followers may sit on other nodes), else only when the room is not empty."""
        if self.config.redis_url:
            return True
        return bool(self.sio.manager.rooms.get("/", {}).get(room_of(owner, session_id)))

    # replies ----------------------------------------------------------------
    async def reply(self, sid: str, reply: dict, event_ok: str | None, event_err: str | None) -> dict | None:
        """Answer through the Socket.IO ack when one was asked for, else by event."""
        if ACK_REQUESTED.get():
            return reply
        event = event_ok if reply.get("ok") else event_err
        if event:
            await self.sio.emit(event, reply, to=sid)
        return None

    async def guarded(self, sid: str, data: Any, work: Callable) -> dict:
        """Run ``work(connection)``; map every failure to an error reply."""
        conn = self.connections.get(sid)
        try:
            if conn is None:
                raise ProtocolError(ErrorCode.UNAUTHORIZED, "not authenticated")
            return await work(conn)
        except ProtocolError as exc:
            self.metrics.errors.labels(exc.code.value).inc()
            return proto.error_ack(exc, proto.echo_ids(data))
        except Exception:
            log.exception("unexpected error while handling an event")
            self.metrics.errors.labels(ErrorCode.INTERNAL.value).inc()
            return proto.error_ack(ProtocolError(ErrorCode.INTERNAL, "internal error; retry later"), proto.echo_ids(data))

    # events -----------------------------------------------------------------
    async def on_audio_chunk(self, sid: str, data: Any = None) -> dict | None:
        async def work(conn: Connection) -> dict:
            return await self._finish_put(conn, data, self._begin_put(conn, data))

        reply = await self.guarded(sid, data, work)
        return await self.reply(sid, reply, proto.CHUNK_ACK, proto.CHUNK_ERROR)

    async def on_audio_chunks(self, sid: str, data: Any = None) -> dict | None:
        """Several chunks in one event (scribe's own client): each is admitted, stored
        and answered exactly as if it had come in its own ``audio-chunk`` event, and
        the replies come back together, in order.  All of them reach the chunk
        writer at once (one batch), and no task is made per chunk."""
        async def work(conn: Connection) -> dict:
            chunks = proto.split_audio_batch(data, self.config.max_chunk_bytes, self.config.max_batch_chunks)
            self.metrics.batches.inc()
            started: list[asyncio.Future | BaseException] = []
            for chunk in chunks:
                try:
                    started.append(self._begin_put(conn, chunk))
                except ProtocolError as exc:
                    started.append(exc)
            replies = []
            for chunk, pending in zip(chunks, started):
                try:
                    if isinstance(pending, BaseException):
                        raise pending
                    replies.append(await self._finish_put(conn, chunk, pending))
                except ProtocolError as exc:
                    self.metrics.errors.labels(exc.code.value).inc()
                    replies.append(proto.error_ack(exc, proto.echo_ids(chunk)))
                except Exception:
                    log.exception("unexpected error while storing a chunk of a batch")
                    self.metrics.errors.labels(ErrorCode.INTERNAL.value).inc()
                    replies.append(proto.error_ack(ProtocolError(ErrorCode.INTERNAL, "internal error; retry later"),
                                                   proto.echo_ids(chunk)))
            return {"ok": True, "replies": replies}

        reply = await self.guarded(sid, data, work)
        if ACK_REQUESTED.get():
            return reply
        for each in reply.get("replies") or [reply]:
            await self.sio.emit(proto.CHUNK_ACK if each.get("ok") else proto.CHUNK_ERROR, each, to=sid)
        return None

    def _begin_put(self, conn: Connection, data: Any) -> asyncio.Future:
        """Admit one chunk and hand it to the chunk writer (raises ProtocolError when refused);
        the future resolves to the writer's Job.  The chunk's share of the budgets is given back
        when the writer settles it, whatever becomes of the handler waiting for it."""
        size = _audio_size(data)
        self._admit(conn, size)
        conn.in_flight += 1
        conn.in_flight_bytes += size
        self.in_flight_bytes += size

        def release(_: asyncio.Future) -> None:
            conn.in_flight -= 1
            conn.in_flight_bytes -= size
            self.in_flight_bytes -= size

        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(release)
        if self.config.unsafe_ack_before_store:
            future.set_result(None)
            return future
        # Validation (with the SHA-256 of the audio) runs on the writer thread, so the event loop only moves bytes.
        self.store.submit(Job(conn.principal.name, partial(proto.parse_audio_chunk, data, self.config.max_chunk_bytes),
                              partial(self.settler.settle, future), size=size))
        return future

    async def _finish_put(self, conn: Connection, data: Any, future: asyncio.Future) -> dict:
        """Wait for one admitted chunk's outcome and answer it (raises ProtocolError when refused)."""
        if self.config.unsafe_ack_before_store:
            return self._ack_before_store(conn, proto.parse_audio_chunk(data, self.config.max_chunk_bytes))
        job = await future
        if job.error is not None:
            raise job.error
        chunk, result = job.chunk, job.result
        if chunk.file is not None and not result.file_recorded:  # a duplicate: recorded again, harmlessly
            await self._record_file_range(conn.principal.name, chunk)
        self.metrics.put_seconds.observe(time.perf_counter() - job.submitted)
        if result.duplicate:
            self.metrics.duplicates.inc()
        else:
            self.metrics.stored.inc()
            self.metrics.stored_bytes.inc(chunk.size)
            if self.has_followers(conn.principal.name, chunk.session_id):
                await self.sio.emit(
                    proto.CHUNK_STORED,
                    {"sessionId": chunk.session_id, "sequence": chunk.sequence, "size": chunk.size,
                     "sha256": chunk.sha256, "durationMs": chunk.duration_ms},
                    room=room_of(conn.principal.name, chunk.session_id),
                )
        return proto.ok_ack(chunk.session_id, chunk.sequence, result.chunk_id, result.duplicate, chunk.timestamp)

    def _admit(self, conn: Connection, size: int) -> None:
        """Refuse (transiently) a chunk that would exceed the connection's or the
        server's budget of chunks and bytes waiting to be stored.  A chunk is
        always admitted when nothing else is in flight, whatever its size."""
        if conn.in_flight >= self.config.max_in_flight or (
                conn.in_flight_bytes and conn.in_flight_bytes + size > self.config.max_connection_bytes):
            raise ProtocolError(ErrorCode.TOO_MANY_IN_FLIGHT, "too many chunks in flight on this connection; retry")
        if self.in_flight_bytes and self.in_flight_bytes + size > self.config.max_in_flight_bytes:
            self.refusals(logging.WARNING, "busy", "server busy: %d bytes in flight (the limit is %d)",
                          self.in_flight_bytes, self.config.max_in_flight_bytes)
            raise ProtocolError(ErrorCode.SERVER_BUSY, "the server is storing too much at once; retry later")

    async def _record_file_range(self, owner: str, chunk: proto.AudioChunk) -> None:
        """Note a watched file's byte range in the manifest before the ack (idempotent: a retried
        chunk, a duplicate, records it again harmlessly)."""
        try:
            await self.run(self.store.manifest.record, owner, chunk)
        except Exception as exc:  # a database hiccup: the client keeps the chunk and retries
            log.error("manifest write failed for %s/%s: %s", chunk.session_id, chunk.sequence, exc)
            raise ProtocolError(ErrorCode.STORAGE_UNAVAILABLE, "the server could not record the file range; retry later")

    def _ack_before_store(self, conn: Connection, chunk) -> dict:
        """The deliberately broken mode: ack now, store a second later (see ServerConfig)."""
        async def later() -> None:
            await asyncio.sleep(1.0)
            try:
                await self.run(self.store.put_chunk, conn.principal.name, chunk)
            except ProtocolError:
                pass

        task = asyncio.create_task(later())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return proto.ok_ack(chunk.session_id, chunk.sequence, "unsafe", False, chunk.timestamp)

    async def on_session_state(self, sid: str, data: Any = None) -> dict | None:
        async def work(conn: Connection) -> dict:
            session_id = proto.parse_session_ref(data)
            seqs = data.get("seqs") or []
            if not isinstance(seqs, list) or len(seqs) > MAX_STATE_SEQS:
                raise ProtocolError(ErrorCode.INVALID_PAYLOAD, f"seqs must be a list of at most {MAX_STATE_SEQS}")
            seqs = [proto.validate_seq(s, "seqs[]") for s in seqs]
            report = await self.run(self.store.missing, conn.principal.name, session_id)
            held = await self.run(self.store.held_checksums, conn.principal.name, session_id, seqs) if seqs else {}
            return {"ok": True, "sessionId": session_id, **report.to_json(),
                    "held": [[seq, sha] for seq, sha in sorted(held.items())]}

        reply = await self.guarded(sid, data, work)
        return await self.reply(sid, reply, proto.SESSION_STATE, proto.CHUNK_ERROR)

    async def on_session_finish(self, sid: str, data: Any = None) -> dict | None:
        async def work(conn: Connection) -> dict:
            finish = proto.parse_session_finish(data)
            report = await self.run(self.store.finish_session, conn.principal.name, finish.session_id, finish.last_seq)
            return {"ok": True, "sessionId": finish.session_id, "lastSeq": finish.last_seq, **report.to_json()}

        reply = await self.guarded(sid, data, work)
        return await self.reply(sid, reply, proto.SESSION_FINISH, proto.CHUNK_ERROR)

    async def on_session_follow(self, sid: str, data: Any = None) -> dict | None:
        async def work(conn: Connection) -> dict:
            session_id = proto.parse_session_ref(data)
            report = await self.run(self.store.missing, conn.principal.name, session_id)
            await self.sio.enter_room(sid, room_of(conn.principal.name, session_id))
            return {"ok": True, "sessionId": session_id, **report.to_json()}

        reply = await self.guarded(sid, data, work)
        return await self.reply(sid, reply, None, proto.CHUNK_ERROR)


def _audio_size(data: Any) -> int:
    audio = data.get("audio") if isinstance(data, dict) else None
    return len(audio) if isinstance(audio, (bytes, bytearray)) else 0
