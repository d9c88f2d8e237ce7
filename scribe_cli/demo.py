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
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from scribe_cli.api import Api
from scribe_cli.capture import session as capture
from scribe_cli.capture.recorder import RecordState
from scribe_cli.capture.sources import ArraySource, MicSource, has_input_device, speech_like
from scribe_cli.chaos.proxy import FaultProxy
from scribe_cli.config import Settings
from scribe_cli.embedded import embedded_server
from scribe_cli.errors import Interrupted
from scribe_cli.spool import Spool
from scribe_cli.stopping import REQUEST, StopRequest

RATE = 16000


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
        cut_after: float | None = None, down_for: float = 3.0, stop: StopRequest | None = None) -> DemoResult:
    """Run the demo; ``on_state`` wraps the recording (the live display).

    A stop request ends the recording early (the network comes back at once),
    and the demo checks and exports what was recorded; an abort raises Interrupted."""
    work = Path(tempfile.mkdtemp(prefix="scribe-demo-"))
    try:
        (work / "server").mkdir()
        with embedded_server(work / "server") as server:
            proxy = FaultProxy("127.0.0.1", server.port).start()
            try:
                return _record_and_check(work, server, proxy, output, seconds, listener, on_state, use_input,
                                         cut_after if cut_after is not None else seconds / 2, down_for, stop)
            finally:
                proxy.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _record_and_check(work, server, proxy, output, seconds, listener, on_state, use_input, cut_after, down_for,
                      stop):
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
    ended = threading.Event()
    cutter = threading.Thread(target=_cut_midway, args=(state, proxy, cut_after, down_for, listener, ended),
                              daemon=True)
    restore = stop.on(REQUEST, lambda: (ended.set(), proxy.refuse_for(0))) if stop else contextlib.nullcontext()
    with Spool(settings.spool_dir) as spool, on_state(state), restore:
        cutter.start()
        try:
            result = capture.record(settings, spool, state, source, 2.0, "flac", int(seconds * RATE), False, 60.0,
                                    listener, stop=stop)
        finally:
            ended.set()
    if stop and stop.aborted:
        raise Interrupted("the demo was stopped before its upload finished")
    if result.upload_error:
        raise result.upload_error
    api = Api(server.url, server.token)
    report = api.missing(session)
    try:
        size = api.export(session, output, output.suffix.lstrip(".").lower() or "flac", allow_gaps=False)
    except OSError as exc:
        from scribe_cli.jobs import output_error

        raise output_error(output, exc) from None
    return DemoResult(session, source_name, state, proxy.stats.cuts, proxy.stats.refused, report, output, size)


def _cut_midway(state: RecordState, proxy: FaultProxy, after: float, down_for: float, listener,
                ended: threading.Event) -> None:
    while state.elapsed < after:
        if ended.wait(0.05):
            return
    proxy.refuse_for(down_for)
    proxy.cut_all()
    listener("network-cut", {"at": round(state.elapsed, 1), "downFor": down_for})
