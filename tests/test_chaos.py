"""`scribe chaos`: a short fault run passes, and a deliberately broken server is caught."""

from __future__ import annotations

import json

from scribe_cli.chaos.run import ChaosConfig, run
from tests.test_client_upload import scribe


def test_short_chaos_run_keeps_every_invariant():
    """300 chunks spooled over 5 s, cuts every ~0.3 s, stalls, 1 server kill, 1 uploader kill, 5% duplicates: no violation."""
    # Spooled over 5 s so that the link is up long enough for cuts (4-7 seen) however fast the drain is.
    result = scribe("chaos", "--chunks", "300", "--seconds", "5", "--cut-every", "0.3", "--server-kills", "1", "--client-kills", "1",
                    "--duplicates", "0.05", "--seed", "11", "--json", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["event"] == "done" and report["ok"]
    assert report["serverKills"] == 1 and report["clientKills"] == 1 and report["cuts"] >= 1
    assert report["stored"] == 300 and report["lostCount"] == 0 and report["storedTwice"] == 0
    assert report["duplicatesAcked"] == report["duplicatesSent"] == 15
    assert report["spoolLeft"] == 0 and report["tempFiles"] == 0


def test_chaos_detects_a_server_that_acks_before_storing():
    """Against a server that acknowledges before its data is durable, killed twice, chaos reports loss."""
    events = []
    report = run(ChaosConfig(chunks=400, chunk_bytes=8192, seconds=4.0, cut_every=None, server_kills=2,
                             client_kills=0, duplicates=0.0, seed=5,
                             server_env={"SCRIBE_SERVER_UNSAFE_ACK_BEFORE_STORE": "1"}),
                 lambda kind, data: events.append(kind))
    assert report.server_kills == 2
    assert report.lost, "the broken server must lose acknowledged chunks"
    assert not report.ok and any("lost" in v for v in report.violations)


def test_same_seed_gives_the_same_content_and_schedule():
    """Chunk contents and kill points derive from the seed alone."""
    import random

    from scribe_cli.chaos.run import content, kill_schedule

    assert content(7, 3, 64) == content(7, 3, 64) != content(8, 3, 64)
    cfg = ChaosConfig(server_kills=3, client_kills=2, seed=7)
    first = kill_schedule(cfg, random.Random(cfg.seed))
    assert first == kill_schedule(cfg, random.Random(cfg.seed)) != kill_schedule(cfg, random.Random(8))
    assert [len(points) for points in first] == [3, 2] and all(0.1 <= p <= 0.9 for p in first[0] + first[1])
