"""Shared fixtures: isolated state dirs and a real scribe-server on a loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent

# The signal tests send SIGHUP (a closed terminal) to real children, which inherit an ignored
# SIGHUP from a suite started under ``nohup`` and would then never see it: they get the default.
if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No SCRIBE_* variable leaks in; all local state lives under tmp_path."""
    for key in list(os.environ):
        if key.startswith("SCRIBE"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SCRIBE_HOME", str(tmp_path / "client-home"))
    monkeypatch.setenv("SCRIBE_SERVER_HOME", str(tmp_path / "server-home"))
    yield


def run_server_cli(*args: str, data_dir: Path, database_url: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "scribe_server", *args, "--data-dir", str(data_dir)]
    if database_url:
        cmd += ["--database-url", database_url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


class ServerProcess:
    """A ``scribe-server serve`` child process that can be killed and restarted."""

    def __init__(self, data_dir: Path, database_url: str | None = None, extra_args: tuple[str, ...] = (),
                 port: int = 0, env: dict | None = None, nofile: int | None = None):
        self.data_dir = data_dir
        self.database_url = database_url
        self.extra_args = extra_args
        self.port = port
        self.env = env
        self.nofile = nofile  # RLIMIT_NOFILE of the server process, when given
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"

    def token(self, name: str) -> str:
        result = run_server_cli("token", "create", name, data_dir=self.data_dir, database_url=self.database_url)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def start(self) -> "ServerProcess":
        cmd = [sys.executable, "-m", "scribe_server", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--data-dir", str(self.data_dir), *self.extra_args]
        if self.database_url:
            cmd += ["--database-url", self.database_url]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")
        env = {**os.environ, **(self.env or {})}
        limit = None
        if self.nofile:
            import resource

            limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))  # noqa: E731
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, preexec_fn=limit)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}\n{self.log_path.read_text()}")
        self.url = line.split()[-1]
        self.port = int(self.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server never became healthy")

    def kill(self) -> None:
        """SIGKILL: no cleanup, as in a power cut of the process."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> "ServerProcess":
        self.kill()
        return self.start()

    def get(self, path: str, token: str | None, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(self.url + path, headers=headers, timeout=30, **kwargs)


@pytest.fixture
def server_factory(tmp_path):
    started: list[ServerProcess] = []

    def make(name: str = "server", **kwargs) -> ServerProcess:
        server = ServerProcess(tmp_path / name, **kwargs)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def server(server_factory) -> ServerProcess:
    """A running server on SQLite with a token for 'alice' in ``server.alice``."""
    srv = server_factory()
    srv.alice = srv.token("alice")
    return srv.start()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """One real PostgreSQL cluster for the whole run; tests create their own databases."""
    from tests.infra import Postgres

    pg = Postgres(tmp_path_factory.mktemp("pg")).start()
    yield pg
    pg.stop()


@pytest.fixture
def redis_server(tmp_path):
    from tests.infra import Redis

    server = Redis(tmp_path).start()
    yield server
    server.stop()


_db_counter = [0]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request):
    """The database URL for a server under test: None (SQLite in the data dir) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    pg = request.getfixturevalue("postgres")
    _db_counter[0] += 1
    return pg.create_database(f"scribe_test_{os.getpid()}_{_db_counter[0]}")
