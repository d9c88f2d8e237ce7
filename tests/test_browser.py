"""The browser recorder and session view, driven in Debian's Chromium (selenium + chromedriver).

The microphone is Chromium's fake capture device fed from a 44.1 kHz 16-bit WAV
of seeded noise; faults are real: DevTools offline emulation, SIGKILL of the
server and of the browser (the same profile directory is reopened).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import socketio
import soundfile as sf

os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never reach for the network

from scribe_cli.chaos.proxy import FaultProxy  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.common.exceptions import SessionNotCreatedException  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "scribe_server" / "web" / "static"
RATE = 44100
NOISE_SECONDS = 45
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = (
    "--headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run "
    "--disable-background-networking --disable-component-update --disable-sync "
    "--autoplay-policy=no-user-gesture-required --use-fake-ui-for-media-stream "
    "--use-fake-device-for-media-stream --window-size=1000,1100"
).split()


@pytest.fixture(scope="module")
def noise_wav(tmp_path_factory):
    """Seeded noise (45 s) then 60 s of zeros: Chromium repeats the file's last 10 ms forever."""
    path = tmp_path_factory.mktemp("mic") / "noise.wav"
    rng = np.random.default_rng(20261201)
    noise = np.clip(rng.standard_normal(RATE * NOISE_SECONDS) * 6000, -32768, 32767).astype(np.int16)
    source = np.concatenate([noise, np.zeros(RATE * 60, np.int16)])
    sf.write(path, source, RATE, subtype="PCM_16")
    return path, source


class Browser:
    """A Chromium under chromedriver with a fixed profile directory that can be SIGKILLed."""

    def __init__(self, profile: Path, wav: Path):
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in FLAGS:
            opts.add_argument(flag)
        opts.add_argument(f"--use-file-for-fake-audio-capture={wav}")
        opts.add_argument(f"--user-data-dir={profile}")
        for attempt in range(3):  # a start-up timeout on a loaded machine is not what these tests are about
            try:
                self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
                break
            except SessionNotCreatedException as exc:
                if attempt == 2:
                    raise
                print(f"chromium did not start ({exc.msg.splitlines()[0] if exc.msg else exc}); retrying")
                time.sleep(2)
        self.driver.set_page_load_timeout(60)
        self.driver.set_script_timeout(60)

    def open(self, url: str) -> None:
        self.driver.get(url)

    def el(self, css_id: str):
        return self.driver.find_element(By.ID, css_id)

    def status(self) -> dict:
        data = self.driver.execute_script(
            "const s = document.getElementById('status'); return s ? Object.assign({}, s.dataset) : {};")
        return {k: (int(v) if v.isdigit() else v) for k, v in data.items()}

    def wait(self, what: str, predicate, timeout: float = 90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        log = self.driver.execute_script(
            "return ['conn-text', 'notice', 'warning', 'log'].map(id => document.getElementById(id))"
            ".filter(e => e).map(e => e.id + ': ' + e.innerText).join('\\n')")
        raise AssertionError(f"timed out waiting for {what}; status={self.status()}\npage:\n{log}")

    def network(self, offline: bool) -> None:
        # Network.enable must come before the emulation or nothing is cut.
        self.driver.execute_cdp_cmd("Network.enable", {})
        self.driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
            "offline": offline, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
        if offline:  # what a real network change fires; socket.io-client drops the socket on it
            self.driver.execute_script("window.dispatchEvent(new Event('offline'))")

    def browser_pid(self) -> int:
        """The main Chromium process (child of chromedriver, not a --type= helper)."""
        root = self.driver.service.process.pid
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                stat = (proc / "stat").read_text()
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == root and not any(arg.startswith(b"--type=") for arg in cmdline):
                return int(proc.name)
        raise AssertionError("no chromium process under chromedriver")

    def kill(self) -> None:
        """SIGKILL the browser (no shutdown, no flush), then end chromedriver."""
        os.kill(self.browser_pid(), signal.SIGKILL)
        time.sleep(0.5)
        self.driver.service.stop()

    def quit(self) -> None:
        try:
            self.driver.quit()
        except Exception:
            self.driver.service.stop()


class SocketBlockingProxy(FaultProxy):
    """The fault proxy, plus a switch that refuses Socket.IO connections while pages still load
    (a middlebox that drops WebSockets): the way to reload a page while its chunks cannot upload."""

    block_sockets = False

    def stall_replies(self) -> None:
        """Stop forwarding server -> browser on open links (chunks still arrive, acks do not)."""
        async def stall() -> None:
            for browser_side, _ in self._links:
                self._stalled.add(browser_side)
        self._run(stall())

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readline()  # the request line: GET /socket.io/?EIO=4&transport=websocket ...
        if self.block_sockets and b"/socket.io/" in head:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        up_writer.write(head)
        link = (writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(self._pipe(reader, up_writer, "up"), self._pipe(up_reader, writer, "down"),
                                 return_exceptions=True)
        finally:
            self._links.discard(link)
            for w in link:
                w.transport.abort()


@pytest.fixture
def browsers():
    started: list[Browser] = []

    def launch(profile: Path, wav: Path) -> Browser:
        browser = Browser(profile, wav)
        started.append(browser)
        return browser

    yield launch
    for browser in started:
        browser.quit()


def set_token(browser: Browser, token: str) -> None:
    field = browser.el("token")
    field.clear()
    field.send_keys(token, Keys.TAB)  # the change event stores it (localStorage) and connects


def start_recording(browser: Browser, url: str, token: str, session: str, chunk_seconds: float = 1) -> None:
    browser.open(url + "/record")
    browser.wait("page ready", lambda: browser.driver.execute_script("return document.body.dataset.ready"))
    set_token(browser, token)
    browser.el("session").clear()
    browser.el("session").send_keys(session)
    browser.driver.execute_script(
        f"const c = document.getElementById('chunk-seconds'); c.value = '{chunk_seconds}';"
        "c.dispatchEvent(new Event('change'))")
    browser.el("start").click()
    browser.wait("recording", lambda: browser.status()["state"] == "recording", 30)


def export_frames(server, session: str) -> np.ndarray:
    resp = server.get(f"/api/sessions/{session}/audio?format=wav", server.alice)
    assert resp.status_code == 200, resp.text
    frames, rate = sf.read(io.BytesIO(resp.content), dtype="int16", always_2d=True)
    assert rate == RATE
    return frames


def find_once(source: np.ndarray, probe: np.ndarray, start: int = 0, end: int = RATE * NOISE_SECONDS) -> int:
    offsets = [start + int(c) for c in np.flatnonzero(source[start:end] == probe[0])
               if np.array_equal(source[start + c:start + c + len(probe)], probe)]
    assert len(offsets) == 1, f"captured audio not found once in the source: {offsets}"
    return offsets[0]


FAKE_BUFFER = 441  # samples per buffer of Chromium's fake capture device at 44.1 kHz (10 ms)
MAX_DEVICE_DROPS = 3


def align_with_source(captured: np.ndarray, source: np.ndarray, holes: list | None = None
                      ) -> tuple[int, int, int, list[int]]:
    """Walk the capture along the source; return (source offset, samples matched, leading zeros, inserted runs).

    Every captured sample must be the next source sample, except runs of exact
    zeros that Chromium's fake capture device inserts when it underruns on a
    loaded machine (seen: 441 samples = one 10 ms buffer).  A changed or
    repeated sample fails the walk; a forward jump in the source (audio the
    browser never delivered, as while a page is frozen) fails it too unless
    ``holes`` is a list, which then receives the length of each jump, or it is
    at most MAX_DEVICE_DROPS skips of whole fake-device buffers (its underrun on
    a loaded machine, before any code of ours sees the audio), which are never
    counted as holes.
    """
    start = int(np.flatnonzero(captured)[0])
    i, j, runs, device_drops = start, find_once(source, captured[start:start + 64]), [], []
    first, skipped = j, 0
    while i < len(captured):
        n = min(len(captured) - i, len(source) - j)
        assert n > 0, "the capture runs past the end of the source"
        diff = np.flatnonzero(captured[i:i + n] != source[j:j + n])
        if not len(diff):
            i, j = i + n, j + n
            continue
        i, j = i + int(diff[0]), j + int(diff[0])
        run = int(np.argmax(captured[i:] != 0)) if captured[i:].any() else len(captured) - i
        if run == 0 and len(captured) - i >= 64 and (holes is not None or len(device_drops) < MAX_DEVICE_DROPS):
            reach = RATE * 30 if holes is not None else FAKE_BUFFER * 10
            resumed = find_once(source, captured[i:i + 64], j + 1, min(len(source), j + reach + 1))
            jump = resumed - j
            # the fake device, starved on a loaded machine, can skip whole 10 ms buffers of its file: a jump of
            # k x 441 samples, k <= 10 (our page moves audio in 128-frame quanta: no loss of its own has that
            # size below 56,448 samples); anything else is a hole (allowed only when the caller counts them)
            if jump % FAKE_BUFFER == 0 and jump <= FAKE_BUFFER * 10 and len(device_drops) < MAX_DEVICE_DROPS:
                device_drops.append(jump)
            else:
                assert holes is not None, f"captured sample {i} jumps {jump} samples ahead"
                holes.append(jump)
            skipped += jump
            j = resumed
            continue
        assert run > 0, f"captured sample {i} is {captured[i]}, the source has {source[j]} (changed or lost audio)"
        runs.append(run)
        i += run
    return first, j - first - skipped, start, runs


def session_info(server, session: str) -> dict:
    resp = server.get(f"/api/sessions/{session}", server.alice)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.mark.timeout(420)
def test_recorder_survives_offline_server_kill_reload_and_browser_kill(server, noise_wav, browsers, tmp_path,
                                                                      request):
    """Offline twice, server SIGKILL, reload and browser SIGKILL with chunks queued: every chunk once, audio exact."""
    wav, source = noise_wav
    profile = tmp_path / "profile"
    session = "browser-faults"
    proxy = SocketBlockingProxy("127.0.0.1", server.port).start()
    request.addfinalizer(proxy.stop)
    browser = browsers(profile, wav)
    start_recording(browser, proxy.url, server.alice, session)
    browser.wait("first acks", lambda: browser.status()["acked"] >= 2)

    # 0. tab hidden (another tab in front): the chunk in progress is cut and stored, capture goes on
    front = browser.driver.current_window_handle
    browser.driver.switch_to.new_window("tab")
    time.sleep(1.0)
    browser.driver.close()
    browser.driver.switch_to.window(front)

    # 1. offline while recording: chunks pile up in IndexedDB, then drain
    browser.network(offline=True)
    browser.wait("offline", lambda: browser.status()["connected"] == "false", 30)
    before = browser.status()["captured"]
    browser.wait("captured while offline", lambda: browser.status()["captured"] >= before + 3)
    assert browser.status()["pending"] >= 3
    browser.network(offline=False)
    browser.wait("reconnected", lambda: browser.status()["connected"] == "true", 60)
    target = browser.status()["captured"]
    browser.wait("drained after offline", lambda: browser.status()["acked"] >= target)

    # 2. the server killed (SIGKILL) and restarted on the same port
    server.kill()
    browser.wait("server gone", lambda: browser.status()["connected"] == "false", 30)
    before = browser.status()["captured"]
    browser.wait("captured while the server is down", lambda: browser.status()["captured"] >= before + 2)
    server.start()
    browser.wait("reconnected to the restarted server", lambda: browser.status()["connected"] == "true", 60)
    target = browser.status()["captured"]
    browser.wait("drained after restart", lambda: browser.status()["acked"] >= target)

    # 2b. a second, short offline period right after the restart
    browser.network(offline=True)
    browser.wait("offline again", lambda: browser.status()["connected"] == "false", 30)
    before = browser.status()["captured"]
    browser.wait("captured while offline again", lambda: browser.status()["captured"] >= before + 1)
    browser.network(offline=False)
    browser.wait("reconnected again", lambda: browser.status()["connected"] == "true", 60)

    # 3. WebSockets refused (pages still load): Stop with chunks waiting
    proxy.block_sockets = True
    proxy.cut_all()
    browser.wait("socket refused", lambda: browser.status()["connected"] == "false", 30)
    before = browser.status()["captured"]
    browser.wait("captured while blocked", lambda: browser.status()["captured"] >= before + 2)
    browser.el("stop").click()
    browser.wait("stopped", lambda: browser.status()["state"] == "idle", 30)
    waiting = browser.status()["pending"]
    assert waiting >= 2 and browser.status()["connected"] == "false"

    # 4. reload: the queued chunks are found and announced
    browser.driver.refresh()
    browser.wait("reloaded page lists the queue", lambda: browser.status().get("pending") == waiting, 30)
    assert "waiting in this browser" in browser.el("notice").text
    assert browser.status()["connected"] == "false"

    # 5. SIGKILL the browser; a new one on the same profile uploads and finishes the session
    browser.kill()
    proxy.block_sockets = False
    browser = browsers(profile, wav)
    browser.open(proxy.url + "/record")
    browser.wait("uploaded after restart", lambda: browser.status().get("pending") == 0
                 and browser.status().get("connected") == "true", 90)
    browser.wait("announced", lambda: "earlier visit are uploaded" in browser.el("notice").text, 30)
    info = browser.wait("session complete", lambda: (i := session_info(server, session))["complete"] and i, 60)

    seqs = [c["sequence"] for c in info["chunks"]]
    assert seqs == list(range(info["finalSeq"] + 1)), "every chunk exactly once, no gap"
    assert info["missingCount"] == 0 and len(seqs) >= 10
    stored = [p for p in server.data_dir.glob(f"audio/**/{session}/*") if p.is_file()]
    assert len(stored) == len(seqs), f"one file per chunk on the server's disk: {sorted(p.name for p in stored)}"
    short = [c["sequence"] for c in info["chunks"][:-1] if c["durationMs"] < 950]
    assert short, "hiding the tab cut the chunk in progress"
    frames = export_frames(server, session)
    assert np.array_equal(frames[:, 0], frames[:, -1]), "both channels carry the mono source"
    offset, matched, leading, runs = align_with_source(frames[:, 0], source)
    assert leading + matched + sum(runs) == len(frames)
    assert sum(runs) < 0.03 * len(frames), f"zero runs inserted by the fake device: {runs}"
    print(f"\nbrowser: {len(seqs)} chunks, {len(frames) / RATE:.1f} s, source offset {offset}, "
          f"{leading} leading zeros, zero runs inserted by the capture device: {runs}")


@pytest.mark.timeout(240)
def test_reconnect_skips_chunks_the_server_already_holds(server, noise_wav, browsers, tmp_path, request):
    """Chunks stored but not acknowledged (acks lost) are dropped after session-state on reconnect, not resent."""
    session = "held-1"
    proxy = SocketBlockingProxy("127.0.0.1", server.port).start()
    request.addfinalizer(proxy.stop)
    browser = browsers(tmp_path / "profile", noise_wav[0])
    start_recording(browser, proxy.url, server.alice, session)
    browser.wait("first ack", lambda: browser.status()["acked"] >= 1)
    proxy.stall_replies()
    acked = browser.status()["acked"]
    browser.wait("stored without acks", lambda: session_info(server, session)["totalChunks"] >= acked + 3, 60)
    assert browser.status()["acked"] <= acked + 1
    proxy.cut_all()  # the browser reconnects through a fresh link
    browser.wait("reconnected", lambda: browser.status()["connected"] == "true", 60)
    browser.wait("held chunks skipped", lambda: "already held" in browser.el("log").text, 60)
    browser.el("stop").click()
    info = browser.wait("complete", lambda: (i := session_info(server, session))["complete"] and i, 60)
    assert [c["sequence"] for c in info["chunks"]] == list(range(info["finalSeq"] + 1))
    metrics = server.get("/metrics", None).text
    duplicates = [line for line in metrics.splitlines() if line.startswith("scribe_chunks_duplicate_total")]
    assert duplicates == ["scribe_chunks_duplicate_total 0.0"], "nothing the server held was sent again"


@pytest.mark.timeout(300)
def test_browser_killed_while_recording_keeps_committed_chunks_and_session_continues(
        server, noise_wav, browsers, tmp_path, request):
    """SIGKILL mid-recording with uploads blocked: every committed chunk uploads from the reopened profile,
    and Start again continues the same session at the next sequence number."""
    wav, source = noise_wav
    profile = tmp_path / "profile"
    session = "browser-killed"
    proxy = SocketBlockingProxy("127.0.0.1", server.port).start()
    request.addfinalizer(proxy.stop)
    proxy.block_sockets = True
    browser = browsers(profile, wav)
    start_recording(browser, proxy.url, server.alice, session)
    browser.wait("captured offline", lambda: browser.status()["captured"] >= 2)
    # Frozen (as a phone does to a background tab): the chunk in progress is committed first. A frozen
    # page captures nothing, so the audio has a hole there; each chunk is still exact.
    browser.driver.execute_cdp_cmd("Page.setWebLifecycleState", {"state": "frozen"})
    time.sleep(1.0)
    browser.driver.execute_cdp_cmd("Page.setWebLifecycleState", {"state": "active"})
    browser.wait("resume noticed", lambda: "was frozen" in browser.el("log").text, 30)
    browser.wait("captured offline", lambda: browser.status()["captured"] >= 5)
    status = browser.status()  # one read: the page updates these together
    committed = status["captured"]
    assert status["acked"] == 0 and status["pending"] == committed
    browser.kill()

    proxy.block_sockets = False
    browser = browsers(profile, wav)
    browser.open(proxy.url + "/record")
    browser.wait("queue uploaded", lambda: browser.status().get("pending") == 0
                 and browser.status().get("acked", 0) >= committed, 90)
    info = session_info(server, session)
    first = info["totalChunks"]
    assert first >= committed and info["maxSeq"] == first - 1 and info["finalSeq"] is None

    assert browser.el("session").get_attribute("value") == session
    browser.el("start").click()
    browser.wait("recording again", lambda: browser.status()["state"] == "recording", 30)
    browser.wait("more chunks", lambda: browser.status()["captured"] >= 2)
    browser.el("stop").click()
    info = browser.wait("session complete", lambda: (i := session_info(server, session))["complete"] and i, 60)
    seqs = [c["sequence"] for c in info["chunks"]]
    assert seqs == list(range(info["finalSeq"] + 1)) and info["finalSeq"] >= first + 1
    assert f"{session} from chunk {first}" in browser.el("log").text
    assert any(c["durationMs"] < 950 for c in info["chunks"][:first - 1]), "the freeze cut a chunk"
    holes: list[int] = []
    for seq in seqs:  # each chunk is exact source audio; the freeze leaves one hole, the kill ends a recording
        resp = server.get(f"/api/sessions/{session}/chunks/{seq}", server.alice)
        frames, _ = sf.read(io.BytesIO(resp.content), dtype="int16", always_2d=True)
        _, matched, leading, runs = align_with_source(frames[:, 0], source, holes)
        assert leading + matched + sum(runs) == len(frames)
    assert len(holes) <= 1, f"audio lost other than while frozen: {holes}"
    print(f"\nbrowser kill: {committed} chunks committed before SIGKILL, {first} uploaded after restart, "
          f"{len(seqs) - first} more recorded; hole while frozen: {holes} samples")


def upload(url: str, token: str, session: str, seqs, last_seq: int | None = None) -> None:
    """Store 1 s WAV chunks of a tone with the Python Socket.IO client, as `scribe` would."""
    with socketio.SimpleClient() as sio:
        sio.connect(url, auth={"token": token}, transports=["websocket"])
        for seq in seqs:
            t = np.arange(RATE) / RATE
            tone = (np.sin(2 * np.pi * (220 + 20 * seq) * t) * 8000).astype(np.int16)
            buf = io.BytesIO()
            sf.write(buf, tone, RATE, format="WAV", subtype="PCM_16")
            data = buf.getvalue()
            reply = sio.call("audio-chunk", {"sessionId": session, "sequence": seq, "audio": data,
                                             "mimeType": "audio/wav", "durationMs": 1000,
                                             "checksum": hashlib.sha256(data).hexdigest()}, timeout=30)
            assert reply["ok"], reply
        if last_seq is not None:
            assert sio.call("session-finish", {"sessionId": session, "lastSeq": last_seq}, timeout=30)["ok"]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.timeout(240)
def test_session_view_shows_marks_gaps_live_updates_audio_and_screenshot(server, noise_wav, browsers, tmp_path):
    """The session view: a mark per chunk, gap ranges, live chunk-stored updates, the export playable; PNG saved."""
    session = "view-1"
    upload(server.url, server.alice, session, [0, 1, 2, 5, 6, 7, 8, 11])
    browser = browsers(tmp_path / "profile", noise_wav[0])
    browser.open(server.url + "/record")
    browser.driver.execute_script("localStorage.setItem('scribe.token', arguments[0])", server.alice)
    summary = lambda: browser.driver.execute_script(  # noqa: E731
        "return Object.assign({}, document.getElementById('summary').dataset)")
    browser.open(f"{server.url}/sessions/later-1")  # opened before its first chunk exists
    browser.wait("not found yet", lambda: "No session later-1" in browser.el("error").text, 30)
    upload(server.url, server.alice, "later-1", [0, 1])
    browser.wait("appears live", lambda: summary()["stored"] == "2" and summary()["live"] == "true", 60)

    browser.open(f"{server.url}/sessions/{session}")
    browser.wait("rendered", lambda: summary()["loaded"] == "true" and summary()["live"] == "true", 60)
    assert summary()["stored"] == "8" and summary()["missing"] == "4"
    assert browser.el("gaps-text").text == "3–4, 9–10"
    assert len(browser.driver.find_elements(By.CSS_SELECTOR, ".mark.stored")) == 8 + 1  # + legend
    assert browser.el("token-card").get_attribute("hidden") is not None

    browser.el("load-audio").click()
    duration = browser.wait("audio loaded", lambda: browser.driver.execute_script(
        "const a = document.getElementById('player'); return a.readyState >= 1 ? a.duration : 0"), 60)
    assert abs(duration - 8.0) < 0.01
    assert browser.driver.execute_script("return document.getElementById('player').src").startswith("blob:")

    shot = tmp_path / "session-view.png"
    data = browser.driver.get_screenshot_as_png()
    shot.write_bytes(data)
    out = os.environ.get("SCREENSHOT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "session-view.png").write_bytes(data)
    width, height = png_size(data)
    assert width >= 800 and height >= 600
    assert len(data) > 20_000, "a blank page compresses far smaller"
    colours = browser.driver.execute_script(
        "return ['#marks .mark.stored', '#marks .mark.missing'].map(q => "
        "getComputedStyle(document.querySelector(q)).backgroundColor)")
    assert colours == ["rgb(46, 139, 87)", "rgb(192, 57, 43)"], colours  # green stored, red missing

    upload(server.url, server.alice, session, [3, 4, 9, 10, 12], last_seq=12)  # live: chunk-stored events
    browser.wait("live update", lambda: summary()["stored"] == "13" and summary()["complete"] == "true", 60)
    assert browser.el("gaps-text").text == "none"
    assert browser.el("duration-text").text == "0:00:13"
    assert len(browser.driver.find_elements(By.CSS_SELECTOR, "#marks .mark")) == 13


@pytest.mark.timeout(120)
def test_recorder_refused_token_shows_disconnected_and_no_token_in_urls(server, noise_wav, browsers, tmp_path):
    """A wrong token is refused (page says so, stays disconnected); the token never appears in a request URL."""
    browser = browsers(tmp_path / "profile", noise_wav[0])
    browser.open(server.url + "/record")
    browser.wait("page ready", lambda: browser.driver.execute_script("return document.body.dataset.ready"))
    set_token(browser, "scr_not-a-real-token")
    browser.wait("refusal shown", lambda: "refused the token" in browser.el("conn-text").text, 30)
    assert browser.status()["connected"] == "false"
    set_token(browser, server.alice)
    browser.wait("connected with the right token", lambda: browser.status()["connected"] == "true", 30)
    urls = browser.driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).concat([location.href])")
    assert urls and not any(server.alice in u or "not-a-real-token" in u for u in urls)


def test_pages_and_static_files_are_served_with_security_headers(server):
    """GET /record and /sessions/<id> serve the pages (CSP, nosniff); a bad id is 404; assets are reachable."""
    for path in ("/record", "/sessions/abc-1"):
        resp = server.get(path, None)
        assert resp.status_code == 200 and "text/html" in resp.headers["Content-Type"]
        assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert server.get("/sessions/..%2F..%2Fetc", None).status_code == 404
    for asset in ("record.js", "session.js", "queue.js", "uploader.js", "capture.js", "worklet.js", "style.css",
                  "vendor/socket.io.min.js"):
        resp = server.get("/static/" + asset, None)
        assert resp.status_code == 200, asset
        assert resp.content == (STATIC / asset).read_bytes()


def test_vendored_socketio_is_exactly_the_build_output():
    """The committed socket.io.min.js is what `npm ci && npm run build` produces from the lockfile."""
    build = json.loads((STATIC / "vendor" / "BUILD.json").read_text())
    lock = json.loads((ROOT / "web" / "package-lock.json").read_text())
    assert build["version"] == lock["packages"]["node_modules/socket.io-client"]["version"]
    for name, digest in build["files"].items():
        committed = (STATIC / "vendor" / name).read_bytes()
        assert hashlib.sha256(committed).hexdigest() == digest, f"{name} differs from what the build recorded"
        built = ROOT / "web" / "node_modules" / "socket.io-client" / "dist" / name
        if built.exists():  # after `npm ci` in web/: compare with the package itself
            assert built.read_bytes() == committed
    assert committed.startswith(b"/*!\n * Socket.IO v" + build["version"].encode())


def test_wheel_ships_the_pages(tmp_path):
    """`pip wheel` of a clean copy includes the static pages and the vendored client, so no npm is needed after install."""
    src = tmp_path / "src"  # a clean copy, so no build/ left in the checkout feeds the wheel
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "node_modules", "*.egg-info", ".pytest_cache", ".hypothesis", "__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr
    wheel = next(tmp_path.glob("scribe-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset in ("record.html", "session.html", "record.js", "worklet.js", "vendor/socket.io.min.js"):
        assert f"scribe_server/web/static/{asset}" in names, asset
    assert "scribe_server/web.py" in names


@pytest.mark.timeout(180)
def test_opus_mode_stores_standalone_webm_chunks(server, noise_wav, browsers, tmp_path):
    """Opus mode: one MediaRecorder per chunk, so every stored chunk is a whole WebM file (EBML header)."""
    browser = browsers(tmp_path / "profile", noise_wav[0])
    browser.open(server.url + "/record")
    browser.wait("page ready", lambda: browser.driver.execute_script("return document.body.dataset.ready"))
    browser.driver.execute_script(  # remembered in localStorage like the token
        "const f = document.getElementById('format'); f.value = 'opus'; f.dispatchEvent(new Event('change'))")
    start_recording(browser, server.url, server.alice, "opus-1")
    browser.wait("chunks", lambda: browser.status()["acked"] >= 3, 60)
    browser.el("stop").click()
    info = browser.wait("finished", lambda: (i := session_info(server, "opus-1"))["complete"] and i, 60)
    assert len(info["chunks"]) >= 3
    for chunk in info["chunks"]:
        assert chunk["mimeType"] == "audio/webm;codecs=opus"
        data = server.get(f"/api/sessions/opus-1/chunks/{chunk['sequence']}", server.alice).content
        assert data[:4] == b"\x1a\x45\xdf\xa3", "each chunk starts with its own WebM header"
        if chunk is not info["chunks"][-1]:  # the last one may be a few milliseconds long
            assert len(data) > 4000 and chunk["durationMs"] > 500
