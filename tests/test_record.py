"""`scribe record` through a real PortAudio device (ALSA `file` plugin), crash recovery, errors.

There is no microphone here. The device is real all the same: PortAudio opens
ALSA's default PCM, which a test `.asoundrc` (in a temporary HOME) routes to a
`file` plugin whose `infile` is raw PCM of known content over a `null` slave.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.test_client_upload import scribe
from scribe_cli.spool import Spool
from scribe_cli.config import resolve

ASOUNDRC = """
pcm.!default {{
    type asym
    playback.pcm "null"
    capture.pcm "filein"
}}
pcm.filein {{
    type file
    slave.pcm "nullcap"
    file "/dev/null"
    infile "{infile}"
    format "raw"
}}
pcm.nullcap {{
    type null
}}
"""


@pytest.fixture
def alsa_home(tmp_path):
    """A HOME whose default ALSA capture device plays a known ramp (int16 mono)."""
    home = tmp_path / "alsa-home"
    home.mkdir()
    source = (np.arange(16000 * 30) % 3001 - 1500).astype("<i2") * 9
    source.tofile(home / "source.raw")
    (home / ".asoundrc").write_text(ASOUNDRC.format(infile=home / "source.raw"))
    return home, source


def export_samples(server, session: str) -> np.ndarray:
    resp = server.get(f"/api/sessions/{session}/audio?format=wav", server.alice)
    assert resp.status_code == 200, resp.text
    data, rate = sf.read(io.BytesIO(resp.content), dtype="int16")
    assert rate == 16000
    return data


def test_record_through_portaudio_equals_source_exactly(server, alsa_home):
    """`scribe record --duration 3` from a PortAudio device: the exported session equals the source samples."""
    home, source = alsa_home
    result = scribe("record", "--session", "mic1", "--duration", "3", "--chunk-seconds", "1", "--json",
                    "--server", server.url, "--token", server.alice, HOME=str(home), timeout=60)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0] == {"event": "session", "session": "mic1", "rate": 16000, "channels": 1, "format": "flac"}
    assert events[-1]["event"] == "done" and events[-1]["pendingAfterDrain"] == 0
    assert sum(e["event"] == "captured" for e in events) == 3
    exported = export_samples(server, "mic1")
    assert len(exported) == 48000
    assert np.array_equal(exported, source[:48000])
    gaps = server.get("/api/sessions/mic1/missing-chunks", server.alice).json()
    assert gaps["complete"] and gaps["finalSeq"] == 2


class RealTimeFeeder:
    """Writes the source into a FIFO at 16,000 frames a second: a device paced like a microphone."""

    def __init__(self, fifo: Path, source: np.ndarray):
        self.fifo, self.source, self.stop = fifo, source, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        block = 1600
        position = 0
        while not self.stop.is_set() and position < len(self.source):
            try:
                with open(self.fifo, "wb") as pipe:
                    started = time.monotonic()
                    while not self.stop.is_set() and position < len(self.source):
                        pipe.write(self.source[position : position + block].tobytes())
                        pipe.flush()
                        position += block
                        delay = started + position / 16000 - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
            except BrokenPipeError:
                # A reader that opened and closed the device (PortAudio probing it) threw away
                # what was written: the recording proper starts from the beginning again.
                position = 0

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        try:  # unblock a writer waiting for a reader
            fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass
        self.thread.join(5)


def test_sigkill_mid_chunk_loses_at_most_a_second(server, alsa_home):
    """Recorder SIGKILLed mid-chunk: `resume` recovers the journal; at most ~1 s before the kill is lost."""
    home, source = alsa_home
    fifo = home / "live.raw"
    os.mkfifo(fifo)
    (home / ".asoundrc").write_text(ASOUNDRC.format(infile=fifo))
    with RealTimeFeeder(fifo, source):
        proc = subprocess.Popen([sys.executable, "-m", "scribe_cli", "record", "--session", "crash",
                                 "--chunk-seconds", "2", "--format", "wav", "--json", "--server", server.url,
                                 "--token", server.alice], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "HOME": str(home)})
        frames_at_kill = 0
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "status":
                frames_at_kill = event["frames"]
                if frames_at_kill >= 16000 * 3.2:  # mid-way through the second chunk
                    break
        time.sleep(0.3)
        frames_at_kill += int(0.3 * 16000)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert (resolve().journal_dir / "crash").exists()
    result = scribe("resume", "crash", "--server", server.url, "--token", server.alice, "--json")
    assert result.returncode == 0, result.stderr
    exported = export_samples(server, "crash")
    assert frames_at_kill - 16000 <= len(exported) <= frames_at_kill + 1600
    assert np.array_equal(exported, source[: len(exported)])
    assert server.get("/api/sessions/crash/missing-chunks", server.alice).json()["complete"]
    assert not (resolve().journal_dir / "crash").exists()


def test_no_input_device_is_a_clear_error(tmp_path):
    """No ALSA device at all: one-line error, exit 7, every other command still works."""
    empty_home = tmp_path / "nohome"
    empty_home.mkdir()
    (empty_home / ".asoundrc").write_text("pcm.!default { type hw card 99 }\n")
    result = scribe("record", "--offline", "--duration", "1", HOME=str(empty_home))
    assert result.returncode == 7
    assert result.stderr.splitlines()[0].startswith("Error: ")
    assert "Try:" in result.stderr and "Traceback" not in result.stderr
    assert scribe("pending", HOME=str(empty_home)).returncode == 0


def test_missing_portaudio_is_a_clear_error(tmp_path):
    """Without the PortAudio library: exit 7 with an install hint; `scribe pending` unaffected.

    PortAudio is installed here, so this test stands in for its absence at the
    one boundary that cannot be real: a `sounddevice` module that raises the
    OSError the real one raises when libportaudio is not found.
    """
    fake = tmp_path / "fake-site"
    fake.mkdir()
    (fake / "sounddevice.py").write_text("raise OSError('PortAudio library not found')\n")
    env = {"PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = scribe("record", "--offline", "--duration", "1", **env)
    assert result.returncode == 7
    assert result.stderr.startswith("Error: PortAudio is not installed")
    assert "libportaudio2" in result.stderr
    assert scribe("devices", **env).returncode == 7
    assert scribe("pending", **env).returncode == 0


def test_record_offline_then_resume_and_refuse_reuse(server, alsa_home):
    """--offline spools only; resume uploads it; recording into the same session again is refused."""
    home, source = alsa_home
    result = scribe("record", "--session", "later", "--duration", "2.5", "--offline", "--chunk-seconds", "1",
                    HOME=str(home), timeout=60)
    assert result.returncode == 0, result.stderr
    with Spool(resolve().spool_dir) as spool:
        assert [m.seq for m in spool.pending("later")] == [0, 1, 2]
        assert spool.session_info("later")["finalSeq"] == 2
    assert scribe("resume", "later", "--server", server.url, "--token", server.alice).returncode == 0
    assert np.array_equal(export_samples(server, "later"), source[:40000])
    again = scribe("record", "--session", "later", "--duration", "1", "--offline", HOME=str(home))
    assert again.returncode == 9 and "already exists" in again.stderr
