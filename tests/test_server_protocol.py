"""The resume protocol against a real scribe-server over real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import threading
import time

import numpy as np
import pytest
import socketio
import soundfile as sf

from tests.wire import call, connected, payload, run, stored_files, temp_files


@pytest.fixture
def server(server_factory, backend):
    """This module's protocol suite runs against SQLite and PostgreSQL alike."""
    srv = server_factory(database_url=backend)
    srv.alice = srv.token("alice")
    return srv.start()


def test_same_chunk_three_times_is_stored_once(server):
    """Three copies: three ok acks, only the first is not a duplicate, one row, one file."""
    async def go():
        async with connected(server.url, server.alice) as sio:
            return [await call(sio, "audio-chunk", payload("s1", 5, b"abc" * 100)) for _ in range(3)]

    acks = run(go())
    assert [a["ok"] for a in acks] == [True] * 3
    assert [a["duplicate"] for a in acks] == [False, True, True]
    assert len({a["chunkId"] for a in acks}) == 1
    assert server.get("/api/sessions/s1", server.alice).json()["totalChunks"] == 1
    assert len(stored_files(server.data_dir, "s1")) == 1


def test_ten_copies_raced_over_five_connections(server):
    """Copies racing on several connections are all acked and stored once."""
    audio = os.urandom(50_000)

    async def go():
        clients = [socketio.AsyncClient(reconnection=False) for _ in range(5)]
        for c in clients:
            await c.connect(server.url, auth={"token": server.alice}, transports=["websocket"])
        try:
            calls = [call(clients[i % 5], "audio-chunk", payload("race", 0, audio)) for i in range(10)]
            return await asyncio.gather(*calls)
        finally:
            for c in clients:
                await c.disconnect()

    acks = run(go())
    assert all(a["ok"] for a in acks)
    assert sum(not a["duplicate"] for a in acks) == 1
    assert server.get("/api/sessions/race", server.alice).json()["totalChunks"] == 1
    files = stored_files(server.data_dir, "race")
    assert len(files) == 1 and files[0].read_bytes() == audio
    assert temp_files(server.data_dir) == []


def test_mixed_outcomes_stored_together_are_each_answered(server):
    """Chunks arriving together are stored in one batch; each copy still gets its own answer:
    new, duplicate (also within the batch), conflict (also within the batch), bad checksum,
    an id another owner also uses (a separate session), and new chunks of many sessions at once."""
    originals = {seq: os.urandom(2_000 + seq) for seq in range(40)}

    async def go():
        clients = [socketio.AsyncClient(reconnection=False) for _ in range(4)]
        for c in clients:
            await c.connect(server.url, auth={"token": server.alice}, transports=["websocket"])
        bob = socketio.AsyncClient(reconnection=False)
        await bob.connect(server.url, auth={"token": server.token("bob")}, transports=["websocket"])
        try:
            await call(bob, "audio-chunk", payload("bobs", 0, b"bob's"))
            jobs = {}
            for seq, audio in originals.items():
                jobs[("new", seq)] = call(clients[seq % 4], "audio-chunk", payload("mix", seq, audio))
                jobs[("copy", seq)] = call(clients[(seq + 1) % 4], "audio-chunk", payload("mix", seq, audio))
                jobs[("other", seq)] = call(clients[(seq + 2) % 4], "audio-chunk", payload(f"mix-{seq}", 0, audio))
            jobs[("conflict", 5)] = call(clients[3], "audio-chunk", payload("mix", 5, b"other bytes"))
            bad = payload("mix", 99, b"abc")
            bad["checksum"] = "0" * 64
            jobs[("bad", 99)] = call(clients[2], "audio-chunk", bad)
            jobs[("foreign", 0)] = call(clients[1], "audio-chunk", payload("bobs", 1, b"not yours"))
            replies = await asyncio.gather(*jobs.values())
            return dict(zip(jobs, replies))
        finally:
            for c in clients + [bob]:
                await c.disconnect()

    replies = run(go())
    assert replies[("bad", 99)]["error"]["code"] == "checksum_mismatch"
    assert replies[("foreign", 0)]["ok"] and not replies[("foreign", 0)]["duplicate"]
    assert [c["sequence"] for c in server.get("/api/sessions/bobs", server.alice).json()["chunks"]] == [1]
    for seq in originals:
        pair = [replies[("new", seq)], replies[("copy", seq)]]
        if seq != 5:
            assert all(r["ok"] for r in pair) and sorted(r["duplicate"] for r in pair) == [False, True], pair
        assert replies[("other", seq)]["ok"] and not replies[("other", seq)]["duplicate"]
    # seq 5: the original and the conflicting bytes raced; exactly one kind won, and the other was refused.
    five = [replies[("new", 5)], replies[("copy", 5)], replies[("conflict", 5)]]
    assert sum(r["ok"] and not r["duplicate"] for r in five) == 1
    stored = {c["sequence"]: c["sha256"] for c in server.get("/api/sessions/mix", server.alice).json()["chunks"]}
    assert sorted(stored) == sorted(originals)
    winner_is_original = stored[5] == hashlib.sha256(originals[5]).hexdigest()
    assert [r["ok"] for r in five] == ([True, True, False] if winner_is_original else [False, False, True])
    for seq, audio in originals.items():
        assert stored[seq] == hashlib.sha256(audio).hexdigest() or seq == 5
        assert server.get(f"/api/sessions/mix-{seq}", server.alice).json()["totalChunks"] == 1
    assert len(stored_files(server.data_dir, "mix")) == len(originals)
    assert temp_files(server.data_dir) == []


def test_conflicting_bytes_and_bad_checksum_are_refused(server):
    """Different bytes under a stored key is a conflict; a wrong checksum stores nothing."""
    async def go():
        async with connected(server.url, server.alice) as sio:
            first = await call(sio, "audio-chunk", payload("c1", 0, b"original"))
            conflict = await call(sio, "audio-chunk", payload("c1", 0, b"different"))
            bad = payload("c1", 1, b"payload")
            bad["checksum"] = hashlib.sha256(b"something else").hexdigest()
            mismatch = await call(sio, "audio-chunk", bad)
            return first, conflict, mismatch

    first, conflict, mismatch = run(go())
    assert first["ok"]
    assert conflict == {"ok": False, "sessionId": "c1", "sequence": 0,
                        "error": {"code": "conflict", "message": conflict["error"]["message"]}}
    assert mismatch["ok"] is False and mismatch["error"]["code"] == "checksum_mismatch"
    body = server.get("/api/sessions/c1", server.alice).json()
    assert [c["sequence"] for c in body["chunks"]] == [0]
    files = stored_files(server.data_dir, "c1")
    assert len(files) == 1 and files[0].read_bytes() == b"original"


def test_gaps_and_trailing_gaps_after_finish(server):
    """{0,1,3,7} misses 2,4,5,6; after session-finish at 9, 8 and 9 are missing too."""
    async def go():
        async with connected(server.url, server.alice) as sio:
            for seq in (0, 1, 3, 7):
                assert (await call(sio, "audio-chunk", payload("g1", seq, b"x%d" % seq)))["ok"]
            before = server.get("/api/sessions/g1/missing-chunks", server.alice).json()
            finish = await call(sio, "session-finish", {"sessionId": "g1", "lastSeq": 9})
            state = await call(sio, "session-state", {"sessionId": "g1", "seqs": [0, 2, 3]})
            return before, finish, state

    before, finish, state = run(go())
    assert before["missing"] == [2, 4, 5, 6]
    assert before["ranges"] == [[2, 2], [4, 6]]
    assert (before["maxSeq"], before["totalChunks"], before["finalSeq"], before["complete"]) == (7, 4, None, False)
    assert finish["ok"] and finish["missing"] == [2, 4, 5, 6, 8, 9]
    after = server.get("/api/sessions/g1/missing-chunks", server.alice).json()
    assert after["ranges"] == [[2, 2], [4, 6], [8, 9]] and after["finalSeq"] == 9
    assert [seq for seq, _ in state["held"]] == [0, 3]
    assert state["held"][0][1] == hashlib.sha256(b"x0").hexdigest()


def test_complete_session_and_huge_sequence_numbers(server):
    """A finished session with every chunk is complete; a lone seq 2^31-1 gives one range, a capped list."""
    async def go():
        async with connected(server.url, server.alice) as sio:
            for seq in range(3):
                await call(sio, "audio-chunk", payload("done", seq, b"a%d" % seq))
            await call(sio, "session-finish", {"sessionId": "done", "lastSeq": 2})
            await call(sio, "audio-chunk", payload("huge", 2**31 - 1, b"z"))
            over = await call(sio, "audio-chunk", payload("huge", 2**31, b"z"))
            beyond = await call(sio, "audio-chunk", payload("done", 3, b"late"))
            return over, beyond

    over, beyond = run(go())
    assert over["error"]["code"] == "invalid_sequence"
    assert beyond["error"]["code"] == "beyond_final"
    done = server.get("/api/sessions/done/missing-chunks", server.alice).json()
    assert done["complete"] is True and done["missing"] == []
    started = time.perf_counter()
    huge = server.get("/api/sessions/huge/missing-chunks", server.alice).json()
    assert time.perf_counter() - started < 5
    assert huge["ranges"] == [[0, 2**31 - 2]]
    assert huge["missingCount"] == 2**31 - 1 and huge["missingTruncated"] is True
    assert len(huge["missing"]) == 10_000


def test_seed_client_without_ack_gets_chunk_ack_event(server):
    """A browser client that emits without an ack callback receives chunk-ack / chunk-error events."""
    got: dict[str, list] = {"chunk-ack": [], "chunk-error": []}

    async def go():
        async with connected(server.url, server.alice) as sio:
            sio.on("chunk-ack", lambda d: got["chunk-ack"].append(d))
            sio.on("chunk-error", lambda d: got["chunk-error"].append(d))
            seed = {"sessionId": "web", "sequence": 0, "timestamp": 1, "size": 4, "mimeType": "audio/webm;codecs=opus",
                    "audio": b"webm"}
            await sio.emit("audio-chunk", seed)
            await sio.emit("audio-chunk", seed)
            await sio.emit("audio-chunk", {**seed, "sequence": -1})
            for _ in range(100):
                if len(got["chunk-ack"]) == 2 and got["chunk-error"]:
                    break
                await asyncio.sleep(0.05)

    run(go())
    assert sorted(a["duplicate"] for a in got["chunk-ack"]) == [False, True]
    assert got["chunk-ack"][0]["timestamp"] == 1 and got["chunk-ack"][0]["sequence"] == 0
    assert got["chunk-error"][0]["error"]["code"] == "invalid_sequence"
    assert stored_files(server.data_dir, "web")[0].suffix == ".webm"


def test_large_chunk_accepted_and_oversize_refused_cleanly(server_factory, backend):
    """A 3 MiB chunk passes (beyond Engine.IO's 1 MB default); one over the limit gets too_large, not a drop."""
    srv = server_factory(extra_args=("--max-chunk-bytes", str(4 * 1024 * 1024)), database_url=backend)
    token = srv.token("alice")
    srv.start()

    async def go():
        async with connected(srv.url, token) as sio:
            big = await call(sio, "audio-chunk", payload("big", 0, os.urandom(3 * 1024 * 1024)))
            over = await call(sio, "audio-chunk", payload("big", 1, os.urandom(5 * 1024 * 1024)))
            after = await call(sio, "audio-chunk", payload("big", 2, b"small"))
            return big, over, after

    big, over, after = run(go())
    assert big["ok"] and after["ok"]
    assert over["error"]["code"] == "too_large"


def test_auth_is_required_and_sessions_are_private(server):
    """No or wrong token is refused; the same id under another token is another, separate session."""
    bob = server.token("bob")

    async def refused(token):
        try:
            async with connected(server.url, token):
                return False
        except socketio.exceptions.ConnectionError:
            return True

    assert run(refused(None)) and run(refused("scr_wrong-token-value"))

    async def go():
        async with connected(server.url, server.alice) as alice:
            assert (await call(alice, "audio-chunk", payload("private", 0, b"alice's")))["ok"]
        async with connected(server.url, bob) as sio:
            return (
                await call(sio, "audio-chunk", payload("private", 1, b"bob's")),
                await call(sio, "session-state", {"sessionId": "private"}),
                await call(sio, "session-finish", {"sessionId": "private", "lastSeq": 5}),
            )

    write, state, finish = run(go())
    assert write["ok"] and not write["duplicate"]
    assert state["ok"] and (state["maxSeq"], state["totalChunks"]) == (1, 1)
    assert finish["ok"] and finish["missing"] == [0, 2, 3, 4, 5]
    for path in ("/api/sessions/private", "/api/sessions/private/missing-chunks", "/api/sessions/private/audio"):
        assert server.get(path, None).status_code == 401
    assert server.get("/api/sessions/other", bob).status_code == 404
    assert [s["sessionId"] for s in server.get("/api/sessions", bob).json()["sessions"]] == ["private"]
    assert [s["sessionId"] for s in server.get("/api/sessions", server.alice).json()["sessions"]] == ["private"]
    alices = server.get("/api/sessions/private", server.alice).json()
    assert [c["sequence"] for c in alices["chunks"]] == [0] and alices["finalSeq"] is None


def test_kill_minus_nine_loses_no_acknowledged_chunk(server):
    """SIGKILL while a client streams: after restart every acked chunk is there, intact, with no tmp file."""
    acked: dict[int, str] = {}
    stop = threading.Event()

    async def stream():
        sio = socketio.AsyncClient(reconnection=False)
        await sio.connect(server.url, auth={"token": server.alice}, transports=["websocket"])
        seq = 0
        try:
            while not stop.is_set() and seq < 5000:
                audio = os.urandom(20_000 + seq % 7 * 1000)
                batch = [payload("kill", seq + i, audio + bytes([i])) for i in range(8)]
                replies = await asyncio.gather(*(call(sio, "audio-chunk", p, timeout=5) for p in batch))
                for p, r in zip(batch, replies):
                    if r.get("ok"):
                        acked[p["sequence"]] = p["checksum"]
                seq += 8
        except (socketio.exceptions.TimeoutError, socketio.exceptions.BadNamespaceError,
                socketio.exceptions.DisconnectedError):
            pass
        finally:
            await sio.disconnect()

    thread = threading.Thread(target=lambda: run(stream()))
    thread.start()
    time.sleep(1.5)
    server.kill()
    stop.set()
    thread.join(30)
    assert len(acked) > 10
    server.start()
    chunks = {c["sequence"]: c["sha256"] for c in server.get("/api/sessions/kill", server.alice).json()["chunks"]}
    for seq, checksum in acked.items():
        assert chunks.get(seq) == checksum
    for path in stored_files(server.data_dir, "kill"):
        seq = int(path.name.split(".")[0])
        if seq in chunks:
            assert hashlib.sha256(path.read_bytes()).hexdigest() == chunks[seq]
    assert temp_files(server.data_dir) == []


def test_export_assembles_session_in_order(server):
    """GET /audio joins WAV chunks in seq order sample for sample, and refuses gaps unless allowed."""
    rng = np.random.default_rng(1)
    parts = [rng.integers(-30000, 30000, size=(1600, 1), dtype=np.int16) for _ in range(3)]

    def wav(frames):
        buf = io.BytesIO()
        sf.write(buf, frames, 16000, format="WAV", subtype="PCM_16")
        return buf.getvalue()

    async def go():
        async with connected(server.url, server.alice) as sio:
            for seq in (2, 0, 1):
                assert (await call(sio, "audio-chunk", payload("exp", seq, wav(parts[seq]))))["ok"]
            assert (await call(sio, "audio-chunk", payload("gappy", 1, wav(parts[0]))))["ok"]

    run(go())
    for fmt in ("wav", "flac"):
        resp = server.get(f"/api/sessions/exp/audio?format={fmt}", server.alice)
        assert resp.status_code == 200
        data, rate = sf.read(io.BytesIO(resp.content), dtype="int16", always_2d=True)
        assert rate == 16000 and np.array_equal(data, np.concatenate(parts))
    refused = server.get("/api/sessions/gappy/audio", server.alice)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "incomplete"
    assert server.get("/api/sessions/gappy/audio?allowGaps=1", server.alice).status_code == 200


@pytest.mark.parametrize("bad", [None, "text", 5, [1, 2], {"sessionId": "ok"}, {"sessionId": "../x", "sequence": 0, "audio": b"a"},
                                 {"sessionId": "s", "sequence": True, "audio": b"a"},
                                 {"sessionId": "s", "sequence": 0, "audio": "not-binary"},
                                 {"sessionId": "s", "sequence": 0, "audio": b"a", "mimeType": "text/html"},
                                 {"sessionId": "s", "sequence": 0, "audio": b"a", "size": 99}])
def test_invalid_payload_gets_error_ack_and_connection_survives(server, bad):
    """Garbage gets an error reply with a code; the same connection keeps working."""
    async def go():
        async with connected(server.url, server.alice) as sio:
            reply = await call(sio, "audio-chunk", bad)
            good = await call(sio, "audio-chunk", payload("fine", 0, b"ok"))
            return reply, good

    reply, good = run(go())
    assert reply["ok"] is False and reply["error"]["code"] and "Traceback" not in reply["error"]["message"]
    assert good["ok"]
    assert not (server.data_dir / "audio" / "s").exists()
