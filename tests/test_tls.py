"""scribe to a server behind a TLS-terminating nginx (real nginx, real certificates).

The client's Socket.IO stack (aiohttp) loads the system's CA certificates only once an
``https://`` server is used (scribe_cli/sio.py defers it: an ``http://`` server never needs
them); these tests hold that an ``https://`` server is still verified exactly as before: a
certificate the system does not trust is refused with a clear error and nothing is lost,
one it trusts (here a private CA, through ``SSL_CERT_FILE`` and ``REQUESTS_CA_BUNDLE``) carries
the upload.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.infra import Nginx
from tests.test_client_upload import fill_spool, scribe


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (and its key), signed by itself."""
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", str(key),
                    "-out", str(cert), "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture
def tls_front(server, tmp_path):
    cert, key = self_signed(tmp_path)
    nginx = Nginx(tmp_path, [server.port], tls=(cert, key)).start()
    yield nginx, cert
    nginx.stop()


def test_an_https_server_is_verified_refused_untrusted_and_carries_the_upload_once_trusted(server, tls_front):
    nginx, cert = tls_front
    chunks = fill_spool("tls-1", 5)
    untrusted = scribe("resume", "tls-1", "--server", nginx.url, "--token", server.alice, "--give-up-after", "3",
                       timeout=60)
    assert untrusted.returncode != 0, untrusted.stdout
    assert "certificate" in untrusted.stderr.lower() and "Traceback" not in untrusted.stderr, untrusted.stderr
    assert "Error: " in untrusted.stderr and "Try: " in untrusted.stderr, untrusted.stderr
    pending = scribe("pending", "--json")
    assert '"tls-1"' in pending.stdout  # nothing left the spool

    # a private CA is trusted by both of the client's HTTP stacks: OpenSSL's store (Socket.IO, over
    # aiohttp) and requests' (the HTTP API; certifi's bundle unless told otherwise)
    trusted = scribe("resume", "tls-1", "--server", nginx.url, "--token", server.alice, "--json",
                     SSL_CERT_FILE=str(cert), REQUESTS_CA_BUNDLE=str(cert))
    assert trusted.returncode == 0, trusted.stderr
    for seq, audio in chunks.items():
        assert server.get(f"/api/sessions/tls-1/chunks/{seq}", server.alice).content == audio


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"])
def test_either_ca_variable_alone_is_trusted_by_both_http_stacks(server, tls_front, variable):
    """A user who sets the one variable they know (OpenSSL's or requests') gets both the
    Socket.IO upload and the HTTP API (``scribe gaps``) trusting the private CA."""
    nginx, cert = tls_front
    chunks = fill_spool("tls-one", 4)
    only = {"SSL_CERT_FILE": "", "REQUESTS_CA_BUNDLE": "", "CURL_CA_BUNDLE": "", variable: str(cert)}
    done = scribe("resume", "tls-one", "--server", nginx.url, "--token", server.alice, "--json", **only)
    assert done.returncode == 0, done.stderr
    for seq, audio in chunks.items():
        assert server.get(f"/api/sessions/tls-one/chunks/{seq}", server.alice).content == audio
    gaps = scribe("gaps", "tls-one", "--server", nginx.url, "--token", server.alice, "--json", **only)
    assert gaps.returncode == 0 and '"totalChunks": 4' in gaps.stdout.replace('":4', '": 4'), gaps.stdout + gaps.stderr


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"])
def test_a_ca_variable_naming_no_file_is_a_clear_error_and_nothing_leaves_the_spool(server, tls_front, tmp_path,
                                                                                    variable):
    nginx, _ = tls_front
    fill_spool("tls-bad", 3)
    missing = str(tmp_path / "no-such-ca.pem")
    for command in (["resume", "tls-bad"], ["gaps", "tls-bad"]):
        out = scribe(*command, "--server", nginx.url, "--token", server.alice, "--give-up-after", "3",
                     **{variable: missing}, timeout=60) if command[0] == "resume" else \
            scribe(*command, "--server", nginx.url, "--token", server.alice, **{variable: missing}, timeout=60)
        assert out.returncode == 9, out.stderr  # CONFIG: a setting that cannot be used
        assert "Traceback" not in out.stderr and "Error: " in out.stderr and "Try: " in out.stderr, out.stderr
        assert missing in out.stderr, out.stderr
    assert '"tls-bad"' in scribe("pending", "--json").stdout
