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
