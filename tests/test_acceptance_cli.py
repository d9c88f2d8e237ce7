"""Acceptance, as a user meets scribe: a closed terminal (SIGHUP), a read-only SCRIBE_HOME, the docs.

The terminal test runs `scribe demo` as the session leader of a real pseudo-terminal
and closes the terminal's master side, so the kernel sends the hangup exactly as
when a terminal window or an SSH connection goes away.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time

import pytest
import requests

from scribe_cli.errors import ExitCode
from scribe_cli.spool import Spool
from tests.test_cli_errors import unwritable
from tests.test_client_upload import fill_spool, scribe, spool_dir
from tests.test_record import alsa_home  # noqa: F401 (fixture)
from tests.test_signals import Scribe, _no_leftover_scribes, assert_clean  # noqa: F401 (autouse fixture)


def _own_terminal() -> None:  # runs in the child: new session, the pty slave (fd 0) as controlling terminal
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class InTerminal:
    """A `scribe` process whose stdin, stdout and stderr are a pseudo-terminal it controls."""

    def __init__(self, *args: str, **env: str):
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "scribe_cli", *args], stdin=slave, stdout=slave,
                                     stderr=slave, preexec_fn=_own_terminal,
                                     env={**os.environ, "TERM": "xterm", "COLUMNS": "100", **env})
        os.close(slave)
        self.screen = ""

    def wait_for(self, pattern: str, timeout: float = 90) -> re.Match:
        """Read the screen until ``pattern`` shows up on it (colours and cursor moves removed)."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None  # before reading: what it printed last is read below
            while select.select([self.master], [], [], 0 if exited else 0.2)[0]:
                try:
                    self.screen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # EIO: every slave fd is closed, nothing more to read
                    break
                if not exited:
                    break
            found = re.search(pattern, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.screen))
            if found:
                return found
            assert not exited, f"exited {self.proc.returncode}: {self.screen[-500:]!r}"
            assert time.monotonic() < deadline, f"{pattern!r} not shown in {timeout} s: {self.screen[-500:]!r}"

    def close_terminal(self, timeout: float = 30) -> tuple[int, float]:
        """Close the terminal (the kernel hangs up the session); return (exit code, seconds to exit)."""
        closed_at = time.monotonic()
        os.close(self.master)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"still running {timeout} s after its terminal was closed")
        return self.proc.returncode, time.monotonic() - closed_at


@pytest.fixture
def tmp(tmp_path):
    """TMPDIR for the command under test; afterwards no process started under it may be left running."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    yield folder
    leftover = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True).stdout.split()
    for pid in leftover:
        os.kill(int(pid), signal.SIGKILL)
    assert leftover == [], "processes left running"


def assert_gone(url: str) -> None:
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/healthz", timeout=2)


def test_demo_winds_down_when_its_terminal_is_closed(tmp_path, tmp):
    """`demo` whose terminal closes: it stops like on Ctrl-C, exports, and stops its embedded server."""
    out = tmp_path / "demo.flac"
    demo = InTerminal("demo", "--generated", "--seconds", "40", "-o", str(out), TMPDIR=str(tmp))
    url = demo.wait_for(r"embedded server at (http://127\.0\.0\.1:\d+)").group(1)
    demo.wait_for(r"[1-9]\d* captured, [1-9]\d* acknowledged")
    code, elapsed = demo.close_terminal()
    assert code == 0  # a normal end: nobody reads it, but it is not a death by SIGHUP (-1) or EIO (1)
    assert elapsed < 15
    assert out.stat().st_size > 0  # the wind-down ran to the end: what was recorded was exported
    assert_gone(url)
    assert list(tmp.iterdir()) == []


def test_chaos_stops_its_children_on_sighup(tmp):
    """`chaos` + SIGHUP to its job (a shell closing): exit 130, embedded server and uploader stopped, tmp removed."""
    chaos = Scribe("chaos", "--chunks", "3000", "--cut-every", "0.5", "--json", TMPDIR=str(tmp))
    start = chaos.wait_for(lambda e: e["event"] == "start", timeout=90)
    time.sleep(1)
    chaos.signal(signal.SIGHUP)
    code, elapsed, stderr = chaos.finish()
    assert code == 130, stderr
    assert elapsed < 15
    assert_clean(stderr)
    assert list(tmp.iterdir()) == []
    assert_gone(start["server"])


def test_gaps_reads_a_read_only_scribe_home(server, tmp_path, monkeypatch):
    """`gaps` only reads the spool: on a read-only SCRIBE_HOME it still answers, with what is spooled."""
    home = tmp_path / "ro-home"
    monkeypatch.setenv("SCRIBE_HOME", str(home))
    fill_spool("kept", 3, final=False)
    sent = scribe("resume", "kept", "--server", server.url, "--token", server.alice)
    assert sent.returncode in (0, 5), sent.stderr  # 5: no final seq yet
    with Spool(spool_dir()) as spool:
        for seq in (3, 4):
            spool.add("kept", seq, os.urandom(4096), "audio/wav", duration_ms=1000)
    with unwritable(home), unwritable(home / "spool"):
        result = scribe("gaps", "kept", "--json", "--server", server.url, "--token", server.alice)
    assert result.returncode != ExitCode.DISK and "read-only" not in result.stderr, result.stderr
    report = json.loads(result.stdout)
    assert "error" not in report and report["spooled"] == 2, report


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_record_from_a_device_faster_than_the_disk_stays_bounded_and_stops(alsa_home):
    """A device delivering far faster than real time (ALSA `file` plugin, unpaced): memory stays bounded,
    the drops are counted as overflows, and Ctrl-C still ends the recording within seconds."""
    home, source = alsa_home
    rec = Scribe("record", "--session", "fast", "--offline", "--chunk-seconds", "2", "--json", HOME=str(home))
    rec.wait_for(lambda e: e["event"] == "status" and e["captured"] >= 2, timeout=90)
    time.sleep(3)  # unbounded, the queue grew by tens of MiB a second here and took minutes to commit
    rss = rss_mib(rec.proc.pid)
    rec.signal(signal.SIGINT)
    code, elapsed, stderr = rec.finish(timeout=60)
    assert code == 0, stderr
    assert elapsed < 15
    assert_clean(stderr)
    assert rss < 400, f"{rss:.0f} MiB resident"
    done = rec.events[-1]
    assert done["event"] == "done" and done["overflows"] > 0, done


@pytest.mark.parametrize("args", [("gaps", "--json"), ("resume", "s", "--json", "--give-up-after", "soon"),
                                  ("record", "--json", "--rate", "abc")], ids=["missing-argument", "bad-value",
                                                                             "streaming"])
def test_usage_errors_still_give_json_readers_an_error_object(args):
    """A command line that cannot be parsed, with --json: exit 2, the usage on stderr, an error object on stdout."""
    result = scribe(*args)
    assert result.returncode == 2, result.stderr
    assert "Usage: " in result.stderr and "Traceback" not in result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "usage" and error["exitCode"] == 2 and error["message"], error
    assert error["hint"].endswith(f" {args[0]} -h")  # "python -m scribe_cli gaps -h" when run that way


def test_export_of_an_undecodable_chunk_is_a_plain_error(server, tmp_path):
    """A stored chunk that is not audio: `export` exits 7 (undecodable audio) naming the chunk, with no object repr."""
    from tests.test_cli_errors import assert_clean_error

    fill_spool("noise", 2)  # random bytes labelled audio/wav: stored as sent, undecodable at export
    assert scribe("resume", "noise", "--server", server.url, "--token", server.alice).returncode == 0
    result = scribe("export", "noise", "-o", str(tmp_path / "noise.flac"), "--server", server.url,
                    "--token", server.alice)
    assert_clean_error(result, ExitCode.NO_AUDIO, "chunk 0", "cannot be decoded")
    assert "object at 0x" not in result.stderr and "BytesIO" not in result.stderr
    assert list(tmp_path.glob("*noise*")) == []


def test_sighup_with_the_terminal_still_open_keeps_showing_the_wind_down(tmp_path, tmp):
    """`kill -HUP` by hand while the terminal is open: `demo` winds down and its summary still shows there."""
    out = tmp_path / "demo.flac"
    demo = InTerminal("demo", "--generated", "--seconds", "40", "-o", str(out), TMPDIR=str(tmp))
    demo.wait_for(r"[1-9]\d* captured, [1-9]\d* acknowledged")
    os.kill(demo.proc.pid, signal.SIGHUP)
    demo.wait_for(r"exported .*demo\.flac", timeout=30)
    assert demo.proc.wait(30) == 0
    os.close(demo.master)
