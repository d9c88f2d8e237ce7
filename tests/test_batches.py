"""``audio-chunks``: several chunks in one event, each answered as if it had come alone."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

from tests.test_client_upload import assert_stored_exactly, fill_spool, metric, scribe
from tests.wire import call, connected, payload, run, stored_files, temp_files


def batch(*chunks: dict) -> dict:
    """An ``audio-chunks`` payload from ``audio-chunk`` payloads."""
    headers = [{k: v for k, v in c.items() if k != "audio"} for c in chunks]
    return {"chunks": headers, "audio": b"".join(c["audio"] for c in chunks)}


def test_batch_answers_each_chunk_in_order(server):
    """New, duplicate (of an earlier chunk and within the batch), conflict, bad checksum, bad seq and a
    chunk of another session in one event: one reply each, in order, and only the good ones stored once."""
    audio = {seq: os.urandom(3_000 + seq) for seq in range(6)}

    async def go():
        async with connected(server.url, server.alice) as sio:
            first = await call(sio, "audio-chunk", payload("b", 0, audio[0]))
            bad = payload("b", 4, audio[4])
            bad["checksum"] = "0" * 64
            reply = await call(sio, "audio-chunks", batch(
                payload("b", 0, audio[0]),          # stored before: duplicate
                payload("b", 1, audio[1]),          # new
                payload("b", 1, audio[1]),          # the same again in the batch: duplicate
                payload("b", 0, b"other bytes"),    # conflict with seq 0
                bad,                                # checksum mismatch
                payload("b", -3, audio[2]),         # invalid sequence
                payload("b-other", 0, audio[5]),    # another session, new
            ))
            return first, reply

    first, reply = run(go())
    assert first["ok"] and not first["duplicate"]
    assert reply["ok"] is True
    replies = reply["replies"]
    assert [r["ok"] for r in replies] == [True, True, True, False, False, False, True]
    assert [r.get("duplicate") for r in replies[:3]] == [True, False, True]
    assert [r["sequence"] for r in replies[:5]] == [0, 1, 1, 0, 4]
    assert replies[3]["error"]["code"] == "conflict"
    assert replies[4]["error"]["code"] == "checksum_mismatch"
    assert replies[5]["error"]["code"] == "invalid_sequence"
    assert replies[6]["sessionId"] == "b-other" and not replies[6]["duplicate"]
    stored = {c["sequence"]: c["sha256"] for c in server.get("/api/sessions/b", server.alice).json()["chunks"]}
    assert stored == {0: hashlib.sha256(audio[0]).hexdigest(), 1: hashlib.sha256(audio[1]).hexdigest()}
    assert [p.read_bytes() for p in stored_files(server.data_dir, "b")] in ([audio[0], audio[1]], [audio[1], audio[0]])
    assert temp_files(server.data_dir) == []
    assert metric(server, "scribe_chunk_batches") == 1


def test_a_large_batch_split_between_the_writer_threads_answers_each_chunk_in_order(server):
    """A window of 46 KiB chunks (over the writer's split threshold: half of it validated and
    written on a helper thread): refusals and duplicates in either half answered in place,
    every good chunk stored once with its own bytes."""
    audio = {seq: os.urandom(47_104) for seq in range(12)}
    bad = payload("big", 10, audio[10])
    bad["checksum"] = "0" * 64

    async def go():
        async with connected(server.url, server.alice) as sio:
            return await call(sio, "audio-chunks", batch(
                *(payload("big", seq, audio[seq]) for seq in range(9)),  # new (seq 0-8)
                payload("big", 2, audio[2]),                             # a copy of seq 2, in the other half
                bad,                                                     # checksum mismatch, helper's half
                payload("big", 3, os.urandom(47_104)),                   # other bytes for seq 3: conflict
                payload("big", 11, audio[11]),                           # new, last
            ))

    reply = run(go())
    replies = reply["replies"]
    assert [r["ok"] for r in replies] == [True] * 10 + [False, False, True]
    assert [r["sequence"] for r in replies] == list(range(9)) + [2, 10, 3, 11]
    assert [r.get("duplicate") for r in replies[:10]] == [False] * 9 + [True]
    assert replies[10]["error"]["code"] == "checksum_mismatch" and replies[11]["error"]["code"] == "conflict"
    stored = {c["sequence"]: c["sha256"] for c in server.get("/api/sessions/big", server.alice).json()["chunks"]}
    expected = {seq: hashlib.sha256(audio[seq]).hexdigest() for seq in [*range(9), 11]}
    assert stored == expected
    assert sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in stored_files(server.data_dir, "big")) == sorted(
        expected.values())
    assert temp_files(server.data_dir) == []


def test_malformed_batches_are_refused_whole_and_the_connection_stays(server):
    """Sizes that do not add up, too many chunks, a header carrying its own audio, text for audio, a batch
    over the chunk limit: one error reply for the event, nothing stored, the connection still works."""
    a, b = os.urandom(1000), os.urandom(2000)

    async def go():
        async with connected(server.url, server.alice) as sio:
            replies = {}
            short = batch(payload("m", 0, a), payload("m", 1, b))
            short["audio"] = short["audio"][:-1]
            replies["sizes"] = await call(sio, "audio-chunks", short)
            replies["many"] = await call(sio, "audio-chunks", batch(*(payload("m", i, a) for i in range(17))))
            own = batch(payload("m", 0, a))
            own["chunks"][0]["audio"] = "inline"  # (a second binary attachment closes the connection: test_hardening)
            replies["own-audio"] = await call(sio, "audio-chunks", own)
            replies["text"] = await call(sio, "audio-chunks", {"chunks": [{"size": 3}], "audio": "abc"})
            replies["empty"] = await call(sio, "audio-chunks", {"chunks": [], "audio": b""})
            replies["not-a-dict"] = await call(sio, "audio-chunks", ([1, 2],))
            replies["no-size"] = await call(sio, "audio-chunks", {"chunks": [{"sessionId": "m"}], "audio": a})
            big = os.urandom(4_500_000)  # two of them: over the 8 MiB chunk limit
            replies["too-large"] = await call(sio, "audio-chunks", batch(payload("m", 0, big), payload("m", 1, big)))
            replies["after"] = await call(sio, "audio-chunks", batch(payload("m", 0, a), payload("m", 1, b)))
            return replies

    srv_replies = run(go())
    codes = {k: (r.get("error") or {}).get("code") for k, r in srv_replies.items()}
    assert codes == {"sizes": "size_mismatch", "many": "invalid_payload", "own-audio": "invalid_payload",
                     "text": "invalid_payload", "empty": "invalid_payload", "not-a-dict": "invalid_payload",
                     "no-size": "invalid_payload", "too-large": "too_large", "after": None}, srv_replies
    assert [r["ok"] and not r["duplicate"] for r in srv_replies["after"]["replies"]] == [True, True]
    assert [c["sequence"] for c in server.get("/api/sessions/m", server.alice).json()["chunks"]] == [0, 1]


def test_batch_without_ack_is_answered_by_events(server):
    """A batch emitted without an ack callback gets one chunk-ack / chunk-error event per chunk."""
    got: dict[str, list] = {"chunk-ack": [], "chunk-error": []}

    async def go():
        async with connected(server.url, server.alice) as sio:
            sio.on("chunk-ack", lambda d: got["chunk-ack"].append(d))
            sio.on("chunk-error", lambda d: got["chunk-error"].append(d))
            await sio.emit("audio-chunks", batch(payload("e", 0, b"zero"), payload("e", 1, b"one"),
                                                 payload("e", 2, b"two", checksum=False) | {"checksum": "1" * 64}))
            for _ in range(200):
                if len(got["chunk-ack"]) + len(got["chunk-error"]) == 3:
                    break
                await asyncio.sleep(0.05)

    run(go())
    assert sorted(a["sequence"] for a in got["chunk-ack"]) == [0, 1]
    assert [e["error"]["code"] for e in got["chunk-error"]] == ["checksum_mismatch"]


def test_batch_counts_against_the_connection_budget(server_factory):
    """Each chunk of a batch is admitted on its own: past the connection's in-flight limit the rest
    get the transient too_many_in_flight, the first ones are stored."""
    srv = server_factory(extra_args=("--max-in-flight", "3"))
    srv.alice = srv.token("alice")
    srv.start()
    chunks = [payload("budget", i, os.urandom(500)) for i in range(6)]

    async def go():
        async with connected(srv.url, srv.alice) as sio:
            return await call(sio, "audio-chunks", batch(*chunks))

    replies = run(go())["replies"]
    assert [r["ok"] for r in replies] == [True, True, True, False, False, False]
    assert {r["error"]["code"] for r in replies[3:]} == {"too_many_in_flight"}
    assert srv.get("/api/sessions/budget", srv.alice).json()["totalChunks"] == 3


def test_uploader_sends_batches_and_falls_back_to_single_chunks(server_factory):
    """`scribe resume` sends audio-chunks to a server that offers it and audio-chunk to one that does not
    (an older server, or batches turned off); both store every chunk exactly once."""
    for name, args in (("batched", ()), ("single", ("--max-batch-chunks", "1"))):
        srv = server_factory(name, extra_args=args)
        srv.alice = srv.token("alice")
        srv.start()
        info = srv.get("/api/info", None).json()
        assert info["maxBatchChunks"] == (16 if name == "batched" else None)
        chunks = fill_spool(name, 200, size=3000)
        result = scribe("resume", name, "--server", srv.url, "--token", srv.alice, "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["complete"] is True
        assert_stored_exactly(srv, name, chunks)
        batches = metric(srv, "scribe_chunk_batches")
        assert (batches >= 200 / 16) if name == "batched" else batches == 0, (name, batches)
        assert metric(srv, "scribe_chunks_stored") == 200


def test_large_chunks_go_in_events_of_at_most_2_mib_and_a_window_in_two_events_or_more(server):
    """The uploader's events: at most 2 MiB of audio each (each is copied a few times on both
    sides), and a window of more than 1 MiB in at least two events, so that one is sent while
    the other is stored; 46 KiB chunks keep the whole window in one event (the test above)."""
    # (512 KiB: 2 MiB events, 4 chunks each; 128 KiB with a window of 16, 2 MiB: two events of 8)
    for size, count, window, most_per_event in ((512 * 1024, 24, "32", 4), (128 * 1024, 32, "16", 8)):
        name = f"large-{size}"
        chunks = fill_spool(name, count, size=size)
        before = metric(server, "scribe_chunk_batches")
        result = scribe("resume", name, "--server", server.url, "--token", server.alice, "--json",
                        SCRIBE_WINDOW=window)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["complete"] is True
        assert_stored_exactly(server, name, chunks)
        events = metric(server, "scribe_chunk_batches") - before
        assert count / most_per_event <= events < count, (size, events)
