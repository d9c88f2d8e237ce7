"""Recorder cards: metadata read from real-recorder-style files; every file back byte for byte."""

from __future__ import annotations

import json

import pytest

from scribe_cli.capture.metadata import BadAudio, NotAudio, probe
from tests import recorder_files as rf
from tests.test_client_upload import scribe


@pytest.fixture(scope="module")
def card_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    return root, rf.card(root)


def test_probe_reports_each_recorder_files_format_and_metadata(card_dir):
    """probe() reads rate, channels, sample format, frames, start time and bext/iXML/INFO/GUANO/tags of every file."""
    root, expected = card_dir
    for rel, want in expected.items():
        info = probe(root / rel)
        got = info.to_manifest()
        for key in ("sampleRate", "channels", "sampleFormat", "startTime", "frames"):
            if key in want:
                assert got[key] == want[key], (rel, key)
        for key, value in want["metadata"].items():
            assert info.metadata.get(key) == value, (rel, key)
        assert bool(info.warnings) == bool(want.get("recovered")), (rel, info.warnings)


def test_probe_refuses_empty_truncated_and_non_audio_files_with_plain_reasons(tmp_path):
    """0-byte, cut-short and garbage WAVs are BadAudio with a reason; CONFIG.TXT is NotAudio."""
    (tmp_path / "EMPTY.WAV").write_bytes(b"")
    (tmp_path / "CUT.WAV").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ")
    (tmp_path / "junk.wav").write_bytes(b"RIFF....WAVEthis is not audio at all" * 10)
    (tmp_path / "CONFIG.TXT").write_text("GAIN=MED\n")
    reasons = {}
    for name in ("EMPTY.WAV", "CUT.WAV", "junk.wav"):
        with pytest.raises(BadAudio) as caught:
            probe(tmp_path / name)
        reasons[name] = caught.value.reason
    assert "empty" in reasons["EMPTY.WAV"] and "truncated" in reasons["CUT.WAV"]
    assert "not decodable" in reasons["junk.wav"]
    with pytest.raises(NotAudio):
        probe(tmp_path / "CONFIG.TXT")


def test_probe_reads_chunks_after_the_data_chunk(tmp_path):
    """An iXML chunk written after the audio (as many recorders do on closing) is found."""
    frames = rf.noise(100, 2, 16, 1)
    body = [rf.fmt_chunk(1, 2, 44100, 16), rf.chunk(b"data", rf.pcm_bytes(frames, 16)),
            rf.chunk(b"iXML", b"<BWFXML><TAKE>7</TAKE></BWFXML>")]
    (tmp_path / "a.wav").write_bytes(rf.wav_file(body))
    info = probe(tmp_path / "a.wav")
    assert info.frames == 100 and info.metadata["ixml.TAKE"] == "7" and info.warnings == []


def sha256_of(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def watch_once(server, folder, *extra: str, timeout: float = 180):
    return scribe("watch", str(folder), "--once", "--settle", "0.2", "--json", "--server", server.url,
                  "--token", server.alice, *extra, timeout=timeout)


def test_card_comes_back_byte_for_byte_with_its_metadata(server, card_dir, tmp_path):
    """A whole card in one session: every audio file back with equal sha256, manifest metadata right,
    CONFIG.TXT listed once and ignored, the 0-byte file reported, --once exits 5 for it."""
    root, expected = card_dir
    result = watch_once(server, root, "--session", "card1", "--chunk-bytes", "65536")
    assert result.returncode == 5, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["path"] for e in events if e["event"] == "ignored"] == ["CONFIG.TXT"]
    assert [(e["path"], e["reason"]) for e in events if e["event"] == "rejected"] == [
        ("FOLDER01/EMPTY.WAV", "the file is empty (0 bytes)")]
    body = server.get("/api/sessions/card1", server.alice).json()
    manifest = {f["path"]: f for f in body["files"]}
    assert set(manifest) == set(expected)
    for rel, want in expected.items():
        got = manifest[rel]
        assert got["size"] == (root / rel).stat().st_size and got["sha256"] == sha256_of(root / rel), rel
        for key in ("sampleRate", "channels", "sampleFormat", "startTime"):
            assert got[key] == want[key], (rel, key)
        for key, value in want["metadata"].items():
            assert got["metadata"].get(key) == value, (rel, key)
    assert manifest["LOST/ZOOM0002.WAV"]["warnings"]  # the power-loss file says it was recovered
    out = tmp_path / "restored"
    result = scribe("export", "card1", "--files", "-o", str(out), "--json", "--server", server.url,
                    "--token", server.alice)
    assert result.returncode == 0, result.stderr
    for rel in expected:
        assert sha256_of(out / rel) == sha256_of(root / rel), rel
    assert not (out / "CONFIG.TXT").exists() and not (out / "FOLDER01" / "EMPTY.WAV").exists()
    again = watch_once(server, root, "--session", "card1", "--chunk-bytes", "65536")
    again_events = [json.loads(line)["event"] for line in again.stdout.splitlines()]
    assert "taken" not in again_events and "ignored" not in again_events  # listed once, nothing twice
    stream = server.get("/api/sessions/card1/audio?format=wav", server.alice)
    assert stream.status_code == 415 and "--files" in stream.json()["error"]["message"]
