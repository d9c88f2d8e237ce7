"""The client's spool and uploader against a real server: resume, cuts, kills, damage, limits."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from scribe_cli.chaos.proxy import FaultProxy
from scribe_cli.config import resolve
from scribe_cli.spool import FAILED, INLINE_MAX, Spool


def scribe(*args: str, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scribe_cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


def spool_dir() -> Path:
    return resolve().spool_dir


def fill_spool(session: str, count: int, size: int = 4096, final: bool = True) -> dict[int, bytes]:
    chunks = {seq: os.urandom(size) for seq in range(count)}
    with Spool(spool_dir()) as spool:
        for seq, audio in chunks.items():
            spool.add(session, seq, audio, "audio/wav", duration_ms=1000)
        if final:
            spool.set_final_seq(session, count - 1)
    return chunks


def metric(server, name: str) -> float:
    text = server.get("/metrics", None).text
    match = re.search(rf"^{name}_total (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def assert_stored_exactly(server, session: str, chunks: dict[int, bytes]) -> None:
    body = server.get(f"/api/sessions/{session}", server.alice).json()
    import hashlib

    assert {c["sequence"]: c["sha256"] for c in body["chunks"]} == {
        seq: hashlib.sha256(audio).hexdigest() for seq, audio in chunks.items()
    }
    assert body["missing"] == [] and body["complete"] is True
    files = list((server.data_dir / "audio" / "@alice" / session).iterdir())
    assert len(files) == len(chunks)


def test_offline_spool_then_resume_stores_everything_once(server):
    """500 chunks spooled offline, then `scribe resume`: all stored once, spool empty (and its
    space given back to the disk), no gaps."""
    chunks = fill_spool("offline", 500, size=48 * 1024)
    result = scribe("resume", "offline", "--server", server.url, "--token", server.alice, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["complete"] and report["upload"]["acked"] == 500
    assert_stored_exactly(server, "offline", chunks)
    with Spool(spool_dir()) as spool:
        assert spool.chunks("offline") == []
    db = sum(path.stat().st_size for path in spool_dir().glob("cache.db*"))
    assert db < 4 * 2**20, f"the drained spool still takes {db} bytes: the removed audio was not given back"
    gaps = scribe("gaps", "offline", "--server", server.url, "--token", server.alice, "--json")
    assert gaps.returncode == 0 and json.loads(gaps.stdout)["missingCount"] == 0


def test_drain_survives_repeated_connection_cuts(server):
    """A proxy cutting connections every ~0.2 s: the drain completes, nothing lost or doubled."""
    chunks = fill_spool("cuts", 800, size=16384)
    # 5 ms per forwarded block: the drain outlasts several cuts however fast client and server are
    proxy = FaultProxy("127.0.0.1", server.port, latency=0.005, cut_every=0.2, seed=7).start()
    try:
        result = scribe("resume", "cuts", "--server", proxy.url, "--token", server.alice, "--json",
                        "--give-up-after", "60")
    finally:
        proxy.stop()
    assert result.returncode == 0, result.stderr
    assert proxy.stats.cuts >= 2, proxy.stats
    report = json.loads(result.stdout)
    assert report["upload"]["disconnects"] >= 1
    assert_stored_exactly(server, "cuts", chunks)


def test_sigkilled_resume_completes_without_resending_stored_chunks(server):
    """resume killed with SIGKILL half-way and run again: completes; the server gets no chunk twice."""
    chunks = fill_spool("killed", 600, size=32768)
    # 5 ms per forwarded block: the kill lands half-way however fast client and server are
    proxy = FaultProxy("127.0.0.1", server.port, latency=0.005).start()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "scribe_cli", "resume", "killed", "--server", proxy.url,
                                 "--token", server.alice, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and metric(server, "scribe_chunks_stored") < 150:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proxy.stop()
    time.sleep(1.0)  # let the server finish what was in flight
    stored_before = metric(server, "scribe_chunks_stored")
    assert 0 < stored_before < 600
    result = scribe("resume", "killed", "--server", server.url, "--token", server.alice, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["upload"]["sent"] == 600 - stored_before
    assert metric(server, "scribe_chunks_duplicate") == 0
    assert metric(server, "scribe_chunks_stored") == 600
    assert_stored_exactly(server, "killed", chunks)


def test_missing_value_file_is_quarantined_not_hung(server):
    """A spool entry whose value file vanished is quarantined and reported; the rest uploads; no hang."""
    fill_spool("damaged", 20, size=INLINE_MAX + 1)  # stored as value files
    with Spool(spool_dir()) as spool:
        victim = spool.cache.get("a/damaged/0000000007", read=True)
        path = victim.name
        victim.close()
    os.unlink(path)
    result = scribe("resume", "damaged", "--server", server.url, "--token", server.alice, "--json", timeout=60)
    assert result.returncode == 5, result.stderr
    report = json.loads(result.stdout)
    assert [q["seq"] for q in report["quarantined"]] == [7]
    assert "value file missing" in report["quarantined"][0]["reason"]
    assert "Error:" in result.stderr and "Try:" in result.stderr
    pending = json.loads(scribe("pending", "damaged", "--json").stdout)
    assert pending["chunks"] == [] and pending["quarantined"][0]["seq"] == 7
    held = server.get("/api/sessions/damaged", server.alice).json()
    assert held["totalChunks"] == 19 and held["missing"] == [7]


def test_damaged_chunk_is_refused_by_the_server_and_quarantined(server):
    """A spooled chunk whose bytes changed is sent unhashed, refused by the server's checksum, then quarantined."""
    fill_spool("rotten", 10, size=4096)
    with Spool(spool_dir()) as spool:
        spool.cache._sql("UPDATE Cache SET value = ? WHERE key = ?", (sqlite3.Binary(os.urandom(4096)), "a/rotten/0000000004"))
    result = scribe("resume", "rotten", "--server", server.url, "--token", server.alice, "--json", timeout=60)
    assert result.returncode == 5, result.stderr
    report = json.loads(result.stdout.splitlines()[0])
    assert [(q["seq"], q["reason"]) for q in report["quarantined"]] == [(4, "checksum mismatch")]
    assert report["failed"] == [] and report["pending"] == 0
    held = server.get("/api/sessions/rotten", server.alice).json()
    assert held["totalChunks"] == 9 and held["missing"] == [4]


def test_chunk_over_the_server_limit_fails_permanently_rest_uploads(server_factory):
    """A chunk over --max-chunk-bytes is marked failed with a clear message; the others are stored."""
    srv = server_factory(extra_args=("--max-chunk-bytes", "100000"))
    srv.alice = srv.token("alice")
    srv.start()
    with Spool(spool_dir()) as spool:
        for seq in range(5):
            spool.add("limits", seq, os.urandom(300_000 if seq == 2 else 1000), "audio/wav")
    result = scribe("resume", "limits", "--server", srv.url, "--token", srv.alice, "--json")
    assert result.returncode == 5
    report = json.loads(result.stdout)
    assert report["failed"][0]["seq"] == 2 and "too_large" in report["failed"][0]["error"]
    assert "limit" in report["failed"][0]["error"]
    assert srv.get("/api/sessions/limits", srv.alice).json()["totalChunks"] == 4
    with Spool(spool_dir()) as spool:
        assert [(m.seq, m.state) for m in spool.chunks("limits")] == [(2, FAILED)]


def test_stalled_link_is_detected_and_upload_completes(server):
    """A link that stops forwarding without closing is dropped by the ack timeout; the drain completes."""
    chunks = fill_spool("stall", 200, size=8192)
    proxy = FaultProxy("127.0.0.1", server.port).start()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "scribe_cli", "resume", "stall", "--server", proxy.url,
                                 "--token", server.alice, "--json"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "SCRIBE_ACK_TIMEOUT": "2"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and metric(server, "scribe_chunks_stored") < 20:
            time.sleep(0.02)
        assert proxy.stall_all() >= 1
        out, err = proc.communicate(timeout=90)
    finally:
        proxy.stop()
    assert proc.returncode == 0, err
    assert json.loads(out)["upload"]["disconnects"] >= 1
    assert_stored_exactly(server, "stall", chunks)


def test_server_down_is_a_clear_error_and_keeps_the_spool(tmp_path):
    """No server: one-line Error/Try, exit 3, every chunk still spooled."""
    fill_spool("down", 3)
    result = scribe("resume", "down", "--server", "http://127.0.0.1:9", "--token", "scr_x" * 4,
                    "--give-up-after", "1")
    assert result.returncode == 3
    assert result.stderr.splitlines()[0].startswith("Error: cannot reach the server")
    assert result.stderr.splitlines()[1].startswith("Try: ")
    assert "Traceback" not in result.stderr
    with Spool(spool_dir()) as spool:
        assert len(spool.pending("down")) == 3


def test_bad_token_is_a_clear_error(server):
    """A wrong token: exit 4 with a hint, nothing removed from the spool."""
    fill_spool("badtoken", 2)
    result = scribe("resume", "badtoken", "--server", server.url, "--token", "scr_not-a-real-token")
    assert result.returncode == 4
    assert result.stderr.startswith("Error: the server refused the token")
    with Spool(spool_dir()) as spool:
        assert len(spool.pending("badtoken")) == 2


def test_export_command_writes_the_session(server, tmp_path):
    """`scribe export -o x.flac` writes the assembled session; gaps are refused without --allow-gaps."""
    import io

    import numpy as np
    import soundfile as sf

    frames = np.arange(-8000, 8000, dtype=np.int16).reshape(-1, 1)
    with Spool(spool_dir()) as spool:
        for seq in range(4):
            buf = io.BytesIO()
            sf.write(buf, frames[seq * 4000:(seq + 1) * 4000], 16000, format="WAV", subtype="PCM_16")
            spool.add("exp", seq, buf.getvalue(), "audio/wav")
    assert scribe("resume", "exp", "--server", server.url, "--token", server.alice).returncode == 0
    out = tmp_path / "exp.flac"
    result = scribe("export", "exp", "-o", str(out), "--server", server.url, "--token", server.alice)
    assert result.returncode == 0, result.stderr
    data, rate = sf.read(out, dtype="int16", always_2d=True)
    assert rate == 16000 and np.array_equal(data, frames)
    bad = scribe("export", "exp", "-o", str(tmp_path / "x.mp3"), "--server", server.url, "--token", server.alice)
    assert bad.returncode == 9 and "Try:" in bad.stderr
