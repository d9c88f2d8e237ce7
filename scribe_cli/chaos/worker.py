"""The uploading process of a chaos run (a child that ``scribe chaos`` may SIGKILL).

It follows the spool of one session with the ordinary uploader until the
orchestrator has written a ``produced`` marker and nothing is left, then
prints its upload statistics as one JSON line.

Usage (internal): python -m scribe_cli.chaos.worker HOME SERVER TOKEN SESSION
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from scribe_cli.spool import Spool
from scribe_cli.upload import Uploader


async def follow(home: Path, server: str, token: str, session: str, ack_timeout: float) -> dict:
    with Spool(home / "spool") as spool:
        uploader = Uploader(spool, server, token, window=32, ack_timeout=ack_timeout)

        async def watch_marker() -> None:
            while not (home / "produced").exists():
                uploader.notify()
                await asyncio.sleep(0.2)
            uploader.drain_now()

        async def snapshots() -> None:  # a SIGKILLed worker still leaves its counts behind
            while True:
                write_snapshot(home, uploader.stats)
                await asyncio.sleep(0.25)

        tasks = [asyncio.create_task(watch_marker()), asyncio.create_task(snapshots())]
        stats = await uploader.run([session], until_empty=False)
        for task in tasks:
            task.cancel()
        return write_snapshot(home, stats)


def write_snapshot(home: Path, stats) -> dict:
    out = asdict(stats)
    out.pop("started")
    out["elapsed"] = stats.elapsed
    path = home / f"worker-{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, path)
    return out


def main() -> None:
    home, server, token, session = sys.argv[1:5]
    ack_timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 3.0
    stats = asyncio.run(follow(Path(home), server, token, session, ack_timeout))
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
