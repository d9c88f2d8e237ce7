"""A TCP fault proxy for loopback: cuts, latency and stalled (half-dead) links.

It sits between a client and a server and forwards bytes both ways.  Faults:

* ``cut_all()`` closes every open connection at once (a Wi-Fi drop);
* ``cut_every`` (seconds, mean of an exponential schedule) cuts on its own;
* ``latency`` delays every forwarded block (one way, in seconds);
* ``stall_all()`` stops forwarding on open connections without closing them,
  a link that only an ack timeout or a heartbeat can detect.

It runs its own event loop in a daemon thread so that synchronous tests and
the chaos command can drive it.  Only loopback addresses are accepted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import threading
import time
from dataclasses import dataclass


@dataclass
class ProxyStats:
    connections: int = 0
    cuts: int = 0
    stalls: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    refused: int = 0


def _require_loopback(host: str) -> None:
    if host == "localhost":
        return
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the fault proxy only talks to loopback addresses, not {host}")


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1",
                 latency: float = 0.0, cut_every: float | None = None, seed: int | None = None):
        _require_loopback(target_host)
        _require_loopback(listen_host)
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.latency = latency
        self.cut_every = cut_every
        self.rng = random.Random(seed)
        self.stats = ProxyStats()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._stalled: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None
        self._cutter: asyncio.Task | None = None
        self._refuse_until = 0.0

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.cut_every:
            self._cutter = asyncio.create_task(self._cut_schedule())

    def retarget(self, port: int) -> None:
        """Send new connections to another port (a restarted server)."""
        self.target = (self.target[0], port)

    def _run(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def cut_all(self) -> int:
        """Close every open connection now; return how many were cut."""
        return self._run(self._cut_all())

    def stall_all(self) -> int:
        """Stop forwarding on every open connection, leaving it open."""
        return self._run(self._stall_all())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _stop(self) -> None:
        if self._cutter:
            self._cutter.cancel()
        if self._server:
            self._server.close()
        await self._cut_all(count=False)
        # The loop is the proxy's own: end its link tasks instead of leaving them pending.
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _cut_all(self, count: bool = True) -> int:
        links = list(self._links)
        for a, b in links:
            for writer in (a, b):
                writer.transport.abort()
        self._links.clear()
        self._stalled.clear()
        if count and links:
            self.stats.cuts += 1
        return len(links)

    async def _stall_all(self) -> int:
        for a, b in self._links:
            self._stalled.update((a, b))
        if self._links:
            self.stats.stalls += 1
        return len(self._links)

    async def _cut_schedule(self) -> None:
        while True:
            await asyncio.sleep(self.rng.expovariate(1.0 / self.cut_every))
            await self._cut_all()

    def refuse_for(self, seconds: float) -> None:
        """Refuse new connections for ``seconds`` (a link that stays down a while)."""
        self._refuse_until = time.monotonic() + seconds

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One proxied connection.  It never ends cancelled: ``stop()`` cancels open links,
        and on Python < 3.11.8 / 3.12.2 the stream server's done-callback calls
        ``task.exception()`` on a cancelled task and logs an "Exception in callback ...
        CancelledError" traceback (CPython gh-113538)."""
        try:
            await self._link(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self._refuse_until:
            self.stats.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.stats.connections += 1
        link = (writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(self._pipe(reader, up_writer, "up"), self._pipe(up_reader, writer, "down"),
                                 return_exceptions=True)
        finally:
            self._links.discard(link)
            for w in link:
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                writer.transport.abort()
                return
            if self.latency:
                await asyncio.sleep(self.latency)
            while writer in self._stalled:
                await asyncio.sleep(0.1)
            if writer.transport.is_closing():
                return
            writer.write(data)
            if direction == "up":
                self.stats.bytes_up += len(data)
            else:
                self.stats.bytes_down += len(data)
            await writer.drain()
