"""A card's bytes written once: ranges of a card file are spooled by reference until they must not be.

While a settled file is read, the card is the durable copy of its ranges: the spool keeps
each range's SHA-256 and where it is on the card, the uploader reads it from the card, and
most are acknowledged without ever being written to the laptop's disk.  A file reported
taken is durable here or on the server: what was not acknowledged by then is copied in.
A crash (or a power cut: the spool's rows are committed FULL) in between leaves references
that still point at the card; a card pulled or changed holds those chunks, never sending
other bytes, until the card is back.
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

RANGE = 256 * 1024  # the smallest range spooled by reference (INLINE_MAX)


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


def crash_mid_close(card: Path, session: str, after: int) -> list[int]:
    """Run a watcher in this process over ``card`` and stop it dead after ``after`` ranges, as a crash
    would (nothing copied in, no clean end); return the seqs spooled."""
    with Spool(resolve().spool_dir) as spool:
        watcher = FolderWatcher(spool, card, session=session, settle=0.2, chunk_bytes=RANGE)
        spooled = []

        def on_chunk() -> None:
            spooled.append(1)
            if len(spooled) >= after:
                watcher.stop_event.set()

        watcher.on_chunk = on_chunk
        watcher.scan_once()  # the file is settled by its mtime: closed (read whole) on first sight
        seqs = [m.seq for m in spool.chunks(session)]
        assert spool.unsealed(session) == len(seqs) >= after, "ranges of a file being closed are references"
        assert not spool_disk.rows(spool.cache, "SELECT key FROM Cache WHERE key >= 'a/' AND key < 'a/\uffff'")
        return seqs


def test_a_crash_mid_card_then_the_card_pulled_holds_the_ranges_until_it_is_back(server, tmp_path):
    """Crash while a card file is read; `scribe resume` with the card out holds those ranges (exit 5,
    names the card file and what to do), sends nothing; card back, `scribe watch --once` sends them
    from the card and finishes the file: the server holds it byte for byte, each range once."""
    card = tmp_path / "card"
    wav = make_card(card)
    spooled = crash_mid_close(card, "cut", after=6)

    out_of_reader = tmp_path / "card-out"
    card.rename(out_of_reader)  # the card is out of the reader
    held = scribe("resume", "cut", "--json", "--server", server.url, "--token", server.alice)
    assert held.returncode == 5, held.stderr
    said = held.stdout + held.stderr
    assert "put the card back" in said and str(wav.parent) in said and "--retry-failed" in said
    human = scribe("resume", "cut", "--server", server.url, "--token", server.alice)
    assert human.returncode == 5 and "Traceback" not in human.stderr
    assert f"Try: {len(spooled)} chunk(s) wait for their card: put it back and run scribe resume cut --retry-failed" \
        in human.stderr
    with Spool(resolve().spool_dir) as spool:
        assert {m.seq: m.state for m in spool.chunks("cut")} == {seq: FAILED for seq in spooled}
        assert not spool.quarantined("cut") and spool.unsealed("cut") == len(spooled)
    assert server.get("/api/sessions/cut", server.alice).status_code == 404  # nothing was stored

    out_of_reader.rename(card)  # the card is back
    result = scribe("watch", str(card), "--session", "cut", "--once", "--settle", "0.2", "--chunk-bytes",
                    str(RANGE), "--json", "--server", server.url, "--token", server.alice)
    assert result.returncode == 0, result.stderr
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


def test_a_card_file_changed_under_a_reference_is_never_sent_nor_copied_in(server, tmp_path):
    """A range whose card bytes changed after it was spooled is quarantined (its bytes as read exist
    nowhere else), neither sent nor copied in; unchanged ranges are copied in; the watcher does not
    report the file taken on that pass, and the next one takes it whole, byte for byte."""
    card = tmp_path / "card"
    wav = make_card(card)
    crash_mid_close(card, "changed", after=3)
    data = bytearray(wav.read_bytes())
    data[RANGE + 7] ^= 0xFF  # someone rewrote the file since
    wav.write_bytes(bytes(data))
    with Spool(resolve().spool_dir) as spool:
        found = spool.seal("changed")
        assert [(f["seq"], f["outcome"]) for f in found] == [(1, "quarantined")]
        assert "changed before this range was copied in" in found[0]["reason"]
        assert spool.unsealed("changed") == 0
        assert {m.seq: m.state for m in spool.chunks("changed")} == {0: PENDING, 2: PENDING}
        assert [q["seq"] for q in spool.quarantined("changed")] == [1]
        for meta in spool.chunks("changed"):  # copied in: readable with the card gone
            assert hashlib.sha256(spool.read_audio(meta)).hexdigest() == meta.sha256
    result = scribe("watch", str(card), "--session", "changed", "--once", "--settle", "0.2", "--chunk-bytes",
                    str(RANGE), "--json", "--server", server.url, "--token", server.alice)
    assert result.returncode == 0, result.stderr
    body = server.get("/api/sessions/changed", server.alice).json()
    assert 1 not in {c["sequence"] for c in body["chunks"]}  # the bytes as first read never went out
    (entry,) = body["files"]
    assert entry["sha256"] == sha256_of(wav)  # the file as it is now, whole
    gaps = scribe("gaps", "changed", "--server", server.url, "--token", server.alice)
    assert gaps.returncode == 5  # and the quarantined seq is reported, not hidden


def test_a_card_taken_offline_is_copied_in_and_one_taken_online_never_touches_the_disk(server, tmp_path):
    """`watch --offline` reports a file taken only once every range is in the spool (no reference left:
    the card may go); `watch` online ends with everything acknowledged: spool empty, nothing left."""
    card = tmp_path / "card"
    wav = make_card(card, seconds=20.0)
    offline = scribe("watch", str(card), "--session", "off", "--once", "--offline", "--settle", "0.2",
                     "--chunk-bytes", str(RANGE), "--json")
    assert offline.returncode == 0, offline.stderr
    with Spool(resolve().spool_dir) as spool:
        assert spool.count("off") == -(-wav.stat().st_size // RANGE) and spool.unsealed() == 0
    card.rename(tmp_path / "card-out")  # taken: the card may go
    assert scribe("resume", "off", "--server", server.url, "--token", server.alice).returncode == 0

    second = tmp_path / "card2"
    wav2 = make_card(second, seconds=20.0)
    online = scribe("watch", str(second), "--session", "on", "--once", "--settle", "0.2", "--chunk-bytes",
                    str(RANGE), "--json", "--server", server.url, "--token", server.alice)
    assert online.returncode == 0, online.stderr
    with Spool(resolve().spool_dir) as spool:
        assert spool.count("on") == 0 and spool.unsealed() == 0
    for session, path in (("off", tmp_path / "card-out" / "FOLDER01" / "ZOOM0001.WAV"), ("on", wav2)):
        (entry,) = server.get(f"/api/sessions/{session}", server.alice).json()["files"]
        assert entry["sha256"] == sha256_of(path)
    assert json.loads(offline.stdout.splitlines()[-1]).get("event") == "done"


def test_watch_killed_mid_card_then_card_pulled_and_back_loses_nothing(server, tmp_path):
    """A real `scribe watch --offline` SIGKILLed while a card file is read: its references survive; with the
    card out `scribe resume` holds them (exit 5, nothing stored); with it back `scribe watch --once` sends
    everything and the server holds the file byte for byte."""
    import sqlite3
    import subprocess
    import sys
    import time

    card = tmp_path / "card"
    wav = make_card(card, seconds=120.0)  # ~34.6 MB: ~132 ranges, read for closing on first sight
    total = -(-wav.stat().st_size // RANGE)
    db = resolve().spool_dir / "cache.db"
    proc = subprocess.Popen([sys.executable, "-m", "scribe_cli", "watch", str(card), "--session", "kill", "--once",
                             "--offline", "--settle", "0.2", "--chunk-bytes", str(RANGE)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    refs, deadline = 0, time.monotonic() + 60
    while refs < 10 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                (refs,) = con.execute("SELECT COUNT(*) FROM Cache WHERE key >= 'u/kill/' AND key < 'u/kill0'").fetchone()
        except sqlite3.Error:
            continue
    proc.kill()
    proc.wait(30)
    with Spool(resolve().spool_dir) as spool:
        referenced = spool.unsealed("kill")
        assert 10 <= referenced < total and spool.count("kill") == referenced  # killed mid-file, nothing copied in

    card.rename(tmp_path / "card-out")
    held = scribe("resume", "kill", "--server", server.url, "--token", server.alice)
    assert held.returncode == 5 and "put it back and run scribe resume kill --retry-failed" in held.stderr
    assert server.get("/api/sessions/kill", server.alice).status_code == 404

    (tmp_path / "card-out").rename(card)
    result = scribe("watch", str(card), "--session", "kill", "--once", "--settle", "0.2", "--chunk-bytes", str(RANGE),
                    "--server", server.url, "--token", server.alice)
    assert result.returncode == 0, result.stderr
    body = server.get("/api/sessions/kill", server.alice).json()
    (entry,) = body["files"]
    assert entry["sha256"] == sha256_of(wav) and body["totalChunks"] == total
    assert sorted(c["sequence"] for c in body["chunks"]) == list(range(total))  # each range stored once


def test_a_card_at_the_default_range_size_reaches_the_servers_disk_past_its_page_cache(server, tmp_path):
    """A real `scribe watch --once` of a ~10 MB card file at the default 4 MiB ranges into a real server:
    each full range is written straight to the server's disk (its chunk file is not in the page cache
    afterwards; util-linux `fincore`), and the file comes back byte for byte."""
    import subprocess

    import requests

    from tests.test_audio_files import resident_bytes

    card = tmp_path / "card"
    wav = make_card(card, seconds=36.0)  # 10.4 MB: two full 4 MiB ranges and a shorter last one
    result = scribe("watch", str(card), "--session", "big", "--once", "--settle", "0.2", "--json",
                    "--server", server.url, "--token", server.alice)
    assert result.returncode == 0, result.stderr[-2000:]
    stored = sorted(p for p in (server.data_dir / "audio" / "@alice" / "big").iterdir() if p.is_file())
    full = [p for p in stored if p.stat().st_size == 4 << 20]
    assert len(stored) == 3 and len(full) == 2, [(p.name, p.stat().st_size) for p in stored]
    in_memory = subprocess.run(["stat", "-f", "-c", "%T", str(server.data_dir)], capture_output=True,
                               text=True).stdout.strip() in ("tmpfs", "ramfs")
    if not in_memory:  # (a tmpfs is the page cache itself)
        assert all(resident_bytes(p) <= 2 * 4096 for p in full), [resident_bytes(p) for p in full]
    back = requests.get(f"{server.url}/api/sessions/big/file", params={"path": "FOLDER01/ZOOM0001.WAV", "version": "1"},
                        headers={"Authorization": f"Bearer {server.alice}"}, timeout=60)
    assert back.status_code == 200 and hashlib.sha256(back.content).hexdigest() == sha256_of(wav)


def test_while_a_files_close_waits_for_the_uploader_the_next_file_is_read(tmp_path, monkeypatch):
    """With an uploader following (here one that never acknowledges), a settled file's close waits
    for its ranges to be let go; meanwhile the next file's ranges are spooled, so that an uploader
    never runs dry between two files of a card.  With one ``--session`` for the card the two files'
    seqs then interleave; each file still ends taken with its own count of ranges, its close copies
    in only its own ranges (the next file's stay references on the card until that one closes), and
    every range's bytes are the file's at its offset."""
    from scribe_cli.capture import watch

    monkeypatch.setattr(watch, "SEAL_PATIENCE", 0.2)
    card = tmp_path / "card"
    first = make_card(card, seconds=6.0)
    second = first.with_name("ZOOM0002.WAV")
    rf.zoom_bwf(second, seconds=6.0, seed=12)
    os.utime(second, (first.stat().st_mtime, first.stat().st_mtime))
    with Spool(resolve().spool_dir) as spool:
        watcher = FolderWatcher(spool, card, session="two", settle=0.2, chunk_bytes=RANGE)
        watcher.uploading = True
        references_at_taken = {}
        watcher.listener = lambda kind, data: (references_at_taken.__setitem__(data["relPath"], spool.unsealed("two"))
                                               if kind == "taken" else None)
        watcher.scan_once()
        ranges = {path.name: -(-path.stat().st_size // RANGE) for path in (first, second)}
        assert {Path(t.rel_path).name: t.chunks for t in watcher.taken} == ranges
        by_file: dict[str, list] = {}
        for meta in spool.chunks("two"):
            by_file.setdefault(Path(meta.file["path"]).name, []).append(meta)
        closing = [m for m in by_file["ZOOM0001.WAV"] if m.file.get("final")]
        assert len(closing) == 1 and closing[0].seq > min(m.seq for m in by_file["ZOOM0002.WAV"]), \
            "the second file's ranges were spooled while the first one's close waited"
        assert references_at_taken == {"FOLDER01/ZOOM0001.WAV": ranges["ZOOM0002.WAV"] - 1,
                                       "FOLDER01/ZOOM0002.WAV": 0}
        assert spool.unsealed() == 0
        for name, metas in by_file.items():
            data = (card / "FOLDER01" / name).read_bytes()
            assert sorted(m.file["offset"] for m in metas) == list(range(0, len(data), RANGE))
            for meta in metas:
                assert spool.read_audio(meta) == data[meta.file["offset"] : meta.file["offset"] + meta.size]


def test_a_card_of_several_files_in_one_session_comes_back_byte_for_byte(server, tmp_path):
    """A real `scribe watch --once --session` of a four-file card at by-reference ranges into a real server
    (each file's close may wait for the uploader while the next file is read): every file back byte for
    byte, each file's `taken` count its own ranges, nothing left in the spool."""
    import requests

    card = tmp_path / "card"
    files = []
    for index in range(4):
        path = card / "FOLDER01" / f"ZOOM{index + 1:04d}.WAV"
        path.parent.mkdir(parents=True, exist_ok=True)
        rf.zoom_bwf(path, seconds=8.0, seed=20 + index)
        old = path.stat().st_mtime - 3600
        os.utime(path, (old, old))
        files.append(path)
    result = scribe("watch", str(card), "--session", "four", "--once", "--settle", "0.2", "--chunk-bytes",
                    str(RANGE), "--json", "--server", server.url, "--token", server.alice)
    assert result.returncode == 0, result.stderr[-2000:]
    taken = {e["relPath"]: e["chunks"] for e in map(json.loads, result.stdout.splitlines()) if e.get("event") == "taken"}
    assert taken == {f"FOLDER01/{p.name}": -(-p.stat().st_size // RANGE) for p in files}
    for path in files:
        back = requests.get(f"{server.url}/api/sessions/four/file", params={"path": f"FOLDER01/{path.name}"},
                            headers={"Authorization": f"Bearer {server.alice}"}, timeout=60)
        assert back.status_code == 200 and hashlib.sha256(back.content).hexdigest() == sha256_of(path), path.name
    with Spool(resolve().spool_dir) as spool:
        assert spool.count("four") == 0 and spool.unsealed() == 0
