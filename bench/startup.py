"""Start-up benchmark: wall time of the read-only commands, from process start to exit.

Each command is run as its own process (the ``scribe`` console script of this
interpreter), output to /dev/null, interleaved round by round; the table gives
the median and the fastest of --runs runs.  Reference rows: ``python -c pass``
(the interpreter alone) and ``python -c "import typer"`` (the CLI framework alone).
Commands run as an installed scribe does, from compiled .pyc files: the warm-up run
writes them (PYTHONDONTWRITEBYTECODE is dropped from the environment), since pip
compiles packages at install time and compiling the sources each time would cost
~30 ms more.  The CPU column (user + system time of the process, median) moves less than wall
time on a shared machine.

Set-up (in a temporary SCRIBE_HOME): a real scribe-server on loopback holding one
uploaded session, and a spool with --chunks pending chunks of two more sessions,
so ``pending`` and ``sessions`` list something and ``gaps`` asks the server.

Goal (issue 16): every read-only command under 200 ms.

``--baseline PATH`` adds the same commands run by another ``scribe`` executable
(e.g. an older checkout's venv), interleaved with these, for a before/after table.

Usage: python bench/startup.py [--runs 9] [--chunks 20] [--baseline /other/venv/bin/scribe] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL_MS = 200.0
COMMANDS = [["--help"], ["pending"], ["pending", "--json"], ["gaps", "uploaded"], ["gaps", "uploaded", "--json"],
            ["sessions"], ["sessions", "--json"]]


def scribe_command() -> list[str]:
    script = Path(sys.executable).parent / "scribe"
    return [str(script)] if script.exists() else [sys.executable, "-m", "scribe_cli"]


def prepare(work: Path, chunks: int) -> tuple[subprocess.Popen, dict]:
    """A server with one uploaded session and a spool with pending chunks; the environment to use them."""
    data, home = work / "data", work / "home"
    token = subprocess.run([sys.executable, "-m", "scribe_server", "token", "create", "bench", "--data-dir", str(data)],
                           capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    server = subprocess.Popen([sys.executable, "-m", "scribe_server", "serve", "--port", "0", "--data-dir", str(data),
                               "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              cwd=ROOT)
    url = server.stdout.readline().split()[-1]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SCRIBE_") and k != "PYTHONDONTWRITEBYTECODE"},
           "SCRIBE_HOME": str(home), "SCRIBE_SERVER": url, "SCRIBE_TOKEN": token}
    filler = (f"from pathlib import Path\nfrom scribe_cli.spool import Spool\n"
              f"with Spool(Path({str(home / 'spool')!r})) as spool:\n"
              f"    for session, n in (('uploaded', 20), ('field-a', {chunks // 2}),\n"
              f"                       ('field-b', {chunks - chunks // 2})):\n"
              f"        for seq in range(n):\n"
              f"            spool.add(session, seq, bytes([seq % 251]) * 4096, 'audio/flac')\n")
    subprocess.run([sys.executable, "-c", filler], check=True, env=env, cwd=ROOT)
    subprocess.run([*scribe_command(), "resume", "uploaded", "--json"], check=True, env=env,
                   stdout=subprocess.DEVNULL, cwd=work)
    return server, env


def run_ms(argv: list[str], env: dict, cwd: Path, expect: int) -> tuple[float, float]:
    """Wall and CPU (user + system) milliseconds of one run of ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = (time.perf_counter() - started) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != expect:
        raise SystemExit(f"{' '.join(argv)} exited {result.returncode}, expected {expect}: {result.stderr[-2000:]}")
    return elapsed, (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9, help="runs of each command (median reported)")
    parser.add_argument("--chunks", type=int, default=20, help="pending chunks in the spool")
    parser.add_argument("--baseline", help="another scribe executable to run the same commands with, interleaved")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks it works")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.chunks = 1, 10
    rows = [("python -c pass", [sys.executable, "-c", "pass"], 0, False),
            ("python -c 'import typer'", [sys.executable, "-c", "import typer"], 0, False)]
    for label, scribe in [("scribe", scribe_command()), *([("baseline", [args.baseline])] if args.baseline else [])]:
        rows += [(f"{label} {' '.join(cmd)}", [*scribe, *cmd], 0, label == "scribe") for cmd in COMMANDS]
    work = Path(tempfile.mkdtemp(prefix="scribe-startup-"))
    server = None
    try:
        server, env = prepare(work, args.chunks)
        for _, argv, expect, _ in rows:  # warm the page cache and .pyc files once
            run_ms(argv, env, work, expect)
        times: dict[str, list[float]] = {name: [] for name, *_ in rows}
        cpu: dict[str, list[float]] = {name: [] for name, *_ in rows}
        for _ in range(args.runs):
            for name, argv, expect, _ in rows:
                wall, used = run_ms(argv, env, work, expect)
                times[name].append(wall)
                cpu[name].append(used)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    print(f"startup benchmark: wall ms from process start to exit, {args.runs} interleaved run(s), "
          f"{args.chunks} pending chunk(s); goal < {GOAL_MS:.0f} ms")
    print(f"{'command':<34} {'median':>8} {'fastest':>8} {'CPU ms':>8}  goal (median wall)")
    for name, _, _, judged in rows:
        median, fastest = statistics.median(times[name]), min(times[name])
        verdict = ("met" if median < GOAL_MS else "MISSED") if judged else ""
        if args.baseline and name.startswith("baseline "):
            verdict = f"scribe / baseline {statistics.median(times['scribe' + name[8:]]) / median:.2f}"
        print(f"{name:<34} {median:>8.0f} {fastest:>8.0f} {statistics.median(cpu[name]):>8.0f}  {verdict}")


if __name__ == "__main__":
    main()
