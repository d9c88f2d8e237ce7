"""A chaos run: upload a session through faults, then verify nothing was lost.

The run spools N chunks of deterministic content (from the seed), lets an
uploader process (``scribe_cli.chaos.worker``) send them through the fault
proxy, and meanwhile injects faults: connection cuts (mean ``cut_every``),
stalled links, latency, SIGKILLs of the server (restarted on the same port
and data) and of the uploader (restarted on the same spool).  Kills happen at
progress points drawn from the seed, so a run is reproducible.  Afterwards
it re-sends a fraction of acknowledged chunks, and checks the invariants:
every chunk stored, byte for byte, exactly once; the spool empty; no
temporary files left on the server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse


import scribe_protocol as proto
from scribe_cli import sio as sio_clients
from scribe_cli.api import Api
from scribe_cli.chaos.proxy import FaultProxy
from scribe_cli.embedded import EmbeddedServer
from scribe_cli.errors import ConfigError, Interrupted, ScribeError
from scribe_cli.spool import Spool
from scribe_cli.stopping import ABORT, REQUEST, StopRequest
from scribe_cli.upload import close_http
from scribe_cli.sio import socketio

Listener = Callable[[str, dict], None]


@dataclass
class ChaosConfig:
    chunks: int = 300
    chunk_bytes: int = 16384
    seconds: float = 0.0  # spread spooling over this long (0: all before the upload starts)
    cut_every: float | None = 1.0
    latency_ms: float = 0.0
    server_kills: int = 1
    client_kills: int = 1
    duplicates: float = 0.05
    seed: int = 1
    server: str | None = None
    token: str | None = None
    timeout: float = 600.0
    server_env: dict = field(default_factory=dict)


@dataclass
class ChaosReport:
    session: str
    seed: int
    chunks: int
    bytes: int
    sent: int = 0
    resends: int = 0
    cuts: int = 0
    stalls: int = 0
    server_kills: int = 0
    client_kills: int = 0
    duplicates_sent: int = 0
    duplicates_acked: int = 0
    stored: int = 0
    lost: list[int] = field(default_factory=list)
    stored_twice: int = 0
    corrupted: list[int] = field(default_factory=list)
    spool_left: int = 0
    temp_files: int = 0
    complete: bool = False
    elapsed: float = 0.0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def throughput(self) -> float:
        return self.bytes / self.elapsed if self.elapsed else 0.0

    def to_json(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items()}, "lostCount": len(self.lost),
                "corruptedCount": len(self.corrupted), "throughputBytesPerSecond": round(self.throughput),
                "ok": self.ok}


def content(seed: int, seq: int, size: int) -> bytes:
    """The deterministic bytes of chunk ``seq`` of a run with ``seed``."""
    return random.Random(f"{seed}:{seq}").randbytes(size)


def kill_schedule(cfg: ChaosConfig, rng: random.Random) -> tuple[list[float], list[float]]:
    """Progress fractions (0.1-0.9 of the chunks stored) at which the server and the uploader are killed."""
    server = sorted(rng.uniform(0.1, 0.9) for _ in range(cfg.server_kills))
    client = sorted(rng.uniform(0.1, 0.9) for _ in range(cfg.client_kills))
    return server, client


def run(cfg: ChaosConfig, listener: Listener, stop: StopRequest | None = None) -> ChaosReport:
    """Run and verify; a stop request ends the run at once (worker, proxy and server stopped,
    temporary files removed) with Interrupted."""
    if cfg.server and cfg.server_kills:
        raise ConfigError("--server-kills needs the run's own server", "drop --server, or set --server-kills 0")
    if cfg.chunks < 1 or cfg.chunk_bytes < 1:
        raise ConfigError("--chunks and --chunk-bytes must be positive")
    work = Path(tempfile.mkdtemp(prefix="scribe-chaos-"))
    try:
        if stop is None:
            return _Run(cfg, work, listener).execute()
        chaos = _Run(cfg, work, listener, stop)
        with stop.on(REQUEST, chaos.stopped.set), stop.on(ABORT, chaos.stopped.set):  # the cleanup is bounded
            return chaos.execute()
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _Run:
    def __init__(self, cfg: ChaosConfig, work: Path, listener: Listener, stop: StopRequest | None = None):
        self.cfg, self.work, self.emit = cfg, work, listener
        self.rng = random.Random(cfg.seed)
        self.session = f"chaos-{cfg.seed}-{secrets.token_hex(3)}"
        self.home = work / "client"
        self.home.mkdir()
        self.report = ChaosReport(self.session, cfg.seed, cfg.chunks, cfg.chunks * cfg.chunk_bytes)
        self.server: EmbeddedServer | None = None
        self.server_url, self.token = cfg.server, cfg.token
        self.worker: subprocess.Popen | None = None
        self.produced = 0
        self.stopped = threading.Event()

    # the run ----------------------------------------------------------------------
    def execute(self) -> ChaosReport:
        started = time.monotonic()
        if self.cfg.server is None:
            (self.work / "server").mkdir()
            self.server = EmbeddedServer(self.work / "server", env=self.cfg.server_env).start()
            self.server_url, self.token = self.server.url, self.server.token
        elif not self.token:
            raise ConfigError("a run against --server needs a token", "pass --token or set SCRIBE_TOKEN")
        target = urlparse(self.server_url)
        proxy = FaultProxy(target.hostname, target.port, latency=self.cfg.latency_ms / 1000,
                           cut_every=self.cfg.cut_every, seed=self.cfg.seed).start()
        self.emit("start", {"session": self.session, "server": self.server_url, "proxy": proxy.url,
                            "chunks": self.cfg.chunks, "chunkBytes": self.cfg.chunk_bytes, "seed": self.cfg.seed})
        producer = threading.Thread(target=self._produce, daemon=True)
        try:
            producer.start()
            self._upload_through_faults(proxy)
            producer.join()
            self._check_stop()
            self._send_duplicates(proxy)
            self.report.cuts, self.report.stalls = proxy.stats.cuts, proxy.stats.stalls
            proxy.stop()
            self._check_stop()
            self._verify()
        finally:
            self.stopped.set()  # ends the producer
            if self.worker is not None and self.worker.poll() is None:
                self.worker.kill()
                self.worker.wait(10)
            proxy.stop()
            producer.join(10)
            if self.server:
                self.server.stop()
        self.report.elapsed = time.monotonic() - started
        return self.report

    def _check_stop(self) -> None:
        if self.stopped.is_set():
            raise Interrupted("the chaos run was stopped before it could verify anything", "run it again")

    def _produce(self) -> None:
        pause = self.cfg.seconds / self.cfg.chunks if self.cfg.seconds else 0.0
        with Spool(self.home / "spool") as spool:
            for seq in range(self.cfg.chunks):
                if self.stopped.is_set():
                    return
                spool.add(self.session, seq, content(self.cfg.seed, seq, self.cfg.chunk_bytes), "audio/wav",
                          duration_ms=1000)
                self.produced = seq + 1
                if pause:
                    time.sleep(pause)
            spool.set_final_seq(self.session, self.cfg.chunks - 1)
        (self.home / "produced").touch()

    def _start_worker(self, proxy: FaultProxy) -> None:
        self.worker = subprocess.Popen([sys.executable, "-m", "scribe_cli.chaos.worker", str(self.home), proxy.url,
                                        self.token, self.session, "3"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       process_group=0)  # a terminal's Ctrl-C reaches the run, which ends it

    def _upload_through_faults(self, proxy: FaultProxy) -> None:
        server_points, client_points = kill_schedule(self.cfg, self.rng)
        stall_every = 4 * self.cfg.cut_every if self.cfg.cut_every else None
        next_stall = time.monotonic() + self.rng.expovariate(1 / stall_every) if stall_every else None
        deadline = time.monotonic() + self.cfg.timeout
        self._start_worker(proxy)
        with Spool(self.home / "spool") as spool:
            while time.monotonic() < deadline:
                if self.stopped.wait(0.05):
                    break
                produced = (self.home / "produced").exists()
                done_fraction = (self.produced - spool.count(self.session)) / self.cfg.chunks
                if server_points and done_fraction >= server_points[0]:
                    server_points.pop(0)
                    self._kill_server()
                if client_points and done_fraction >= client_points[0]:
                    client_points.pop(0)
                    self.worker.kill()
                    self.worker.wait(10)
                    self.report.client_kills += 1
                    self.emit("client-killed", {"at": round(done_fraction, 3)})
                    self._start_worker(proxy)
                if next_stall and time.monotonic() >= next_stall:
                    if proxy.stall_all():
                        self.emit("stalled", {})
                    next_stall = time.monotonic() + self.rng.expovariate(1 / stall_every)
                if self.worker.poll() is not None:
                    if self.worker.returncode == 0 and produced and spool.count(self.session) == 0:
                        break
                    self._start_worker(proxy)  # a crashed uploader is simply started again
            else:
                self.report.violations.append(f"the upload did not finish within {self.cfg.timeout:.0f} s")
                self.worker.kill()
        self._collect_worker_stats()

    def _kill_server(self) -> None:
        self.server.kill()
        self.report.server_kills += 1
        self.emit("server-killed", {"n": self.report.server_kills})
        time.sleep(self.rng.uniform(0.2, 1.0))
        self.server.start()
        self.emit("server-restarted", {"n": self.report.server_kills})

    def _collect_worker_stats(self) -> None:
        for path in self.home.glob("worker-*.json"):
            stats = json.loads(path.read_text())
            self.report.sent += stats["sent"]
            self.report.duplicates_acked += stats["duplicates"]
        self.report.resends = max(0, self.report.sent - self.cfg.chunks)

    # duplicates and verification --------------------------------------------------
    def _send_duplicates(self, proxy: FaultProxy) -> None:
        count = round(self.cfg.duplicates * self.cfg.chunks)
        if not count:
            return
        seqs = sorted(self.rng.sample(range(self.cfg.chunks), count))

        async def send() -> None:
            remaining = list(seqs)
            for _ in range(50):
                if not remaining or self.stopped.is_set():
                    return
                sio = sio_clients.AsyncClient(reconnection=False)
                try:
                    await sio.connect(proxy.url, auth={"token": self.token}, transports=["websocket"],
                                      wait_timeout=5)
                    while remaining:
                        seq = remaining[0]
                        data = content(self.cfg.seed, seq, self.cfg.chunk_bytes)
                        reply = await sio.call(proto.AUDIO_CHUNK, {
                            "sessionId": self.session, "sequence": seq, "audio": data, "mimeType": "audio/wav",
                            "checksum": hashlib.sha256(data).hexdigest()}, timeout=5)
                        self.report.duplicates_sent += 1
                        if reply.get("ok") and reply.get("duplicate"):
                            self.report.duplicates_acked += 1
                        elif reply.get("ok"):
                            self.report.violations.append(f"a re-sent copy of seq {seq} was stored as new")
                        remaining.pop(0)
                except (socketio.exceptions.SocketIOError, OSError, asyncio.TimeoutError):
                    await asyncio.sleep(0.2)
                finally:
                    if sio.connected:
                        await sio.disconnect()
                    await close_http(sio)

        asyncio.run(send())
        self.emit("duplicates", {"sent": self.report.duplicates_sent})

    def _verify(self) -> None:
        r = self.report
        api = Api(self.server_url, self.token, timeout=60)
        try:
            detail = api.session(self.session)
        except ScribeError as exc:
            r.violations.append(f"cannot read the session back: {exc.message}")
            return
        held = {c["sequence"]: c["sha256"] for c in detail["chunks"]}
        r.stored = detail["totalChunks"]
        r.complete = bool(detail["complete"])
        r.lost = [seq for seq in range(self.cfg.chunks) if seq not in held]
        for seq, checksum in held.items():
            expected = content(self.cfg.seed, seq, self.cfg.chunk_bytes)
            if checksum != hashlib.sha256(expected).hexdigest() or api.chunk(self.session, seq) != expected:
                r.corrupted.append(seq)
        r.stored_twice = r.stored - len(held)
        if self.server:
            # audio/@<owner>/<session>/...: the chaos server has one token, so one owner
            files = [p for p in (self.server.data_dir / "audio").glob(f"@*/{self.session}/*") if not p.name.startswith(".")]
            r.stored_twice += max(0, len(files) - len(held))
            r.temp_files = len(list((self.server.data_dir / "audio").glob("*/*/.*.tmp")))
        with Spool(self.home / "spool") as spool:
            r.spool_left = spool.count(self.session) + len(spool.quarantined(self.session))
        for name, bad in (("lost", len(r.lost)), ("stored twice", r.stored_twice), ("corrupted", len(r.corrupted)),
                          ("left in the spool", r.spool_left), ("temporary files on the server", r.temp_files)):
            if bad:
                r.violations.append(f"{bad} chunk(s) {name}" if "files" not in name else f"{bad} {name}")
        if not r.complete and not r.lost:
            r.violations.append("the server does not report the session complete")
