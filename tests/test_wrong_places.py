"""The client pointed at the wrong things: a server that never answers or does not speak HTTP,
output paths that cannot be written, settings that cannot work, a reader that goes away, a
damaged spool.  Each ends in one `Error:`/`Try:` pair and its documented exit code, before any
work is wasted, and no audio is lost."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from scribe_cli.errors import ExitCode
from tests import recorder_files as rf
from tests.infra import free_port
from tests.test_cli_errors import assert_clean_error
from tests.test_client_upload import fill_spool, scribe, spool_dir


class MuteServer:
    """A TCP server on loopback that accepts every connection and either never answers
    (``garbage=False``) or answers anything with bytes that are not HTTP."""

    def __init__(self, garbage: bool = False):
        self.sock = socket.create_server(("127.0.0.1", free_port()))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.garbage, self.held, self.done = garbage, [], threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            if self.garbage:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    conn.sendall(b"\x00\xffNOT HTTP AT ALL\r\n" * 20)
                except OSError:
                    pass
                conn.close()
            else:
                self.held.append(conn)

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        for conn in self.held:
            conn.close()
        self.sock.close()


@pytest.fixture
def mute():
    server = MuteServer()
    yield server
    server.close()


@pytest.fixture
def garbage():
    server = MuteServer(garbage=True)
    yield server
    server.close()


def test_watch_takes_the_card_while_the_server_accepts_and_never_answers(mute, tmp_path):
    """The server's questions before watching wait a few seconds at most: every file is spooled,
    the upload that cannot happen ends in exit 5 with the chunks kept for `scribe resume`."""
    card = tmp_path / "card"
    (card / "FOLDER01").mkdir(parents=True)
    for n in range(3):
        rf.zoom_bwf(card / "FOLDER01" / f"ZOOM000{n}.WAV", seed=n)
        os.utime(card / "FOLDER01" / f"ZOOM000{n}.WAV", (time.time() - 3600,) * 2)
    started = time.monotonic()
    result = scribe("watch", str(card), "--once", "--session", "mute", "--drain-timeout", "1", "--json",
                    "--server", mute.url, "--token", "any", timeout=120)
    events = [json.loads(line) for line in result.stdout.splitlines()]
    taken = [e for e in events if e.get("event") == "taken"]
    assert len(taken) == 3, result.stderr
    assert result.returncode == ExitCode.INCOMPLETE, result.stderr
    assert time.monotonic() - started < 16  # (it waited 2 x 10 s for the server's answers before taking a file)
    pending = json.loads(scribe("pending", "mute", "--json").stdout)
    assert len(pending["chunks"]) == sum(e["chunks"] for e in taken)


def test_a_server_that_does_not_speak_http(garbage):
    """follow (its own Socket.IO connection), gaps and resume: exit 3 naming what answered."""
    for args in (("follow", "s1"), ("follow", "s1", "--json"), ("gaps", "s1")):
        result = scribe(*args, "--server", garbage.url, "--token", "any", timeout=60)
        assert_clean_error(result, ExitCode.UNREACHABLE, garbage.url)
    assert "not HTTP" in scribe("follow", "s1", "--server", garbage.url, "--token", "any", timeout=60).stderr
    fill_spool("kept", 3)
    result = scribe("resume", "kept", "--give-up-after", "2", "--server", garbage.url, "--token", "any", timeout=60)
    assert_clean_error(result, ExitCode.UNREACHABLE)
    assert len(json.loads(scribe("pending", "kept", "--json").stdout)["chunks"]) == 3


def test_output_paths_that_cannot_be_written_are_refused_before_any_work(tmp_path):
    """A missing folder or a file where a folder must be: exit 9 at once (the demo before it
    records 15 s, the export before it asks the server, which is not even running here)."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    cases = [
        (("demo", "-o", str(tmp_path / "nodir" / "x.flac")), "does not exist"),
        (("demo", "-o", str(a_file / "x.flac")), "is a file"),
        (("export", "s1", "-o", str(tmp_path / "nodir" / "x.flac")), "does not exist"),
        (("export", "s1", "--files", "-o", str(a_file)), "is a file"),
    ]
    for args, needle in cases:
        started = time.monotonic()
        result = scribe(*args, *(() if args[0] == "demo" else ("--server", "http://127.0.0.1:9", "--token", "t")))
        assert_clean_error(result, ExitCode.CONFIG, needle)
        assert time.monotonic() - started < 10, args
    assert not (tmp_path / "nodir").exists()


def test_settings_and_values_that_cannot_work(tmp_path):
    """A config.toml that is a folder, an ack timeout of 0, NaN or below; demo and chaos values
    out of range: a clean refusal, never a traceback or an upload that waits forever."""
    home = Path(os.environ["SCRIBE_HOME"])
    (home / "config.toml").mkdir(parents=True)
    assert_clean_error(scribe("pending"), ExitCode.CONFIG, "config.toml")
    (home / "config.toml").rmdir()
    fill_spool("slow", 2)
    for value in ("0", "-3", "nan"):
        result = scribe("resume", "slow", "--token", "t", SCRIBE_ACK_TIMEOUT=value)
        assert_clean_error(result, ExitCode.CONFIG, "ack_timeout")
    for args in (("demo", "--seconds", "0"), ("demo", "--seconds", "-1"), ("chaos", "--duplicates", "5"),
                 ("chaos", "--cut-every", "-1"), ("chaos", "--server-kills", "-1"), ("resume", "slow", "--give-up-after", "-3")):
        result = scribe(*args, timeout=60)
        assert result.returncode == ExitCode.USAGE, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert len(json.loads(scribe("pending", "slow", "--json").stdout)["chunks"]) == 2


@pytest.mark.parametrize("args", [("sessions",), ("pending",), ("--help",), ("export", "--help"), ("pending", "--json")])
def test_a_reader_that_went_away_ends_the_command_with_141(args):
    """stdout is a pipe whose reader closed before the command wrote: exit 141 quietly, like any
    Unix tool killed by SIGPIPE (rich and click would otherwise exit 1)."""
    fill_spool("piped", 2)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "scribe_cli", *args], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert result.returncode == ExitCode.PIPE_CLOSED, result.stderr
    assert "Traceback" not in result.stderr and "Error:" not in result.stderr


def test_pending_for_a_session_this_spool_never_held():
    fill_spool("here", 1)
    assert_clean_error(scribe("pending", "elsewhere"), ExitCode.NOT_FOUND, "elsewhere")
    assert_clean_error(scribe("pending", ""), ExitCode.CONFIG)
    assert scribe("pending", "here").returncode == 0


def test_a_damaged_spool_database_says_so_and_how_to_start_again():
    fill_spool("damaged", 2)
    for name in ("cache.db-wal", "cache.db-shm"):
        (spool_dir() / name).unlink(missing_ok=True)
    with open(spool_dir() / "cache.db", "r+b") as db:
        db.write(os.urandom(100))  # the header: "file is not a database"
    for args in (("pending",), ("resume", "damaged", "--token", "t")):
        assert_clean_error(scribe(*args), ExitCode.DISK, "damaged", "spool.damaged")


def test_follow_into_a_log_prints_a_line_per_event(server):
    """No terminal for the live display (a log, a pipe): one plain line per event, the end said."""
    fill_spool("logged", 5)
    follower = subprocess.Popen([sys.executable, "-m", "scribe_cli", "follow", "logged", "--wait", "30",
                                 "--server", server.url, "--token", server.alice],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert scribe("resume", "logged", "--server", server.url, "--token", server.alice).returncode == 0
        out, err = follower.communicate(timeout=60)
    finally:
        follower.kill()
    assert follower.returncode == 0, err
    assert "following logged" in err and "logged: 5 chunk(s), 0 missing, complete" in err, err
    assert "logged is complete" in out + err


def test_a_web_server_that_is_not_scribes(tmp_path):
    """Any other web server on the port (a 404 page for every /api route): exit 3 saying so, not
    "no such session" (6); `scribe sessions` still lists the local spool."""
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        fill_spool("mine", 2)
        for args in (("gaps", "mine"), ("export", "mine", "-o", str(tmp_path / "x.flac")), ("resume", "mine", "--give-up-after", "30")):
            assert_clean_error(scribe(*args, "--server", url, "--token", "t"), ExitCode.UNREACHABLE,
                               "does not look like a scribe-server")
        listed = scribe("sessions", "--server", url, "--token", "t")
        assert listed.returncode == 0 and "mine" in listed.stdout and "does not look like" in listed.stdout
    finally:
        httpd.shutdown()
    assert len(json.loads(scribe("pending", "mine", "--json").stdout)["chunks"]) == 2
