"""Start-up of the read-only commands: what they import, and the GET they make without requests (issue 16).

Timing is measured by bench/startup.py, never asserted here: these tests pin the
behaviour that keeps start-up short (no upload, audio, pydantic or requests
modules in `pending`, `gaps`, `sessions`, `--help`) and that the http.client GET
of `gaps` and `sessions` answers exactly as requests did.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from scribe_cli.api import Api, _plain_get
from tests.test_client_upload import fill_spool, scribe

#: Modules no read-only command needs: the uploader's stack, audio, the server, requests, typer's pydantic.
HEAVY = ("requests", "urllib3", "pydantic", "pydantic_core", "socketio", "engineio", "aiohttp", "asyncio", "numpy",
         "soundfile", "sounddevice", "sqlalchemy", "scribe_cli.upload", "scribe_server")


def imported(*args: str, env: dict) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime -m scribe_cli ARGS`; the result and the names of every module it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "scribe_cli", *args], capture_output=True,
                            text=True, timeout=120, env=env)
    names = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", result.stderr, re.M))
    assert "scribe_cli.cli" in names, result.stderr[-2000:]
    return result, names


def test_read_only_commands_import_no_heavy_module(server):
    """`pending`, `gaps`, `sessions` (tables, --json) and `--help` import no uploader, audio, requests, pydantic."""
    fill_spool("uploaded", 3)
    assert scribe("resume", "uploaded", "--server", server.url, "--token", server.alice, "--json").returncode == 0
    fill_spool("waiting", 2, final=False)
    env = {**os.environ, "SCRIBE_SERVER": server.url, "SCRIBE_TOKEN": server.alice}
    for args in (["--help"], ["pending"], ["pending", "--json"], ["gaps", "uploaded"], ["gaps", "uploaded", "--json"],
                 ["sessions"], ["sessions", "--json"]):
        result, names = imported(*args, env=env)
        assert result.returncode == 0, (args, result.stderr[-2000:])
        heavy = {name for name in names if name.split(".")[0] in HEAVY or name in HEAVY}
        assert not heavy, (args, sorted(heavy))
        if "--json" in args or "--help" in args:
            assert not {name for name in names if name.split(".")[0] == "rich"}, args
    result, _ = imported("gaps", "uploaded", "--json", env=env)
    assert json.loads(result.stdout)["found"] is True and json.loads(result.stdout)["totalChunks"] == 3
    result, _ = imported("sessions", "--json", env=env)
    assert [s["sessionId"] for s in json.loads(result.stdout)["server"]] == ["uploaded"]
    assert "waiting" in [s["session"] for s in json.loads(result.stdout)["local"]]


def test_resume_with_its_default_numbers_skips_pydantic_and_typed_numbers_are_still_checked(server):
    """Numbers left at their defaults pass typer's check without pydantic (~70 ms of every
    `scribe resume`); numbers typed on the command line, and bounded ones, keep typer's checks."""
    fill_spool("numbers", 3)
    env = {**os.environ, "SCRIBE_SERVER": server.url, "SCRIBE_TOKEN": server.alice}
    result, names = imported("resume", "numbers", "--json", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["uploaded"] is True
    assert not {name for name in names if name.split(".")[0] in ("pydantic", "pydantic_core")}
    typed = scribe("resume", "numbers", "--window", "8", "--give-up-after", "5.5", "--json",
                   SCRIBE_SERVER=server.url, SCRIBE_TOKEN=server.alice)
    assert typed.returncode == 0 and json.loads(typed.stdout)["uploaded"] is True, typed.stderr[-2000:]
    bad = scribe("resume", "numbers", "--window", "many")
    assert bad.returncode == 2 and "--window" in bad.stderr and "valid integer" in bad.stderr, bad.stderr
    out_of_range = scribe("watch", ".", "--chunk-bytes", "100")
    assert out_of_range.returncode == 2 and "--chunk-bytes" in out_of_range.stderr, out_of_range.stderr
    assert "greater than or equal to 4096" in out_of_range.stderr, out_of_range.stderr


def test_config_file_is_still_read(server, tmp_path):
    """tomllib comes only with a SCRIBE_HOME/config.toml: its server and token are used, a broken one exits 9."""
    home = tmp_path / "client-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(f'server = "{server.url}"\ntoken = "{server.alice}"\n')
    fill_spool("from-config", 2)
    assert scribe("resume", "from-config", "--json").returncode == 0
    result = scribe("sessions", "--json")
    assert [s["sessionId"] for s in json.loads(result.stdout)["server"]] == ["from-config"], result.stderr
    (home / "config.toml").write_text("server = \n")
    result = scribe("sessions")
    assert result.returncode == 9 and "is not valid TOML" in result.stderr, result.stderr


# The GET without requests answers as requests did --------------------------------------------------------------

def _response(status: str, headers: dict, body: bytes) -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Content-Length": str(len(body)), **headers}.items())
    return f"HTTP/1.1 {status}\r\n{head}Connection: close\r\n\r\n".encode() + body


OK_BODY = json.dumps({"sessionId": "x", "missingCount": 0, "note": "caf\u00e9"}).encode()

#: What the raw server does for GET /api/sessions/<scenario>: bytes to send, or an action.
SCENARIOS = {
    "ok": _response("200 OK", {"Content-Type": "application/json; charset=utf-8"}, OK_BODY),
    "json-no-charset": _response("200 OK", {"Content-Type": "application/json"}, OK_BODY),
    "no-content-type": _response("200 OK", {}, OK_BODY),
    "latin1": _response("200 OK", {"Content-Type": "application/json; charset=iso-8859-1"},
                        '{"note": "caf\u00e9"}'.encode("latin-1")),
    "chunked": (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                b"Connection: close\r\n\r\n" + f"{len(OK_BODY):x}\r\n".encode() + OK_BODY + b"\r\n0\r\n\r\n"),
    "gzip": _response("200 OK", {"Content-Type": "application/json", "Content-Encoding": "gzip"},
                      gzip.compress(OK_BODY)),
    "redirect": _response("302 Found", {"Location": "/api/sessions/ok"}, b""),
    "not-json": _response("200 OK", {"Content-Type": "text/html"}, b"<html>hello</html>"),
    "empty": _response("200 OK", {"Content-Type": "application/json"}, b""),
    "401": _response("401 Unauthorized", {"Content-Type": "application/json"}, b'{"error": {"message": "no"}}'),
    "404": _response("404 Not Found", {"Content-Type": "application/json"}, b'{"error": {"message": "none"}}'),
    "409": _response("409 Conflict", {"Content-Type": "application/json"}, b'{"error": {"message": "gaps"}}'),
    "418": _response("418 I'm a teapot", {"Content-Type": "application/json"},
                     b'{"error": {"message": "short; and stout"}}'),
    "500-json": _response("500 Internal Server Error", {"Content-Type": "application/json"},
                          b'{"error": {"message": "boom"}}'),
    "502-html": _response("502 Bad Gateway", {"Content-Type": "text/html"}, "<h1>d\u00e9j\u00e0</h1>".encode()),
    "503-binary": _response("503 Busy", {}, bytes(range(256))),
    "close": "close",
    "reset": "reset",
    "garbage": b"HELLO THERE\r\n\r\n",
    "truncated": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\": 1",
    "stall-headers": "stall",
    "stall-body": (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\"", "stall"),
}


class RawServer:
    """A loopback HTTP server answering each scenario with exactly the bytes (or failure) it names."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                data = conn.recv(65536)
                if not data:
                    return
                request += data
            scenario = request.split(b" ")[1].decode().rsplit("/", 1)[-1]
            action = SCENARIOS[scenario]
            if isinstance(action, tuple):
                conn.sendall(action[0])
                action = action[1]
            if action == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            elif action == "stall":
                conn.settimeout(30)
                try:
                    conn.recv(1)  # until the client gives up and closes
                except OSError:
                    pass
            elif isinstance(action, bytes):
                conn.sendall(action)

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


def outcome(url: str, scenario: str):
    """What `Api.session` gives back or raises: the value, or the exception's class, message and hint."""
    try:
        return "value", Api(url, "token", timeout=1.0).session(scenario)
    except Exception as exc:  # noqa: BLE001 - the point is to compare whatever happens
        return f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc), getattr(exc, "hint", None)


@pytest.fixture(scope="module")
def raw_server():
    server = RawServer()
    yield server
    server.close()


@pytest.mark.parametrize("scenario", [*SCENARIOS, "refused"])
def test_plain_get_answers_as_requests_did(raw_server, scenario, monkeypatch):
    """Every answer and failure (status, decoding, reset, timeout, refused) ends as it does through requests."""
    url = raw_server.url
    if scenario == "refused":
        probe = socket.create_server(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
        probe.close()
    for name in [name for name in os.environ if name.lower().endswith(("_proxy", "netrc"))]:
        monkeypatch.delenv(name)
    if scenario not in ("redirect", "gzip"):  # taken by http.client, not handed to requests
        try:
            assert _plain_get(url, f"/api/sessions/{scenario}", "token", 1.0) is not None
        except Exception as exc:  # noqa: BLE001
            assert type(exc).__name__ == "_PlainFailure", exc
    started = time.monotonic()
    plain = outcome(url, scenario)
    monkeypatch.setenv("no_proxy", "example.invalid")  # requests does every request again
    assert _plain_get(url, f"/api/sessions/{scenario}", "token", 1.0) is None
    assert outcome(url, scenario) == plain
    assert time.monotonic() - started < 30


def test_watch_of_a_card_imports_no_pydantic_numpy_or_requests(server, tmp_path):
    """`scribe watch CARD --once` with typed numbers loads neither pydantic (typer's adapters), numpy
    and libsndfile (the recorder's encoder) nor requests (its GETs go over http.client); what it
    takes is uploaded all the same, and a bad number or path still gets typer's own refusal."""
    from tests.recorder_files import zoom_bwf

    card = tmp_path / "card"
    for index in (1, 2):
        path = card / "FOLDER01" / f"ZOOM000{index}.WAV"
        path.parent.mkdir(parents=True, exist_ok=True)
        zoom_bwf(path, seed=index)
        os.utime(path, (time.time() - 3600, time.time() - 3600))  # a card back from the field
    env = {**os.environ, "SCRIBE_SERVER": server.url, "SCRIBE_TOKEN": server.alice}
    # (socketio's import tries `requests` once, refused by scribe_cli/sio.py: a name, no module)
    unwanted = ("pydantic", "pydantic_core", "numpy", "soundfile", "sounddevice", "urllib3", "requests.sessions")
    for args, uploads in ((["--offline", "--session", "field"], False), (["--session", "field"], True)):
        result, names = imported("watch", str(card), "--once", *args, "--settle", "2", "--chunk-bytes", "65536",
                                 "--drain-timeout", "30", "--json", env=env)
        assert result.returncode == 0, (args, result.stderr[-2000:])
        assert not {name for name in names if name.split(".")[0] in unwanted or name in unwanted}, args
        assert ("socketio" in names) == uploads, args  # --offline loads no uploader at all
        done = json.loads(result.stdout.splitlines()[-1])
        assert done["event"] == "done" and done["failed"] == 0 and (done["pending"] == 0) == uploads, done
    report = Api(server.url, server.alice).session("field")
    assert report["totalChunks"] > 2 and sorted(f["path"] for f in report["files"]) == [
        "FOLDER01/ZOOM0001.WAV", "FOLDER01/ZOOM0002.WAV"], report
    other = scribe("watch", str(card), "--once", "--offline", "--settle", "2e0", "--session", "other",
                   SCRIBE_HOME=str(tmp_path / "home2"))
    assert other.returncode == 0, other.stderr[-2000:]  # a number written otherwise: typer reads it
    for bad, option in ((["--settle", "soon"], "--settle"), (["--chunk-bytes", "4095"], "--chunk-bytes"),
                        (["--chunk-seconds", "0"], "--chunk-seconds")):
        refused = scribe("watch", str(card), "--once", "--offline", *bad)
        assert refused.returncode == 2 and option in refused.stderr, (bad, refused.stderr)
    missing = scribe("export", "field", "-o", str(tmp_path / "no-such-dir" / "x.wav"), "--server", server.url,
                     "--token", server.alice)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr, missing.stderr


CA_PROBE = """
import ssl
from scribe_cli import sio
import aiohttp.connector as connector
contexts = (connector._SSL_CONTEXT_VERIFIED, connector._SSL_CONTEXT_UNVERIFIED)
print([c.cert_store_stats()["x509_ca"] for c in contexts])
ssl.create_default_context()  # another context, made after the import: loaded as usual
print(ssl.create_default_context().cert_store_stats()["x509_ca"] > 0)
sio.load_deferred_certificates()
print([c.cert_store_stats() == ssl.create_default_context().cert_store_stats() for c in contexts])
"""


def test_the_socketio_client_loads_ca_certificates_only_when_asked():
    """aiohttp's two default TLS contexts are made at import with the system's CA store loaded
    (~40 ms each); scribe defers that to the first https:// connection, and then loads exactly
    what aiohttp would have (tests/test_tls.py holds the https:// path end to end)."""
    result = subprocess.run([sys.executable, "-c", CA_PROBE], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["[0, 0]", "True", "[True, True]"], result.stdout
