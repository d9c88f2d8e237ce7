"""Watch benchmark: a large card file through `scribe watch`, memory and speed beside their ceilings.

One run, one file (a 48 kHz / 24-bit stereo WAV of --gb GB), side by side:

* disk read    -- the file read once in 1 MiB blocks, its pages evicted from
                  the page cache first (each watch run below starts cold too);
* watch spool  -- `scribe watch --once --offline`: read, hash, spool (fsynced);
* drain        -- `scribe resume` of exactly those chunks into a real
                  scribe-server on loopback (the ceiling of the upload side);
* watch online -- `scribe watch --once` into a fresh server and spool: read,
                  spool and upload alongside, end to end;

each with the peak RSS of its process (os.wait4's ru_maxrss), and the file
downloaded back and checked byte for byte (sha256) with --verify (default in
--smoke).  The target is a peak RSS under 150 MB whatever the file's size.

Usage: python bench/watch_large.py [--gb 2.1] [--chunk-bytes 4194304] [--verify] [--smoke]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def make_wav(path: Path, size: int) -> str:
    """A 48 kHz/24-bit stereo WAV of about ``size`` bytes; returns its sha256."""
    rate, channels, bits = 48000, 2, 24
    align = channels * bits // 8
    data_size = (size - 44) // align * align
    header = (b"RIFF" + struct.pack("<I", 36 + data_size) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, channels, rate, rate * align, align, bits) + b"data" + struct.pack("<I", data_size))
    digest = hashlib.sha256(header)
    block = os.urandom(4 * MiB)
    with open(path, "wb") as f:
        f.write(header)
        left = data_size
        while left:
            piece = block[: min(left, len(block))]
            f.write(piece)
            digest.update(piece)
            left -= len(piece)
    return digest.hexdigest()


def run_measured(cmd: list[str], env: dict) -> tuple[float, int, str, str, int]:
    """Run ``cmd`` reaping it ourselves so its own peak RSS is known: (s, rss, out, err, code)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        return seconds, usage.ru_maxrss * 1024, out.read().decode(), err.read().decode(), proc.returncode


class Server:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> "Server":
        base = [sys.executable, "-m", "scribe_server"]
        token = subprocess.run(base + ["token", "create", "bench", "--data-dir", str(self.data_dir)],
                               capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
        self.token = token
        self.proc = subprocess.Popen(base + ["serve", "--host", "127.0.0.1", "--port", "0", "--data-dir",
                                             str(self.data_dir)], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"server did not start: {line!r}")
        self.url = line.split()[-1]
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def drop_cache(path: Path) -> None:
    """Evict this one file's pages from the page cache (flushed first), so the next read hits the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_read(path: Path) -> float:
    drop_cache(path)
    started = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(MiB):
            pass
    return time.perf_counter() - started


def verify(server: Server, session: str, rel: str, want: str) -> bool:
    import requests

    digest = hashlib.sha256()
    with requests.get(f"{server.url}/api/sessions/{session}/file", params={"path": rel}, stream=True,
                      headers={"Authorization": f"Bearer {server.token}"}, timeout=600) as resp:
        resp.raise_for_status()
        for block in resp.iter_content(MiB):
            digest.update(block)
    return digest.hexdigest() == want


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.1, help="File size in GB (10^9 bytes).")
    parser.add_argument("--chunk-bytes", type=int, default=4 * MiB, help="scribe watch --chunk-bytes (its default)")
    parser.add_argument("--verify", action="store_true", help="Download the file back and compare sha256.")
    parser.add_argument("--smoke", action="store_true", help="A 48 MB file, verified: checks the bench works.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary folder.")
    args = parser.parse_args()
    size = 48_000_000 if args.smoke else int(args.gb * 1e9)
    check = args.verify or args.smoke
    work = Path(tempfile.mkdtemp(prefix="scribe-watch-bench-"))
    servers: list[Server] = []
    try:
        card = work / "card" / "FOLDER01"
        card.mkdir(parents=True)
        target = card / "ZOOM0001.WAV"
        digest = make_wav(target, size)
        mib = target.stat().st_size / MiB
        rows = [("disk read", disk_read(target), None, "")]

        def env_for(home: Path) -> dict:
            env = {k: v for k, v in os.environ.items() if not k.startswith("SCRIBE")}
            return {**env, "SCRIBE_HOME": str(home), "PYTHONPATH": str(ROOT)}

        scribe = [sys.executable, "-m", "scribe_cli"]
        first = Server(work / "server-a").start()
        servers.append(first)
        home_a = work / "home-a"
        common = ["--session", "big", "--settle", "0.5", "--chunk-bytes", str(args.chunk_bytes)]
        drop_cache(target)
        s, rss, out, err, code = run_measured(scribe + ["watch", str(work / "card"), "--once", "--offline", *common],
                                              env_for(home_a))
        if code:
            raise RuntimeError(f"watch --offline failed ({code}): {err[-2000:]}")
        rows.append(("watch spool (offline)", s, rss, ""))
        s, rss, out, err, code = run_measured(scribe + ["resume", "big", "--server", first.url, "--token",
                                                        first.token], env_for(home_a))
        if code:
            raise RuntimeError(f"resume failed ({code}): {err[-2000:]}")
        rows.append(("drain (scribe resume)", s, rss, ""))
        second = Server(work / "server-b").start()
        servers.append(second)
        drop_cache(target)
        s, rss, out, err, code = run_measured(scribe + ["watch", str(work / "card"), "--once", *common, "--server",
                                                        second.url, "--token", second.token], env_for(work / "home-b"))
        if code:
            raise RuntimeError(f"watch failed ({code}): {err[-2000:]}")
        note = ""
        if check:
            note = "sha256 equal" if verify(second, "big", "FOLDER01/ZOOM0001.WAV", digest) else "SHA256 DIFFERS"
        rows.append(("watch online (end to end)", s, rss, note))
        print(f"watch benchmark: one {mib:,.0f} MiB 48 kHz/24-bit stereo WAV, chunks of {args.chunk_bytes:,} bytes")
        print(f"{'stage':<28}{'seconds':>9}{'MiB/s':>9}{'peak RSS':>11}  note")
        for name, seconds, rss, note in rows:
            rss_text = f"{rss / 1e6:,.0f} MB" if rss else "-"
            print(f"{name:<28}{seconds:>9.1f}{mib / seconds:>9.1f}{rss_text:>11}  {note}")
        worst = max(r[2] for r in rows if r[2])
        print(f"largest peak RSS {worst / 1e6:,.0f} MB (target < 150 MB): {'ok' if worst < 150e6 else 'OVER'}")
        return 0 if worst < 150e6 and "DIFFERS" not in "".join(r[3] for r in rows) else 1
    finally:
        for server in servers:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
