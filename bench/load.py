"""Load benchmark: many real-time recorders against one node, and two nodes behind nginx.

Each simulated recorder holds one Socket.IO connection and sends a 1-second chunk
(32,000 bytes: 16 kHz, 16-bit mono) every second with an ack, for --seconds.  Reported:
p50/p99/max ack latency, chunks acknowledged, and the server processes' CPU (share of
one core) and resident memory per connection.

* one node: scribe-server on SQLite (the embedded default);
* two nodes: two scribe-server processes on a real PostgreSQL and Redis behind a real
  nginx (all Debian packages, on loopback; see tests/infra.py).

Each setup is measured --repeats times against the same server(s); the table shows the
median of each column (errors: the total), and memory per connection from the first run
(later runs reuse the memory the first one grew).

Usage: python bench/load.py [--recorders 200] [--seconds 30] [--repeats 3] [--smoke] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
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

from tests.infra import Nginx, Postgres, Redis  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import check_file_creation  # noqa: E402

CHUNK = 32000
WARMUP = 3.0  # seconds: all recorders connect and create their sessions; reported apart


def proc_stat(pid: int) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return cpu, rss


def start_node(data_dir: Path, *args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "scribe_server", "serve", "--port", "0", "--data-dir",
                             str(data_dir), "--log-level", "warning", "--max-connections", "5000", *args],
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().split()[-1]


def token(data_dir: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "scribe_server", "token", "create", f"load{random.random()}",
                           "--data-dir", str(data_dir), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


async def recorder(url: str, secret: str, index: int, seconds: float, latencies: list, errors: list) -> None:
    sio = socketio.AsyncClient(reconnection=False)
    await asyncio.sleep(index * 1.0 / 200)  # spread the connects and the send phases over a second
    await sio.connect(url, auth={"token": secret}, transports=["websocket"], wait_timeout=30)
    audio = os.urandom(CHUNK)
    session = f"load-{index}-{random.randrange(1 << 30)}"
    started = time.monotonic()
    seq = 0
    try:
        while time.monotonic() - started < seconds:
            sent = time.monotonic()
            reply = await sio.call("audio-chunk", {"sessionId": session, "sequence": seq, "audio": audio[:-1] +
                                                   bytes([seq % 256]), "mimeType": "audio/wav"}, timeout=30)
            latencies.append((sent - started, time.monotonic() - sent))
            if not reply.get("ok"):
                errors.append(reply["error"]["code"])
            seq += 1
            await asyncio.sleep(max(0.0, started + seq - time.monotonic()))
    finally:
        await sio.disconnect()


async def drive(url: str, secret: str, count: int, seconds: float) -> tuple[list[float], list]:
    latencies: list[float] = []
    errors: list = []
    await asyncio.gather(*(recorder(url, secret, i, seconds, latencies, errors) for i in range(count)))
    return latencies, errors


def measure(label: str, url: str, secret: str, pids: list[int], count: int, seconds: float) -> dict:
    idle = [proc_stat(pid) for pid in pids]
    started = time.monotonic()
    latencies, errors = asyncio.run(drive(url, secret, count, seconds))
    wall = time.monotonic() - started
    busy = [proc_stat(pid) for pid in pids]
    everything = sorted(latency for _, latency in latencies)
    steady = sorted(latency for at, latency in latencies if at >= WARMUP) or everything
    cpu = sum(b[0] - i[0] for b, i in zip(busy, idle)) / wall
    rss_growth = sum(b[1] - i[1] for b, i in zip(busy, idle))
    pct = lambda values, q: values[max(0, int(len(values) * q) - 1)] * 1000  # noqa: E731
    return {"setup": label, "recorders": count, "acks": len(everything), "errors": len(errors),
            "p50": pct(steady, 0.5), "p99": pct(steady, 0.99), "max": steady[-1] * 1000,
            "p99_all": pct(everything, 0.99), "cpu": cpu, "rss_per_conn_kib": rss_growth * 1024 / count}


def repeated(repeats: int, *args) -> dict:
    """``measure`` several times; the median of each figure."""
    runs = [measure(*args) for _ in range(repeats)]
    out = dict(runs[0])
    for key in ("acks", "p50", "p99", "max", "p99_all", "cpu"):
        out[key] = statistics.median(run[key] for run in runs)
    out["errors"] = sum(run["errors"] for run in runs)
    out["runs"] = [round(run["p99"]) for run in runs]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recorders", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one-node-only", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the servers store (default: a new temporary directory)")
    args = parser.parse_args()
    if args.smoke:
        args.recorders, args.seconds, args.repeats = 10, 3.0, 1
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="scribe-load-", dir=args.work_dir))
    results, cleanup = [], []
    try:
        check_file_creation(work)
        one = work / "one"
        one.mkdir()
        secret = token(one)
        proc, url = start_node(one)
        cleanup.append(proc)
        time.sleep(0.5)
        results.append(repeated(args.repeats, "1 node, SQLite", url, secret, [proc.pid], args.recorders, args.seconds))
        if not args.one_node_only:
            pg = Postgres(work / "pg").start()
            cleanup.append(pg)
            redis = Redis(work).start()
            cleanup.append(redis)
            db_url = pg.create_database("scribe_load")
            shared = work / "shared"
            shared.mkdir()
            secret = token(shared, "--database-url", db_url)
            nodes = [start_node(shared, "--database-url", db_url, "--redis-url", redis.url) for _ in range(2)]
            cleanup.extend(p for p, _ in nodes)
            nginx = Nginx(work, [int(u.rsplit(":", 1)[1]) for _, u in nodes]).start()
            cleanup.append(nginx)
            time.sleep(0.5)
            results.append(repeated(args.repeats, "2 nodes, PostgreSQL + Redis, nginx", nginx.url, secret,
                                    [p.pid for p, _ in nodes], args.recorders, args.seconds))
    finally:
        for item in reversed(cleanup):
            item.terminate() if isinstance(item, subprocess.Popen) else item.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"load benchmark: {args.recorders} recorders x one {CHUNK}-byte chunk per second for {args.seconds:.0f} s")
    print(f"ack latency in steady state (after the first {WARMUP:.0f} s); 'p99 all' includes the connect burst;")
    print(f"median of {args.repeats} run(s); 'p99 runs' lists each run's steady p99")
    print(f"{'setup':<38} {'acks':>6} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'p99 all':>8} "
          f"{'server CPU':>11} {'KiB/conn':>9}  p99 runs")
    for r in results:
        print(f"{r['setup']:<38} {int(r['acks']):>6} {r['errors']:>6} {r['p50']:>8.1f} {r['p99']:>8.1f} {r['max']:>8.1f} "
              f"{r['p99_all']:>8.1f} {r['cpu']:>10.0%} {r['rss_per_conn_kib']:>9.0f}  {r['runs']}")


if __name__ == "__main__":
    main()
