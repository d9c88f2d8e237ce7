"""Peers benchmark: scribe beside a naive HTTP+fsync uploader and tus, on the same backlog.

Every contender moves the same pre-filled backlog (N chunks of one size) from a client
process to a server process on loopback, 16 chunks in flight, timed from the client's
start to its exit 0:

* scribe -- the whole ``scribe resume SESSION --json`` command on a pre-filled spool,
            into a real scribe-server (files, directory entries and rows durable before
            every ack: one syncfs per batch covers the files and the SQLite log; the
            client removes each acknowledged chunk from its durable spool);
* naive  -- a small aiohttp server and client defined here: one POST per chunk, the
            server writes the body to a file and fsyncs it (no directory fsync, no
            database) in a thread pool, the client reads each chunk from its own file;
* tus    -- Node ``@tus/server`` + ``@tus/file-store`` and ``tus-js-client``, one
            upload per chunk (no fsync at all).  Installed by ``npm ci`` from
            ``bench/tus/package-lock.json`` into a scratch directory; skipped with a
            message when node or npm is missing.

Contenders run interleaved (the order rotates each repetition) and each table cell is
the median over --repeats.  CPU per chunk is user+system time: of the client from
``getrusage(RUSAGE_CHILDREN)`` around its run, of the server from ``/proc/PID/stat``
before and after.  Ratios are against the naive baseline of the same run: on a shared
machine quote those, not the absolute rates.

Nothing is deleted until the end: on ext4 without a journal (these machines) creating a
file within minutes of mass deletions in the same block group costs up to 1 ms of
kernel time per file (``recently_deleted`` scans), so deleting one contender's files
between runs would tax whichever contender ran next.

Usage: python bench/peers.py [--sizes 47104,524288] [--chunks 3200] [--repeats 3]
                             [--window 16] [--no-tus] [--smoke] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TUS_DIR = Path(__file__).resolve().parent / "tus"
CLK_TCK = os.sysconf("SC_CLK_TCK")

FSYNC_NOTE = {
    "scribe": "file + dir + row (one syncfs)",
    "naive": "file fsync only",
    "tus": "no fsync",
}


# the naive contender -------------------------------------------------------------
def naive_server(directory: str) -> None:
    """POST /chunks/NAME: write the body to DIRECTORY/NAME and fsync it, then answer 200."""
    from aiohttp import web

    def store(path: str, body: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)

    async def post(request: web.Request) -> web.Response:
        body = await request.read()
        name = request.match_info["name"]
        await asyncio.get_running_loop().run_in_executor(None, store, os.path.join(directory, name), body)
        return web.json_response({"ok": True, "size": len(body)})

    serve_post("/chunks/{name}", post, client_max_size=64 * 2**20)


def serve_post(route: str, handler, client_max_size: int) -> None:
    """Serve ``handler`` for POSTs to ``route`` on a free loopback port until killed; prints
    ``listening on URL`` first (the naive contenders of this benchmark and bench/cards.py)."""
    from aiohttp import web

    async def main() -> None:
        app = web.Application(client_max_size=client_max_size)
        app.router.add_post(route, handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(f"listening on http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def naive_client(url: str, backlog: str, count: int, window: int, prefix: str) -> None:
    """POST each backlog file, ``window`` at once; exit 1 on any failure."""
    import aiohttp

    async def main() -> None:
        queue = list(range(count))
        queue.reverse()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=window)) as http:
            async def worker() -> None:
                while queue:
                    index = queue.pop()
                    with open(os.path.join(backlog, f"{index}.bin"), "rb") as f:
                        body = f.read()
                    async with http.post(f"{url}/chunks/{prefix}-{index}", data=body) as reply:
                        if reply.status != 200 or (await reply.json()).get("size") != len(body):
                            raise SystemExit(f"chunk {index}: HTTP {reply.status}")

            await asyncio.gather(*(worker() for _ in range(window)))

    asyncio.run(main())


# processes and measurement ---------------------------------------------------------
def check_file_creation(work: Path, files: int = 200, slow_us: float = 200.0, slow_mb_s: float = 1500.0) -> float:
    """Time the creation of new files in ``work`` (every contender creates one per chunk) and
    the writing of 512 KiB into new ones; print both and a warning when either is slow.

    On ext4 without a journal, the inode allocator skips inodes freed in the last one to six
    minutes, re-reading the inode table for each: after a mass deletion nearby (a previous
    benchmark's cleanup, a test suite) a file can take ~1 ms to create instead of ~25 us.
    And once the memory is full of page cache, every page written to a new file is first
    reclaimed from it: on these virtual machines writing 512 KiB then takes ~1.2 ms instead
    of ~0.1 ms.  Either slows every contender by a varying amount."""
    probe = work / "creation-probe"
    probe.mkdir()
    times = []
    for index in range(files):
        started = time.perf_counter()
        os.close(os.open(probe / str(index), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        times.append(time.perf_counter() - started)
    median_us = statistics.median(times) * 1e6
    print(f"creating a new file in the work directory: {median_us:.0f} us (median of {files})")
    if median_us > slow_us:
        print(f"warning: creating a file in {work} takes {median_us:.0f} us (median of {files}): every contender "
              f"creates one per chunk, so rates here are low and noisy; compare ratios, or pass --work-dir on a "
              f"filesystem without recent mass deletions (ext4 without a journal skips recently freed inodes)")
    block, writes = os.urandom(512 * 1024), []
    for index in range(16):
        fd = os.open(probe / f"w{index}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            started = time.perf_counter()
            os.write(fd, block)
            writes.append(time.perf_counter() - started)
        finally:
            os.close(fd)
    mb_s = len(block) / statistics.median(writes) / 1e6
    free = _meminfo_mib("MemFree")
    print(f"writing 512 KiB into a new file: {mb_s:,.0f} MB/s (median of 16); free memory {free:,} MiB")
    if mb_s < slow_mb_s:
        print(f"warning: writing into new files runs at {mb_s:,.0f} MB/s: the memory is probably full of page cache "
              f"({free:,} MiB free), so every page written is reclaimed first; every contender pays it, by a varying "
              f"amount. As root, `sync; echo 3 > /proc/sys/vm/drop_caches` empties the page cache")
    return median_us


def _meminfo_mib(field: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return -1


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a running process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def start(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=cwd, env=env)
    line = proc.stdout.readline()
    if not line.startswith("listening on"):
        proc.kill()
        raise RuntimeError(f"could not start {cmd}: {line!r}")
    return proc, line.split()[-1]


@dataclass
class Sample:
    seconds: float
    client_cpu: float
    server_cpu: float


def settle_writes() -> None:
    """Write back what earlier steps left in the page cache (``sync``) before a timed run.

    A contender that does not fsync (tus) leaves its files dirty in memory; so does
    writing the backlog.  scribe's server makes a batch durable with one ``syncfs`` of
    its filesystem (docs/durability.md), which also writes back whatever else is dirty
    there, so without this the scribe run after a tus run paid for flushing tus's files
    (150 MB at 46 KiB, ~90 ms on these machines; 400 MB at 512 KiB).  The naive server's
    per-file fsync and tus are not affected either way: each run starts from the same,
    clean state."""
    os.sync()


def timed(cmd: list[str], server: subprocess.Popen, env: dict | None = None, cwd: Path | None = None) -> Sample:
    """Run a client command to its exit (which must be 0), measuring wall time and both sides' CPU."""
    settle_writes()
    server_before, client_before = cpu_of(server.pid), children_cpu()
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} exited {result.returncode}: {result.stderr[-2000:]}")
    return Sample(seconds, children_cpu() - client_before, cpu_of(server.pid) - server_before)


@dataclass
class Contender:
    name: str
    samples: dict[int, list[Sample]] = field(default_factory=dict)


class Scribe:
    name = "scribe"

    def __init__(self, work: Path, window: int):
        self.work, self.window, self.runs = work, window, 0
        data = work / "scribe-server"
        self.token = subprocess.run([sys.executable, "-m", "scribe_server", "token", "create", "peers", "--data-dir",
                                     str(data)], capture_output=True, text=True, check=True).stdout.strip()
        self.server, self.url = start([sys.executable, "-m", "scribe_server", "serve", "--port", "0", "--data-dir",
                                       str(data), "--max-chunk-bytes", str(16 * 2**20), "--log-level", "warning"])

    def run(self, backlog: Path, count: int) -> Sample:
        sys.path.insert(0, str(ROOT))
        from scribe_cli.spool import Spool

        self.runs += 1
        home = self.work / f"scribe-home-{self.runs}"
        session = f"peers-{self.runs}"
        with Spool(home / "spool") as spool:  # the backlog, spooled before the clock starts
            for index in range(count):
                spool.add(session, index, (backlog / f"{index}.bin").read_bytes(), "audio/wav")
        env = {"SCRIBE_HOME": str(home), "SCRIBE_SERVER": self.url, "SCRIBE_TOKEN": self.token,
               "SCRIBE_WINDOW": str(self.window)}
        return timed([sys.executable, "-m", "scribe_cli", "resume", session, "--json"], self.server, env)

    def close(self) -> None:
        self.server.terminate()
        self.server.wait()


class Naive:
    name = "naive"

    def __init__(self, work: Path, window: int):
        self.work, self.window, self.runs = work, window, 0
        self.store = work / "naive-server"
        self.store.mkdir()
        self.server, self.url = start([sys.executable, __file__, "_naive-server", str(self.store)])

    def run(self, backlog: Path, count: int) -> Sample:
        self.runs += 1
        prefix = f"r{self.runs}"
        sample = timed([sys.executable, __file__, "_naive-client", self.url, str(backlog), str(count),
                        str(self.window), prefix], self.server)
        stored = [path for path in self.store.iterdir() if path.name.startswith(prefix + "-")]
        assert len(stored) == count, f"naive: {len(stored)} of {count} chunks stored"
        return sample

    def close(self) -> None:
        self.server.terminate()
        self.server.wait()


def start_tus(work: Path) -> tuple[Path, Path, subprocess.Popen, str]:
    """``npm ci`` bench/tus into WORK/tus, start its server storing into WORK/tus-store:
    (directory, store, server process, upload endpoint)."""
    directory = work / "tus"
    directory.mkdir()
    for name in ("package.json", "package-lock.json", "server.mjs", "client.mjs"):
        shutil.copy(TUS_DIR / name, directory / name)
    installed = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=directory,
                               capture_output=True, text=True)
    if installed.returncode != 0:
        raise RuntimeError(f"npm ci failed: {installed.stderr[-2000:]}")
    store = work / "tus-store"
    store.mkdir()
    server, url = start(["node", "server.mjs", str(store)], cwd=directory)
    return directory, store, server, url + "/files"


class Tus:
    name = "tus"

    def __init__(self, work: Path, window: int):
        self.work, self.window = work, window
        self.dir, self.store, self.server, self.endpoint = start_tus(work)
        self.seen: set[str] = set()

    def run(self, backlog: Path, count: int) -> Sample:
        sample = timed(["node", "client.mjs", self.endpoint, str(backlog), str(count), str(self.window)], self.server,
                       cwd=self.dir)
        stored = [p for p in self.store.iterdir() if p.suffix != ".json" and p.name not in self.seen]
        assert len(stored) == count, f"tus: {len(stored)} of {count} chunks stored"
        self.seen.update(p.name for p in stored)
        return sample

    def close(self) -> None:
        self.server.terminate()
        self.server.wait()


def tus_missing() -> str | None:
    """Why tus cannot run here, or None."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not found on PATH" if missing else None


# the run -------------------------------------------------------------------------
def write_backlog(directory: Path, size: int, count: int) -> None:
    directory.mkdir(parents=True)
    for index in range(count):
        (directory / f"{index}.bin").write_bytes(os.urandom(size))


def report(sizes: list[int], counts: dict[int, int], contenders: list[Contender], repeats: int, window: int) -> None:
    print(f"peers benchmark: {window} in flight, median of {repeats} run(s), whole client command start to exit 0")
    print(f"{'size':>7} {'chunks':>6} {'contender':<9} {'chunks/s':>9} {'MiB/s':>7} {'client CPU':>11} "
          f"{'server CPU':>11} {'vs naive':>9}  durable before ack")
    for size in sizes:
        count = counts[size]
        rates = {c.name: count / statistics.median(s.seconds for s in c.samples[size]) for c in contenders}
        for c in contenders:
            samples = c.samples[size]
            client = statistics.median(s.client_cpu for s in samples) / count * 1000
            server = statistics.median(s.server_cpu for s in samples) / count * 1000
            ratio = f"{rates[c.name] / rates['naive']:.2f}x" if "naive" in rates else "-"
            print(f"{size // 1024:>5}Ki {count:>6} {c.name:<9} {rates[c.name]:>9.0f} {rates[c.name] * size / 2**20:>7.1f} "
                  f"{client:>8.2f} ms {server:>8.2f} ms {ratio:>9}  {FSYNC_NOTE[c.name]}")
        for c in contenders:
            runs = ", ".join(f"{count / s.seconds:.0f}" for s in c.samples[size])
            print(f"{'':>7} {'':>6} {c.name:<9} runs (chunks/s): {runs}")
    print("CPU: user+system milliseconds per chunk (client: the whole command; server: during the run)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_naive-server":
        return naive_server(sys.argv[2])
    if len(sys.argv) > 1 and sys.argv[1] == "_naive-client":
        url, backlog, count, window, prefix = sys.argv[2:7]
        return naive_client(url, backlog, int(count), int(window), prefix)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="47104,524288", help="chunk sizes in bytes (default 46 KiB and 512 KiB)")
    parser.add_argument("--chunks", type=int, default=3200, help="chunks per run (a quarter for sizes over 64 KiB; 3,200 as in issue 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=16, help="chunks in flight (each contender)")
    parser.add_argument("--no-tus", action="store_true", help="leave tus out")
    parser.add_argument("--smoke", action="store_true", help="tiny run that only checks the benchmark works (no npm)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the servers store and the backlog lives (default: a new temporary directory); "
                             "a directory on a filesystem no other run has just deleted many files from")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.chunks, args.repeats = "47104", 40, 1
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = {size: args.chunks if size <= 65536 else max(10, args.chunks // 4) for size in sizes}
    kinds: list[type] = [Scribe, Naive]
    why_not = "left out by --smoke (it would need npm ci)" if args.smoke else \
        "left out by --no-tus" if args.no_tus else tus_missing()
    if why_not:
        print(f"tus: skipped: {why_not}")
    else:
        kinds.append(Tus)
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="scribe-peers-", dir=args.work_dir))
    running = []
    try:
        check_file_creation(work)
        for kind in kinds:
            running.append(kind(work, args.window))
        results = [Contender(c.name) for c in running]
        for size in sizes:
            backlog = work / f"backlog-{size}"
            write_backlog(backlog, size, counts[size])
            for result in results:
                result.samples[size] = []
            for rep in range(args.repeats):
                order = list(range(len(running)))
                order = order[rep % len(order):] + order[:rep % len(order)]
                for i in order:
                    results[i].samples[size].append(running[i].run(backlog, counts[size]))
    finally:
        for contender in running:
            contender.close()
        shutil.rmtree(work, ignore_errors=True)
    report(sizes, counts, results, args.repeats, args.window)


if __name__ == "__main__":
    main()
