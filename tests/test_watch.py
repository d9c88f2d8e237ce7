"""`scribe watch`: growing files, restarts, corrupt and non-audio files, sample-exact export."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import soundfile as sf

from scribe_cli.capture.watch import FolderWatcher
from scribe_cli.config import resolve
from scribe_cli.spool import Spool
from tests.test_client_upload import scribe


def wav_bytes(frames: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, frames, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def tone(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-20000, 20000, size=(int(16000 * seconds), 1), dtype=np.int16)


def spooled_file(spool: Spool, rel: str) -> bytes:
    """A watched file rebuilt from its spooled byte ranges, laid in seq order at their offsets."""
    out = bytearray()
    size = None
    for meta in spool.chunks():
        if meta.file and meta.file["path"] == rel:
            data = spool.read_audio(meta)
            offset = meta.file["offset"]
            out[offset : offset + len(data)] = data
            size = meta.file.get("final", {}).get("size", size)
    return bytes(out[:size])


def test_slowly_written_file_is_taken_in_pieces_and_closed_when_complete(tmp_path):
    """A file written over ~1.5 s: full ranges are spooled as it grows, it is closed only once settled."""
    folder = tmp_path / "rec"
    folder.mkdir()
    data = wav_bytes(tone(3, 1))
    with Spool(resolve().spool_dir) as spool:
        watcher = FolderWatcher(spool, folder, chunk_seconds=1, settle=0.6)
        target = folder / "take1.wav"

        def slow_writer():
            with open(target, "wb") as f:
                for start in range(0, len(data), len(data) // 6 + 1):
                    f.write(data[start : start + len(data) // 6 + 1])
                    f.flush()
                    time.sleep(0.25)

        writer = threading.Thread(target=slow_writer)
        writer.start()
        taken_while_writing = 0
        while writer.is_alive():
            taken_while_writing += watcher.scan_once()
            time.sleep(0.05)
        writer.join()
        assert taken_while_writing == 0 and watcher.taken == []
        assert len(spool.chunks()) >= 1  # pieces went out while the file grew
        deadline = time.monotonic() + 5
        while not watcher.taken and time.monotonic() < deadline:
            watcher.scan_once()
            time.sleep(0.1)
        assert [(m.file["offset"], m.size) for m in spool.chunks()] == [(0, 32000), (32000, 32000), (64000, 32000),
                                                                        (96000, 44)]  # none twice
        assert spooled_file(spool, "take1.wav") == data


def test_temp_names_and_dotfiles_are_ignored(tmp_path):
    """.part, .tmp and dotfiles are never taken, however long they sit still."""
    folder = tmp_path / "rec"
    folder.mkdir()
    for name in ("a.wav.part", "b.tmp", ".c.wav"):
        (folder / name).write_bytes(wav_bytes(tone(1, 2)))
    with Spool(resolve().spool_dir) as spool:
        watcher = FolderWatcher(spool, folder, settle=0.1)
        for _ in range(4):
            watcher.scan_once()
            time.sleep(0.12)
        assert watcher.taken == [] and spool.chunks() == []


def test_restart_does_not_respool_and_corrupt_file_is_skipped(tmp_path):
    """A second watcher over the same folder takes nothing again; a corrupt file is reported and skipped."""
    folder = tmp_path / "rec"
    folder.mkdir()
    (folder / "01.wav").write_bytes(wav_bytes(tone(2.5, 3)))
    (folder / "02.wav").write_bytes(b"RIFF....WAVEthis is not audio at all" * 10)
    (folder / "03.wav").write_bytes(wav_bytes(tone(1, 4)))
    with Spool(resolve().spool_dir) as spool:
        first = FolderWatcher(spool, folder, chunk_seconds=1, session="site", settle=0.1)
        first.run(once=True)
        assert [(t.rel_path, t.first_seq, t.chunks) for t in first.taken] == [("01.wav", 0, 3), ("03.wav", 3, 2)]
        assert [r["relPath"] for r in first.rejected] == ["02.wav"]
        second = FolderWatcher(spool, folder, chunk_seconds=1, session="site", settle=0.1)
        second.run(once=True)
        assert second.taken == [] and second.rejected == []
        assert [m.seq for m in spool.chunks("site")] == [0, 1, 2, 3, 4]
        (folder / "04.wav").write_bytes(wav_bytes(tone(1, 5)))
        third = FolderWatcher(spool, folder, chunk_seconds=1, session="site", settle=0.1)
        third.run(once=True)
        assert [(t.first_seq, t.chunks) for t in third.taken] == [(5, 2)]


def test_watch_once_uploads_and_export_equals_concatenated_sources(server, tmp_path):
    """`scribe watch --once --session`: the exported session equals the files joined, sample for sample."""
    folder = tmp_path / "rec"
    folder.mkdir()
    parts = [tone(2.3, 10), tone(1.0, 11), tone(3.7, 12)]
    for i, frames in enumerate(parts):
        (folder / f"REC{i:03d}.WAV").write_bytes(wav_bytes(frames))
    (folder / "notes.txt").write_text("field notes, not audio")
    result = scribe("watch", str(folder), "--session", "walk", "--once", "--settle", "0.2", "--chunk-seconds", "1",
                    "--json", "--server", server.url, "--token", server.alice, timeout=120)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert sum(e["event"] == "taken" for e in events) == 3
    assert [e["relPath"] for e in events if e["event"] == "ignored"] == ["notes.txt"]
    assert not [e for e in events if e["event"] == "rejected"]
    resp = server.get("/api/sessions/walk/audio?format=flac", server.alice)
    assert resp.status_code == 200
    data, rate = sf.read(io.BytesIO(resp.content), dtype="int16", always_2d=True)
    assert rate == 16000 and np.array_equal(data, np.concatenate(parts))
    with Spool(resolve().spool_dir) as spool:
        assert spool.pending() == []


def test_session_per_file_and_offline(tmp_path):
    """Without --session each file is its own finished session; --offline only spools."""
    folder = tmp_path / "rec"
    folder.mkdir()
    (folder / "Morning Walk.wav").write_bytes(wav_bytes(tone(1.5, 20)))
    result = scribe("watch", str(folder), "--once", "--offline", "--settle", "0.1", "--chunk-seconds", "1")
    assert result.returncode == 0, result.stderr
    with Spool(resolve().spool_dir) as spool:
        (summary,) = spool.sessions()
        assert summary.session.startswith("Morning-Walk-") and summary.pending == 2 and summary.final_seq == 1


def test_missing_folder_is_a_clear_error(tmp_path):
    """A folder that does not exist: exit 9 with a hint."""
    result = scribe("watch", str(tmp_path / "nope"), "--offline", "--once")
    assert result.returncode == 9 and result.stderr.startswith("Error: ")
