"""Gaps benchmark: `missing-chunks` on big sessions, beside the seed's algorithm.

Sessions (built directly in the server's SQLite database, rows only):
* "big": 100,000 chunks with 1% missing at random;
* "huge": a single chunk at seq 2^31-1.

For each, the median wall time of `GET /api/sessions/{id}/missing-chunks` from a real
scribe-server over HTTP, and the seed's algorithm (`for i in 0..maxSeq: if
!sequences.includes(i)`) on the same data.  The seed's loop is timed on a prefix and
extrapolated linearly (its full run takes hours); the table says so.

Usage: python bench/gaps.py [--chunks 100000] [--repeats 5] [--smoke]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scribe_server.store import db  # noqa: E402


def build(data_dir: Path, session: str, seqs: list[int]) -> None:
    engine = db.create_engine(db.sqlite_url(data_dir))
    db.migrate(engine)
    with engine.begin() as conn:
        conn.execute(db.sessions.insert().values(id=session, owner="bench", created_at=time.time()))
        for start in range(0, len(seqs), 10_000):
            conn.execute(db.chunks.insert(), [
                {"id": str(uuid.uuid4()), "owner": "bench", "session_id": session, "seq": s, "audio_path": f"{session}/x",
                 "created_at": 0.0, "size": 1, "sha256": "0" * 64, "mime_type": "audio/wav"}
                for s in seqs[start : start + 10_000]])
    engine.dispose()


def seed_algorithm(sequences: list[int], budget: float) -> tuple[float, bool]:
    """Seconds of the seed's O(n^2) loop; extrapolated when it would exceed ``budget``."""
    max_seq = max([*sequences, -1])
    started = time.perf_counter()
    missing = []
    for i in range(max_seq + 1):
        if i not in sequences:  # JavaScript's Array.includes: a linear scan
            missing.append(i)
        if i % 256 == 255 and time.perf_counter() - started > budget:
            return (time.perf_counter() - started) / (i + 1) * (max_seq + 1), True
    return time.perf_counter() - started, False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed-budget", type=float, default=10.0, help="seconds for each seed-algorithm run")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.chunks, args.repeats, args.seed_budget = 2000, 1, 0.5
    rng = random.Random(1)
    big = sorted(set(range(args.chunks)) - set(rng.sample(range(args.chunks), args.chunks // 100)))
    cases = {"big": big, "huge": [2**31 - 1]}
    work = Path(tempfile.mkdtemp(prefix="scribe-gaps-"))
    try:
        for name, seqs in cases.items():
            build(work, name, seqs)
        token = subprocess.run([sys.executable, "-m", "scribe_server", "token", "create", "bench", "--data-dir",
                                str(work)], capture_output=True, text=True, check=True).stdout.strip()
        server = subprocess.Popen([sys.executable, "-m", "scribe_server", "serve", "--port", "0", "--data-dir",
                                   str(work), "--log-level", "warning"], stdout=subprocess.PIPE, text=True)
        url = server.stdout.readline().split()[-1]
        try:
            rows = []
            for name, seqs in cases.items():
                times, body = [], None
                for _ in range(args.repeats + 1):
                    started = time.perf_counter()
                    response = requests.get(f"{url}/api/sessions/{name}/missing-chunks",
                                            headers={"Authorization": f"Bearer {token}"}, timeout=60)
                    times.append(time.perf_counter() - started)
                    body = response.json()
                seed_seconds, extrapolated = seed_algorithm(seqs, args.seed_budget)
                rows.append((name, len(seqs), body["missingCount"], statistics.median(times[1:]), seed_seconds,
                             extrapolated))
        finally:
            server.terminate()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("gaps benchmark: median of", args.repeats, "HTTP request(s) against a real scribe-server (SQLite)")
    print(f"{'session':>8} {'stored':>8} {'missing':>11} {'scribe':>10} {'seed algorithm':>18} {'ratio':>10}")
    for name, stored, missing, ours, seed, extrapolated in rows:
        seed_text = f"{seed:.3g} s" + (" (extrap.)" if extrapolated else "")
        print(f"{name:>8} {stored:>8} {missing:>11} {ours * 1000:>7.1f} ms {seed_text:>18} {seed / ours:>9.0f}x")


if __name__ == "__main__":
    main()
