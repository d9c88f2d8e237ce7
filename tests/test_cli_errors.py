"""Foreseeable failures end in one `Error:` line, one `Try:` line and the documented exit code."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scribe_cli.errors import ExitCode
from scribe_server.cli import Exit as ServerExit
from tests.conftest import ROOT, run_server_cli
from tests.infra import free_port
from tests.test_client_upload import fill_spool, scribe


def server_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scribe_server", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def assert_clean_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """Exit ``code``; stderr is `Error: ...` then `Try: ...`, mentions each needle, and has no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("Error: ")]
    assert errors and lines[errors[0] + 1].startswith("Try: "), result.stderr
    for bad in ("Traceback", "Exception", "╭─", "Unclosed client session"):
        assert bad not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


@contextlib.contextmanager
def unwritable(path: Path):
    """Make ``path`` unwritable even for root (chattr +i), as a read-only mount would be."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)


def missing_modules(tmp_path: Path, *names: str) -> dict:
    """PYTHONPATH for a process in which importing ``names`` fails as if they were not installed.

    psycopg and redis are installed here (the tests need them), so their absence
    is the one boundary that cannot be real: packages that raise ModuleNotFoundError.
    """
    shadow = tmp_path / "shadow"
    for name in names:
        (shadow / name).mkdir(parents=True, exist_ok=True)
        (shadow / name / "__init__.py").write_text(f"raise ModuleNotFoundError({f'No module named {name}'!r}, name={name!r})\n")
    return {"PYTHONPATH": f"{shadow}{os.pathsep}{ROOT}"}


# scribe-server -------------------------------------------------------------------------------------------------


def test_server_without_psycopg_names_the_extra(tmp_path):
    """`token create` / `serve` with a PostgreSQL URL but no psycopg: exit 6 and `pip install 'scribe[postgres]'`."""
    env = missing_modules(tmp_path, "psycopg")
    url = "postgresql://scribe@127.0.0.1:5432/scribe"
    for args in (("token", "create", "x"), ("serve", "--port", "0")):
        result = server_cli(*args, "--data-dir", str(tmp_path / "d"), "--database-url", url, env=env)
        assert_clean_error(result, ServerExit.CONFIG, "pip install 'scribe[postgres]'")


def test_server_without_redis_names_the_extra(tmp_path):
    """`serve --redis-url` without the redis package: exit 6 and `pip install 'scribe[redis]'`."""
    result = server_cli("serve", "--port", "0", "--data-dir", str(tmp_path / "d"), "--redis-url", "redis://127.0.0.1:6379",
                        env=missing_modules(tmp_path, "redis"))
    assert_clean_error(result, ServerExit.CONFIG, "pip install 'scribe[redis]'")


def test_server_port_out_of_range_is_a_usage_error(tmp_path):
    """`serve --port 99999`: exit 2 with the valid range, no OverflowError."""
    result = server_cli("serve", "--port", "99999", "--data-dir", str(tmp_path / "d"))
    assert result.returncode == ServerExit.USAGE
    assert "--port" in result.stderr and "65535" in result.stderr and "Traceback" not in result.stderr


def test_server_flush_mode_that_does_not_exist_is_a_usage_error(tmp_path):
    """`serve --flush sometimes`: exit 2 naming the modes, before anything is opened."""
    result = server_cli("serve", "--port", "0", "--flush", "sometimes", "--data-dir", str(tmp_path / "d"))
    assert_clean_error(result, ServerExit.USAGE, "--flush", "auto, syncfs, fsync")
    assert not (tmp_path / "d").exists()


def test_server_data_dir_that_is_a_file(tmp_path):
    """A data dir that is a regular file: exit 4 naming the path."""
    path = tmp_path / "server-data"
    path.write_text("not a directory")
    for args in (("serve", "--port", "0"), ("token", "create", "x")):
        assert_clean_error(server_cli(*args, "--data-dir", str(path)), ServerExit.STORAGE, str(path), "not a directory")


def test_server_unwritable_data_dir(tmp_path):
    """An immutable (read-only) data dir: exit 4 naming the path and the reason, not an OperationalError."""
    path = tmp_path / "server-data"
    path.mkdir()
    with unwritable(path):
        for args in (("serve", "--port", "0"), ("token", "create", "x")):
            result = server_cli(*args, "--data-dir", str(path))
            assert_clean_error(result, ServerExit.STORAGE, str(path))
            assert "OperationalError" not in result.stderr
            assert re.search(r"not permitted|denied|read-only", result.stderr, re.I), result.stderr


def test_server_postgres_down(tmp_path):
    """PostgreSQL not listening: exit 4 with the driver's reason (not a class name) and no password."""
    url = f"postgresql://scribe:s3cret@127.0.0.1:{free_port()}/scribe"
    for args in (("serve", "--port", "0"), ("token", "create", "x")):
        result = server_cli(*args, "--data-dir", str(tmp_path / "d"), "--database-url", url)
        assert_clean_error(result, ServerExit.STORAGE, "refused", "PostgreSQL")
        assert "s3cret" not in result.stderr


# scribe -------------------------------------------------------------------------------------------------------


def test_bad_port_in_scribe_server_is_a_config_error():
    """SCRIBE_SERVER with port 99999: exit 9 at once, naming the URL."""
    started = time.monotonic()
    result = scribe("follow", "s", "--token", "t", SCRIBE_SERVER="http://127.0.0.1:99999", timeout=60)
    assert_clean_error(result, ExitCode.CONFIG, "http://127.0.0.1:99999", "port")
    assert time.monotonic() - started < 20


def test_follow_unknown_session_exits_6_at_once(server):
    """`scribe follow nosuch`: exit 6 within seconds, not after 30 s."""
    started = time.monotonic()
    result = scribe("follow", "nosuch", "--server", server.url, "--token", server.alice, timeout=60)
    assert_clean_error(result, ExitCode.NOT_FOUND, "nosuch")
    assert time.monotonic() - started < 15


def test_follow_server_down_leaves_no_unclosed_session_warning():
    """`scribe follow` against a closed port: exit 3 and no aiohttp "Unclosed client session" warning."""
    result = scribe("follow", "s", "--server", f"http://127.0.0.1:{free_port()}", "--token", "t", timeout=60)
    assert_clean_error(result, ExitCode.UNREACHABLE, "cannot reach")


def test_no_token_exits_auth():
    """Commands that need a token exit 4 (auth) when none is set, as the docs say."""
    for args in (("follow", "s"), ("gaps", "s"), ("resume", "s"), ("export", "s", "-o", "x.flac")):
        assert_clean_error(scribe(*args, timeout=60), ExitCode.AUTH, "no token")


def test_unusable_format_and_rate_are_config_errors(tmp_path):
    """`watch --format mp3` and `record --format opus --rate 44100` exit 9 before touching any device."""
    folder = tmp_path / "rec"
    folder.mkdir()
    assert_clean_error(scribe("watch", str(folder), "--format", "mp3", "--offline"), ExitCode.CONFIG, "mp3")
    result = scribe("record", "--format", "opus", "--rate", "44100", "--offline", "--duration", "1")
    assert_clean_error(result, ExitCode.CONFIG, "44100")


def test_unreachable_server_is_said_once(tmp_path):
    """A resume against a closed port says "cannot reach" once, with a plain reason, exit 3."""
    fill_spool("down", 2)
    result = scribe("resume", "down", "--server", f"http://127.0.0.1:{free_port()}", "--token", "t",
                    "--give-up-after", "1", timeout=90)
    assert_clean_error(result, ExitCode.UNREACHABLE)
    assert result.stderr.count("cannot reach") == 1, result.stderr
    assert "refused" in result.stderr


def test_server_url_ending_in_api_is_normalised(server):
    """--server http://host:port/api/ works as the server's root URL."""
    fill_spool("apiurl", 3)
    result = scribe("resume", "apiurl", "--server", server.url + "/api/", "--token", server.alice)
    assert result.returncode == 0, result.stderr
    gaps = scribe("gaps", "apiurl", "--server", server.url + "/api", "--token", server.alice, "--json")
    assert gaps.returncode == 0 and json.loads(gaps.stdout)["totalChunks"] == 3


def test_read_only_scribe_home(tmp_path, monkeypatch):
    """A read-only SCRIBE_HOME: `pending` and `sessions` still list it; a writing command says why, exit 8."""
    home = tmp_path / "ro-home"
    monkeypatch.setenv("SCRIBE_HOME", str(home))
    fill_spool("kept", 3, final=False)
    folder = tmp_path / "rec"
    folder.mkdir()
    spool = home / "spool"
    with unwritable(home), unwritable(spool):
        listed = scribe("pending", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [c["seq"] for c in json.loads(listed.stdout)["chunks"]] == [0, 1, 2]
        people = scribe("sessions")
        assert people.returncode == 0 and "kept" in people.stdout, people.stderr
        result = scribe("watch", str(folder), "--once", "--offline")
        assert_clean_error(result, ExitCode.DISK, "read-only", str(home))
        checked = scribe("fsck", "--dry-run", "--json")  # reports only: reading is enough
        assert checked.returncode == 0, checked.stderr
        assert json.loads(checked.stdout)["missingAudio"] == []
        assert_clean_error(scribe("fsck"), ExitCode.DISK, "read-only")
    with unwritable(tmp_path):
        empty = scribe("pending", SCRIBE_HOME=str(tmp_path / "never-created"))
        assert empty.returncode == 0 and "empty" in empty.stdout, empty.stderr


def test_rejected_file_shows_path_and_plain_reason(tmp_path):
    """A file that is not audio is reported with its path and a plain reason, no object repr."""
    folder = tmp_path / "rec"
    folder.mkdir()
    (folder / "notes.wav").write_text("field notes, not audio")
    result = scribe("watch", str(folder), "--once", "--offline", "--settle", "0.1", "--json")
    assert result.returncode == ExitCode.INCOMPLETE, result.stderr  # --once: a rejected file is not "done"
    (rejected,) = [e for e in map(json.loads, result.stdout.splitlines()) if e.get("event") == "rejected"]
    assert rejected["path"] == str(folder / "notes.wav")
    assert rejected["reason"] == "not decodable audio (format not recognised)"
    other = tmp_path / "rec2"
    other.mkdir()
    (other / "notes.wav").write_text("field notes, not audio")
    people = scribe("watch", str(other), "--once", "--offline", "--settle", "0.1")
    assert f"skipped {other / 'notes.wav'}: not decodable audio (format not recognised)" in people.stderr
    assert "<_io" not in people.stderr and "object at 0x" not in people.stderr


def test_json_error_object_on_stdout():
    """With --json a failure still prints {"error": {code, message, hint}} on stdout, plus Error/Try on stderr."""
    result = scribe("gaps", "s", "--json")
    assert_clean_error(result, ExitCode.AUTH)
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "auth" and error["message"] == "no token is set" and "SCRIBE_TOKEN" in error["hint"]


def test_follow_json_into_a_closed_pipe(server):
    """`scribe follow S --json | head -1`: exit 141 quietly once the reader is gone, no BrokenPipeError."""
    fill_spool("piped", 4)
    assert scribe("resume", "piped", "--server", server.url, "--token", server.alice).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "scribe_cli", "follow", "piped", "--forever", "--json",
                             "--server", server.url, "--token", server.alice],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    assert json.loads(first)["event"] in ("following", "state")
    proc.stdout.close()
    try:
        code = proc.wait(30)
    finally:
        proc.kill()
    stderr = proc.stderr.read()
    assert code == ExitCode.PIPE_CLOSED, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Error:" not in stderr


def test_documented_exit_codes_match_the_enums():
    """docs/operations.md lists exactly the ExitCode values of scribe and the Exit values of scribe-server."""
    text = (ROOT / "docs" / "operations.md").read_text()
    server_part = text[text.index("Server exit codes"):text.index("## The client")]
    client_part = text[text.index("### Exit codes"):]

    def table(part: str) -> dict[int, str]:
        return {int(code): name for code, name in re.findall(r"^\| (\d+) \| (\w+) \|", part, re.M)}

    assert table(client_part) == {int(c): c.name.lower() for c in ExitCode}
    assert table(server_part) == {int(c): c.name.lower() for c in ServerExit}


def test_proxy_stop_with_open_links_logs_nothing(server, caplog):
    """Stopping the chaos fault proxy while links are open logs no "Exception in callback ... CancelledError"."""
    from scribe_cli.chaos.proxy import FaultProxy

    caplog.set_level(logging.DEBUG, logger="asyncio")
    for _ in range(3):
        proxy = FaultProxy("127.0.0.1", server.port).start()
        links = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10) for _ in range(3)]
        for link in links:
            link.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert link.recv(1024).startswith(b"HTTP/1.1 200")
        proxy.stop()
        for link in links:
            link.close()
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not errors, [r.getMessage() for r in errors]


def test_json_error_ends_a_stream_or_is_the_document(server):
    """With --json a stream's last line carries the error; an error before any output is the one document."""
    result = scribe("follow", "nosuch", "--json", "--server", server.url, "--token", server.alice)
    assert result.returncode == ExitCode.NOT_FOUND
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[-1]["error"]["code"] == "not_found"
    assert all("event" in line for line in lines) or len(lines) == 1
    fill_spool("half", 3)
    result = scribe("resume", "half", "--server", f"http://127.0.0.1:{free_port()}", "--token", server.alice,
                    "--give-up-after", "1", "--json")
    assert result.returncode == ExitCode.UNREACHABLE
    assert json.loads(result.stdout)["error"]["code"] == "unreachable"
