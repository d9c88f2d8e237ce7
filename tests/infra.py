"""Real PostgreSQL, Redis and nginx servers (Debian packages) on random loopback ports.

A missing binary skips locally, but fails under CI=true: CI installs them.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
import warnings
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require(binary: str | None, what: str) -> str:
    if binary and os.path.exists(binary):
        return binary
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is not installed but CI must test it (see .ci/run)")
    pytest.skip(f"{what} is not installed")


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


class Postgres:
    """A throwaway PostgreSQL cluster owned by the ``postgres`` user (it refuses to run as root)."""

    def __init__(self, base: Path):
        bindir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        self.bin = Path(require(bindir[-1] if bindir else None, "PostgreSQL"))
        self.dir = base / "pgdata"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def _as_postgres(self, *cmd: str, **kwargs):
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *cmd], check=True, capture_output=True, text=True, **kwargs)

    def start(self) -> "Postgres":
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir.parent, 0o777)
        if os.geteuid() == 0:
            for parent in list(self.dir.parents)[:-1]:
                os.chmod(parent, os.stat(parent).st_mode | 0o011)
        if not (self.dir / "PG_VERSION").exists():
            self._as_postgres(str(self.bin / "initdb"), "-D", str(self.dir), "-A", "trust", "-U", "postgres",
                              "--no-sync")
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.log = self.dir.parent / "postgres.log"
        self.proc = subprocess.Popen([*prefix, str(self.bin / "postgres"), "-D", str(self.dir), "-p", str(self.port),
                                      "-h", "127.0.0.1", "-k", str(self.dir), "-c", "synchronous_commit=on",
                                      "-c", "max_connections=200"],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "a"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                   capture_output=True)
            if ready.returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError("PostgreSQL did not start")

    def _wait_postmaster_gone(self, timeout: float = 20) -> None:
        pidfile = self.dir / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        deadline = time.monotonic() + timeout
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)

    def create_database(self, name: str) -> str:
        if self.proc is not None and self.proc.poll() is not None:
            # The shared test cluster ended under an earlier test (seen twice in loaded full runs; its log
            # says why): start it again on the same data so later tests test the code, not the fixture.
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            warnings.warn(f"the test PostgreSQL cluster had exited ({self.proc.returncode}); restarting it. "
                          f"Its log ends:\n{tail}")
            self._wait_postmaster_gone()
            self.start()
        cmd = [str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name]
        try:
            self._as_postgres(*cmd)
        except subprocess.CalledProcessError as exc:
            alive = self.proc is not None and self.proc.poll() is None
            raise RuntimeError(f"createdb {name} failed (cluster {'running' if alive else 'gone'}): "
                               f"{exc.stderr.strip()}") from None
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Redis:
    def __init__(self, base: Path):
        self.bin = require(shutil.which("redis-server"), "Redis")
        self.port = free_port()
        self.dir = base / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "Redis":
        self.proc = subprocess.Popen([self.bin, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 20m;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    upstream scribe {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port}{ssl};
{tls}
        location / {{
            proxy_pass http://scribe;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 120s;
            proxy_connect_timeout 2s;
            proxy_next_upstream error timeout http_502 http_503;
        }}
    }}
}}
"""


class Nginx:
    def __init__(self, base: Path, upstream_ports: list[int], tls: tuple[Path, Path] | None = None):
        """``tls``: (certificate, key) files: nginx then speaks HTTPS and terminates TLS."""
        self.bin = require(shutil.which("nginx") or "/usr/sbin/nginx", "nginx")
        self.dir = base / "nginx"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for p in upstream_ports)
        self.scheme = "https" if tls else "http"
        settings = f"        ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]};" if tls else ""
        (self.dir / "nginx.conf").write_text(NGINX_CONF.format(dir=self.dir, port=self.port, servers=servers,
                                                               ssl=" ssl" if tls else "", tls=settings))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self) -> "Nginx":
        self.proc = subprocess.Popen([self.bin, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
