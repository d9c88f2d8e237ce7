"""An embedded scribe-server child process on a loopback port (demo, chaos).

It can be SIGKILLed and started again on the same port and data directory,
which is how ``scribe chaos`` simulates a server crash.  It runs in its own
process group: a Ctrl-C at the terminal reaches only the scribe command,
which decides when to stop the server (after its drain and export).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import requests

from scribe_cli.errors import ScribeError, ServerUnreachable


class EmbeddedServer:
    def __init__(self, data_dir: Path, extra_args: tuple[str, ...] = (), env: dict | None = None):
        self.data_dir, self.extra_args = Path(data_dir), extra_args
        self.env = {**os.environ, **(env or {})}
        self.port = 0
        self.url = ""
        self.process: subprocess.Popen | None = None
        self.token = self._create_token()
        self._log = open(self.data_dir / "server.log", "a")

    def _create_token(self) -> str:
        created = subprocess.run([sys.executable, "-m", "scribe_server", "token", "create", "embedded",
                                  "--data-dir", str(self.data_dir)], capture_output=True, text=True, env=self.env)
        if created.returncode != 0:
            raise ScribeError(f"cannot create the embedded server's token: {created.stderr.strip()}")
        return created.stdout.strip()

    def start(self) -> "EmbeddedServer":
        """Start (or start again, on the same port once one was chosen) and wait until ready."""
        for attempt in range(50):
            self.process = subprocess.Popen(
                [sys.executable, "-m", "scribe_server", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--data-dir", str(self.data_dir), *self.extra_args],
                stdout=subprocess.PIPE, stderr=self._log, text=True, env=self.env, process_group=0)
            line = self.process.stdout.readline()
            if line.startswith("listening on "):
                break
            self.process.wait(10)
            time.sleep(0.1)  # the port may still be held by the killed process for a moment
        else:
            raise ServerUnreachable("the embedded server did not start", f"see {self.data_dir / 'server.log'}")
        self.url = line.split()[-1]
        self.port = int(self.url.rsplit(":", 1)[1])
        _wait_healthy(self.url)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no cleanup, as in a crash."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@contextlib.contextmanager
def embedded_server(data_dir: Path, extra_args: tuple[str, ...] = (), env: dict | None = None
                    ) -> Iterator[EmbeddedServer]:
    """A running scribe-server child process on a free loopback port, with a fresh token."""
    server = EmbeddedServer(data_dir, extra_args, env)
    try:
        yield server.start()
    finally:
        server.stop()


def _wait_healthy(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise ServerUnreachable("the embedded server never became ready")
