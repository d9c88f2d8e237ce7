"""Cards benchmark: a recorder card through `scribe watch --once` beside whole-file tus and a naive POST.

A card is written the way a Zoom/Tascam recorder fills one (tests/recorder_files.py's
RIFF helpers): FOLDER01/ZOOM0001.WAV ... in two folders, each file a 48 kHz/24-bit
stereo Broadcast WAV with ``bext`` and ``iXML`` ahead of its data (random bytes, so
nothing compresses), ~1 GiB in all by default, with mtimes of the last hour (a card
brought back from the field, not one still being written).  Then, interleaved over --repeats (the
order rotates each repetition), each contender takes every file of the card from disk
into a server process on loopback, timed from the client's start to its exit 0:

* scribe      -- the whole ``scribe watch CARD --once --session S`` command with a fresh
                 spool: probe, read, hash, spool (durable) and upload byte-range chunks into
                 a real scribe-server (file + directory fsync, SQLite synchronous=FULL
                 before every ack), default chunk size unless --chunk-bytes;
* scribe split -- the same as two commands, ``watch --once --offline`` then
                 ``scribe resume S``, each timed (left out by --no-split);
* tus         -- tus-js-client uploading each whole file (read from disk in 16 MiB
                 requests, --parallel files at once) to @tus/server + @tus/file-store,
                 which never fsyncs (npm ci from bench/tus/package-lock.json into a scratch
                 directory; skipped with a message without node/npm);
* naive       -- an aiohttp client streaming each whole file in one POST (--parallel at
                 once) to an aiohttp server that writes it and fsyncs the file.

Every contender's result is checked: tus and naive by the stored files' sizes; scribe by
the manifest of ``GET /api/sessions/S`` (every path, size and sha256 as written) and one
file of each run fetched back through ``GET /api/sessions/S/file`` and hashed (the
server rebuilds it from its chunks and checks its sha256 too).

Nothing is deleted until the end (see bench/peers.py: ext4 without a journal taxes file
creations after mass deletions).

Usage: python bench/cards.py [--mib 1024] [--files 8] [--repeats 3] [--parallel 1]
                             [--chunk-bytes N] [--settle 2] [--no-tus] [--no-split]
                             [--compare LABEL=DIR ...] [--smoke] [--work-dir DIR]

``--compare main=/work/main`` runs that checkout's ``scribe watch --once`` (its client and
its own server) interleaved with this one's, as ``scribe@main``: before/after in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from peers import (ROOT, Sample, check_file_creation, children_cpu, cpu_of, serve_post, settle_writes, start, start_tus, timed,
                   tus_missing)

MiB = 1 << 20
TUS_CHUNK = 16 * MiB

FSYNC_NOTE = {
    "scribe": "card ranges copied into the spool (fsync) if unacked when taken; server file + dir fsync, SQLite FULL",
    "scribe offline": "spool fsync",
    "scribe resume": "file + dir fsync, SQLite FULL",
    "tus": "no fsync",
    "naive": "file fsync only",
}


# the card ----------------------------------------------------------------------------
def make_card(root: Path, total: int, count: int) -> dict[str, tuple[int, str]]:
    """Write ``count`` Zoom-like BWF files of ``total`` bytes in all under ``root``; {rel: (size, sha256)}."""
    sys.path.insert(0, str(ROOT))
    from tests.recorder_files import bext, chunk, fmt_chunk

    rate, align = 48000, 6
    files = {}
    block = os.urandom(4 * MiB)
    for index in range(count):
        rel = f"FOLDER{index * 2 // count + 1:02d}/ZOOM{index + 1:04d}.WAV"
        seconds = index * 600
        ixml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><BWFXML><PROJECT>FIELD</PROJECT><SCENE>S01</SCENE>"
                f"<TAKE>{index + 1}</TAKE><TAPE>ZOOM{index + 1:04d}</TAPE></BWFXML>").encode()
        head = (bext("ZOOM F6", "ZOOM F6", "2026-11-30", f"{6 + seconds // 3600:02d}:{seconds // 60 % 60:02d}:00",
                     (6 * 3600 + seconds) * rate, "A=PCM,F=48000,W=24,M=stereo,T=ZOOM F6\r\n")
                + fmt_chunk(1, 2, rate, 24) + chunk(b"iXML", ixml))
        data_size = max(align, (total // count - len(head) - 20) // align * align)
        header = b"RIFF" + struct.pack("<I", 4 + len(head) + 8 + data_size) + b"WAVE" + head + b"data" + \
            struct.pack("<I", data_size)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(header)
        with open(path, "wb") as f:
            f.write(header)
            left = data_size
            while left:
                piece = block[: min(left, len(block))] if left < len(block) else block
                piece = bytes([index & 255]) + piece[1:]  # no two files alike
                f.write(piece)
                digest.update(piece)
                left -= len(piece)
        recorded = time.time() - 3600 + index * 60  # recorded earlier, as a card's files are
        os.utime(path, (recorded, recorded))
        files[rel] = (path.stat().st_size, digest.hexdigest())
    return files


# the naive contender: one streamed POST per whole file -----------------------------------
def naive_server(directory: str) -> None:
    """POST /files/NAME: stream the body to DIRECTORY/NAME, fsync it, answer 200 with its size."""
    from aiohttp import web

    async def post(request: web.Request) -> web.Response:
        path = os.path.join(directory, request.match_info["name"])
        size = 0
        with open(path, "wb") as f:
            async for block in request.content.iter_chunked(MiB):
                f.write(block)
                size += len(block)
            f.flush()
            await asyncio.get_running_loop().run_in_executor(None, os.fsync, f.fileno())
        return web.json_response({"ok": True, "size": size})

    serve_post("/files/{name}", post, client_max_size=0)


def naive_client(url: str, listing: str, parallel: int, prefix: str) -> None:
    """POST every file of ``listing`` whole (streamed from disk), ``parallel`` at once; exit 1 on a failure."""
    import aiohttp

    paths = Path(listing).read_text().splitlines()

    async def main() -> None:
        queue = list(enumerate(paths))[::-1]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=parallel)) as http:
            async def worker() -> None:
                while queue:
                    index, path = queue.pop()
                    size = os.path.getsize(path)
                    with open(path, "rb") as f:
                        async with http.post(f"{url}/files/{prefix}-{index}", data=f) as reply:
                            if reply.status != 200 or (await reply.json()).get("size") != size:
                                raise SystemExit(f"{path}: HTTP {reply.status}")

            await asyncio.gather(*(worker() for _ in range(parallel)))

    asyncio.run(main())


# contenders ------------------------------------------------------------------------------
@dataclass
class Card:
    root: Path
    files: dict[str, tuple[int, str]]
    listing: Path

    @property
    def bytes(self) -> int:
        return sum(size for size, _ in self.files.values())


def scribe_env(home: Path, url: str, token: str, root: Path = ROOT) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCRIBE")}
    return {**env, "SCRIBE_HOME": str(home), "SCRIBE_SERVER": url, "SCRIBE_TOKEN": token, "PYTHONPATH": str(root)}


def timed_env(cmd: list[str], server: subprocess.Popen, env: dict) -> Sample:
    """``peers.timed`` with exactly ``env`` (no inherited SCRIBE_* variables)."""
    settle_writes()
    server_before, client_before = cpu_of(server.pid), children_cpu()
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=env["PYTHONPATH"])
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[2:5]} exited {result.returncode}: {result.stderr[-2000:]}")
    return Sample(seconds, children_cpu() - client_before, cpu_of(server.pid) - server_before)


class Scribe:
    """scribe watch --once into a real scribe-server; with ``split``, also --offline then resume.

    ``root`` is the checkout whose client and server run (another one with --compare)."""

    def __init__(self, work: Path, chunk_bytes: int | None, settle: float, split: bool, root: Path = ROOT,
                 label: str = "scribe"):
        self.work, self.chunk_bytes, self.settle, self.split, self.runs = work, chunk_bytes, settle, split, 0
        self.root, self.label = root, label
        data = work / f"{label}-server".replace(" ", "-").replace("/", "-")
        self.token = subprocess.run([sys.executable, "-m", "scribe_server", "token", "create", "cards", "--data-dir",
                                     str(data)], capture_output=True, text=True, check=True, cwd=root,
                                    env=scribe_env(work, "", "", root)).stdout.strip()
        self.server, self.url = start([sys.executable, "-m", "scribe_server", "serve", "--port", "0", "--data-dir",
                                       str(data), "--log-level", "warning"], cwd=root, env=scribe_env(work, "", "", root))
        self.names = [label] + ([f"{label} offline", f"{label} resume"] if split else [])

    def watch_cmd(self, card: Card, session: str, *extra: str) -> list[str]:
        cmd = [sys.executable, "-m", "scribe_cli", "watch", str(card.root), "--once", "--session", session,
               "--settle", str(self.settle), *extra]
        return cmd + (["--chunk-bytes", str(self.chunk_bytes)] if self.chunk_bytes else [])

    def run(self, card: Card) -> dict[str, Sample]:
        self.runs += 1
        session = f"card-{self.runs}"
        home = self.work / f"{self.label}-home-{self.runs}".replace(" ", "-").replace("/", "-")
        env = scribe_env(home, self.url, self.token, self.root)
        out = {self.label: timed_env(self.watch_cmd(card, session), self.server, env)}
        self.verify(card, session, self.runs)
        if self.split:
            session = f"card-split-{self.runs}"
            env = scribe_env(Path(f"{home}-split"), self.url, self.token, self.root)
            out[f"{self.label} offline"] = timed_env(self.watch_cmd(card, session, "--offline"), self.server, env)
            out[f"{self.label} resume"] = timed_env([sys.executable, "-m", "scribe_cli", "resume", session, "--json"],
                                                    self.server, env)
            self.verify(card, session, self.runs + 1)
        return out

    def verify(self, card: Card, session: str, turn: int) -> None:
        """Every file in the manifest with its size and sha256; one of them fetched back and hashed."""
        import requests

        headers = {"Authorization": f"Bearer {self.token}"}
        listed = requests.get(f"{self.url}/api/sessions/{session}", headers=headers, timeout=60).json()["files"]
        got = {f["path"]: (f["size"], f["sha256"]) for f in listed}
        assert got == card.files, f"{self.label} {session}: manifest differs from the card: {got} != {card.files}"
        rel = sorted(card.files)[turn % len(card.files)]
        digest, size = hashlib.sha256(), 0
        with requests.get(f"{self.url}/api/sessions/{session}/file", params={"path": rel}, headers=headers,
                          stream=True, timeout=600) as reply:
            reply.raise_for_status()
            for block in reply.iter_content(MiB):
                digest.update(block)
                size += len(block)
        assert (size, digest.hexdigest()) == card.files[rel], f"{self.label} {session}: {rel} came back different"

    def close(self) -> None:
        self.server.terminate()
        self.server.wait()


class Tus:
    names = ["tus"]

    def __init__(self, work: Path, parallel: int):
        self.parallel = parallel
        self.dir, self.store, self.server, self.endpoint = start_tus(work)
        self.seen: set[str] = set()

    def run(self, card: Card) -> dict[str, Sample]:
        sample = timed(["node", "client.mjs", "--files", self.endpoint, str(card.listing), str(self.parallel),
                        str(TUS_CHUNK)], self.server, cwd=self.dir)
        stored = [p for p in self.store.iterdir() if p.suffix != ".json" and p.name not in self.seen]
        self.seen.update(p.name for p in stored)
        sizes = sorted(p.stat().st_size for p in stored)
        assert sizes == sorted(s for s, _ in card.files.values()), f"tus: stored sizes {sizes}"
        return {"tus": sample}

    def close(self) -> None:
        self.server.terminate()
        self.server.wait()


class Naive:
    names = ["naive"]

    def __init__(self, work: Path, parallel: int):
        self.parallel, self.runs = parallel, 0
        self.store = work / "naive-server"
        self.store.mkdir()
        self.server, self.url = start([sys.executable, __file__, "_naive-server", str(self.store)])

    def run(self, card: Card) -> dict[str, Sample]:
        self.runs += 1
        prefix = f"r{self.runs}"
        sample = timed([sys.executable, __file__, "_naive-client", self.url, str(card.listing), str(self.parallel),
                        prefix], self.server)
        sizes = sorted(p.stat().st_size for p in self.store.iterdir() if p.name.startswith(prefix + "-"))
        assert sizes == sorted(s for s, _ in card.files.values()), f"naive: stored sizes {sizes}"
        return {"naive": sample}

    def close(self) -> None:
        self.server.terminate()
        self.server.wait()


# the run ---------------------------------------------------------------------------------
def report(card: Card, samples: dict[str, list[Sample]], repeats: int, args) -> None:
    mib = card.bytes / MiB
    chunk = f"{args.chunk_bytes:,}-byte chunks" if args.chunk_bytes else "default chunk size"
    print(f"cards benchmark: {len(card.files)} files, {mib:,.0f} MiB, median of {repeats} run(s), whole client "
          f"command start to exit 0; scribe: {chunk}, --settle {args.settle}; tus/naive: {args.parallel} file(s) "
          f"at once")
    rates = {name: mib / statistics.median(s.seconds for s in runs) for name, runs in samples.items()}
    for name in [n for n in samples if n.endswith(" offline")]:
        base = name[: -len(" offline")]
        both = [a.seconds + b.seconds for a, b in zip(samples[name], samples[f"{base} resume"])]
        rates[f"{base} offline+resume"] = mib / statistics.median(both)
    print(f"{'contender':<22} {'seconds':>8} {'MiB/s':>7} {'client CPU':>11} {'server CPU':>11} {'vs tus':>7}  "
          f"durable before ack")
    for name, rate in rates.items():
        runs = samples.get(name)
        client = f"{statistics.median(s.client_cpu for s in runs):>9.1f} s" if runs else f"{'':>11}"
        server = f"{statistics.median(s.server_cpu for s in runs):>9.1f} s" if runs else f"{'':>11}"
        ratio = f"{rate / rates['tus']:.2f}x" if "tus" in rates else "-"
        kind = name.split(" ", 1)
        note = FSYNC_NOTE.get(name) or FSYNC_NOTE.get(" ".join(["scribe", *kind[1:]]) if name.startswith("scribe")
                                                      else name, "")
        print(f"{name:<22} {mib / rate:>8.1f} {rate:>7.1f} {client} {server} {ratio:>7}  {note}")
    for name, runs in samples.items():
        print(f"{name:<22} runs (MiB/s): {', '.join(f'{mib / s.seconds:.1f}' for s in runs)}")
    print("CPU: user+system seconds (client: the whole command; server: during the run); every file checked "
          "(sizes; scribe: manifest sha256 and one file fetched back)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_naive-server":
        return naive_server(sys.argv[2])
    if len(sys.argv) > 1 and sys.argv[1] == "_naive-client":
        url, listing, parallel, prefix = sys.argv[2:6]
        return naive_client(url, listing, int(parallel), prefix)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024, help="size of the card in MiB (default 1024)")
    parser.add_argument("--files", type=int, default=8, help="WAV files on the card (default 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=1, help="files uploaded at once by tus and naive")
    parser.add_argument("--chunk-bytes", type=int, default=None, help="scribe watch --chunk-bytes (default: its own)")
    parser.add_argument("--settle", type=float, default=2.0, help="scribe watch --settle (default 2, as scribe's)")
    parser.add_argument("--no-tus", action="store_true", help="leave tus out")
    parser.add_argument("--no-split", action="store_true", help="leave out scribe watch --offline + scribe resume")
    parser.add_argument("--compare", action="append", default=[], metavar="LABEL=DIR",
                        help="also run scribe watch --once (client and server) from another checkout, e.g. "
                             "main=/work/main (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="tiny run that only checks the benchmark works (no npm)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the card, the spools and the servers' files go (default: a new temporary directory)")
    args = parser.parse_args()
    if args.smoke:
        args.mib, args.files, args.repeats = 6, 3, 1
    why_not = "left out by --smoke (it would need npm ci)" if args.smoke else \
        "left out by --no-tus" if args.no_tus else tus_missing()
    if why_not:
        print(f"tus: skipped: {why_not}")
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="scribe-cards-", dir=args.work_dir))
    running = []
    try:
        check_file_creation(work)
        root = work / "card"
        files = make_card(root, args.mib * MiB, args.files)
        listing = work / "card-files.txt"
        listing.write_text("".join(f"{root / rel}\n" for rel in sorted(files)))
        card = Card(root, files, listing)
        running.append(Scribe(work, args.chunk_bytes, args.settle, not args.no_split))
        for other in args.compare:
            label, _, directory = other.partition("=")
            running.append(Scribe(work, args.chunk_bytes, args.settle, False, Path(directory).resolve(),
                                  f"scribe@{label}"))
        if not why_not:
            running.append(Tus(work, args.parallel))
        running.append(Naive(work, args.parallel))
        samples: dict[str, list[Sample]] = {name: [] for c in running for name in c.names}
        for rep in range(args.repeats):
            order = running[rep % len(running):] + running[:rep % len(running)]
            for contender in order:
                for name, sample in contender.run(card).items():
                    samples[name].append(sample)
                    print(f"  run {rep + 1} {name}: {card.bytes / MiB / sample.seconds:.1f} MiB/s", file=sys.stderr)
    finally:
        for contender in running:
            contender.close()
        shutil.rmtree(work, ignore_errors=True)
    report(card, samples, args.repeats, args)


if __name__ == "__main__":
    main()
