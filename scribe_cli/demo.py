"""``scribe demo``: the whole story in 15 seconds on any machine.

It starts an embedded scribe-server (SQLite and local files in a temporary
folder) on a free loopback port behind the fault proxy, records about 15 s
from the default input (or a generated speech-like signal when there is
none), cuts the connection in the middle and restores it, then checks that
the server reports no gaps and exports the session to a file.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import requests

from scribe_cli.api import Api
from scribe_cli.capture import session as capture
from scribe_cli.capture.recorder import RecordState
from scribe_cli.capture.sources import ArraySource, MicSource, has_input_device, speech_like
from scribe_cli.chaos.proxy import FaultProxy
from scribe_cli.config import Settings
from scribe_cli.errors import ScribeError, ServerUnreachable
from scribe_cli.spool import Spool

RATE = 16000


@dataclass
class EmbeddedServer:
    url: str
    port: int
    token: str
    data_dir: Path
    process: subprocess.Popen

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


@contextlib.contextmanager
def embedded_server(data_dir: Path, extra_args: tuple[str, ...] = ()) -> Iterator[EmbeddedServer]:
    """A scribe-server child process on a free loopback port, with a fresh token."""
    base = [sys.executable, "-m", "scribe_server"]
    created = subprocess.run([*base, "token", "create", "demo", "--data-dir", str(data_dir)],
                             capture_output=True, text=True)
    if created.returncode != 0:
        raise ScribeError(f"cannot create the embedded server's token: {created.stderr.strip()}")
    log = open(data_dir / "server.log", "a")
    process = subprocess.Popen([*base, "serve", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir),
                                *extra_args], stdout=subprocess.PIPE, stderr=log, text=True)
    line = process.stdout.readline()
    if not line.startswith("listening on "):
        process.kill()
        raise ServerUnreachable("the embedded server did not start", f"see {data_dir / 'server.log'}")
    url = line.split()[-1]
    server = EmbeddedServer(url, int(url.rsplit(":", 1)[1]), created.stdout.strip(), data_dir, process)
    try:
        _wait_healthy(url)
        yield server
    finally:
        server.stop()
        log.close()


def _wait_healthy(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise ServerUnreachable("the embedded server never became ready")


@dataclass
class DemoResult:
    session: str
    source: str
    state: RecordState
    cuts: int
    refused: int
    report: dict
    output: Path
    output_bytes: int

    def to_json(self) -> dict:
        return {"session": self.session, "source": self.source, **self.state.to_json(), "cuts": self.cuts,
                "refusedConnections": self.refused, "server": self.report, "output": str(self.output),
                "outputBytes": self.output_bytes}


def run(output: Path, seconds: float, listener: Callable[[str, dict], None],
        on_state: Callable[[RecordState], contextlib.AbstractContextManager], use_input: bool | None = None,
        cut_after: float | None = None, down_for: float = 3.0) -> DemoResult:
    """Run the demo; ``on_state`` wraps the recording (the live display)."""
    work = Path(tempfile.mkdtemp(prefix="scribe-demo-"))
    try:
        (work / "server").mkdir()
        with embedded_server(work / "server") as server:
            proxy = FaultProxy("127.0.0.1", server.port).start()
            try:
                return _record_and_check(work, server, proxy, output, seconds, listener, on_state, use_input,
                                         cut_after if cut_after is not None else seconds / 2, down_for)
            finally:
                proxy.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _record_and_check(work, server, proxy, output, seconds, listener, on_state, use_input, cut_after, down_for):
    session = time.strftime("demo-%Y%m%d-%H%M%S")
    settings = Settings(home=work / "home", server=proxy.url, token=server.token, window=32, ack_timeout=10.0)
    if use_input is None:
        use_input = has_input_device()
    if use_input:
        source, source_name = MicSource(None, RATE, 1), "default input device"
    else:
        source, source_name = ArraySource(speech_like(RATE, seconds), RATE), "generated speech-like signal"
    listener("start", {"session": session, "source": source_name, "server": server.url})
    state = RecordState(session, RATE, 1)
    cutter = threading.Thread(target=_cut_midway, args=(state, proxy, cut_after, down_for, listener), daemon=True)
    with Spool(settings.spool_dir) as spool, on_state(state):
        cutter.start()
        result = capture.record(settings, spool, state, source, 2.0, "flac", int(seconds * RATE), False, 60.0,
                                listener)
    if result.upload_error:
        raise result.upload_error
    api = Api(server.url, server.token)
    report = api.missing(session)
    size = api.export(session, output, output.suffix.lstrip(".").lower() or "flac", allow_gaps=False)
    return DemoResult(session, source_name, state, proxy.stats.cuts, proxy.stats.refused, report, output, size)


def _cut_midway(state: RecordState, proxy: FaultProxy, after: float, down_for: float, listener) -> None:
    while state.elapsed < after:
        time.sleep(0.05)
    proxy.refuse_for(down_for)
    proxy.cut_all()
    listener("network-cut", {"at": round(state.elapsed, 1), "downFor": down_for})
