"""Recorder cards: metadata read from real-recorder-style files; every file back byte for byte."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given
from hypothesis import strategies as st

import scribe_protocol as proto

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
    events = [e for e in map(json.loads, result.stdout.splitlines()) if "event" in e]  # then {"error": ...}
    assert [e["relPath"] for e in events if e["event"] == "ignored"] == ["CONFIG.TXT"]
    assert [(e["relPath"], e["reason"]) for e in events if e["event"] == "rejected"] == [
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
    again_events = [json.loads(line).get("event") for line in again.stdout.splitlines()]
    assert "taken" not in again_events and "ignored" not in again_events  # listed once, nothing twice
    stream = server.get("/api/sessions/card1/audio?format=wav", server.alice)
    assert stream.status_code == 415 and "--files" in stream.json()["error"]["message"]
    bob = server.token("bob")
    for route in ("/api/sessions/card1", "/api/sessions/card1/file?path=CONFIG.TXT",
                  "/api/sessions/card1/file?path=FOLDER01/ZOOM0001.WAV"):
        assert server.get(route, bob).status_code == 404  # another token's files do not exist for bob


@pytest.fixture
def any_server(server_factory, backend):
    """A server on SQLite and on PostgreSQL, with a token for 'alice'."""
    srv = server_factory(database_url=backend)
    srv.alice = srv.token("alice")
    return srv.start()


def test_in_place_change_becomes_a_new_version_without_duplicating_audio(any_server, tmp_path):
    """One byte changed in an uploaded file: version 2 sends one range; the stream export is not doubled;
    both versions download byte for byte (SQLite and PostgreSQL)."""
    server = any_server
    folder = tmp_path / "card"
    folder.mkdir()
    rf.zoom_bwf(folder / "TAKE.WAV", seconds=2.0, seed=5)
    original = (folder / "TAKE.WAV").read_bytes()
    assert watch_once(server, folder, "--session", "edit", "--chunk-bytes", "65536").returncode == 0
    changed = bytearray(original)
    changed[300_000] ^= 0xFF
    (folder / "TAKE.WAV").write_bytes(bytes(changed))
    result = watch_once(server, folder, "--session", "edit", "--chunk-bytes", "65536")
    assert result.returncode == 0, result.stderr
    (taken,) = [e for e in map(json.loads, result.stdout.splitlines()) if e.get("event") == "taken"]
    assert taken["version"] == 2 and taken["chunks"] == 2  # the changed range and the closing range
    (entry,) = server.get("/api/sessions/edit", server.alice).json()["files"]
    assert entry["version"] == 2 and entry["sha256"] == sha256_of(folder / "TAKE.WAV")
    for version, content in ((1, original), (2, bytes(changed))):
        resp = server.get("/api/sessions/edit/file", server.alice, params={"path": "TAKE.WAV", "version": version})
        assert resp.status_code == 200 and resp.content == content
    stream = server.get("/api/sessions/edit/audio?format=flac", server.alice)
    assert stream.status_code == 200
    exported, rate = sf.read(io.BytesIO(stream.content), dtype="int32")
    source, _ = sf.read(folder / "TAKE.WAV", dtype="int32")
    assert rate == 48000 and np.array_equal(exported, source)


def test_stream_export_never_clips_float_nor_cuts_bits(server, tmp_path):
    """Float with peaks above 0 dBFS exports as float WAV (peaks kept) and FLAC is refused clearly;
    a 16-bit then a 24-bit file export as 24-bit, sample for sample."""
    floats = tmp_path / "floats"
    floats.mkdir()
    rf.float_wav(floats / "A.WAV", rate=48000)
    assert watch_once(server, floats, "--session", "flt").returncode == 0
    flac = server.get("/api/sessions/flt/audio?format=flac", server.alice)
    assert flac.status_code == 415 and ".wav" in flac.json()["error"]["message"]
    wav = server.get("/api/sessions/flt/audio?format=wav", server.alice)
    exported, _ = sf.read(io.BytesIO(wav.content), dtype="float32")
    source, _ = sf.read(floats / "A.WAV", dtype="float32")
    assert sf.info(io.BytesIO(wav.content)).subtype == "FLOAT" and exported.max() == 3.5
    assert np.array_equal(exported, source)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    sf.write(mixed / "01.wav", rf.noise(4800, 2, 16, 1).astype(np.int16), 48000, subtype="PCM_16")
    rf.zoom_bwf(mixed / "02.wav", seconds=0.1)
    assert watch_once(server, mixed, "--session", "mix").returncode == 0
    resp = server.get("/api/sessions/mix/audio?format=flac", server.alice)
    assert resp.status_code == 200 and sf.info(io.BytesIO(resp.content)).subtype == "PCM_24"
    exported, _ = sf.read(io.BytesIO(resp.content), dtype="int32")
    parts = [sf.read(mixed / name, dtype="int32")[0] for name in ("01.wav", "02.wav")]
    assert np.array_equal(exported, np.concatenate(parts))


def test_growing_file_with_header_rewrites_and_a_pause_and_a_renamed_tmp(server, tmp_path):
    """A recorder writing in real time (sizes rewritten each block, a pause longer than --settle) and a
    .tmp renamed to .WAV: the server ends with exactly the final bytes, the stream has no audio twice."""
    folder = tmp_path / "card"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "scribe_cli", "watch", str(folder), "--session", "live",
                             "--settle", "0.5", "--chunk-bytes", "16384", "--json", "--server", server.url,
                             "--token", server.alice], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        rate, frames = 16000, rf.noise(16000 * 3, 1, 16, 9)
        live = folder / "LIVE.WAV"
        write_like_a_recorder(live, frames, rate, pause_after=1.0, pause=3.0)
        tmp = folder / "NEXT.tmp"
        write_like_a_recorder(tmp, frames[:8000], rate)
        tmp.rename(folder / "NEXT.WAV")
        want = {"LIVE.WAV": sha256_of(live), "NEXT.WAV": sha256_of(folder / "NEXT.WAV")}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            files = server.get("/api/sessions/live", server.alice).json().get("files", [])
            if {f["path"]: f["sha256"] for f in files} == want:
                break
            time.sleep(0.3)
        assert {f["path"]: f["sha256"] for f in files} == want
        live_version = [f["version"] for f in files if f["path"] == "LIVE.WAV"][0]
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=90)
    assert live_version >= 2, out + err  # closed at the pause, then grew
    for rel, digest in want.items():
        resp = server.get("/api/sessions/live/file", server.alice, params={"path": rel})
        assert hashlib.sha256(resp.content).hexdigest() == digest
    stream = server.get("/api/sessions/live/audio?format=flac", server.alice)
    exported, _ = sf.read(io.BytesIO(stream.content), dtype="int16")
    assert np.array_equal(exported, np.concatenate([frames, frames[:8000]])[:, 0])


def write_like_a_recorder(path, frames, rate: int, pause_after: float | None = None, pause: float = 0.0) -> None:
    """Write a 16-bit mono WAV in 0.1 s blocks in real time, header sizes 0 at first and rewritten after
    every block (as recorders update them), optionally pausing once."""
    import struct

    block = rate // 10
    with open(path, "wb") as f:
        f.write(rf.wav_file([rf.fmt_chunk(1, 1, rate, 16)], riff_size=0) + b"data" + struct.pack("<I", 0))
        data_at = f.tell()
        written, paused = 0, False
        for start in range(0, len(frames), block):
            f.seek(0, 2)
            f.write(rf.pcm_bytes(frames[start : start + block], 16))
            end = f.tell()
            written = end - data_at
            f.seek(4)
            f.write(struct.pack("<I", end - 8))
            f.seek(data_at - 4)
            f.write(struct.pack("<I", written))
            f.flush()
            time.sleep(0.1)
            if pause_after is not None and not paused and start / rate >= pause_after:
                paused = True
                time.sleep(pause)


path_parts = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"),
                     min_size=1, max_size=20)


@given(st.lists(path_parts, min_size=1, max_size=6))
def test_file_path_validation_accepts_relative_paths_and_refuses_escapes(parts):
    """file.path: any relative path of plain parts is accepted; with '..', '.', '' or a leading '/' refused."""
    path = "/".join(parts)
    if any(part in (".", "..") for part in parts) or len(path) > proto.MAX_FILE_PATH:
        with pytest.raises(proto.ProtocolError):
            proto.validate_file_path(path)
        return
    assert proto.validate_file_path(path) == path
    for bad in ("/" + path, path + "/../x", "../" + path, path + "//x", path + "\x00"):
        with pytest.raises(proto.ProtocolError):
            proto.validate_file_path(bad)


@given(st.integers(0, 2**40), st.integers(1, 4096), st.integers(-3, 3))
def test_closing_chunk_must_end_at_the_file_size(offset, length, skew):
    """A chunk carrying file.final is accepted only when offset + its length is the file's size."""
    audio = b"x" * length
    payload = {"sessionId": "s", "sequence": 0, "audio": audio,
               "file": {"path": "A/B.WAV", "version": 1, "offset": offset,
                        "final": {"size": offset + length + skew, "sha256": "0" * 64, "metadata": {}}}}
    if skew == 0:
        assert proto.parse_audio_chunk(payload).file.final["size"] == offset + length
    else:
        with pytest.raises(proto.ProtocolError):
            proto.parse_audio_chunk(payload)


def test_killed_watcher_resumes_mid_file_without_sending_a_range_twice(server, tmp_path):
    """SIGKILL of `scribe watch` half-way through a 12 MB file, then a rerun: each range spooled once,
    the file back byte for byte; the card mounted elsewhere afterwards is recognised (nothing re-sent)."""
    folder = tmp_path / "card"
    (folder / "FOLDER01").mkdir(parents=True)
    rf.zoom_bwf(folder / "FOLDER01" / "BIG.WAV", seconds=40.0, seed=3)  # ~11.5 MB
    size = (folder / "FOLDER01" / "BIG.WAV").stat().st_size
    cmd = [sys.executable, "-m", "scribe_cli", "watch", str(folder), "--session", "kill", "--once", "--offline",
           "--settle", "0.2", "--chunk-bytes", "65536"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from scribe_cli.config import resolve
    from scribe_cli.spool import Spool

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with Spool(resolve().spool_dir) as spool:
            if spool.count("kill") >= 20:
                break
        time.sleep(0.05)
    proc.kill()
    proc.wait(30)
    with Spool(resolve().spool_dir) as spool:
        before = spool.count("kill")
    assert 20 <= before < -(-size // 65536)
    assert subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
    with Spool(resolve().spool_dir) as spool:
        offsets = [m.file["offset"] for m in spool.chunks("kill")]
    assert sorted(offsets) == list(range(0, size, 65536))  # every range exactly once
    moved = tmp_path / "mounted-elsewhere"
    folder.rename(moved)
    again = subprocess.run(cmd[:4] + [str(moved)] + cmd[5:] + ["--json"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and '"event": "taken"' not in again.stdout
    result = scribe("resume", "kill", "--server", server.url, "--token", server.alice)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "restored"
    assert scribe("export", "kill", "--files", "-o", str(out), "--server", server.url,
                  "--token", server.alice).returncode == 0
    assert sha256_of(out / "FOLDER01" / "BIG.WAV") == sha256_of(moved / "FOLDER01" / "BIG.WAV")


def test_power_loss_wav_is_kept_as_is_and_exported_to_the_end_of_its_data(server, tmp_path):
    """A WAV with RIFF/data sizes 0: uploaded unchanged (with a warning), its stream export holds all frames."""
    folder = tmp_path / "card"
    folder.mkdir()
    want = rf.power_loss(folder / "ZOOM0002.WAV")
    result = watch_once(server, folder, "--session", "lost")
    assert result.returncode == 0, result.stderr
    (entry,) = server.get("/api/sessions/lost", server.alice).json()["files"]
    assert entry["sha256"] == sha256_of(folder / "ZOOM0002.WAV") and "power loss" in entry["warnings"][0]
    resp = server.get("/api/sessions/lost/audio?format=flac", server.alice)
    exported, rate = sf.read(io.BytesIO(resp.content), dtype="int32")
    raw = np.frombuffer((folder / "ZOOM0002.WAV").read_bytes()[44:], np.uint8).reshape(-1, 3).astype(np.uint32)
    samples = ((raw[:, 0] << 8) | (raw[:, 1] << 16) | (raw[:, 2] << 24)).view(np.int32).reshape(-1, 2)
    assert rate == 48000 and len(exported) == want["frames"] and np.array_equal(exported, samples)


def test_once_reports_a_file_still_being_written_and_exits_5(tmp_path):
    """`watch --once` while a recorder keeps writing: exit 5, the file named as still being written,
    its full ranges spooled; the next run closes it with exactly its final bytes."""
    folder = tmp_path / "card"
    folder.mkdir()
    frames = rf.noise(16000 * 12, 1, 16, 4)  # written over 12 s: longer than --once waits (3 x 1 + 2 s)
    writer = threading.Thread(target=write_like_a_recorder, args=(folder / "REC.WAV", frames, 16000))
    writer.start()
    try:
        result = scribe("watch", str(folder), "--session", "busy", "--once", "--offline", "--settle", "1",
                        "--chunk-bytes", "8192", "--json", timeout=120)
    finally:
        writer.join()
    assert result.returncode == 5, result.stderr
    events = [e for e in map(json.loads, result.stdout.splitlines()) if "event" in e]
    assert [e["relPath"] for e in events if e["event"] == "still-writing"] == ["REC.WAV"]
    from scribe_cli.config import resolve
    from scribe_cli.spool import Spool

    with Spool(resolve().spool_dir) as spool:
        assert spool.count("busy") >= 1
    closing = scribe("watch", str(folder), "--session", "busy", "--once", "--offline", "--settle", "0.2",
                     "--chunk-bytes", "8192", timeout=120)
    assert closing.returncode == 0, closing.stderr
    with Spool(resolve().spool_dir) as spool:
        rebuilt = bytearray()
        for meta in spool.chunks("busy"):
            data = spool.read_audio(meta)
            rebuilt[meta.file["offset"] : meta.file["offset"] + len(data)] = data
    assert bytes(rebuilt) == (folder / "REC.WAV").read_bytes()


def test_a_card_read_error_skips_that_file_takes_the_others_and_the_next_run_completes_it(server, tmp_path):
    """A card whose reader fails (EIO) inside one file: the other files are taken, the bad one is
    reported as unreadable (not blamed on the spool), --once exits 5 with a hint; what was read
    of it is kept, and once the card reads again the next run completes it: every file comes back
    from the server byte for byte."""
    from tests.faulty_fs import FaultyCard

    source = tmp_path / "source"
    (source / "DCIM").mkdir(parents=True)
    for index in (1, 2, 3):
        rf.zoom_bwf(source / "DCIM" / f"ZOOM000{index}.WAV", seconds=3, seed=index)
    def watch_card(faults: dict[str, int]):
        card = FaultyCard(source, tmp_path / "card", faults).mount()
        try:
            return watch_once(server, card.mountpoint, "--session", "worn", "--chunk-bytes", "65536")
        finally:
            card.unmount()

    failing = watch_card({"DCIM/ZOOM0002.WAV": 300_000})
    assert failing.returncode == 5, failing.stderr
    events = [e for e in map(json.loads, failing.stdout.splitlines()) if "event" in e]
    assert [e["relPath"] for e in events if e["event"] == "unreadable"] == ["DCIM/ZOOM0002.WAV"]
    assert sorted(e["relPath"] for e in events if e["event"] == "taken") == ["DCIM/ZOOM0001.WAV", "DCIM/ZOOM0003.WAV"]
    assert "could not be read from the card" in failing.stderr and "Input/output error" in failing.stderr
    assert "spool" not in failing.stderr.split("Error: ", 1)[1].split("\n")[0]
    assert "Try: " in failing.stderr and "Traceback" not in failing.stderr

    healed = watch_card({})  # the card reads again (another reader)
    assert healed.returncode == 0, healed.stderr
    events = [e for e in map(json.loads, healed.stdout.splitlines()) if "event" in e]
    assert [e["relPath"] for e in events if e["event"] == "taken"] == ["DCIM/ZOOM0002.WAV"]
    out = tmp_path / "restored"
    result = scribe("export", "worn", "--files", "-o", str(out), "--json", "--server", server.url,
                    "--token", server.alice)
    assert result.returncode == 0, result.stderr
    for index in (1, 2, 3):
        rel = f"DCIM/ZOOM000{index}.WAV"
        assert sha256_of(out / rel) == sha256_of(source / rel), rel
