"""Cards as they come back from the field: odd names, links, Windows' leftovers, two recorders
writing the same names, a card mounted somewhere else, a recorder still writing with an old mtime."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time

import soundfile as sf

from scribe_cli.capture.metadata import NotAudio, probe
from tests import recorder_files as rf
from tests.test_cards import sha256_of, watch_once
from tests.test_client_upload import scribe

OLD = time.time() - 3600  # a card brought back from the field: every file closed an hour ago


def events_of(result) -> list[dict]:
    return [e for e in map(json.loads, result.stdout.splitlines()) if "event" in e]


def export_files(server, session: str, out, *extra: str):
    result = scribe("export", session, "--files", "-o", str(out), "--json", "--server", server.url,
                    "--token", server.alice, *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_names_the_server_cannot_take_are_rejected_and_the_rest_of_the_card_is_taken(server, tmp_path):
    """A name in another character set, a backslash, a newline; links to a file, a folder and
    nowhere; Windows' UTF-16 IndexerVolumeGuid: no traceback, the bad names rejected with a
    reason (exit 5, every run), the links and the text file ignored, every good file on the
    server byte for byte, and nothing reported taken that the server would refuse."""
    card = tmp_path / "card"
    (card / "FOLDER01").mkdir(parents=True)
    rf.zoom_bwf(card / "FOLDER01" / "ZOOM0001.WAV", seed=1)
    rf.zoom_bwf(card / "FOLDER01" / "ZOOM0002.WAV", seed=2)
    good = (card / "FOLDER01" / "ZOOM0001.WAV").read_bytes()
    folder = os.fsencode(card / "FOLDER01")
    with open(folder + b"/caf\xe9.WAV", "wb") as f:  # Latin-1, as another system wrote it
        f.write(good)
    (card / "FOLDER01" / "back\\slash.WAV").write_bytes(good)
    (card / "FOLDER01" / "new\nline.WAV").write_bytes(good)
    outside = tmp_path / "outside.wav"
    outside.write_bytes(good)
    (card / "FOLDER01" / "LINK.WAV").symlink_to(outside)
    (card / "ELSEWHERE").symlink_to(tmp_path)
    (card / "GONE.WAV").symlink_to(tmp_path / "nothing.wav")
    (card / "System Volume Information").mkdir()
    (card / "System Volume Information" / "IndexerVolumeGuid").write_bytes("{A1B2-C3D4}".encode("utf-16"))
    for path in card.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (OLD, OLD))

    for attempt in range(2):  # the second run reports the same files again: they are still not on the server
        result = watch_once(server, card, "--session", "names")
        assert result.returncode == 5, result.stderr
        assert "Traceback" not in result.stderr
        events = events_of(result)
        rejected = {e["relPath"]: e["reason"] for e in events if e["event"] == "rejected"}
        assert set(rejected) == {"FOLDER01/caf\\xe9.WAV", "FOLDER01/back\\slash.WAV", "FOLDER01/new\\nline.WAV"}
        assert "UTF-8" in rejected["FOLDER01/caf\\xe9.WAV"] and "backslash" in rejected["FOLDER01/back\\slash.WAV"]
        assert "control character" in rejected["FOLDER01/new\\nline.WAV"]
        ignored = {e["relPath"]: e["reason"] for e in events if e["event"] == "ignored"}
        assert {"FOLDER01/LINK.WAV", "ELSEWHERE", "GONE.WAV"} <= set(ignored)
        assert all("symbolic link" in ignored[name] for name in ("FOLDER01/LINK.WAV", "ELSEWHERE", "GONE.WAV"))
        taken = sorted(e["relPath"] for e in events if e["event"] == "taken")
        if attempt == 0:
            assert ignored["System Volume Information/IndexerVolumeGuid"] == "not an audio file"
            assert taken == ["FOLDER01/ZOOM0001.WAV", "FOLDER01/ZOOM0002.WAV"]
        else:
            assert taken == []
        error = json.loads(result.stdout.splitlines()[-1])["error"]
        assert error["exitCode"] == 5 and "3 file(s) rejected" in error["message"]
    manifest = {f["path"]: f for f in server.get("/api/sessions/names", server.alice).json()["files"]}
    assert set(manifest) == {"FOLDER01/ZOOM0001.WAV", "FOLDER01/ZOOM0002.WAV"}
    for rel, entry in manifest.items():
        assert entry["sha256"] == sha256_of(card / rel)
    pending = scribe("pending", "--json")
    assert pending.returncode == 0 and json.loads(pending.stdout)["chunks"] == [], pending.stdout


def test_a_utf16_text_file_is_no_mp3_and_an_mp3_without_tags_still_is(tmp_path):
    """FF FE (a UTF-16 byte-order mark) looks like an MPEG frame sync; two frames in a row do not."""
    (tmp_path / "NOTES.TXT").write_bytes(("take 3 was good\r\n" * 50).encode("utf-16"))
    try:
        probe(tmp_path / "NOTES.TXT")
        raise AssertionError("a UTF-16 text file was taken for audio")
    except NotAudio:
        pass
    assert "MP3" in sf.available_formats()  # (libsndfile >= 1.1, bundled by soundfile >= 0.12)
    tagged = tmp_path / "tagged.mp3"
    sf.write(tagged, rf.noise(48000, 2, 16, 3) / 32768.0, 48000, format="MP3")
    data = tagged.read_bytes()
    if data[:3] == b"ID3":  # strip the tag: a handheld recorder's bare MPEG stream
        size = (data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F)
        data = data[10 + size:]
    (tmp_path / "BARE").write_bytes(data)
    assert probe(tmp_path / "BARE").container == "MP3"


def two_recorders(tmp_path) -> tuple:
    """Two cards of one recorder model: the same file names, sizes and mtimes, different audio."""
    cards = []
    for seed in (1, 2):
        card = tmp_path / f"card{seed}"
        (card / "FOLDER01").mkdir(parents=True)
        rf.zoom_bwf(card / "FOLDER01" / "ZOOM0001.WAV", seed=seed)
        rf.zoom_bwf(card / "FOLDER01" / "ZOOM0002.WAV", seed=seed + 10)
        for path in card.rglob("*.WAV"):
            os.utime(path, (OLD, OLD))
        cards.append(card)
    first, second = cards
    for rel in ("FOLDER01/ZOOM0001.WAV", "FOLDER01/ZOOM0002.WAV"):
        assert (first / rel).stat().st_size == (second / rel).stat().st_size
        assert sha256_of(first / rel) != sha256_of(second / rel)
    return first, second


def test_a_second_recorders_card_with_the_same_names_sizes_and_mtimes_is_not_taken_for_the_first(server, tmp_path):
    """Into one session: the second card's files become version 2 (nothing skipped), export --files
    gives the latest and --all-versions every one, each byte for byte; a third run takes nothing."""
    first, second = two_recorders(tmp_path)
    assert watch_once(server, first, "--session", "two").returncode == 0
    result = watch_once(server, second, "--session", "two")
    assert result.returncode == 0, result.stderr
    taken = {e["relPath"]: e["version"] for e in events_of(result) if e["event"] == "taken"}
    assert taken == {"FOLDER01/ZOOM0001.WAV": 2, "FOLDER01/ZOOM0002.WAV": 2}
    again = watch_once(server, second, "--session", "two")
    assert again.returncode == 0 and not [e for e in events_of(again) if e["event"] == "taken"]
    out = tmp_path / "restored"
    latest = export_files(server, "two", out)
    assert {(e["path"], e["version"], e["versions"]) for e in latest["files"]} == {
        ("FOLDER01/ZOOM0001.WAV", 2, 2), ("FOLDER01/ZOOM0002.WAV", 2, 2)}
    export_files(server, "two", out, "--all-versions")
    for name in ("ZOOM0001", "ZOOM0002"):
        assert sha256_of(out / "FOLDER01" / f"{name}.WAV") == sha256_of(second / "FOLDER01" / f"{name}.WAV")
        assert sha256_of(out / "FOLDER01" / f"{name}.v1.WAV") == sha256_of(first / "FOLDER01" / f"{name}.WAV")


def test_without_a_session_cards_at_one_mount_point_and_one_card_at_two(server, tmp_path):
    """Per-file sessions, the ledger keyed by the file's absolute path: another card at the same
    mount point is taken (not mistaken for the first), and the same card seen through another
    path (a stale /media/ZOOM, so it comes up as /media/ZOOM1) is recognised and not sent again."""
    first, second = two_recorders(tmp_path)
    (tmp_path / "media").mkdir()
    mount = tmp_path / "media" / "ZOOM"
    first.rename(mount)  # (a card mounted is a folder at the mount point: moving one there is the same)
    assert watch_once(server, mount).returncode == 0
    mount.rename(first)
    second.rename(mount)
    result = watch_once(server, mount)
    assert result.returncode == 0, result.stderr
    taken = [e for e in events_of(result) if e["event"] == "taken"]
    assert len(taken) == 2
    for event in taken:
        assert event["sha256"] == sha256_of(mount / event["relPath"])
        body = server.get(f"/api/sessions/{event['session']}", server.alice).json()
        assert [f["sha256"] for f in body["files"]] == [event["sha256"]] and body["missing"] == []

    elsewhere = tmp_path / "media" / "ZOOM1"
    mount.rename(elsewhere)
    result = watch_once(server, elsewhere)
    assert result.returncode == 0, result.stderr
    assert [e for e in events_of(result) if e["event"] in ("taken", "failed")] == []
    pending = scribe("pending", "--json")
    assert json.loads(pending.stdout)["chunks"] == [], pending.stdout


def write_with_an_old_mtime(path, seconds: float) -> None:
    """A recorder on a filesystem that sets mtimes only on close: the header's sizes stay 0 while
    audio is appended, the mtime stays an hour old; the sizes are written at the end."""
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 2, 48000, 288000, 6, 24)
    header = b"RIFF" + struct.pack("<I", 0) + b"WAVE" + fmt + b"data" + struct.pack("<I", 0)
    written = 0
    with open(path, "wb") as f:
        f.write(header)
        f.flush()
        os.utime(path, (OLD, OLD))
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            f.write(os.urandom(28800))
            f.flush()
            written += 28800
            os.utime(path, (OLD, OLD))
            time.sleep(0.1)
        f.seek(4)
        f.write(struct.pack("<I", 36 + written))
        f.seek(40)
        f.write(struct.pack("<I", written))


def test_a_file_growing_under_an_old_mtime_is_not_taken_half_written(server, tmp_path):
    """Its header says it is not closed yet: its old mtime does not settle it; it is taken only
    whole (this run or the next), never as the first half the card held at the start."""
    card = tmp_path / "card"
    card.mkdir()
    path = card / "REC.WAV"
    writer = threading.Thread(target=write_with_an_old_mtime, args=(path, 3.0))
    writer.start()
    try:
        time.sleep(0.5)
        first = scribe("watch", str(card), "--once", "--settle", "1", "--json", "--session", "growing",
                       "--server", server.url, "--token", server.alice, timeout=120)
    finally:
        writer.join()
    assert first.returncode in (0, 5), first.stderr
    second = watch_once(server, card, "--session", "growing")
    assert second.returncode == 0, second.stderr
    final = path.read_bytes()
    taken = [e for e in events_of(first) + events_of(second) if e["event"] == "taken"]
    assert [(e["bytes"], e["sha256"]) for e in taken] == [(len(final), hashlib.sha256(final).hexdigest())]
    (entry,) = server.get("/api/sessions/growing", server.alice).json()["files"]
    assert entry["sha256"] == hashlib.sha256(final).hexdigest() and entry["version"] == 1
