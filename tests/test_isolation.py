"""Sessions are namespaced per owner (issue 13, item 3): two tokens can both have "interview-1",
neither can see, squat or probe the other's, and stores of the older global layout are migrated."""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import time

import pytest
import sqlalchemy as sa

from tests.wire import call, connected, payload, run, session_dir, stored_files


@pytest.fixture
def two(server_factory, backend):
    """A server (SQLite or PostgreSQL) with tokens for alice and bob."""
    srv = server_factory(database_url=backend)
    srv.alice, srv.bob = srv.token("alice"), srv.token("bob")
    return srv.start()


def test_two_tokens_each_have_their_own_interview_1(two):
    """Both write "interview-1": each sees only its own chunks, gaps, finish, list, bytes and files."""
    async def go():
        async with connected(two.url, two.alice) as alice, connected(two.url, two.bob) as bob:
            for seq in (0, 1, 2):
                assert (await call(alice, "audio-chunk", payload("interview-1", seq, b"alice %d" % seq)))["ok"]
            bob_first = await call(bob, "audio-chunk", payload("interview-1", 0, b"bob 0"))
            bob_state = await call(bob, "session-state", {"sessionId": "interview-1", "seqs": [0, 1, 2]})
            bob_finish = await call(bob, "session-finish", {"sessionId": "interview-1", "lastSeq": 0})
            alice_later = await call(alice, "audio-chunk", payload("interview-1", 3, b"alice 3"))
            alice_state = await call(alice, "session-state", {"sessionId": "interview-1", "seqs": [0]})
            return bob_first, bob_state, bob_finish, alice_later, alice_state

    bob_first, bob_state, bob_finish, alice_later, alice_state = run(go())
    assert bob_first["ok"] and not bob_first["duplicate"], "not a duplicate of alice's seq 0, not a conflict"
    assert bob_state["totalChunks"] == 1 and bob_state["held"] == [[0, hashlib.sha256(b"bob 0").hexdigest()]]
    assert bob_finish["ok"] and bob_finish["complete"]
    assert alice_later["ok"], "bob finishing his interview-1 at 0 does not squat alice's"
    assert alice_state["finalSeq"] is None and alice_state["totalChunks"] == 4
    assert alice_state["held"] == [[0, hashlib.sha256(b"alice 0").hexdigest()]]
    alice_body = two.get("/api/sessions/interview-1", two.alice).json()
    bob_body = two.get("/api/sessions/interview-1", two.bob).json()
    assert [c["sequence"] for c in alice_body["chunks"]] == [0, 1, 2, 3]
    assert [c["sequence"] for c in bob_body["chunks"]] == [0] and bob_body["finalSeq"] == 0
    assert two.get("/api/sessions/interview-1/chunks/0", two.alice).content == b"alice 0"
    assert two.get("/api/sessions/interview-1/chunks/0", two.bob).content == b"bob 0"
    assert two.get("/api/sessions/interview-1/chunks/1", two.bob).status_code == 404
    for token in (two.alice, two.bob):
        assert [s["sessionId"] for s in two.get("/api/sessions", token).json()["sessions"]] == ["interview-1"]
    assert [p.read_bytes() for p in stored_files(two.data_dir, "interview-1", "bob")] == [b"bob 0"]
    assert len(stored_files(two.data_dir, "interview-1", "alice")) == 4


def test_follow_only_hears_the_followers_own_session(two):
    """bob following "interview-1" hears nothing of alice's chunks; alice's follower hears them."""
    heard: dict[str, list] = {"alice": [], "bob": []}

    async def go():
        async with connected(two.url, two.alice) as alice, connected(two.url, two.bob) as bob, \
                connected(two.url, two.alice) as alice_follower:
            bob.on("chunk-stored", lambda d: heard["bob"].append(d))
            alice_follower.on("chunk-stored", lambda d: heard["alice"].append(d))
            assert (await call(alice, "audio-chunk", payload("interview-1", 0, b"a0")))["ok"]
            assert (await call(bob, "audio-chunk", payload("interview-1", 9, b"b9")))["ok"]
            assert (await call(bob, "session-follow", {"sessionId": "interview-1"}))["ok"]
            assert (await call(alice_follower, "session-follow", {"sessionId": "interview-1"}))["ok"]
            for seq in range(1, 4):
                assert (await call(alice, "audio-chunk", payload("interview-1", seq, b"a%d" % seq)))["ok"]
            deadline = time.monotonic() + 10
            while len(heard["alice"]) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)

    run(go())
    assert sorted(e["sequence"] for e in heard["alice"]) == [1, 2, 3]
    assert heard["bob"] == []


def test_replies_do_not_reveal_whether_another_owner_uses_an_id(two):
    """bob's replies for an id alice uses equal those for an id nobody uses, and take as long."""
    async def go():
        async with connected(two.url, two.alice) as alice:
            for i in range(20):
                assert (await call(alice, "audio-chunk", payload(f"taken-{i}", 0, b"alice")))["ok"]
        timings: dict[str, list[float]] = {"taken": [], "free": []}
        replies: dict[str, list] = {"taken": [], "free": []}
        async with connected(two.url, two.bob) as bob:
            for i in range(20):
                for kind in ("taken", "free"):
                    sid = f"{kind}-{i}"
                    started = time.perf_counter()
                    state = await call(bob, "session-state", {"sessionId": sid})
                    timings[kind].append(time.perf_counter() - started)
                    write = await call(bob, "audio-chunk", payload(sid, 0, b"bob"))
                    finish = await call(bob, "session-finish", {"sessionId": sid, "lastSeq": 0})
                    replies[kind].append([_without_ids(r) for r in (state, write, finish)])
        return timings, replies

    timings, replies = run(go())
    assert replies["taken"] == replies["free"]
    assert replies["taken"][0][0]["error"]["code"] == "not_found" and replies["taken"][0][1]["ok"]
    taken, free = statistics.median(timings["taken"]), statistics.median(timings["free"])
    assert abs(taken - free) < max(0.05, 0.5 * min(taken, free)), (taken, free)
    for i in range(20):
        assert two.get(f"/api/sessions/taken-{i}/chunks/0", two.alice).content == b"alice"


def _without_ids(reply: dict) -> dict:
    return {k: v for k, v in reply.items() if k not in ("sessionId", "chunkId")}


# Migration from the global-session layout (schema version 1) ---------------------------------

LEGACY = sa.MetaData()
sa.Table("schema_meta", LEGACY, sa.Column("key", sa.String(64), primary_key=True),
         sa.Column("value", sa.String(256), nullable=False))
sa.Table("tokens", LEGACY, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
         sa.Column("name", sa.String(64), nullable=False, index=True),
         sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
         sa.Column("created_at", sa.Float, nullable=False), sa.Column("revoked_at", sa.Float, nullable=True))
sa.Table("sessions", LEGACY, sa.Column("id", sa.String(64), primary_key=True),
         sa.Column("owner", sa.String(64), nullable=False, index=True),
         sa.Column("created_at", sa.Float, nullable=False), sa.Column("final_seq", sa.BigInteger, nullable=True),
         sa.Column("finished_at", sa.Float, nullable=True))
sa.Table("chunks", LEGACY, sa.Column("id", sa.String(36), primary_key=True),
         sa.Column("session_id", sa.String(64), sa.ForeignKey("sessions.id"), nullable=False),
         sa.Column("seq", sa.BigInteger, nullable=False), sa.Column("audio_path", sa.String(256), nullable=False),
         sa.Column("duration_ms", sa.Integer, nullable=True), sa.Column("text", sa.Text, nullable=True),
         sa.Column("speaker", sa.String(128), nullable=True), sa.Column("confidence", sa.Float, nullable=True),
         sa.Column("status", sa.String(32), nullable=False, server_default="uploaded"),
         sa.Column("created_at", sa.Float, nullable=False), sa.Column("size", sa.Integer, nullable=False),
         sa.Column("sha256", sa.String(64), nullable=False), sa.Column("mime_type", sa.String(100), nullable=False),
         sa.Column("client_timestamp", sa.Float, nullable=True),
         sa.UniqueConstraint("session_id", "seq", name="chunks_session_seq_key"))


def _legacy_store(data_dir, database_url) -> dict[tuple[str, int], bytes]:
    """A store as the version-1 server left it: global session ids, ``audio/<session>/`` files."""
    from scribe_server.store import db

    data_dir.mkdir(parents=True)
    engine = db.create_engine(database_url or db.sqlite_url(data_dir))
    LEGACY.create_all(engine)
    t = LEGACY.tables
    written = {}
    with engine.begin() as conn:
        conn.execute(t["schema_meta"].insert().values(key="version", value="1"))
        for sid, owner, final in (("interview-1", "alice", 1), ("notes", "carol", None), ("ünï-owner", "zoë", None)):
            sid = sid if sid.isascii() else "u1"
            conn.execute(t["sessions"].insert().values(id=sid, owner=owner, created_at=1.0, final_seq=final))
            for seq in range(2):
                audio = f"{owner}/{sid}/{seq}".encode()
                sha = hashlib.sha256(audio).hexdigest()
                name = f"{sid}/{seq:010d}.{sha[:16]}.wav"
                (data_dir / "audio" / sid).mkdir(parents=True, exist_ok=True)
                (data_dir / "audio" / name).write_bytes(audio)
                conn.execute(t["chunks"].insert().values(
                    id=f"{sid}-{seq}", session_id=sid, seq=seq, audio_path=name, created_at=1.0, size=len(audio),
                    sha256=sha, mime_type="audio/wav"))
                written[(sid, seq)] = audio
    engine.dispose()
    return written


def test_a_version_1_store_is_migrated(server_factory, backend):
    """Rows and files of the global layout move under their owners; everything reads back; ids free up."""
    srv = server_factory(database_url=backend)
    written = _legacy_store(srv.data_dir, backend)
    tokens = {name: srv.token(name) for name in ("alice", "carol", "zoë", "bob")}
    srv.start()
    owners = {"interview-1": "alice", "notes": "carol", "u1": "zoë"}
    for (sid, seq), audio in written.items():
        assert srv.get(f"/api/sessions/{sid}/chunks/{seq}", tokens[owners[sid]]).content == audio
    assert sorted(p.name for p in (srv.data_dir / "audio").iterdir() if not p.name.startswith(".")) == sorted(
        ["@alice", "@carol", "@_" + hashlib.sha256("zoë".encode()).hexdigest()[:32]])
    assert len(stored_files(srv.data_dir, "interview-1")) == 2 and session_dir(srv.data_dir, "notes", "carol").is_dir()
    assert srv.get("/api/sessions/interview-1", tokens["alice"]).json()["complete"] is True

    async def go():
        async with connected(srv.url, tokens["bob"]) as bob, connected(srv.url, tokens["alice"]) as alice:
            return (await call(bob, "audio-chunk", payload("interview-1", 5, b"bob's own")),
                    await call(alice, "audio-chunk", payload("interview-1", 2, b"late")),
                    await call(alice, "audio-chunk", payload("interview-1", 1, written[("interview-1", 1)])))

    bobs, beyond, duplicate = run(go())
    assert bobs["ok"] and beyond["error"]["code"] == "beyond_final" and duplicate["duplicate"]
    srv.stop()
    srv.start()  # migrating again is a no-op
    assert srv.get("/api/sessions/notes/chunks/1", tokens["carol"]).content == written[("notes", 1)]
