"""A card's bytes written once: ranges spooled from a card are flushed only when they must be.

While a settled file is read, the card is the durable copy of its ranges; they are spooled
without an fsync and most leave the spool acknowledged before the kernel writes them back.
A file reported taken is durable here or on the server.  A power cut before that is
emulated the way it looks afterwards: the markers carry another boot's id and the value
files are empty or torn (what ext4's delayed allocation leaves); the spool then reads the
ranges again from the card, or holds them until the card is back.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from scribe_cli import spool_disk
from scribe_cli.capture.watch import FolderWatcher
from scribe_cli.config import resolve
from scribe_cli.spool import FAILED, PENDING, Spool
from tests import recorder_files as rf
from tests.test_client_upload import scribe

RANGE = 256 * 1024  # the smallest range that lives in a value file (INLINE_MAX)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_card(root: Path, seconds: float = 12.0) -> Path:
    """One Zoom-like BWF (~3.5 MB, 14 ranges) with an mtime of an hour ago: a card back from the field."""
    path = root / "FOLDER01" / "ZOOM0001.WAV"
    path.parent.mkdir(parents=True)
    rf.zoom_bwf(path, seconds=seconds, seed=11)
    old = path.stat().st_mtime - 3600
    os.utime(path, (old, old))
    return path


def crash_mid_close(card: Path, session: str, after: int) -> int:
    """Run a watcher in this process over ``card`` and stop it dead after ``after`` ranges, as a crash
    would (no seal, no clean end); return how many chunks were spooled."""
    with Spool(resolve().spool_dir) as spool:
        watcher = FolderWatcher(spool, card, session=session, settle=0.2, chunk_bytes=RANGE)
        spooled = []

        def on_chunk() -> None:
            spooled.append(1)
            if len(spooled) >= after:
                watcher.stop_event.set()

        watcher.on_chunk = on_chunk
        watcher.scan_once()  # the file is settled by its mtime: closed (read whole) on first sight
        assert spool.unsealed(session) == len(spooled) >= after, "ranges of a file being closed are not flushed"
        return len(spooled)


def power_cut(session: str, torn: str = "empty") -> list[int]:
    """What a power cut leaves of unflushed ranges: markers of an earlier boot, value files empty
    (the data never reached the disk) or with their second half zeroed; the seqs affected."""
    with Spool(resolve().spool_dir) as spool:
        cache = spool.cache
        seqs = []
        for key, text in list(spool._items(f"u/{session}/")):
            marker = json.loads(text)
            marker["boot"] = "0" * 8 + "-earlier-boot"
            cache.set(key, json.dumps(marker))
            seq = int(key.rsplit("/", 1)[1])
            seqs.append(seq)
            ((filename,),) = spool_disk.rows(cache, "SELECT filename FROM Cache WHERE key = ?",
                                             (f"a/{session}/{seq:010d}",))
            path = Path(cache.directory) / filename
            if torn == "empty" or seq % 2:
                path.write_bytes(b"")
            else:
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
        return seqs


def test_a_power_cut_mid_card_is_repaired_from_the_card_and_held_while_the_card_is_out(server, tmp_path):
    """Crash while a card file is read, then a power cut: `scribe resume` with the card out holds the torn
    ranges (exit 5, names the card file, uploads nothing wrong); with the card back, `scribe watch --once`
    repairs them from it and the server ends with the file byte for byte, each range stored once."""
    card = tmp_path / "card"
    wav = make_card(card)
    crash_mid_close(card, "cut", after=6)
    torn = power_cut("cut", torn="half")
    assert len(torn) >= 6

    out_of_reader = tmp_path / "card-out"
    card.rename(out_of_reader)  # the card is out of the reader
    held = scribe("resume", "cut", "--json", "--server", server.url, "--token", server.alice)
    assert held.returncode == 5, held.stderr
    assert "power cut" in held.stdout + held.stderr and "put the card back" in held.stdout + held.stderr
    with Spool(resolve().spool_dir) as spool:
        states = {m.seq: m.state for m in spool.chunks("cut")}
        assert all(states[seq] == FAILED for seq in torn) and not spool.quarantined("cut")
    chunks = server.get("/api/sessions/cut", server.alice).json().get("chunks", [])
    assert not {c["sequence"] for c in chunks} & set(torn)  # nothing torn was stored

    out_of_reader.rename(card)  # the card is back
    result = scribe("watch", str(card), "--session", "cut", "--once", "--settle", "0.2", "--chunk-bytes",
                    str(RANGE), "--json", "--server", server.url, "--token", server.alice)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(e["seq"] for e in events if e.get("event") == "repaired") == sorted(torn)
    with Spool(resolve().spool_dir) as spool:
        assert spool.count("cut") == 0 and spool.unsealed() == 0
    body = server.get("/api/sessions/cut", server.alice).json()
    (entry,) = body["files"]
    assert entry["sha256"] == sha256_of(wav) and entry["size"] == wav.stat().st_size
    ranges = -(-wav.stat().st_size // RANGE)
    assert sorted(c["sequence"] for c in body["chunks"]) == list(range(ranges))  # every range stored once
    restored = tmp_path / "restored"
    assert scribe("export", "cut", "--files", "-o", str(restored), "--server", server.url,
                  "--token", server.alice).returncode == 0
    assert sha256_of(restored / "FOLDER01" / "ZOOM0001.WAV") == sha256_of(wav)


def test_ranges_that_survived_the_cut_are_kept_and_a_changed_card_file_is_not_trusted(tmp_path):
    """Values that reached the disk whole are kept without reading the card; a card file rewritten since
    (other bytes at that offset) repairs nothing: the ranges are held, never filled with other audio."""
    card = tmp_path / "card"
    wav = make_card(card)
    crash_mid_close(card, "kept", after=4)
    with Spool(resolve().spool_dir) as spool:
        for key, text in list(spool._items("u/kept/")):
            spool.cache.set(key, json.dumps({**json.loads(text), "boot": "earlier-boot"}))
        before = {m.seq: m for m in spool.chunks("kept")}
        assert spool.recover_unsealed() == []  # every value whole: nothing to repair, nothing held
        assert spool.unsealed() == 0 and all(m.state == PENDING for m in spool.chunks("kept"))
        for seq, meta in before.items():
            assert hashlib.sha256(spool.read_audio(meta)).hexdigest() == meta.sha256

    crash_mid_close(card, "changed", after=3)
    torn = power_cut("changed", torn="empty")
    data = bytearray(wav.read_bytes())
    data[RANGE + 7] ^= 0xFF  # the recorder (or someone) rewrote the file since
    wav.write_bytes(bytes(data))
    with Spool(resolve().spool_dir) as spool:
        found = {f["seq"]: f for f in spool.recover_unsealed()}
        assert sorted(found) == sorted(torn)
        assert found[1]["outcome"] == "held" and "no longer holds the same bytes" in found[1]["reason"]
        assert all(found[seq]["outcome"] == "repaired" for seq in torn if seq != 1)  # still the same bytes
        assert spool.unsealed("changed") == 1  # kept for a later repair
        assert spool.recover_unsealed() == []  # told once per process (a watch's watcher and uploader both ask)
        assert {m.seq: m.state for m in spool.chunks("changed")}[1] == FAILED


def test_a_card_taken_offline_is_flushed_and_one_taken_online_leaves_an_empty_spool(server, tmp_path):
    """`watch --offline` reports a file taken only once its ranges are durable (no unflushed range
    left); `watch` online ends with everything acknowledged: spool empty, no marker left behind."""
    card = tmp_path / "card"
    wav = make_card(card, seconds=20.0)
    offline = scribe("watch", str(card), "--session", "off", "--once", "--offline", "--settle", "0.2",
                     "--chunk-bytes", str(RANGE), "--json")
    assert offline.returncode == 0, offline.stderr
    with Spool(resolve().spool_dir) as spool:
        assert spool.count("off") == -(-wav.stat().st_size // RANGE) and spool.unsealed() == 0
    assert scribe("resume", "off", "--server", server.url, "--token", server.alice).returncode == 0

    second = tmp_path / "card2"
    wav2 = make_card(second, seconds=20.0)
    online = scribe("watch", str(second), "--session", "on", "--once", "--settle", "0.2", "--chunk-bytes",
                    str(RANGE), "--json", "--server", server.url, "--token", server.alice)
    assert online.returncode == 0, online.stderr
    with Spool(resolve().spool_dir) as spool:
        assert spool.count("on") == 0 and spool.unsealed() == 0
    for session, path in (("off", wav), ("on", wav2)):
        (entry,) = server.get(f"/api/sessions/{session}", server.alice).json()["files"]
        assert entry["sha256"] == sha256_of(path)
