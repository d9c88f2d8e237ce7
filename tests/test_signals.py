"""Ctrl-C and SIGTERM, sent for real to real `scribe` processes: prompt, clean, nothing lost.

Each scribe process runs in its own process group and the signal goes to the
whole group, as a terminal's Ctrl-C does.  Every test checks the exit code,
the time from the signal to the exit, that stderr holds no traceback, and
what the server holds afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf

from scribe_cli.capture.sources import speech_like
from scribe_cli.chaos.proxy import FaultProxy
from scribe_cli.config import resolve
from scribe_cli.spool import Spool
from tests.test_client_upload import assert_stored_exactly, fill_spool, scribe
from tests.test_record import ASOUNDRC, RealTimeFeeder, alsa_home, export_samples  # noqa: F401 (fixture)
from tests.test_watch import tone, wav_bytes

RATE = 16000


_started: list["Scribe"] = []


@pytest.fixture(autouse=True)
def _no_leftover_scribes():
    """A test that fails before a `scribe` it started has exited leaves no process behind."""
    yield
    while _started:
        proc = _started.pop().proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


class Scribe:
    """A `scribe` subprocess in its own process group, its stdout read as JSON Lines in a thread."""

    def __init__(self, *args: str, **env: str):
        _started.append(self)
        self.proc = subprocess.Popen([sys.executable, "-m", "scribe_cli", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, **env}, process_group=0)
        self.events: list[dict] = []
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.signalled_at: float | None = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line)
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    pass
                self.changed.notify_all()

    def wait_for(self, predicate, timeout: float = 60) -> dict:
        """The first event matching ``predicate`` (waiting for it); fails on timeout or exit."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.proc.stderr.read()}"
                assert time.monotonic() < deadline, f"no matching event in {timeout} s: {self.events[-3:]}"
                self.changed.wait(0.2)

    def signal(self, sig: int) -> None:
        """Signal the whole process group, as a terminal does."""
        self.signalled_at = time.monotonic()
        os.killpg(self.proc.pid, sig)

    def finish(self, timeout: float = 60) -> tuple[int, float, str]:
        """Wait for the exit: (exit code, seconds since the first signal, stderr)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"still running {timeout} s after the signal")
        elapsed = time.monotonic() - self.signalled_at
        self.reader.join(5)
        return self.proc.returncode, elapsed, self.proc.stderr.read()


def assert_clean(stderr: str) -> None:
    assert "Traceback" not in stderr and "Exception" not in stderr, stderr


def assert_interrupted(code: int, elapsed: float, stderr: str, within: float = 5) -> None:
    """Exit 130 (interrupted) within ``within`` seconds of the signal, without a traceback."""
    assert code == 130, stderr
    assert elapsed < within, (elapsed, stderr)
    assert_clean(stderr)


def wait_until(condition, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# the Socket.IO adapter -------------------------------------------------------------

ADAPTER_PROBE = """
import asyncio, os, signal, sys
from scribe_cli.sio import AsyncClient

seen = []
signal.signal(signal.SIGINT, lambda *a: seen.append(1))
mine = signal.getsignal(signal.SIGINT)

async def main():
    sio = AsyncClient(reconnection=False)
    await sio.connect(sys.argv[1], auth={"token": sys.argv[2]}, transports=["websocket"], wait_timeout=10)
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.sleep(0.5)
    print(len(seen), sio.connected, signal.getsignal(signal.SIGINT) is mine, flush=True)
    await sio.disconnect()

asyncio.run(main())
"""


def test_socketio_client_leaves_sigint_to_the_application(server):
    """A connected client from scribe_cli.sio neither replaces our SIGINT handler nor lets the loop swallow it."""
    result = subprocess.run([sys.executable, "-c", ADAPTER_PROBE, server.url, server.alice], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "True", "True"]


# record ----------------------------------------------------------------------------

@pytest.fixture
def live_device(alsa_home):
    """The ALSA capture device paced like a microphone: a FIFO fed at 16,000 frames a second."""
    home, source = alsa_home
    fifo = home / "live.raw"
    os.mkfifo(fifo)
    (home / ".asoundrc").write_text(ASOUNDRC.format(infile=fifo))
    with RealTimeFeeder(fifo, source):
        yield home, source


def record(home: Path, session: str, server_url: str, token: str) -> Scribe:
    return Scribe("record", "--session", session, "--chunk-seconds", "2", "--json", "--server", server_url,
                  "--token", token, HOME=str(home))


def assert_recorded_prefix(server, session: str, source: np.ndarray, done: dict, at_least: float) -> None:
    """The server's session is a finished, gap-free prefix of the source, as long as what was captured."""
    exported = export_samples(server, session)
    assert len(exported) >= at_least * RATE
    assert (done["captured"] - 1) * 2 * RATE < len(exported) <= done["captured"] * 2 * RATE  # 2 s chunks
    assert np.array_equal(exported, source[: len(exported)])
    gaps = server.get(f"/api/sessions/{session}/missing-chunks", server.alice).json()
    assert gaps["complete"] and gaps["finalSeq"] == done["finalSeq"] == done["captured"] - 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_record_stops_on_first_signal_and_uploads_the_partial_chunk(server, live_device, sig):
    """`record` + one Ctrl-C, SIGTERM or SIGHUP: exit 0 within seconds; the server holds an exact prefix of the source."""
    home, source = live_device
    rec = record(home, "sig1", server.url, server.alice)
    rec.wait_for(lambda e: e["event"] == "status" and e["frames"] >= 5 * RATE)  # mid-way through the third chunk
    rec.signal(sig)
    code, elapsed, stderr = rec.finish()
    assert code == 0, stderr
    assert elapsed < 10
    assert_clean(stderr)
    done = rec.events[-1]
    assert done["event"] == "done" and done["pendingAfterDrain"] == 0 and done["captured"] >= 3
    assert_recorded_prefix(server, "sig1", source, done, at_least=5)


def test_record_with_a_stalled_link_exits_5_after_a_short_drain(server, live_device):
    """Ctrl-C while the link is stalled: a bounded drain, exit 5 with the resume hint; resume completes it."""
    home, source = live_device
    proxy = FaultProxy("127.0.0.1", server.port).start()
    try:
        rec = record(home, "stall1", proxy.url, server.alice)
        rec.wait_for(lambda e: e["event"] == "acked")
        proxy.stall_all()
        rec.wait_for(lambda e: e["event"] == "status" and e["frames"] >= 5 * RATE)
        rec.signal(signal.SIGINT)
        code, elapsed, stderr = rec.finish()
    finally:
        proxy.stop()
    assert code == 5, stderr
    assert 4 < elapsed < 12  # the 5 s drain, not the 30 s --drain-timeout
    assert_clean(stderr)
    assert "scribe resume stall1" in stderr
    done = next(e for e in rec.events if e["event"] == "done")
    assert done["pendingAfterDrain"] >= 1
    assert rec.events[-1]["event"] == "error" and rec.events[-1]["error"]["code"] == "incomplete"
    resumed = scribe("resume", "stall1", "--server", server.url, "--token", server.alice, "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert_recorded_prefix(server, "stall1", source, done, at_least=5)


def test_record_second_ctrl_c_stops_the_drain_at_once(server, live_device):
    """A second Ctrl-C during the drain: exit 130 at once, the rest stays spooled and resume completes it."""
    home, source = live_device
    proxy = FaultProxy("127.0.0.1", server.port).start()
    try:
        rec = record(home, "twice", proxy.url, server.alice)
        rec.wait_for(lambda e: e["event"] == "acked")
        proxy.stall_all()
        rec.wait_for(lambda e: e["event"] == "status" and e["frames"] >= 5 * RATE)
        rec.signal(signal.SIGINT)
        rec.wait_for(lambda e: e["event"] == "stopping", timeout=10)
        second = time.monotonic()
        os.killpg(rec.proc.pid, signal.SIGINT)
        code, _, stderr = rec.finish()
        after_second = time.monotonic() - second
    finally:
        proxy.stop()
    assert code == 130, stderr
    assert after_second < 3
    assert_clean(stderr)
    assert stderr.startswith("Error: stopped before the upload finished") and "scribe resume twice" in stderr
    with Spool(resolve().spool_dir) as spool:
        assert spool.count("twice") >= 1 and spool.session_info("twice")["finalSeq"] is not None
    resumed = scribe("resume", "twice", "--server", server.url, "--token", server.alice, "--json")
    assert resumed.returncode == 0, resumed.stderr
    exported = export_samples(server, "twice")
    assert len(exported) >= 5 * RATE and np.array_equal(exported, source[: len(exported)])


# watch -----------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_watch_idle_stops_on_ctrl_c(server, tmp_path, sig):
    """An idle `watch` (its file uploaded): one Ctrl-C (or SIGHUP) exits 0 at once; the session exports bit-exact."""
    folder = tmp_path / "rec"
    folder.mkdir()
    audio = tone(3, 5)
    (folder / "a.wav").write_bytes(wav_bytes(audio))
    watch = Scribe("watch", str(folder), "--session", "idle", "--settle", "0.3", "--chunk-seconds", "1", "--json",
                   "--server", server.url, "--token", server.alice)
    taken = watch.wait_for(lambda e: e["event"] == "taken")
    wait_until(lambda: server.get("/api/sessions/idle", server.alice).status_code == 200
               and server.get("/api/sessions/idle", server.alice).json()["totalChunks"] == taken["chunks"],
               what=f"{taken['chunks']} chunks stored")
    time.sleep(1)  # idle: nothing to take, nothing to send
    watch.signal(sig)
    code, elapsed, stderr = watch.finish()
    assert code == 0, stderr
    assert elapsed < 5
    assert_clean(stderr)
    assert np.array_equal(export_samples(server, "idle").reshape(-1, 1), audio)


@pytest.mark.parametrize("second", [False, True], ids=["one-signal", "two-signals"])
def test_watch_uploading_stops_within_seconds(server, tmp_path, second):
    """`watch` with uploads in flight over a stalled link: exit 5 after the short drain, or 130 on a second
    Ctrl-C; nothing spooled is lost and resume completes the session bit-exact."""
    folder = tmp_path / "rec"
    folder.mkdir()
    audio = tone(20, 6)
    (folder / "big.wav").write_bytes(wav_bytes(audio))
    proxy = FaultProxy("127.0.0.1", server.port).start()
    try:
        watch = Scribe("watch", str(folder), "--session", "busy", "--settle", "0.3", "--chunk-seconds", "0.5",
                       "--json", "--server", proxy.url, "--token", server.alice, SCRIBE_WINDOW="2")
        watch.wait_for(lambda e: e["event"] == "acked")
        proxy.stall_all()
        watch.wait_for(lambda e: e["event"] == "taken")  # the whole file is spooled; its upload is stalled
        watch.signal(signal.SIGTERM)
        if second:
            watch.wait_for(lambda e: e["event"] == "stopping", timeout=10)
            os.killpg(watch.proc.pid, signal.SIGINT)
        code, elapsed, stderr = watch.finish()
    finally:
        proxy.stop()
    assert_clean(stderr)
    if second:
        assert code == 130 and elapsed < 4, (code, elapsed, stderr)
    else:
        assert code == 5 and 4 < elapsed < 12, (code, elapsed, stderr)
    assert "scribe resume busy" in stderr
    with Spool(resolve().spool_dir) as spool:
        assert spool.count("busy") >= 1
    resumed = scribe("resume", "busy", "--server", server.url, "--token", server.alice, "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert np.array_equal(export_samples(server, "busy").reshape(-1, 1), audio)


def test_watch_stops_promptly_when_the_server_never_answers(tmp_path):
    """A server that accepts connections but never answers does not hold up the exit after the drain."""
    import socket

    folder = tmp_path / "rec"
    folder.mkdir()
    (folder / "a.wav").write_bytes(wav_bytes(tone(2, 9)))
    with socket.create_server(("127.0.0.1", 0), backlog=50) as hole:
        url = f"http://127.0.0.1:{hole.getsockname()[1]}"
        watch = Scribe("watch", str(folder), "--session", "hole", "--settle", "0.2", "--drain-timeout", "1",
                       "--json", "--server", url, "--token", "any")
        watch.wait_for(lambda e: e["event"] == "taken")
        time.sleep(2)  # the uploader now waits on its first HTTP request (10 s timeout)
        watch.signal(signal.SIGINT)
        code, elapsed, stderr = watch.finish()
    assert code == 5, stderr
    assert elapsed < 4
    assert_clean(stderr)
    with Spool(resolve().spool_dir) as spool:
        assert spool.count("hole") == 1


def test_an_inherited_ignored_sigint_stays_ignored(server):
    """Started with SIGINT ignored (nohup, `&` in a script), scribe ignores it; SIGTERM still stops it."""
    fill_spool("ignored", 2, final=False)
    assert scribe("resume", "ignored", "--server", server.url, "--token", server.alice).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "scribe_cli", "follow", "ignored", "--json", "--server", server.url,
                             "--token", server.alice], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert json.loads(proc.stdout.readline())["event"] in ("following", "state")
    proc.send_signal(signal.SIGINT)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 130
    assert_clean(proc.stderr.read())


# resume ----------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_resume_mid_drain_stops_and_keeps_the_spool(server, sig):
    """`resume` of a big spool over a slow link, signalled mid-drain: exit 130 in seconds, nothing lost;
    a second resume stores every chunk exactly once."""
    chunks = fill_spool("bigspool", 600, size=16384)
    proxy = FaultProxy("127.0.0.1", server.port, latency=0.02).start()
    try:
        resume = Scribe("resume", "bigspool", "--server", proxy.url, "--token", server.alice, "--json")
        wait_until(lambda: server.get("/api/sessions/bigspool", server.alice).status_code == 200
                   and server.get("/api/sessions/bigspool", server.alice).json()["totalChunks"] >= 20,
                   what="the drain to be under way")
        resume.signal(sig)
        code, elapsed, stderr = resume.finish()
    finally:
        proxy.stop()
    assert_interrupted(code, elapsed, stderr)
    assert stderr.startswith("Error: stopped uploading: ") and "scribe resume bigspool" in stderr
    held = server.get("/api/sessions/bigspool", server.alice).json()["totalChunks"]
    with Spool(resolve().spool_dir) as spool:
        left = spool.count("bigspool")
    assert held < 600 and left >= 600 - held  # spooled until acknowledged: none lost
    again = scribe("resume", "bigspool", "--server", server.url, "--token", server.alice, "--json")
    assert again.returncode == 0, again.stderr
    assert_stored_exactly(server, "bigspool", chunks)


def test_resume_interrupted_while_it_checks_the_server_and_compacts_the_spool(server):
    """Ctrl-C after the last ack, while `resume` asks the server for its view of the session (its
    requests refused here, so it retries) and gives the spool's space back beside it: exit 130 at once with the one-line error,
    the spool intact (a VACUUM is one transaction), and the next `resume` finds the session complete."""
    chunks = fill_spool("packed", 700, size=48 * 1024)  # 33 MiB spooled: freed, it is worth compacting
    proxy = FaultProxy("127.0.0.1", server.port).start()
    try:
        resume = Scribe("resume", "packed", "--server", proxy.url, "--token", server.alice, "--json")

        def stored() -> int:
            reply = server.get("/api/sessions/packed", server.alice)
            return reply.json()["totalChunks"] if reply.status_code == 200 else 0

        wait_until(lambda: stored() >= 100, what="the drain to be under way")
        # the upload goes on over its open link; the check's requests are refused (and retried) from now
        proxy.refuse_for(30)
        wait_until(lambda: stored() == 700, what="every chunk to be stored")
        time.sleep(0.2)
        resume.signal(signal.SIGINT)
        code, elapsed, stderr = resume.finish()
    finally:
        proxy.stop()
    assert_interrupted(code, elapsed, stderr)
    assert stderr.startswith("Error: interrupted") and "Try: " in stderr
    # the compact ran to its end before the exit: the 33 MiB are given back
    assert sum(path.stat().st_size for path in resolve().spool_dir.glob("cache.db*")) < 4 * 2**20
    database = sqlite3.connect(resolve().spool_dir / "cache.db")
    try:
        assert database.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        database.close()
    with Spool(resolve().spool_dir) as spool:
        assert spool.fsck(repair=False).missing_audio == []
    again = scribe("resume", "packed", "--server", server.url, "--token", server.alice, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["complete"]
    assert_stored_exactly(server, "packed", chunks)


# demo, follow, export, chaos -------------------------------------------------------

def test_demo_stops_on_ctrl_c_and_exports_what_it_recorded(tmp_path):
    """`demo` + Ctrl-C: recording stops at once, exit 0, the export is an exact prefix of the signal."""
    out = tmp_path / "demo.flac"
    demo = Scribe("demo", "--generated", "--seconds", "30", "-o", str(out), "--json")
    demo.wait_for(lambda e: e["event"] == "status" and e["frames"] >= 4 * RATE, timeout=90)
    demo.signal(signal.SIGINT)
    code, elapsed, stderr = demo.finish()
    assert code == 0, stderr
    assert elapsed < 10
    assert_clean(stderr)
    done = demo.events[-1]
    assert done["event"] == "done" and done["server"]["complete"]
    data, rate = sf.read(out, dtype="int16", always_2d=True)
    assert 4 * RATE <= len(data) < 15 * RATE
    assert np.array_equal(data, speech_like(RATE, 30)[: len(data)])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_follow_stops_on_signal(server, sig):
    """`follow` of an unfinished session: one signal ends it at once with 130, no traceback."""
    fill_spool("unfinished", 3, final=False)
    assert scribe("resume", "unfinished", "--server", server.url, "--token", server.alice).returncode == 0
    follow = Scribe("follow", "unfinished", "--json", "--server", server.url, "--token", server.alice)
    follow.wait_for(lambda e: e["event"] == "state")
    follow.signal(sig)
    code, elapsed, stderr = follow.finish()
    assert_interrupted(code, elapsed, stderr)
    assert stderr.startswith("Error: stopped following unfinished")


def test_export_interrupted_leaves_no_partial_file(server, tmp_path):
    """`export` over a slow link, Ctrl-C mid-download: exit 130, neither the file nor its .part remain."""
    audio = tone(120, 8)
    folder = tmp_path / "rec"
    folder.mkdir()
    (folder / "long.wav").write_bytes(wav_bytes(audio))
    taken = scribe("watch", str(folder), "--session", "long", "--once", "--settle", "0.2", "--format", "wav",
                   "--server", server.url, "--token", server.alice)
    assert taken.returncode == 0, taken.stderr
    proxy = FaultProxy("127.0.0.1", server.port, latency=0.1).start()  # ~6 s for the 3.8 MB download
    out = tmp_path / "out" / "long.wav"
    out.parent.mkdir()
    try:
        export = Scribe("export", "long", "-o", str(out), "--server", proxy.url, "--token", server.alice)
        wait_until(lambda: any(out.parent.iterdir()), what="the download to start")
        export.signal(signal.SIGINT)
        code, elapsed, stderr = export.finish()
    finally:
        proxy.stop()
    assert_interrupted(code, elapsed, stderr)
    assert list(out.parent.iterdir()) == []


def test_chaos_stops_on_ctrl_c_and_leaves_nothing_behind(tmp_path):
    """`chaos` + Ctrl-C: exit 130 in seconds, its embedded server stopped and its temporary folder removed."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    chaos = Scribe("chaos", "--chunks", "3000", "--cut-every", "0.5", "--json", TMPDIR=str(tmp))
    start = chaos.wait_for(lambda e: e["event"] == "start", timeout=90)
    time.sleep(1)
    chaos.signal(signal.SIGINT)
    code, elapsed, stderr = chaos.finish()
    assert code == 130, stderr
    assert elapsed < 15
    assert_clean(stderr)
    assert list(tmp.iterdir()) == []
    with pytest.raises(requests.ConnectionError):
        requests.get(start["server"] + "/healthz", timeout=2)


def test_stopping_the_fault_proxy_with_open_links_logs_nothing(caplog):
    """Stopping the chaos/demo proxy while links are open logs no asyncio "Exception in callback" (gh-113538)."""
    import socket

    caplog.set_level(logging.ERROR)
    for _ in range(5):
        with socket.create_server(("127.0.0.1", 0)) as upstream:
            proxy = FaultProxy("127.0.0.1", upstream.getsockname()[1]).start()
            clients = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(3)]
            accepted = [upstream.accept()[0] for _ in range(3)]
            for client in clients:
                client.sendall(b"x")
            wait_until(lambda: proxy.stats.bytes_up == 3, 10, "the bytes to pass")
            proxy.stop()
            for sock in clients + accepted:
                sock.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_watch_stopped_mid_file_says_so_and_the_next_run_finishes_it(server, tmp_path):
    """Ctrl-C while a recorder is still writing a file: exit 5 naming the file left, and the next
    `watch --once` completes it so the server holds the file byte for byte."""
    import hashlib

    folder = tmp_path / "card"
    folder.mkdir()
    data = wav_bytes(tone(12, 21))
    target = folder / "ZOOM0001.WAV"
    stop_writing = threading.Event()

    def recorder() -> None:  # appends 4 KiB every 50 ms, as a recorder writing in real time
        with open(target, "wb") as f:
            for start in range(0, len(data), 4096):
                if stop_writing.is_set():
                    return
                f.write(data[start:start + 4096])
                f.flush()
                time.sleep(0.05)

    writer = threading.Thread(target=recorder)
    writer.start()
    try:
        watch = Scribe("watch", str(folder), "--session", "grow", "--settle", "1", "--chunk-bytes", "16384",
                       "--json", "--server", server.url, "--token", server.alice)
        watch.wait_for(lambda e: e["event"] == "acked")
        watch.signal(signal.SIGINT)
        code, elapsed, stderr = watch.finish()
    finally:
        stop_writing.set()
        writer.join()
    assert_clean(stderr)
    assert code == 5 and elapsed < 8, (code, elapsed, stderr)
    assert "taken whole" in stderr and "scribe watch" in stderr
    assert any(e["event"] == "still-writing" and e["relPath"] == "ZOOM0001.WAV" for e in watch.events)
    target.write_bytes(data)  # the recording ends: the file is rewritten whole, header included
    again = scribe("watch", str(folder), "--session", "grow", "--settle", "0.5", "--once",
                   "--server", server.url, "--token", server.alice)
    assert again.returncode == 0, again.stderr
    got = server.get("/api/sessions/grow/file?path=ZOOM0001.WAV", server.alice)
    assert got.status_code == 200, got.text
    assert hashlib.sha256(got.content).hexdigest() == hashlib.sha256(data).hexdigest()


def test_watch_once_stopped_mid_card_says_so_and_the_next_run_continues(tmp_path):
    """Ctrl-C during `watch --once` of a card: exit 5 with "stopped before N file(s) were taken whole" (not
    "still being written": the files are a finished recorder's); the next `watch --once` takes the rest and
    every file of the card ends in the spool whole."""
    from tests import recorder_files as rf

    card = tmp_path / "card"
    files = []
    for index in range(16):
        path = card / "FOLDER01" / f"ZOOM{index + 1:04d}.WAV"
        path.parent.mkdir(parents=True, exist_ok=True)
        rf.zoom_bwf(path, seconds=20.0, seed=index)
        files.append(path)
    old = time.time() - 3600
    for path in files:
        os.utime(path, (old, old))
    watch = Scribe("watch", str(card), "--session", "cut", "--once", "--offline", "--settle", "0.2", "--json")
    watch.wait_for(lambda e: e["event"] == "taken")
    watch.signal(signal.SIGINT)
    code, elapsed, stderr = watch.finish()
    assert_clean(stderr)
    taken = sum(e["event"] == "taken" for e in watch.events)
    assert code == 5 and taken < len(files), (code, taken, stderr)
    assert f"stopped before {len(files) - taken} file(s) were taken whole" in stderr and "still being" not in stderr
    assert f"run scribe watch {card} again" in stderr
    again = scribe("watch", str(card), "--session", "cut", "--once", "--offline", "--settle", "0.2", "--json")
    assert again.returncode == 0, again.stderr
    with Spool(resolve().spool_dir) as spool:
        closing = {meta.file["path"]: meta.file["final"]["sha256"] for meta in spool.chunks("cut")
                   if meta.file.get("final")}
    import hashlib

    assert closing == {f"FOLDER01/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
