"""Drain benchmark: how fast a backlog leaves the spool, beside its ceilings.

For each chunk size, in one run and side by side, median over --repeats:

* scribe     -- N pre-spooled chunks drained by the uploader (the code path of
                ``scribe resume``) into a real scribe-server on loopback;
* transport  -- raw python-socketio emit+ack of the same sizes and window to a
                server that replies without storing (the network/transport ceiling);
* storage    -- write + fsync + rename + fsync(dir) of the same sizes in one
                thread (the disk ceiling);
* seed       -- the design note's resume: one chunk at a time with a 100 ms pause,
                against the same scribe-server (measured on a sample, as a rate).

Usage: python bench/drain.py [--sizes 16384,65536,524288] [--chunks 2000] [--repeats 3] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import socketio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scribe_cli.spool import Spool  # noqa: E402
from scribe_cli.upload import Uploader  # noqa: E402

BARE_SERVER = r'''
import asyncio, sys, socketio
from aiohttp import web
sio = socketio.AsyncServer(async_mode="aiohttp", transports=["websocket"], max_http_buffer_size=64 * 2**20)
app = web.Application()
sio.attach(app)
@sio.on("connect")
async def connect(sid, environ, auth=None):
    return True
@sio.on("audio-chunk")
async def chunk(sid, data):
    return {"ok": True, "sessionId": data["sessionId"], "sequence": data["sequence"], "duplicate": False}
async def main():
    runner = web.AppRunner(app); await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0); await site.start()
    print("listening on http://127.0.0.1:%d" % site._server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
'''


def start(cmd: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, **(env or {})})
    line = proc.stdout.readline()
    if not line.startswith("listening on"):
        raise RuntimeError(f"could not start {cmd}: {line!r}")
    return proc, line.split()[-1]


def start_scribe_server(data_dir: Path) -> tuple[subprocess.Popen, str, str]:
    token = subprocess.run([sys.executable, "-m", "scribe_server", "token", "create", "bench", "--data-dir",
                            str(data_dir)], capture_output=True, text=True, check=True).stdout.strip()
    proc, url = start([sys.executable, "-m", "scribe_server", "serve", "--port", "0", "--data-dir", str(data_dir),
                       "--max-chunk-bytes", str(16 * 2**20), "--log-level", "warning"])
    return proc, url, token


def run_scribe(url: str, token: str, home: Path, session: str, size: int, n: int, window: int) -> float:
    """Seconds to drain n pre-spooled chunks with the uploader."""
    spool_dir = home / session
    with Spool(spool_dir) as spool:
        for seq in range(n):
            spool.add(session, seq, os.urandom(size), "audio/wav")
    with Spool(spool_dir) as spool:
        uploader = Uploader(spool, url, token, window=window)
        started = time.perf_counter()
        stats = asyncio.run(uploader.run([session]))
        elapsed = time.perf_counter() - started
        assert stats.acked == n and not spool.chunks(session), "drain incomplete"
    shutil.rmtree(spool_dir)
    return elapsed


def run_transport(url: str, size: int, n: int, window: int) -> float:
    """Seconds for n emit+ack round trips with a window, no storage."""
    async def go() -> float:
        sio = socketio.AsyncClient(reconnection=False)
        await sio.connect(url, transports=["websocket"])
        gate = asyncio.Semaphore(window)
        audio = [os.urandom(size) for _ in range(8)]

        async def one(seq: int) -> None:
            try:
                data = audio[seq % 8]
                await sio.call("audio-chunk", {"sessionId": "t", "sequence": seq, "audio": data, "size": size,
                                               "mimeType": "audio/wav",
                                               "checksum": hashlib.sha256(data).hexdigest()})
            finally:
                gate.release()

        started = time.perf_counter()
        tasks = []
        for seq in range(n):
            await gate.acquire()
            tasks.append(asyncio.create_task(one(seq)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
        await sio.disconnect()
        return elapsed

    return asyncio.run(go())


def run_storage(directory: Path, size: int, n: int) -> float:
    """Seconds for n durable file writes (write, fsync, rename, fsync dir) in one thread."""
    directory.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    started = time.perf_counter()
    for i in range(n):
        tmp, final = directory / f".{i}.tmp", directory / f"{i}.wav"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, final)
        os.fsync(dfd)
    elapsed = time.perf_counter() - started
    os.close(dfd)
    shutil.rmtree(directory)
    return elapsed


def run_seed(url: str, token: str, size: int, sample: int) -> float:
    """Seconds per chunk of the seed's resume (sequential send, then a 100 ms pause)."""
    async def go() -> float:
        sio = socketio.AsyncClient(reconnection=False)
        await sio.connect(url, auth={"token": token}, transports=["websocket"])
        started = time.perf_counter()
        for seq in range(sample):
            await sio.emit("audio-chunk", {"sessionId": f"seed{size}", "sequence": seq, "timestamp": 0,
                                           "size": size, "mimeType": "audio/webm", "audio": os.urandom(size)})
            await asyncio.sleep(0.1)
        elapsed = time.perf_counter() - started
        await sio.disconnect()
        return elapsed / sample

    return asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16384,65536,524288")
    parser.add_argument("--chunks", type=int, default=2000, help="chunks per run (fewer for 512 KiB: a quarter)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="tiny run that only checks the benchmark works")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.chunks, args.repeats = "16384", 50, 1
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="scribe-bench-"))
    server, url, token = start_scribe_server(work / "server")
    bare, bare_url = start([sys.executable, "-c", BARE_SERVER])
    rows = []
    try:
        for size in sizes:
            n = args.chunks if size <= 65536 else max(10, args.chunks // 4)
            scribe, transport, storage = [], [], []
            for r in range(args.repeats):
                transport.append(run_transport(bare_url, size, n, args.window))
                storage.append(run_storage(work / f"storage-{size}-{r}", size, n))
                scribe.append(run_scribe(url, token, work / "client", f"s{size}r{r}", size, n, args.window))
            seed = run_seed(url, token, size, 5 if args.smoke else 20)
            rows.append((size, n, statistics.median(scribe), statistics.median(transport),
                         statistics.median(storage), seed))
    finally:
        server.terminate()
        bare.terminate()
        shutil.rmtree(work, ignore_errors=True)
    print(f"drain benchmark: window {args.window}, median of {args.repeats} run(s), chunks/s (MiB/s)")
    header = f"{'size':>8} {'chunks':>6} {'scribe':>16} {'transport':>16} {'storage':>16} {'seed':>12} " \
             f"{'vs lower ceiling':>16} {'vs seed':>8}"
    print(header)
    for size, n, scribe, transport, storage, seed in rows:
        rate = lambda seconds: n / seconds  # noqa: E731
        fmt = lambda seconds: f"{rate(seconds):7.0f} ({rate(seconds) * size / 2**20:5.1f})"  # noqa: E731
        lower = min(rate(transport), rate(storage))
        print(f"{size // 1024:>6}Ki {n:>6} {fmt(scribe):>16} {fmt(transport):>16} {fmt(storage):>16} "
              f"{1 / seed:>7.1f}/s    {rate(scribe) / lower:>15.0%} {rate(scribe) * seed:>7.0f}x")


if __name__ == "__main__":
    main()
