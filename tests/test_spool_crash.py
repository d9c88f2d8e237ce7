"""The spool after kill -9 at any moment: no row without its audio, no stray value file, nothing lost.

Also pins down each diskcache internal that ``scribe_cli/spool_disk.py`` relies on.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import diskcache
import pytest

from scribe_cli import spool_disk
from scribe_cli.chaos.proxy import FaultProxy
from scribe_cli.config import resolve
from scribe_cli.spool import Spool

CHURN = Path(__file__).with_name("spool_churn.py")


def scribe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scribe_cli", *args], capture_output=True, text=True, timeout=120)


def value_path(spool: Spool, key: str) -> str:
    handle = spool.cache.get(key, read=True)
    handle.close()
    return handle.name


def orphans(spool: Spool) -> set[str]:
    return spool_disk.value_files(str(spool.directory)) - spool_disk.referenced(spool.cache)


def start_churn(directory: Path, log: Path, first: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(CHURN), str(directory), str(log), str(first), *extra],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_diskcache_is_the_version_the_adapter_was_written_for():
    """The adapter reads diskcache 5.x internals: the pin <6 holds and the attributes exist."""
    assert diskcache.__version__.split(".")[0] == "5"
    cache = diskcache.Cache()
    try:
        assert cache._txn_id is None and callable(cache._sql)
        columns = {row[1] for row in cache._sql("PRAGMA table_info(Cache)").fetchall()}
        assert {"key", "raw", "mode", "value", "filename"} <= columns
    finally:
        cache.close()


def test_removal_inside_a_transaction_unlinks_only_after_commit(tmp_path):
    """diskcache unlinks a nested delete's file before the outer commit; the spool defers it until after (a value
    above INLINE_MAX, so it lives in a file)."""
    with Spool(tmp_path) as spool:
        spool.add("s", 0, os.urandom(300_000), "audio/wav")
        path = value_path(spool, "a/s/0000000000")
        with spool.transaction():
            spool.cache.delete("a/s/0000000000")
            spool.cache.delete("c/s/0000000000")
            assert os.path.exists(path)  # still there: the row's removal is not committed yet
        assert not os.path.exists(path)
        with pytest.raises(RuntimeError):
            with spool.transaction():
                spool.add("s", 1, os.urandom(300_000), "audio/wav")
                raise RuntimeError("roll back")
        assert spool.chunks("s") == [] and len(orphans(spool)) == 1  # a rolled-back add leaves its file
        assert spool.sweep()[0] == 1 and orphans(spool) == set()


def test_rolled_back_removal_keeps_the_audio(tmp_path):
    """A removal whose transaction rolls back leaves the chunk and its bytes intact."""
    with Spool(tmp_path) as spool:
        audio = os.urandom(300_000)
        spool.add("s", 0, audio, "audio/wav")
        with pytest.raises(RuntimeError):
            with spool.transaction():
                spool.remove_many([("s", 0)])
                raise RuntimeError("crash stand-in")
        (meta,) = spool.chunks("s")
        assert spool.read_audio(meta) == audio and spool.memory("s").count == 0


def test_memory_counts_each_acknowledged_seq_once(tmp_path):
    """remove_many remembers seq ranges, count, bytes and a checksum digest; a seq is never counted twice."""
    with Spool(tmp_path) as spool:
        metas = [spool.add("s", seq, os.urandom(100), "audio/wav") for seq in (0, 1, 2, 5)]
        spool.remove_many([("s", 0), ("s", 1)])
        spool.remove_many([("s", 1), ("s", 2), ("s", 5)])
        spool.add("s", 1, os.urandom(100), "audio/wav")
        spool.remove_many([("s", 1)])
        memory = spool.memory("s")
        assert memory.ranges == [[0, 2], [5, 5]] and memory.count == 4 and memory.bytes == 400
        from scribe_cli.spool import session_digest

        assert memory.digest == session_digest((m.seq, m.sha256) for m in metas)


def test_sweep_never_removes_the_file_of_a_concurrent_add(tmp_path):
    """A process sweeping in a loop while another adds: every chunk added stays readable."""
    directory, log = tmp_path / "spool", tmp_path / "added.log"
    Spool(directory).close()
    sweeper = start_churn(directory, tmp_path / "unused.log", 0, "sweep")
    writer = start_churn(directory, log, 0)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and log.read_text().count("\n") < 200:
            time.sleep(0.2)
    finally:
        for proc in (writer, sweeper):
            proc.kill()
            proc.wait(30)
    check_after_crash(directory, log)


def check_after_crash(directory: Path, log: Path) -> int:
    """Every row has intact audio; every chunk ``add`` returned is spooled or remembered as acknowledged."""
    added = dict(line.split() for line in log.read_text().splitlines() if line.strip())
    with Spool(directory) as spool:
        assert spool.missing_audio() == []
        chunks = spool.chunks("churn")
        for meta in chunks:
            audio = spool.cache.get(f"a/churn/{meta.seq:010d}")
            assert hashlib.sha256(audio).hexdigest() == meta.sha256
        spooled = {m.seq: m.sha256 for m in chunks}
        memory = spool.memory("churn")
        for seq, sha in added.items():
            seq = int(seq)
            assert spooled.get(seq) == sha or memory.contains(seq), f"chunk {seq} lost"
        assert memory.count + len(spooled) >= len(added)
        return len(chunks)


def test_kill_minus_nine_during_add_and_remove_leaves_a_truthful_spool(tmp_path):
    """SIGKILL at random points of add/remove_many, many times: pending == rows with intact audio, fsck leaves no orphan."""
    rng = random.Random(int(os.environ.get("SCRIBE_CRASH_SEED", time.time())))
    directory, log = resolve().spool_dir, tmp_path / "added.log"
    log.touch()
    swept = kills = 0
    for round_ in range(30):
        proc = start_churn(directory, log, 10_000 * round_)
        time.sleep(rng.uniform(0.02, 0.6))
        proc.kill()
        proc.wait(30)
        kills += 1
        rows = check_after_crash(directory, log)
        if round_ % 6 == 5:
            pending = json.loads(scribe("pending", "--json").stdout)
            assert len(pending["chunks"]) == rows and pending["audioMissing"] == []
            fsck = scribe("fsck", "--json")
            assert fsck.returncode == 0, fsck.stderr
            swept += json.loads(fsck.stdout)["orphanFiles"]
        else:
            swept += Spool(directory).sweep()[0]
        with Spool(directory) as spool:
            assert orphans(spool) == set()
    assert kills == 30
    print(f"{kills} kills, {swept} orphan files swept, {rows} chunks left spooled")


def test_resume_killed_at_random_moments_loses_nothing_and_pending_stays_true(server):
    """`scribe resume` SIGKILLed mid-drain up to 8 times: each chunk is on the server or spooled with its audio."""
    rng = random.Random(int(os.environ.get("SCRIBE_CRASH_SEED", time.time())))
    directory = resolve().spool_dir
    with Spool(directory) as spool:
        sums = {seq: spool.add("drain", seq, os.urandom(48_000), "audio/wav").sha256 for seq in range(600)}
        spool.set_final_seq("drain", 599)
    # 10 ms per forwarded block: each run drains for seconds, however fast client and server are,
    # so that every kill (0-0.3 s after a run's first chunk is stored) lands mid-drain
    proxy = FaultProxy("127.0.0.1", server.port, latency=0.01).start()
    cmd = [sys.executable, "-m", "scribe_cli", "resume", "drain", "--server", proxy.url, "--token", server.alice,
           "--json", "--window", "8"]
    def stored() -> dict[int, str]:
        body = server.get("/api/sessions/drain", server.alice).json()
        return {c["sequence"]: c["sha256"] for c in body.get("chunks", [])}  # none yet: a 404 body

    kills_mid_drain = 0
    try:
        for _ in range(8):
            before = len(stored())
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while len(stored()) == before and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)  # kill only once this run is uploading
            time.sleep(rng.uniform(0, 0.3))
            proc.kill()
            proc.wait(30)
            held = stored()
            kills_mid_drain += len(held) < len(sums)
            pending = json.loads(scribe("pending", "drain", "--json").stdout)
            spooled = {m["seq"]: m["sha256"] for m in pending["chunks"]}
            assert pending["audioMissing"] == [] and pending["quarantined"] == []
            for seq, sha in sums.items():
                assert held.get(seq) == sha or spooled.get(seq) == sha, f"chunk {seq} lost"
            if len(held) == len(sums):
                break
    finally:
        proxy.stop()
    assert kills_mid_drain >= 4  # (all 8, with the proxy's latency)
    print(f"{kills_mid_drain} kill(s) mid-drain")
    result = scribe("resume", "drain", "--server", server.url, "--token", server.alice, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["complete"] is True
    with Spool(directory) as spool:
        assert spool.chunks("drain") == [] and orphans(spool) == set() and spool.memory("drain").count == 600
