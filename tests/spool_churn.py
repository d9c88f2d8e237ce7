"""A helper process for tests/test_spool_crash.py (not a test): adds and removes spool chunks until killed.

Usage: python tests/spool_churn.py SPOOL_DIR LOG FIRST_SEQ [sweep]

Each chunk is logged (``seq sha256``) once ``add`` has returned, so the test
knows what the spool promised to keep.  Six of every eight chunks are then
removed as if acknowledged; two stay, so the spool grows a backlog.  With
``sweep`` it only sweeps orphans in a loop (to race a writer).
"""

from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scribe_cli.spool import Spool  # noqa: E402


def main() -> None:
    directory, log_path, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with Spool(directory) as spool, open(log_path, "a") as log:
        if sys.argv[4:] == ["sweep"]:
            print("ready", flush=True)
            while True:
                spool.sweep()
        seq = first
        print("ready", flush=True)
        while True:
            batch = []
            for _ in range(8):
                meta = spool.add("churn", seq, os.urandom(random.randint(100_000, 400_000)), "audio/wav")
                log.write(f"{seq} {meta.sha256}\n")
                log.flush()
                batch.append(("churn", seq))
                seq += 1
            random.shuffle(batch)
            spool.remove_many(batch[:6])


if __name__ == "__main__":
    main()
