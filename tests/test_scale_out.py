"""Two scribe-server nodes on PostgreSQL + Redis behind nginx, all real, on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from scribe_cli.config import Settings, resolve
from scribe_cli.follow import FollowState, follow
from scribe_cli.spool import Spool
from tests.conftest import ServerProcess, run_server_cli
from tests.infra import Nginx
from tests.test_client_upload import fill_spool, scribe


@pytest.fixture
def cluster(tmp_path, postgres, redis_server):
    """Nodes A and B sharing one PostgreSQL database, one Redis and one audio directory."""
    url = postgres.create_database(f"scribe_cluster_{os.getpid()}_{int(time.monotonic() * 1000)}")
    shared = tmp_path / "shared-volume"
    created = run_server_cli("token", "create", "alice", data_dir=shared, database_url=url)
    assert created.returncode == 0, created.stderr
    nodes = [ServerProcess(shared, database_url=url, extra_args=("--redis-url", redis_server.url)).start()
             for _ in range(2)]
    for node in nodes:
        node.alice = created.stdout.strip()
    yield nodes
    for node in nodes:
        node.stop()


def connections(node: ServerProcess) -> float:
    try:
        text = node.get("/metrics", None).text
    except Exception:
        return 0.0
    match = re.search(r"^scribe_connections (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_node_killed_mid_upload_behind_nginx_loses_nothing(cluster, tmp_path):
    """500 chunks through nginx; the node holding the connection is SIGKILLed half-way; the client
    reconnects through nginx to the other node and completes: nothing lost, nothing doubled."""
    a, b = cluster
    nginx = Nginx(tmp_path, [a.port, b.port]).start()
    try:
        chunks = fill_spool("fleet", 500, size=32768)
        # a window of 2 keeps the drain slow enough to be caught half-way on a fast or a loaded machine
        proc = subprocess.Popen([sys.executable, "-m", "scribe_cli", "resume", "fleet", "--server", nginx.url,
                                 "--token", a.alice, "--json", "--window", "2"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        victim = None
        deadline = time.monotonic() + 60
        while victim is None and time.monotonic() < deadline:
            with Spool(resolve().spool_dir) as spool:
                left = spool.count("fleet")
            if left <= 250:
                victim = next((node for node in (a, b) if connections(node) >= 1), None)
            time.sleep(0.02)
        assert victim is not None, "the upload never reached half-way on a node"
        victim.kill()
        out, err = proc.communicate(timeout=120)
    finally:
        if "proc" in locals() and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        nginx.stop()
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["upload"]["disconnects"] >= 1 and report["complete"]
    survivor = b if victim is a else a
    body = survivor.get("/api/sessions/fleet", a.alice).json()
    assert {c["sequence"]: c["sha256"] for c in body["chunks"]} == {
        seq: hashlib.sha256(data).hexdigest() for seq, data in chunks.items()}
    assert len(list((survivor.data_dir / "audio" / "@alice" / "fleet").glob("[0-9]*"))) == 500


def test_follow_on_node_b_sees_chunks_uploaded_through_node_a(cluster):
    """`scribe follow` connected to node B receives a chunk-stored event for every chunk stored by node A."""
    from tests.wire import call, connected, run

    a, b = cluster
    fill_spool("live", 120, size=4096)

    async def open_session():  # session-finish creates the (still empty) session, through node A
        async with connected(a.url, a.alice) as sio:
            assert (await call(sio, "session-finish", {"sessionId": "live", "lastSeq": 119}))["ok"]

    run(open_session())
    state = FollowState("live")
    events: list[dict] = []
    following = threading.Event()
    settings = Settings(home=resolve().home, server=b.url, token=b.alice)

    def listener(kind: str, data: dict) -> None:
        events.append({"event": kind, **data})
        if kind == "following":
            following.set()

    thread = threading.Thread(target=lambda: asyncio.run(follow(settings, "live", listener, state)))
    thread.start()
    assert following.wait(30)
    result = scribe("resume", "live", "--server", a.url, "--token", a.alice, "--json")
    thread.join(60)
    assert result.returncode == 0, result.stderr
    assert not thread.is_alive() and state.report.get("complete")
    seen = [e["sequence"] for e in events if e["event"] == "stored"]
    assert sorted(seen) == list(range(120))


def test_beyond_final_holds_across_nodes(cluster):
    """Finish at lastSeq 3 on node A, send seq 9 to node B at once (which cached the session as
    unfinished): refused beyond_final every time; and finish racing a late chunk on the other node
    never lets both succeed."""
    from tests.wire import call, connected, payload, run

    a, b = cluster

    async def go():
        outcomes, races = [], []
        async with connected(a.url, a.alice) as on_a, connected(b.url, b.alice) as on_b:
            for i in range(5):
                sid = f"final-{i}"
                for seq in range(3):  # node B now holds the session, unfinished, in its cache
                    assert (await call(on_b, "audio-chunk", payload(sid, seq, b"%d" % seq)))["ok"]
                assert (await call(on_a, "session-finish", {"sessionId": sid, "lastSeq": 3}))["ok"]
                outcomes.append(await call(on_b, "audio-chunk", payload(sid, 9, b"late")))
            for i in range(10):
                sid = f"race-{i}"
                assert (await call(on_b, "audio-chunk", payload(sid, 0, b"0")))["ok"]
                finish, late = await asyncio.gather(
                    call(on_a, "session-finish", {"sessionId": sid, "lastSeq": 3}),
                    call(on_b, "audio-chunk", payload(sid, 9, b"late")))
                races.append((finish, late))
        return outcomes, races

    outcomes, races = run(go())
    assert [r["error"]["code"] for r in outcomes] == ["beyond_final"] * 5
    for i, (finish, late) in enumerate(races):
        assert finish["ok"] != late["ok"], (finish, late)
        body = a.get(f"/api/sessions/race-{i}", a.alice).json()
        assert (body["finalSeq"] == 3) == finish["ok"] and (body["maxSeq"] == 9) == late["ok"]
    for i in range(5):
        body = b.get(f"/api/sessions/final-{i}", b.alice).json()
        assert body["maxSeq"] == 2 and body["finalSeq"] == 3 and body["missing"] == [3]
