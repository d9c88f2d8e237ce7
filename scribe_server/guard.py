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
  write timeout;
* a WebSocket may receive at most ``preauth_bytes`` (16 KiB) until its
  Socket.IO connect has authenticated (``authenticated``): more, and it is
  aborted before aiohttp buffers the rest.  aiohttp reads a whole WebSocket
  message (up to Engine.IO's limit, 17 MiB) before anyone sees it, and its
  limit cannot be changed per connection, so without this a client with no
  token could make the server hold 17 MiB per socket for the handshake
  deadline; with it, at most 16 KiB (plus one read) per socket.  The check is
  one attribute test per TCP read; an authenticated connection does none.

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
        self.preauth: int | None = None  # bytes a WebSocket may still receive before it authenticates

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
        if self.refused:
            return
        if self.preauth is not None:
            self.preauth -= len(data)
            if self.preauth < 0:  # aborted: nothing more reaches aiohttp
                if self.preauth + len(data) >= 0:
                    self.guard.too_much_before_auth(self)
                return
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


#: Bytes a WebSocket may receive before its Socket.IO connect authenticated (a connect with its token is ~100).
PREAUTH_BYTES = 16 * 1024


class SocketGuard:
    def __init__(self, max_sockets: int, idle_timeout: float, preauth_bytes: int = PREAUTH_BYTES):
        self.max_sockets, self.idle_timeout, self.preauth_bytes = max_sockets, idle_timeout, preauth_bytes
        self.open: dict[asyncio.BaseTransport, _Guarded] = {}
        self.refused = 0  # sockets refused at the cap, since start
        self.timed_out = 0  # connections closed for not sending a request in time
        self.preauth_aborted = 0  # WebSockets closed for sending too much before authenticating
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

    def authenticated(self, request: web.Request | None) -> None:
        """The WebSocket of ``request`` has authenticated: it may receive any amount from now on."""
        conn = self.open.get(request.transport) if request is not None and request.transport is not None else None
        if conn is not None:
            conn.preauth = None

    def too_much_before_auth(self, conn: _Guarded) -> None:
        self.preauth_aborted += 1
        self.refusals(logging.WARNING, "preauth", "closed a WebSocket that sent more than %d bytes before "
                      "authenticating", self.preauth_bytes)
        if conn.transport is not None:
            conn.transport.abort()

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        """Marks the connection busy while its request is handled, and a WebSocket as not yet authenticated."""
        conn = self.open.get(request.transport) if request.transport is not None else None
        if conn is None:
            return await handler(request)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            conn.preauth = self.preauth_bytes
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
