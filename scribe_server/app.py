"""Wiring: one process serving Socket.IO (WebSocket) and the HTTP API."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys

import socketio
from aiohttp import web

from scribe_server import http_api, web as web_pages
from scribe_server.config import ServerConfig
from scribe_server.events import EventHandlers
from scribe_server.guard import SocketGuard, default_max_sockets
from scribe_server.metrics import Metrics
from scribe_server.sio_adapter import HardenedServer
from scribe_server.store import ChunkStore, db
from scribe_server.store.tokens import TokenStore

log = logging.getLogger("scribe_server")


def open_store(config: ServerConfig) -> ChunkStore:
    return ChunkStore.open(
        config.data_dir, config.database_url, flush=config.flush, max_sessions_per_owner=config.max_sessions_per_token
    )


def build(config: ServerConfig, guard: SocketGuard | None = None) -> tuple[web.Application, EventHandlers]:
    """The aiohttp application with Socket.IO attached, and its handlers."""
    store = open_store(config)
    for warning in db.durability_warnings(store.engine):
        log.warning("database setting breaks the durability contract: %s", warning)
    removed = store.files.cleanup_temp()
    if removed:
        log.info("removed %d temporary file(s) left by a crashed writer", removed)
    manager = socketio.AsyncRedisManager(config.redis_url) if config.redis_url else None
    sio = HardenedServer(
        async_mode="aiohttp",
        client_manager=manager,
        transports=["websocket"],
        max_http_buffer_size=config.engineio_buffer_bytes,
        ping_interval=config.ping_interval,
        ping_timeout=config.ping_timeout,
        # Any origin may connect: clients authenticate with a token they send
        # explicitly, never with cookies, so a foreign page gains nothing from
        # a visitor's browser (docs/security.md, "CORS").
        cors_allowed_origins="*",
        cors_credentials=False,
        handshake_timeout=config.handshake_timeout,
    )
    middlewares = [guard.middleware] if guard is not None else []
    app = web.Application(client_max_size=config.engineio_buffer_bytes,
                          middlewares=[*middlewares, http_api.json_errors])
    sio.attach(app)
    handlers = EventHandlers(sio, store, TokenStore(store.engine), config, Metrics())
    handlers.guard = guard
    http_api.add_routes(app, handlers)
    web_pages.add_routes(app)

    async def start_background(app: web.Application) -> None:
        app["revocations"] = asyncio.create_task(handlers.watch_revocations())
        app["guard"] = asyncio.create_task(guard.watch()) if guard is not None else None

    async def stop_background(app: web.Application) -> None:
        app["revocations"].cancel()
        if app["guard"] is not None:
            app["guard"].cancel()
        handlers.executor.shutdown(wait=True)
        store.close()

    app.on_startup.append(start_background)
    app.on_cleanup.append(stop_background)
    return app, handlers


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT/SIGTERM; print ``listening on URL`` once ready."""
    guard = SocketGuard(default_max_sockets(config.max_sockets), config.idle_timeout)
    app, _ = build(config, guard)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=config.idle_timeout)
    await runner.setup()
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    sock.listen(1024)
    port = sock.getsockname()[1]
    loop = asyncio.get_running_loop()
    accepting = loop.create_task(guard.accept(sock, runner.server))
    log.info("accepting at most %d sockets at once", guard.max_sockets)
    host = f"[{config.host}]" if family == socket.AF_INET6 else config.host
    print(f"listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        print("shutting down", file=sys.stderr, flush=True)
        accepting.cancel()
        sock.close()
        await runner.cleanup()
