"""Hostile clients against a live server (issue 13): each test runs one attack on loopback,
bounded in count and time, and checks the server's limit holds and it stays healthy."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid

import aiohttp
import numpy as np
import pytest
import requests
import soundfile as sf

import scribe_protocol as proto
from tests.wire import call, connected, payload, run


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """The server's resident memory (VmRSS) or its peak so far (VmHWM), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def metric(server, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", requests.get(server.url + "/metrics", timeout=10).text, re.M)
    return float(match.group(1))


class RawSocketIO:
    """A hand-driven Engine.IO v4 / Socket.IO v5 WebSocket, to send what real clients never would."""

    def __init__(self, url: str):
        self.url = url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"

    async def __aenter__(self) -> "RawSocketIO":
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(self.url, timeout=aiohttp.ClientWSTimeout(ws_close=10))
        opening = await self.ws.receive(timeout=10)
        assert opening.data.startswith("0{"), opening
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()
        await self.session.close()

    async def send(self, text: str) -> None:
        await self.ws.send_str(text)

    async def receive(self, timeout: float = 10) -> str | None:
        """The next Socket.IO packet (answering Engine.IO pings), None once closed."""
        while True:
            msg = await self.ws.receive(timeout=timeout)
            if msg.type != aiohttp.WSMsgType.TEXT or msg.data == "1":  # "1": Engine.IO close
                return None
            if msg.data == "2":
                await self.ws.send_str("3")
                continue
            return msg.data

    async def connect(self, token: str) -> str | None:
        await self.send("40" + json.dumps({"token": token}))
        return await self.receive()

    async def closed_within(self, seconds: float) -> bool:
        """True when the server closes this socket within ``seconds`` (other packets are skipped)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if await self.receive(timeout=max(0.1, deadline - time.monotonic())) is None:
                    return True
            except asyncio.TimeoutError:
                return False
            except (aiohttp.ClientError, ConnectionError):
                return True
        return False


# 5. reserved event names -----------------------------------------------------------------------

def test_clients_cannot_fire_connect_or_disconnect(server_factory):
    """42["disconnect"] and 42["connect", {spoofed environ}, {bad token}] reach no handler: the
    connection stays registered and usable, and no failed login is recorded against anyone."""
    srv = server_factory(extra_args=("--max-connections", "3"))
    token = srv.alice = srv.token("alice")
    srv.start()

    async def go():
        async with RawSocketIO(srv.url) as raw:
            assert (await raw.connect(token)).startswith("40{")
            for _ in range(20):
                await raw.send('42["disconnect"]')
                await raw.send('42["connect",{"REMOTE_ADDR":"127.0.0.1"},{"token":"scr_bad-guess-xxxx"}]')
                await raw.send('42["connect_error",{}]')
            await raw.send('421["session-state",{"sessionId":"still-here"}]')
            reply = await raw.receive()
            gauge = metric(srv, "scribe_connections")
            failures = metric(srv, "scribe_auth_failures_total")
            async with connected(srv.url, token), connected(srv.url, token):
                refused = False
                try:
                    async with connected(srv.url, token):
                        pass
                except Exception:
                    refused = True
            started = time.monotonic()
            async with connected(srv.url, token):
                login = time.monotonic() - started
            return reply, gauge, failures, refused, login

    reply, gauge, failures, refused, login = run(go())
    assert reply.startswith("431[") and '"not_found"' in reply, "the connection still works"
    assert gauge == 1, "the connection was not unregistered"
    assert failures == 0, "no auth failure was recorded"
    assert refused, "--max-connections 3 still counts the attacker's connection"
    assert login < 1.0, "logins from the spoofed address are not slowed down"


# 2. memory: attachments, bytes in flight, export ------------------------------------------------

def test_a_binary_event_may_not_announce_more_attachments_than_it_carries(server):
    """A binary event announcing 9,999,999,999 (or 2) attachments, or a binary ack: the connection is closed before frames are buffered."""
    base = rss_kib(server.proc.pid)

    async def go():
        outcomes = []
        for header in ('459999999999-["audio-chunk",{"_placeholder":true,"num":0}]',
                       '452-["audio-chunk",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]',
                       '461-1[{"_placeholder":true,"num":0}]'):
            async with RawSocketIO(server.url) as raw:
                assert (await raw.connect(server.alice)).startswith("40{")
                await raw.send(header)
                for _ in range(8):
                    if raw.ws.closed:
                        break
                    with contextlib.suppress(Exception):
                        await raw.ws.send_bytes(b"\0" * (4 << 20))
                outcomes.append(await raw.closed_within(10))
        return outcomes

    assert run(go()) == [True, True, True]
    assert rss_kib(server.proc.pid) - base < 64 * 1024, "no attachment was held"
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200


def test_bytes_in_flight_are_bounded_per_connection_and_per_server(server_factory):
    """4 connections x 12 chunks of 2 MiB at once against 6 MiB per connection and 12 MiB in all:
    the excess gets the transient too_many_in_flight / server_busy, every ok chunk is stored, and
    the server's memory peak stays far below the 96 MiB offered."""
    srv = server_factory(extra_args=("--max-connection-bytes", str(6 << 20), "--max-in-flight-bytes", str(12 << 20)))
    token = srv.token("alice")
    srv.start()
    base = rss_kib(srv.proc.pid)

    async def go():
        async def one(index):
            async with connected(srv.url, token) as sio:
                chunks = [payload(f"flood-{index}", seq, os.urandom(2 << 20)) for seq in range(12)]
                return await asyncio.gather(*(call(sio, "audio-chunk", p, timeout=60) for p in chunks))

        return [r for replies in await asyncio.gather(*(one(i) for i in range(4))) for r in replies]

    replies = run(go())
    codes = {r["error"]["code"] for r in replies if not r["ok"]}
    assert codes and codes <= {"too_many_in_flight", "server_busy"}
    assert all(proto.ErrorCode(code).transient for code in codes)
    stored = sum(srv.get(f"/api/sessions/flood-{i}", token).json().get("totalChunks", 0) for i in range(4))
    assert stored == sum(r["ok"] for r in replies) > 0
    peak = rss_kib(srv.proc.pid, "VmHWM") - base
    assert peak < 80 * 1024, f"peak grew by {peak // 1024} MiB"


def _flac_silence(seconds: int, rate: int = 48_000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros((seconds * rate, 1), dtype=np.int16), rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def test_export_is_streamed_capped_and_head_runs_nothing(server):
    """A FLAC chunk that decodes to far more than it declared is refused (decode_limit); a long
    honest one exports with bounded memory; HEAD answers without running the export."""
    liar = _flac_silence(300)
    honest = _flac_silence(300)

    async def go():
        async with connected(server.url, server.alice) as sio:
            assert (await call(sio, "audio-chunk", payload("liar", 0, liar, mimeType="audio/flac",
                                                           durationMs=1000)))["ok"]
            assert (await call(sio, "audio-chunk", payload("honest", 0, honest, mimeType="audio/flac",
                                                           durationMs=300_000)))["ok"]
            assert (await call(sio, "audio-chunk", payload("broken", 0, b"not audio at all")))["ok"]

    run(go())
    refused = server.get("/api/sessions/liar/audio", server.alice)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "decode_limit"
    base = rss_kib(server.proc.pid, "VmHWM")
    resp = server.get("/api/sessions/honest/audio?format=wav", server.alice, stream=True)
    size = sum(len(block) for block in resp.iter_content(1 << 20))
    assert resp.status_code == 200 and size > 300 * 48_000 * 2
    assert rss_kib(server.proc.pid, "VmHWM") - base < 24 * 1024, "the export held the decoded audio in memory"
    assert server.get("/api/sessions/broken/audio", server.alice).status_code == 415
    head = requests.head(server.url + "/api/sessions/broken/audio", timeout=10,
                         headers={"Authorization": f"Bearer {server.alice}"})
    assert head.status_code == 200 and head.headers["Content-Type"] == "audio/wav", "HEAD decoded nothing"
    assert requests.head(server.url + "/api/sessions/nosuch/audio", timeout=10,
                         headers={"Authorization": f"Bearer {server.alice}"}).status_code == 404


# 1. connections before authentication --------------------------------------------------------

def _open_sockets(port: int, count: int) -> list[socket.socket]:
    out = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        out.append(s)
    return out


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_every_socket_counts_toward_the_cap(server_factory):
    """With --max-sockets 20, 20 idle sockets fill the server; the next one is answered 503
    server_busy at once; once the idle ones are reaped, requests are served again."""
    srv = server_factory(extra_args=("--max-sockets", "20", "--idle-timeout", "3"))
    srv.alice = srv.token("alice")
    srv.start()
    time.sleep(4)  # the start-up health checks' keep-alive sockets are reaped
    idle = _open_sockets(srv.port, 20)
    try:
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as extra:
            extra.settimeout(5)
            answer = extra.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503") and b'"server_busy"' in answer
        assert all(_closed_by_server(s, 10) for s in idle), "idle sockets are closed after --idle-timeout"
    finally:
        for s in idle:
            s.close()
    assert requests.get(srv.url + "/healthz", timeout=10).status_code == 200


def test_slowloris_and_silent_engineio_sockets_are_closed(server_factory):
    """Headers sent a byte at a time and an Engine.IO socket that never sends the Socket.IO connect
    are closed within their deadlines; an authenticated connection stays."""
    srv = server_factory(extra_args=("--idle-timeout", "2", "--handshake-timeout", "2"))
    srv.alice = srv.token("alice")
    srv.start()
    slow = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    closed = False
    while time.monotonic() - started < 8:
        try:
            slow.sendall(b"X")
        except OSError:
            closed = True
            break
        slow.settimeout(0.5)
        try:
            if slow.recv(1) == b"":
                closed = True
                break
        except socket.timeout:
            pass
    slow.close()
    assert closed and time.monotonic() - started < 6, "the slow header was cut off"

    async def go():
        async with RawSocketIO(srv.url) as silent, RawSocketIO(srv.url) as good:
            assert (await good.connect(srv.alice)).startswith("40{")
            silent_closed = await silent.closed_within(6)
            await good.send('421["session-state",{"sessionId":"x"}]')
            return silent_closed, await good.receive()

    silent_closed, reply = run(go())
    assert silent_closed
    assert reply is not None and reply.startswith("431[")


ATTACK = r"""
import asyncio, socket, sys, json, time
import aiohttp
port, count = int(sys.argv[1]), int(sys.argv[2])
async def main():
    idle, slow, eio = [], [], []
    for _ in range(count):
        try:
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            pass
    for _ in range(count):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        except OSError:
            pass
    session = aiohttp.ClientSession()
    async def one():
        try:
            return await session.ws_connect(f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket", timeout=5)
        except Exception:
            return None
    eio = [w for w in await asyncio.gather(*(one() for _ in range(count))) if w is not None]
    print(json.dumps({"idle": len(idle), "slow": len(slow), "eio": len(eio)}), flush=True)
    sys.stdin.readline()
    await session.close()
asyncio.run(main())
"""


def test_server_stays_healthy_under_a_socket_flood_with_nofile_256(server_factory):
    """300 idle + 300 slowloris + 300 silent Engine.IO sockets against a server limited to 256 file
    descriptors: an authenticated uploader keeps storing, no EMFILE, and it is healthy afterwards."""
    srv = server_factory(nofile=256, extra_args=("--idle-timeout", "3", "--handshake-timeout", "3"))
    srv.alice = srv.token("alice")
    srv.start()

    async def upload_during(attack_seconds: float):
        replies = []
        async with connected(srv.url, srv.alice) as sio:
            attacker = subprocess.Popen([sys.executable, "-c", ATTACK, str(srv.port), "300"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
            try:
                seq, deadline = 0, time.monotonic() + attack_seconds
                while time.monotonic() < deadline:
                    replies.append(await call(sio, "audio-chunk", payload("steady", seq, os.urandom(20_000))))
                    seq += 1
                    await asyncio.sleep(0.05)
                opened = json.loads(await asyncio.to_thread(attacker.stdout.readline))
            finally:
                attacker.communicate("\n", timeout=60)
        return replies, opened

    replies, opened = run(upload_during(8))
    assert replies and all(r["ok"] for r in replies), [r for r in replies if not r["ok"]][:3]
    assert sum(opened.values()) > 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and requests.get(srv.url + "/healthz", timeout=10).status_code != 200:
        time.sleep(0.5)
    assert requests.get(srv.url + "/healthz", timeout=10).status_code == 200
    log = srv.log_path.read_text()
    assert "Too many open files" not in log and "EMFILE" not in log


# 7. readiness and liveness -------------------------------------------------------------------

def test_readiness_says_503_with_the_reason_when_the_disk_is_full(server_factory, tiny_disk):
    """A full disk: /healthz 503 "disk full" while /livez stays 200; ready again once space is back."""
    from tests.test_security import fill

    srv = server_factory(name="tiny/server")
    srv.token("alice")
    srv.start()
    filler = fill(tiny_disk)
    time.sleep(1.2)  # past the cached answer
    resp = requests.get(srv.url + "/healthz", timeout=10)
    assert resp.status_code == 503 and resp.json() == {"status": "unavailable", "reason": "disk full"}
    assert requests.get(srv.url + "/livez", timeout=10).json() == {"status": "alive"}
    filler.unlink()
    deadline = time.monotonic() + 15
    while requests.get(srv.url + "/healthz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.3)


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 16 MiB filesystem (tmpfs), to run out of space for real."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_postgresql_outage_answers_json_everywhere(server_factory, tmp_path):
    """PostgreSQL down: /healthz 503 with the reason, /api/sessions 503 storage_unavailable in JSON,
    a new Socket.IO connection is refused with storage_unavailable (not left hanging)."""
    from tests.infra import Postgres

    pg = Postgres(tmp_path / "own-pg").start()
    try:
        srv = server_factory(database_url=pg.create_database("outage"))
        token = srv.token("alice")
        srv.start()
        pg.stop()
        time.sleep(1.2)
        health = requests.get(srv.url + "/healthz", timeout=30)
        assert health.status_code == 503 and health.json()["reason"] == "database unreachable"
        listing = srv.get("/api/sessions", token)
        assert listing.status_code == 503 and listing.json()["error"]["code"] == "storage_unavailable"

        async def attempt():
            import socketio

            client = socketio.AsyncClient(reconnection=False)
            errors = []
            client.on("connect_error", lambda data: errors.append(data))
            try:
                await client.connect(srv.url, auth={"token": token}, transports=["websocket"], wait_timeout=20)
            except socketio.exceptions.ConnectionError:
                return errors
            finally:
                await client.disconnect()
            return None

        started = time.monotonic()
        refused = run(attempt())
        assert refused is not None and time.monotonic() - started < 20
        assert "storage_unavailable" in json.dumps(refused)
        assert "Traceback" not in srv.log_path.read_text()
    finally:
        pg.stop()


# 8. unhandled input ----------------------------------------------------------------------------

@pytest.mark.parametrize("path,status", [
    ("/api/sessions/s/chunks/%C2%B2", 404), ("/api/sessions/s/chunks/" + "9" * 5000, 404),
    ("/api/sessions/s/chunks/%D9%A1", 404), ("/api/sessions/s/chunks/-1", 404), ("/api/sessions/s/chunks/1.0", 404),
    ("/api/sessions/s?limit=%D9%A1", 400), ("/api/sessions/s?after=x", 400), ("/no/such/route", 404),
])
def test_odd_paths_get_json_with_a_code(server, path, status):
    """Non-ASCII digits, huge numbers and unknown routes get a JSON error, never a text 500."""
    async def go():
        async with connected(server.url, server.alice) as sio:
            assert (await call(sio, "audio-chunk", payload("s", 1, b"one")))["ok"]

    run(go())
    resp = server.get(path, server.alice)
    assert resp.status_code == status and resp.json()["ok"] is False and resp.json()["error"]["code"]
    assert server.get("/api/sessions/s/chunks/1", server.alice).content == b"one"
    post = requests.post(server.url + "/healthz", timeout=10)
    assert post.status_code == 405 and post.json()["ok"] is False
    assert "Traceback" not in server.log_path.read_text()


# 9. pagination -------------------------------------------------------------------------------

def test_session_chunks_are_paged_and_truncation_is_explicit(server):
    """?limit=N&after=SEQ pages through chunks; chunksTruncated and nextAfter say when there is more."""
    async def go():
        async with connected(server.url, server.alice) as sio:
            await asyncio.gather(*(call(sio, "audio-chunk", payload("paged", seq, b"%d" % seq)) for seq in range(25)))

    run(go())
    seen, after, pages = [], None, 0
    while True:
        query = "?limit=10" + (f"&after={after}" if after is not None else "")
        body = server.get(f"/api/sessions/paged{query}", server.alice).json()
        seen += [c["sequence"] for c in body["chunks"]]
        pages += 1
        if not body["chunksTruncated"]:
            assert body["nextAfter"] is None
            break
        after = body["nextAfter"]
    assert seen == list(range(25)) and pages == 3
    whole = server.get("/api/sessions/paged", server.alice).json()
    assert len(whole["chunks"]) == 25 and whole["chunksTruncated"] is False


# 6. temp files without PIDs ----------------------------------------------------------------

HOLDER = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""


def test_temp_files_of_dead_writers_are_removed_at_start_even_with_a_reused_pid(server_factory):
    """Start-up removes tmp files of writer instances that hold no lock (PID reuse cannot fool it),
    and of the older host.pid naming on this host; a live writer's tmp file on a shared volume stays."""
    srv = server_factory()
    srv.alice = srv.token("alice")
    session = srv.data_dir / "audio" / "@alice" / "s"
    session.mkdir(parents=True)
    instances = srv.data_dir / "audio" / ".instances"
    instances.mkdir()
    dead, live = uuid.uuid4().hex, uuid.uuid4().hex
    (instances / f"{dead}.lock").touch()
    host = socket.gethostname().replace(".", "_")[:32]
    planted = {
        "dead": session / f".0000000001.{'a' * 16}.wav.{dead}.123{'.tmp'}",
        "old-naming-pid-1": session / f".0000000002.{'b' * 16}.wav.{host}.1.456.tmp",
        "old-naming-own-pid": session / f".0000000003.{'c' * 16}.wav.{host}.{os.getpid()}.789.tmp",
        "live": session / f".0000000004.{'d' * 16}.wav.{live}.123.tmp",
    }
    for path in planted.values():
        path.write_bytes(b"x" * 4096)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(instances / f"{live}.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        srv.start()
        left = {name for name, path in planted.items() if path.exists()}
        assert left == {"live"}
    finally:
        holder.communicate("\n", timeout=10)
    srv.kill()
    srv.start()
    assert not planted["live"].exists(), "once its writer is gone, the next start removes it"


# the private API the adapter relies on ---------------------------------------------------------

def test_the_socketio_internals_the_adapter_overrides_are_as_read():
    """sio_adapter overrides private python-socketio methods: they exist with the signatures it was
    written against, in a version inside the range pinned in pyproject.toml."""
    import inspect
    from importlib.metadata import version

    import socketio

    from scribe_server.sio_adapter import HardenedServer

    expected = {"_handle_eio_connect": ["self", "eio_sid", "environ"],
                "_handle_eio_message": ["self", "eio_sid", "data"],
                "_handle_event": ["self", "eio_sid", "namespace", "id", "data"],
                "_handle_event_internal": ["self", "server", "sid", "eio_sid", "data", "namespace", "id"]}
    for name, params in expected.items():
        assert list(inspect.signature(getattr(socketio.AsyncServer, name)).parameters) == params, name
        assert getattr(HardenedServer, name) is not getattr(socketio.AsyncServer, name)
    assert hasattr(socketio.AsyncServer(), "_binary_packet")
    major, minor = (int(x) for x in version("python-socketio").split(".")[:2])
    assert (5, 11) <= (major, minor) < (5, 19)


# 10. the client backs off, the server logs refusals rate-limited ---------------------------

def test_client_backs_off_while_storage_is_down_and_the_server_log_stays_short(server_factory, tiny_disk):
    """Disk full for 10 s under `scribe resume --window 2` with 300 chunks: a few dozen refusals,
    not thousands, a handful of log lines; once space is back everything is stored."""
    from tests.test_client_upload import fill_spool
    from tests.test_security import fill

    srv = server_factory(name="tiny/server")
    token = srv.token("alice")
    srv.start()
    filler = fill(tiny_disk)
    fill_spool("outage", 300, size=2048)
    proc = subprocess.Popen([sys.executable, "-m", "scribe_cli", "resume", "outage", "--server", srv.url,
                             "--token", token, "--window", "2", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(10)
        refusals = metric(srv, 'scribe_chunk_errors_total{code="storage_unavailable"}')
        filler.unlink()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert 0 < refusals < 200, refusals
    lines = [line for line in srv.log_path.read_text().splitlines() if "storage_unavailable" in line]
    assert len(lines) <= 6, lines
    assert srv.get("/api/sessions/outage", token).json()["totalChunks"] == 300


def _wav(seconds: float, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros((int(seconds * rate), 1), dtype=np.int16), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_export_of_chunks_with_different_rates_is_a_json_refusal(server):
    """A session whose chunks differ in sample rate exports as a 415 naming the chunk, never a 500."""
    async def go():
        async with connected(server.url, server.alice) as sio:
            assert (await call(sio, "audio-chunk", payload("mixed", 0, _wav(1, 16000), durationMs=1000)))["ok"]
            assert (await call(sio, "audio-chunk", payload("mixed", 1, _wav(1, 48000), durationMs=1000)))["ok"]

    run(go())
    resp = server.get("/api/sessions/mixed/audio?format=wav", server.alice)
    assert resp.status_code == 415, resp.text
    assert resp.json()["error"]["code"] == "unsupported_mime_type" and "chunk 1 is 48000 Hz" in resp.text
