"""Every TCP connection, counted and timed, before aiohttp sees it.

A connection that has not authenticated costs the server a file descriptor
and some memory, so it is the cheapest attack there is (slowloris headers,
idle sockets, Engine.IO sockets that never connect).  ``SocketGuard`` wraps
the listening socket's protocol factory:

* it counts **every** open socket; over ``max_sockets`` a new one is answered
  ``503 {"error": {"code": "server_busy"}}`` and closed at once, so the
  process keeps file descriptors for its database and audio files;
* a connection must send complete request headers within ``idle_timeout``
  seconds of opening, and again within ``idle_timeout`` after each response
  (keep-alive); otherwise it is closed.  While a request is being handled the
  connection is not timed here: a WebSocket is governed by the handshake
  deadline (``sio_adapter``) and Engine.IO's ping timeout, an export by its
  write timeout.

Only public asyncio and aiohttp API: a protocol proxy and a middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import socket
from typing import Any, Callable

from aiohttp import web

from scribe_server.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

#: File descriptors kept for everything that is not a client socket: database
#: connections (SQLite: up to 18 x 2 files; PostgreSQL: up to 30 sockets), the
#: chunk writer's temp files and directory fsyncs (8 + 8), Redis, logs, the event
#: loop.  Measured: 12 when idle, 16 under a 64-chunk burst.
RESERVED_FDS = 64

_BUSY_BODY = json.dumps({"ok": False, "error": {"code": "server_busy",
                                                "message": "the server is at its socket limit; retry later"}}).encode()
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 b"Retry-After: 1\r\nContent-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


def default_max_sockets(configured: int | None) -> int:
    """``configured``, else what RLIMIT_NOFILE leaves after ``RESERVED_FDS``
    (at least 16): 192 sockets at nofile=256, 65,472 at 65,536."""
    if configured:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 65_536
    return max(16, soft - RESERVED_FDS)


class _Guarded(asyncio.Protocol):
    """Forwards a connection's events to aiohttp's protocol, unless refused."""

    def __init__(self, guard: "SocketGuard", inner: asyncio.Protocol):
        self.guard, self.inner = guard, inner
        self.transport: asyncio.Transport | None = None
        self.refused = False
        self.busy = 0  # requests being handled on this connection
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.guard.open) >= self.guard.max_sockets:
            self.refused = True
            self.guard.refused += 1
            transport.write(BUSY_RESPONSE)  # type: ignore[attr-defined]
            transport.close()
            return
        self.idle_since = self.guard.loop.time()
        self.guard.open[transport] = self
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.refused:
            self.inner.data_received(data)

    def eof_received(self) -> Any:
        return None if self.refused else self.inner.eof_received()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.refused:
            self.guard.open.pop(self.transport, None)
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if not self.refused:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if not self.refused:
            self.inner.resume_writing()


class SocketGuard:
    def __init__(self, max_sockets: int, idle_timeout: float):
        self.max_sockets, self.idle_timeout = max_sockets, idle_timeout
        self.open: dict[asyncio.BaseTransport, _Guarded] = {}
        self.refused = 0  # sockets refused at the cap, since start
        self.timed_out = 0  # connections closed for not sending a request in time
        self.loop = asyncio.get_event_loop()
        self.refusals = RateLimitedLog(log)

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(self, inner())

    async def accept(self, listener: socket.socket, inner: Callable[[], asyncio.Protocol]) -> None:
        """Accept connections one at a time, forever.  asyncio's own server accepts
        up to its backlog per wake-up and closes refused sockets only a few loop
        turns later, which runs a small RLIMIT_NOFILE out; here a socket over the
        cap is answered and closed before the next one is accepted."""
        listener.setblocking(False)
        factory = self.factory(inner)
        while True:
            try:
                conn, _ = await self.loop.sock_accept(listener)
            except OSError as exc:  # EMFILE/ENFILE/ENOBUFS: wait for descriptors to come back
                self.refusals(logging.ERROR, "accept", "cannot accept a connection: %s", exc.strerror or exc)
                await asyncio.sleep(0.1)
                continue
            if len(self.open) >= self.max_sockets:
                self.refused += 1
                with contextlib.suppress(OSError):
                    conn.setblocking(False)
                    conn.send(BUSY_RESPONSE)
                conn.close()
                continue
            try:
                await self.loop.connect_accepted_socket(factory, conn)
            except OSError:
                conn.close()

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        """Marks the connection busy while its request is handled."""
        conn = self.open.get(request.transport) if request.transport is not None else None
        if conn is None:
            return await handler(request)
        conn.busy += 1
        try:
            return await handler(request)
        finally:
            conn.busy -= 1
            conn.idle_since = self.loop.time()

    async def watch(self, every: float = 1.0) -> None:
        """Close connections idle (no complete request) for longer than ``idle_timeout``."""
        while True:
            await asyncio.sleep(every)
            now = self.loop.time()
            for transport, conn in list(self.open.items()):
                if not conn.busy and now - conn.idle_since > self.idle_timeout:
                    self.timed_out += 1
                    transport.abort()
