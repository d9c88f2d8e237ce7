"""`scribe demo`: embedded server, a network cut in the middle, no gaps, exact export."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf

from scribe_cli.capture.sources import speech_like
from tests.test_client_upload import scribe


def test_demo_survives_the_cut_and_exports_the_exact_signal(tmp_path):
    """The demo's export equals the generated signal sample for sample, after a real connection cut."""
    out = tmp_path / "demo.flac"
    result = scribe("demo", "--generated", "--seconds", "8", "-o", str(out), "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert "network-cut" in kinds and kinds.count("connected") >= 2
    done = events[-1]
    assert done["event"] == "done" and done["cuts"] >= 1 and done["server"]["complete"]
    data, rate = sf.read(out, dtype="int16", always_2d=True)
    assert rate == 16000 and np.array_equal(data, speech_like(16000, 8))


def test_demo_for_people_prints_the_story(tmp_path):
    """Without --json the demo ends with the gap verdict and the exported file."""
    out = tmp_path / "demo.wav"
    result = scribe("demo", "--generated", "--seconds", "5", "-o", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no gaps" in result.stdout and str(out) in result.stdout
    assert out.exists()
