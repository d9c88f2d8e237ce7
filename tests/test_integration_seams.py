"""Where server hardening (issue 13), `scribe watch` (14) and the browser pages (15) meet."""

from __future__ import annotations

import hashlib
import io
import re
import struct
from pathlib import Path

import numpy as np
import requests
import soundfile as sf
from selenium.webdriver.common.by import By

from scribe_protocol import ErrorCode
from tests import recorder_files as rf
from tests.test_browser import browsers, noise_wav  # noqa: F401  (fixtures)
from tests.test_client_upload import scribe
from tests.wire import call, connected, payload, run

STATIC = Path(__file__).resolve().parent.parent / "scribe_server" / "web" / "static"


def _flac_silence(seconds: int, rate: int = 48_000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros((seconds * rate, 1), dtype=np.int16), rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _send_file(server, session: str, path: str, data: bytes, **final) -> dict:
    """One watched file in one chunk, its manifest entry saying ``final``, as a raw client would send it."""
    final = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "sampleRate": 48_000, "channels": 1,
             "sampleFormat": "PCM_16", **final}

    async def go():
        async with connected(server.url, server.alice) as sio:
            return await call(sio, "audio-chunk", payload(session, 0, data, mimeType="application/octet-stream",
                                                          file={"path": path, "version": 1, "offset": 0,
                                                                "final": final}))

    return run(go())


def test_watched_file_export_is_held_to_the_decode_cap(server):
    """A watched FLAC that decodes to far more than its manifest declares is refused (decode_limit), as the
    same bytes sent as a plain chunk are; honest frames export; a lying rate or a non-integer frames is refused."""
    silence = _flac_silence(300)
    assert _send_file(server, "liar", "x.flac", silence, frames=48_000)["ok"]
    refused = server.get("/api/sessions/liar/audio", server.alice)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "decode_limit"
    assert "x.flac" in refused.json()["error"]["message"]
    assert _send_file(server, "honest", "x.flac", silence, frames=300 * 48_000)["ok"]
    resp = server.get("/api/sessions/honest/audio", server.alice)
    assert resp.status_code == 200 and sf.info(io.BytesIO(resp.content)).frames == 300 * 48_000
    assert _send_file(server, "rate", "x.flac", silence, frames=300 * 48_000, sampleRate=1)["ok"]
    wrong = server.get("/api/sessions/rate/audio", server.alice)
    assert wrong.status_code == 415 and "48000 Hz" in wrong.json()["error"]["message"]
    bad = _send_file(server, "frames", "x.flac", silence, frames="lots")
    assert not bad["ok"] and bad["error"]["code"] == "invalid_payload"


def _long_card(root: Path, seed: int, rate: int = 8000, seconds: int = 660) -> np.ndarray:
    """An 11-minute WAV and the same audio left by a power loss (sizes 0), in nested, spaced, non-ASCII folders."""
    audio = np.random.default_rng(seed).integers(-3000, 3000, size=(rate * seconds, 1)).astype(np.int16)
    (root / "A B" / "Vögel am Morgen").mkdir(parents=True)
    sf.write(root / "A B" / "long take.wav", audio, rate, subtype="PCM_16")
    lost = rf.wav_file([rf.fmt_chunk(1, 1, rate, 16)], riff_size=0) + b"data" + struct.pack("<I", 0) + audio.tobytes()
    (root / "A B" / "Vögel am Morgen" / "ZOOM 0002.WAV").write_bytes(lost)
    return audio


def test_long_watched_files_of_two_owners_export_whole_and_apart(server, tmp_path):
    """Two tokens watch cards with the same session id and paths (11-minute WAV + power-loss WAV, over the
    600 s undeclared cap): each export holds all 22 minutes, --files gives each owner its own bytes back."""
    server.bob = server.token("bob")
    audio = {}
    for who, token, seed in (("alice", server.alice, 1), ("bob", server.bob, 2)):
        card = tmp_path / f"card-{who}"
        audio[who] = _long_card(card, seed)
        done = scribe("watch", str(card), "--session", "site-a", "--once", "--settle", "0.3", "--server", server.url,
                      "--token", token, timeout=240, SCRIBE_HOME=str(tmp_path / f"home-{who}"))
        assert done.returncode == 0, done.stderr
    for who, token in (("alice", server.alice), ("bob", server.bob)):
        out = tmp_path / f"{who}.wav"
        done = scribe("export", "site-a", "-o", str(out), "--server", server.url, "--token", token, timeout=120)
        assert done.returncode == 0, done.stderr
        exported, _ = sf.read(out, dtype="int16", always_2d=True)
        assert np.array_equal(exported, np.concatenate([audio[who], audio[who]]))
        files = tmp_path / f"{who}-files"
        done = scribe("export", "site-a", "--files", "-o", str(files), "--server", server.url, "--token", token,
                      timeout=120)
        assert done.returncode == 0, done.stderr
        card = tmp_path / f"card-{who}"
        for rel in ("A B/long take.wav", "A B/Vögel am Morgen/ZOOM 0002.WAV"):
            assert (files / rel).read_bytes() == (card / rel).read_bytes(), rel
            got = server.get("/api/sessions/site-a/file", token, params={"path": rel})
            assert got.status_code == 200 and got.content == (card / rel).read_bytes()
    for path, version in (("../card-bob/A B/long take.wav", None), ("A B/./long take.wav", None),
                          ("A B/long take.wav", "١"), ("A B/long take.wav", "²")):
        params = {"path": path, **({"version": version} if version else {})}
        resp = server.get("/api/sessions/site-a/file", server.alice, params=params)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_payload"
    carol = server.token("carol")
    assert server.get("/api/sessions/site-a/file", carol, params={"path": "A B/long take.wav"}).status_code == 404


def test_browser_retries_every_code_the_protocol_calls_transient():
    """The browser uploader's transient set is the protocol's (server_busy from the in-flight byte
    budgets must be retried, not kept as a permanent refusal)."""
    source = (STATIC / "uploader.js").read_text()
    listed = set(re.findall(r'"([a-z_]+)"', re.search(r"const TRANSIENT = new Set\(\[(.*?)\]\)", source).group(1)))
    assert listed == {code.value for code in ErrorCode if code.transient}


def test_session_view_shows_a_watched_sessions_files_and_metadata(server, noise_wav, browsers, tmp_path):  # noqa: F811
    """/sessions/<id> of a watched session lists each file with its size, format and parsed metadata (bext)."""
    card = tmp_path / "card"
    (card / "FOLDER01").mkdir(parents=True)
    expected = rf.zoom_bwf(card / "FOLDER01" / "ZOOM0001.WAV")
    done = scribe("watch", str(card), "--session", "view-files", "--once", "--settle", "0.3", "--server", server.url,
                  "--token", server.alice, timeout=120)
    assert done.returncode == 0, done.stderr
    browser = browsers(tmp_path / "profile", noise_wav[0])
    browser.open(server.url + "/record")
    browser.driver.execute_script("localStorage.setItem('scribe.token', arguments[0])", server.alice)
    browser.open(f"{server.url}/sessions/view-files")
    row = browser.wait("files listed", lambda: browser.driver.find_elements(
        By.CSS_SELECTOR, '#files tr[data-path="FOLDER01/ZOOM0001.WAV"]'), 60)[0]
    text = row.text
    assert "[object Object]" not in text
    assert f"{expected['sampleRate']} Hz × {expected['channels']}, {expected['sampleFormat']}" in text
    key, value = next(iter(expected["metadata"].items()))
    assert f"{key}: {value}" in text
    assert not browser.el("files-card").get_attribute("hidden")


def test_watch_cuts_ranges_the_server_accepts(server_factory, tmp_path):
    """A server started with a small --max-chunk-bytes still takes a watched file whole: watch cuts its
    ranges to the server's limit instead of spooling ranges that are refused for good (too_large)."""
    srv = server_factory(extra_args=("--max-chunk-bytes", str(256 * 1024)))
    token = srv.token("alice")
    srv.start()
    card = tmp_path / "card"
    card.mkdir()
    audio = np.random.default_rng(3).integers(-30000, 30000, size=(600_000, 2)).astype(np.int16)
    sf.write(card / "take.wav", audio, 48_000, subtype="PCM_16")
    done = scribe("watch", str(card), "--session", "small-1", "--once", "--settle", "0.3", "--chunk-bytes",
                  str(16 << 20), "--server", srv.url, "--token", token, timeout=240)
    assert done.returncode == 0, done.stderr
    got = srv.get("/api/sessions/small-1/file", token, params={"path": "take.wav"})
    assert got.status_code == 200 and got.content == (card / "take.wav").read_bytes()
    chunks = srv.get("/api/sessions/small-1", token).json()["chunks"]
    assert len(chunks) == 10 and max(c["size"] for c in chunks) <= 256 * 1024


def test_uploads_stay_inside_the_servers_per_connection_budgets(server_factory, tmp_path):
    """`scribe watch` (1 MiB ranges) under a 2 MiB per-connection byte budget and `scribe resume --window 16`
    under --max-in-flight 4 send no chunk the server must refuse (too_many_in_flight), and all arrive."""
    from tests.test_client_upload import fill_spool, metric

    srv = server_factory(extra_args=("--max-connection-bytes", str(2 << 20), "--max-in-flight", "4"))
    token = srv.token("alice")
    srv.start()
    card = tmp_path / "card"
    card.mkdir()
    audio = np.random.default_rng(4).integers(-30000, 30000, size=(3 << 20, 2)).astype(np.int16)
    sf.write(card / "big.wav", audio, 48_000, subtype="PCM_16")
    done = scribe("watch", str(card), "--session", "budget-1", "--once", "--settle", "0.3", "--server", srv.url,
                  "--token", token, timeout=240, SCRIBE_HOME=str(tmp_path / "home-watch"))
    assert done.returncode == 0, done.stderr
    assert srv.get("/api/sessions/budget-1/file", token, params={"path": "big.wav"}).content == \
        (card / "big.wav").read_bytes()
    fill_spool("budget-2", 200, size=2048)
    done = scribe("resume", "budget-2", "--window", "16", "--server", srv.url, "--token", token, timeout=240)
    assert done.returncode == 0, done.stderr
    assert srv.get("/api/sessions/budget-2", token).json()["totalChunks"] == 200
    assert metric(srv, 'scribe_chunk_errors_total{code="too_many_in_flight"}') == 0


def test_export_refusal_prints_the_servers_advice_as_the_try_line(server, tmp_path):
    """`scribe export` of a watched float + 24-bit BWF + power-loss session: the WAV keeps float peaks above
    0 dBFS; the FLAC refusal says `Try: export it as .wav`, not a generic --help hint."""
    card = tmp_path / "card"
    card.mkdir()
    rf.zoom_bwf(card / "a.wav")
    rf.float_wav(card / "b.wav")
    rf.power_loss(card / "c.wav")
    done = scribe("watch", str(card), "--session", "mixed-1", "--once", "--settle", "0.3", "--server", server.url,
                  "--token", server.alice, timeout=120)
    assert done.returncode == 0, done.stderr
    wav = scribe("export", "mixed-1", "-o", str(tmp_path / "m.wav"), "--server", server.url, "--token", server.alice)
    assert wav.returncode == 0, wav.stderr
    exported, rate = sf.read(tmp_path / "m.wav", dtype="float32")
    assert rate == 48_000 and sf.info(str(tmp_path / "m.wav")).subtype == "FLOAT" and abs(exported).max() == 3.5
    flac = scribe("export", "mixed-1", "-o", str(tmp_path / "m.flac"), "--server", server.url, "--token", server.alice)
    assert flac.returncode != 0 and "Traceback" not in flac.stderr
    assert flac.stderr.strip().splitlines()[-1] == "Try: export it as .wav", flac.stderr


def test_head_of_a_watched_file_answers_from_the_manifest_without_rebuilding(server, tmp_path):
    """HEAD /api/sessions/{id}/file gives size, sha256 and version from the manifest and reads no chunk (as HEAD
    of an export runs none): with the stored bytes gone, HEAD still answers while GET cannot rebuild."""
    card = tmp_path / "card"
    card.mkdir()
    rf.zoom_bwf(card / "Z.WAV")
    done = scribe("watch", str(card), "--session", "head-1", "--once", "--settle", "0.3", "--server", server.url,
                  "--token", server.alice, timeout=120)
    assert done.returncode == 0, done.stderr
    for stored in (server.data_dir / "audio" / "@alice" / "head-1").iterdir():
        stored.unlink()
    head = requests.head(server.url + "/api/sessions/head-1/file", params={"path": "Z.WAV"}, timeout=30,
                         headers={"Authorization": f"Bearer {server.alice}"})
    data = (card / "Z.WAV").read_bytes()
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(data)
    assert head.headers["X-File-Sha256"] == hashlib.sha256(data).hexdigest()
    assert server.get("/api/sessions/head-1/file", server.alice, params={"path": "Z.WAV"}).status_code >= 400
    missing = requests.head(server.url + "/api/sessions/head-1/file", params={"path": "X.WAV"}, timeout=30,
                            headers={"Authorization": f"Bearer {server.alice}"})
    assert missing.status_code == 404


def _plain_chunks(server, session: str, count: int, finish: bool = False) -> None:
    """``count`` one-second WAV chunks sent the way `scribe record` or the browser sends them."""
    buf = io.BytesIO()
    sf.write(buf, np.zeros((48_000, 1), dtype=np.int16), 48_000, format="WAV", subtype="PCM_16")

    async def go():
        async with connected(server.url, server.alice) as sio:
            for seq in range(count):
                assert (await call(sio, "audio-chunk", payload(session, seq, buf.getvalue(), durationMs=1000)))["ok"]
            if finish:
                assert (await call(sio, "session-finish", {"sessionId": session, "lastSeq": count - 1}))["ok"]

    run(go())


def test_watch_into_a_session_with_recorded_chunks_continues_after_them(server, tmp_path):
    """`scribe watch --session S` where S already holds another client's chunks numbers its ranges after them
    (not a permanent conflict at seq 0); the stream export then refuses plainly instead of silently dropping
    the recorded chunks; a session finished on the server is refused before anything is spooled."""
    _plain_chunks(server, "mix-1", 3)
    card = tmp_path / "card"
    card.mkdir()
    rf.zoom_bwf(card / "Z.WAV")
    done = scribe("watch", str(card), "--session", "mix-1", "--once", "--settle", "0.3", "--server", server.url,
                  "--token", server.alice, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "from seq 3" in done.stderr
    got = server.get("/api/sessions/mix-1/file", server.alice, params={"path": "Z.WAV"})
    assert got.status_code == 200 and got.content == (card / "Z.WAV").read_bytes()
    audio = server.get("/api/sessions/mix-1/audio", server.alice)
    assert audio.status_code == 415 and "3 recorded chunk(s)" in audio.json()["error"]["message"]
    _plain_chunks(server, "done-1", 2, finish=True)
    refused = scribe("watch", str(card), "--session", "done-1", "--once", "--settle", "0.3", "--server", server.url,
                     "--token", server.alice, timeout=120, SCRIBE_HOME=str(tmp_path / "home-2"))
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "finished on the server" in refused.stderr and "Try: watch into a new --session id" in refused.stderr
    assert server.get("/api/sessions/done-1", server.alice).json()["totalChunks"] == 2
