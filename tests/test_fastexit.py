"""scribe_cli/fastexit.py: a finished command leaves without the interpreter's teardown, losing nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from scribe_cli.spool import Spool
from tests.test_client_upload import scribe, spool_dir


def test_exit_codes_atexit_handlers_and_messages_survive():
    """--version exits 0, a usage error 2, sys.exit("text") 1 with the text; atexit handlers still run."""
    code = ("import atexit, sys, scribe_cli.cli as c\n"
            "atexit.register(lambda: print('atexit ran', file=sys.stderr))\n"
            "sys.argv = ['scribe'] + sys.argv[1:]\n"
            "c.main()\n")
    ok = subprocess.run([sys.executable, "-c", code, "--version"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("scribe ") and "atexit ran" in ok.stderr
    usage = subprocess.run([sys.executable, "-c", code, "no-such-command"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "No such command" in usage.stderr and "atexit ran" in usage.stderr
    from scribe_cli.fastexit import exit_now  # noqa: F401  (the module imports cleanly on its own)
    text = subprocess.run([sys.executable, "-c", "from scribe_cli.fastexit import exit_now; exit_now('went wrong')"],
                          capture_output=True, text=True, timeout=60)
    assert text.returncode == 1 and text.stderr.strip() == "went wrong"


def test_long_piped_output_arrives_whole_and_a_closed_pipe_is_quiet():
    """`scribe pending --json` of 3,000 chunks reaches a pipe whole; `scribe pending | head -c 10` ends
    without a traceback."""
    with Spool(spool_dir()) as spool:
        for seq in range(3000):
            spool.add("piped", seq, os.urandom(64), "audio/wav")
    result = scribe("pending", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["chunks"]) == 3000
    head = subprocess.run(f"{sys.executable} -m scribe_cli pending | head -c 10", shell=True, capture_output=True,
                          text=True, timeout=60)
    assert len(head.stdout) == 10 and "Traceback" not in head.stderr, head.stderr
