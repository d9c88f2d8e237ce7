"""Smoke runs of the benchmarks: each one works end to end (no speed is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script,expect", [
    ("drain.py", ["drain benchmark", "16Ki", "vs seed"]),
    ("peers.py", ["peers benchmark", "46Ki", "scribe", "naive", "vs naive", "tus: skipped"]),
    ("cards.py", ["cards benchmark", "scribe offline+resume", "naive", "tus: skipped", "every file checked"]),
    ("gaps.py", ["gaps benchmark", "big", "huge"]),
    ("recorder.py", ["recorder overhead", "CPU per second of audio", "growth"]),
    ("watch_large.py", ["watch benchmark", "disk read", "drain (scribe resume)", "sha256 equal", "target < 150 MB"]),
    ("load.py", ["load benchmark", "1 node, SQLite", "2 nodes, PostgreSQL + Redis, nginx"]),
    ("startup.py", ["startup benchmark", "python -c pass", "scribe --help", "scribe pending", "scribe gaps uploaded",
                    "scribe sessions --json"]),
])
def test_benchmark_smoke(script, expect):
    """`bench/<script> --smoke` runs to the end and prints its table."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke"], capture_output=True,
                            text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    for text in expect:
        assert text in result.stdout, result.stdout
