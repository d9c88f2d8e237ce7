"""Security and bad input against a live server: fuzzing, traversal, tokens, limits, disk full."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest
import requests
import socketio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scribe_protocol as proto
from tests.wire import call, connected, payload, run, stored_files

ERROR_CODES = {code.value for code in proto.ErrorCode}
VALID_SESSIONS = ["fz-a", "fz-b"]

session_ids = st.one_of(st.sampled_from(VALID_SESSIONS), st.text(max_size=70),
                        st.sampled_from(["../x", "..", "/etc/passwd", "a/../../b", "x\x00y", "ａｂｃ", "..／x", ""]))
numbers = st.one_of(st.integers(min_value=-5, max_value=2**31 + 5), st.integers(min_value=0, max_value=50),
                    st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=5))
audio = st.one_of(st.binary(min_size=0, max_size=300), st.text(max_size=20), st.none(), st.integers(),
                  st.lists(st.integers(min_value=0, max_value=255), max_size=5))
chunk_payloads = st.fixed_dictionaries(
    {"sessionId": session_ids, "sequence": numbers, "audio": audio},
    optional={"size": numbers, "mimeType": st.one_of(st.sampled_from(["audio/wav", "audio/webm;codecs=opus",
                                                                      "text/html", "audio/wav; x=\"<script>\""]),
                                                     st.text(max_size=30), st.integers()),
              "checksum": st.one_of(st.text(max_size=70), st.just("0" * 64), st.integers()),
              "durationMs": numbers, "timestamp": numbers, "extra": st.text(max_size=10)},
)
# Mostly well-formed chunks, so that acks (and duplicates and conflicts) are reached often,
# not only refusals: fully random payloads are valid about once in 200 cases.
valid_chunks = st.fixed_dictionaries(
    {"sessionId": st.sampled_from(VALID_SESSIONS), "sequence": st.integers(min_value=0, max_value=50),
     "audio": st.binary(min_size=1, max_size=300)},
    optional={"mimeType": st.sampled_from(["audio/wav", "audio/webm;codecs=opus"]),
              "durationMs": st.integers(min_value=0, max_value=10_000), "timestamp": numbers},
)
any_payload = st.one_of(chunk_payloads, st.none(), st.integers(), st.text(max_size=20),
                        st.lists(st.integers(), max_size=3), st.binary(max_size=20))
state_payloads = st.one_of(any_payload, st.fixed_dictionaries(
    {"sessionId": session_ids}, optional={"seqs": st.one_of(st.lists(numbers, max_size=5), numbers)}))
finish_payloads = st.one_of(any_payload, st.fixed_dictionaries({"sessionId": session_ids, "lastSeq": numbers}))


def test_fuzzed_payloads_over_a_live_connection(server):
    """1,200 generated audio-chunk / session-state / session-finish payloads: every reply is an ok
    or an error ack with a known code, the server stays healthy, and only acked chunks exist."""
    client = socketio.Client(reconnection=False)
    client.connect(server.url, auth={"token": server.alice}, transports=["websocket"])
    acked: dict[tuple[str, int], str] = {}
    seen = {"cases": 0}

    def check(reply):
        assert isinstance(reply, dict) and set(reply) >= {"ok"}
        if not reply["ok"]:
            assert reply["error"]["code"] in ERROR_CODES
            assert "Traceback" not in reply["error"]["message"] and str(server.data_dir) not in reply["error"]["message"]

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.tuples(st.just("audio-chunk"), chunk_payloads), st.tuples(st.just("audio-chunk"), any_payload),
                     st.tuples(st.just("audio-chunk"), valid_chunks),
                     st.tuples(st.just("session-state"), state_payloads),
                     st.tuples(st.just("session-finish"), finish_payloads)))
    def one(case):
        event, data = case
        seen["cases"] += 1
        reply = client.call(event, data, timeout=10)
        check(reply)
        if event == "audio-chunk" and reply["ok"]:
            acked[(data["sessionId"], data["sequence"])] = hashlib.sha256(data["audio"]).hexdigest()

    for _ in range(3):
        one()
    client.disconnect()
    assert seen["cases"] >= 1000 and acked, "the fuzzer must reach both outcomes"
    assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
    audio_dir = server.data_dir / "audio" / "@alice"
    # Random text is sometimes a valid session id: such a session may be stored too.
    acked_sessions = {session for session, _ in acked}
    assert {p.name for p in (server.data_dir / "audio").iterdir()} <= {"@alice", ".instances"}
    assert {p.name for p in audio_dir.iterdir()} <= set(VALID_SESSIONS) | acked_sessions
    for session in set(VALID_SESSIONS) | acked_sessions:
        resp = server.get(f"/api/sessions/{session}", server.alice)
        held = {(session, c["sequence"]): c["sha256"] for c in resp.json()["chunks"]} if resp.ok else {}
        assert held == {k: v for k, v in acked.items() if k[0] == session}
        assert len(stored_files(server.data_dir, session)) == len(held)
    assert not list(audio_dir.glob("*/.*.tmp"))


@pytest.mark.parametrize("bad", ["../x", "..", ".", "/etc/passwd", "a/../../b", "x\x00y", "ａｂｃ", "..／x",
                                 "a" * 65, "-leading", "sp ace", "ünïcode", "C:\\x"])
def test_path_traversal_ids_are_rejected(server, bad):
    """Traversal and look-alike ids are refused everywhere; nothing appears outside DATA_DIR/audio."""
    before = {p for p in server.data_dir.parent.rglob("*")}

    async def go():
        async with connected(server.url, server.alice) as sio:
            return (await call(sio, "audio-chunk", payload(bad, 0, b"data")),
                    await call(sio, "session-finish", {"sessionId": bad, "lastSeq": 1}),
                    await call(sio, "session-state", {"sessionId": bad}))

    for reply in run(go()):
        assert reply["ok"] is False and reply["error"]["code"] == "invalid_session_id"
    quoted = requests.utils.quote(bad, safe="")
    assert server.get(f"/api/sessions/{quoted}/missing-chunks", server.alice).status_code == 404
    after = {p for p in server.data_dir.parent.rglob("*")}
    new = {p for p in after - before if not p.name.endswith((".log", "-wal", "-shm", ".db-journal"))}
    assert new == set()


def test_revoked_token_is_refused_and_open_connections_are_closed(server):
    """token revoke: new connections refused at once, an open one closed within seconds."""
    bob = server.token("bob")
    client = socketio.Client(reconnection=False)
    client.connect(server.url, auth={"token": bob}, transports=["websocket"])
    assert client.call("audio-chunk", payload("bobs", 0, b"x"), timeout=5)["ok"]
    from tests.conftest import run_server_cli

    assert run_server_cli("token", "revoke", "bob", data_dir=server.data_dir).returncode == 0
    with pytest.raises(socketio.exceptions.ConnectionError):
        socketio.Client(reconnection=False).connect(server.url, auth={"token": bob}, transports=["websocket"])
    deadline = time.monotonic() + 8
    while client.connected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not client.connected
    assert server.get("/api/sessions", bob).status_code == 401


def test_failed_authentication_is_slowed_down(server):
    """Repeated bad tokens from one address are answered more and more slowly."""
    timings = []
    for _ in range(7):
        started = time.monotonic()
        assert server.get("/api/sessions", "scr_bad-token-guess").status_code == 401
        timings.append(time.monotonic() - started)
    assert timings[0] < 0.5 and timings[-1] >= 1.0


def test_limits_in_flight_sessions_and_connections(server_factory):
    """--max-in-flight answers a transient back-off; --max-sessions-per-token and --max-connections refuse."""
    srv = server_factory(extra_args=("--max-in-flight", "2", "--max-sessions-per-token", "2",
                                     "--max-connections", "2"))
    token = srv.token("alice")
    srv.start()

    async def go():
        async with connected(srv.url, token) as sio:
            burst = [call(sio, "audio-chunk", payload("lim", seq, os.urandom(400_000))) for seq in range(12)]
            import asyncio

            replies = await asyncio.gather(*burst)
            second = await call(sio, "audio-chunk", payload("lim2", 0, b"a"))
            third = await call(sio, "audio-chunk", payload("lim3", 0, b"a"))
            async with connected(srv.url, token):
                try:
                    async with connected(srv.url, token):
                        refused = False
                except socketio.exceptions.ConnectionError:
                    refused = True
            return replies, second, third, refused

    replies, second, third, refused = run(go())
    codes = [r["error"]["code"] for r in replies if not r["ok"]]
    assert codes and set(codes) == {"too_many_in_flight"}
    assert proto.ErrorCode("too_many_in_flight").transient
    assert second["ok"] and third["error"]["code"] == "too_many_sessions"
    assert refused


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 4 MiB filesystem (tmpfs), to run out of space for real."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> Path:
    filler = path / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_server_disk_full_is_a_transient_error_with_nothing_stored(server_factory, tiny_disk):
    """ENOSPC while storing: transient error ack, no partial file, no row; the retry succeeds once space is back."""
    srv = server_factory(name="tiny/server")
    token = srv.token("alice")
    srv.start()
    data = os.urandom(500_000)

    async def send(seq):
        async with connected(srv.url, token) as sio:
            return await call(sio, "audio-chunk", payload("full", seq, data))

    assert run(send(0))["ok"]
    filler = fill(tiny_disk)
    reply = run(send(1))
    assert reply["ok"] is False and reply["error"]["code"] == "storage_unavailable"
    assert proto.ErrorCode(reply["error"]["code"]).transient
    assert len(stored_files(srv.data_dir, "full")) == 1
    assert not list((srv.data_dir / "audio").glob("*/*/.*.tmp"))
    filler.unlink()
    assert run(send(1))["ok"]
    assert srv.get("/api/sessions/full", token).json()["totalChunks"] == 2


def _reserve(disk: Path) -> Path:
    """Room kept aside so the test can open the spool again once the disk is full."""
    reserve = disk / "reserve"
    reserve.write_bytes(b"\0" * 512 * 1024)
    return reserve


def _spool_intact(home: Path) -> int:
    from scribe_cli.spool import Spool

    (home / "reserve").unlink()
    with Spool(home / "spool") as spool:
        chunks = spool.chunks()
        for meta in chunks:
            assert spool.read_audio(meta) is not None
        assert spool.quarantined() == []
        return len(chunks)


def test_client_disk_full_while_recording_stops_cleanly(tiny_disk, tmp_path):
    """The spool's disk fills during `scribe record`: exit 8 with Error/Try; every spooled chunk is intact."""
    from tests.test_client_upload import scribe
    from tests.test_record import ASOUNDRC

    import numpy as np

    home = tmp_path / "alsa"
    home.mkdir()
    (np.arange(16000 * 20) % 999).astype("<i2").tofile(home / "src.raw")
    (home / ".asoundrc").write_text(ASOUNDRC.format(infile=home / "src.raw"))
    _reserve(tiny_disk)
    result = scribe("record", "--offline", "--session", "big", "--format", "wav", "--chunk-seconds", "1",
                    "--duration", "400", HOME=str(home), SCRIBE_HOME=str(tiny_disk), timeout=120)
    assert result.returncode == 8, result.stderr
    assert result.stderr.splitlines()[0].startswith("Error: the disk under the spool is full")
    assert "Traceback" not in result.stderr
    assert _spool_intact(tiny_disk) >= 5


def test_client_disk_full_stops_watch_taking_files(tiny_disk, tmp_path):
    """The spool's disk fills during `scribe watch`: it stops taking files, exit 8, the spool is intact."""
    import io

    import numpy as np
    import soundfile as sf

    from tests.test_client_upload import scribe

    folder = tmp_path / "rec"
    folder.mkdir()
    for i in range(8):
        buf = io.BytesIO()
        sf.write(buf, np.random.default_rng(i).integers(-9000, 9000, (16000 * 20, 1), dtype=np.int16), 16000,
                 format="WAV", subtype="PCM_16")
        (folder / f"{i:02d}.wav").write_bytes(buf.getvalue())
    _reserve(tiny_disk)
    result = scribe("watch", str(folder), "--once", "--offline", "--format", "wav", "--settle", "0.1",
                    SCRIBE_HOME=str(tiny_disk), timeout=120)
    assert result.returncode == 8, result.stderr
    assert "Error: the disk under the spool is full" in result.stderr and "Traceback" not in result.stderr
    taken = _spool_intact(tiny_disk)
    assert 0 < taken < 8 * 2


def test_a_connection_made_while_revocations_are_checked_is_not_taken_for_revoked():
    """The revocation watcher asks the database which tokens of the open connections are still
    active; a connection made while it waits for the answer (its token was not asked about) must
    not be disconnected for being missing from that answer (seen as a recorder cut off at its
    first chunk under load: the 2-node load benchmark)."""
    import asyncio
    import threading

    from scribe_server.config import ServerConfig
    from scribe_server.events import Connection, EventHandlers
    from scribe_server.store.tokens import Principal

    asked = threading.Event()
    answer = threading.Event()

    class Tokens:
        def active_ids(self, ids):
            asked.set()
            answer.wait(10)
            return set(ids)  # every token asked about is active

    class Sio:
        disconnected: list = []

        def on(self, *args):
            pass

        async def disconnect(self, sid):
            self.disconnected.append(sid)

    async def scenario():
        handlers = EventHandlers(Sio(), None, Tokens(), ServerConfig(data_dir=Path("."), revoke_check_seconds=0.01),
                                 None)
        handlers.connections["old"] = Connection(Principal(1, "alice"), "127.0.0.1")
        watcher = asyncio.create_task(handlers.watch_revocations())
        await asyncio.to_thread(asked.wait, 10)
        handlers.connections["new"] = Connection(Principal(2, "bob"), "127.0.0.1")  # connects meanwhile
        answer.set()
        await asyncio.sleep(0.2)  # the answer is applied, and the next rounds ask about both
        watcher.cancel()
        return handlers

    handlers = asyncio.run(scenario())
    assert Sio.disconnected == [] and set(handlers.connections) == {"old", "new"}
