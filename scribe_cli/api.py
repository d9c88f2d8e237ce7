"""The server's HTTP API as plain functions (requests), errors mapped to ScribeError.

``requests`` is imported when a request needs it, not with this module.  The
GETs of the read-only commands (``session``, ``sessions``: ``scribe gaps``,
``scribe sessions``) and those a ``watch`` or ``resume`` makes before it uploads
(``info``, ``missing``) go over ``http.client`` instead when requests would do
nothing more for them: a plain ``http://`` URL, no proxy or netrc settings in
the environment, no redirect, no content encoding (``_plain_get``).  Importing
requests and urllib3 was ~50 ms of those commands' start-up (issue 16).  What
the caller sees is the same either way: the same status handling, the same
``Error:`` reasons (``_plain_reason`` maps socket errors to the words
``_reason`` finds in requests' exceptions), and the same JSON and text
decoding (anything unusual is decoded by a real ``requests.Response``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from scribe_cli.errors import (AuthError, CaptureError, Incomplete, NotFound, NotScribeServer, ScribeError,
                               ServerUnreachable)


if TYPE_CHECKING:
    import requests


class Api:
    def __init__(self, server: str, token: str | None, timeout: float = 30.0):
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._http: requests.Session | None = None

    @property
    def http(self) -> requests.Session:
        if self._http is None:
            import requests

            self._http = requests.Session()
            if self.token:
                self._http.headers["Authorization"] = f"Bearer {self.token}"
            if self.server.lower().startswith("https:"):
                from scribe_cli.config import check_ca_variables

                check_ca_variables()
            bundle = ca_bundle_for_requests()
            if bundle:
                self._http.verify = bundle
        return self._http

    def _get(self, path: str, plain: bool = False, **kwargs) -> requests.Response | _PlainResponse:
        """GET ``path``; ``plain``: over http.client when requests would do nothing more (see the module doc)."""
        response = None
        if plain and not kwargs:
            try:
                response = _plain_get(self.server, path, self.token, self.timeout)
            except _PlainFailure as failure:
                raise ServerUnreachable(f"cannot reach the server at {self.server} ({failure.reason})") from None
        if response is None:
            import requests

            try:
                response = self.http.get(self.server + path, timeout=self.timeout, **kwargs)
            except requests.RequestException as exc:
                raise ServerUnreachable(f"cannot reach the server at {self.server} ({_reason(exc)})") from None
        if response.status_code == 401:
            raise AuthError("the server refused the token")
        if response.status_code == 404 and not _is_scribe_error(response):  # (http.server, a web server's page)
            raise NotScribeServer(f"the server at {self.server} does not look like a scribe-server (it answered "
                                  f"404 to {path.split('?')[0]} without scribe's error object)")
        if response.status_code == 404:
            what = f"session {path.split('/')[3]}" if path.startswith("/api/sessions/") else f"{path} (is this a scribe-server?)"
            raise NotFound(f"the server has no {what} for this token")
        if response.status_code == 409:
            raise Incomplete(_message(response), "scribe gaps SESSION shows what is missing; --allow-gaps joins what is there")
        if response.status_code == 415:  # export: a chunk it cannot decode, files that cannot be joined, float to FLAC
            what, _, advice = _message(response).partition("; ")  # the server's own advice follows "; "
            raise CaptureError(what, advice or "what is stored is intact, only this file cannot be made of it: "
                                               "-o FILE.wav, or scribe export SESSION --files -o DIR for a watched "
                                               "session's own files")
        if response.status_code == 429:  # one of this token's limits (its exports at once): transient
            raise ServerUnreachable(f"the server is busy: {_message(response)}",
                                    "retry when this token's other exports are done")
        if response.status_code >= 500:
            raise ServerUnreachable(f"the server answered {response.status_code}: {_message(response)}")
        if response.status_code >= 400:
            what, _, hint = _message(response).partition("; ")  # the server's advice follows "; " (export refusals)
            raise ScribeError(f"the server answered {response.status_code}: {what}", *([hint] if hint else []))
        return response

    def info(self) -> dict:
        return self._get("/api/info", plain=True).json()

    def missing(self, session: str) -> dict:
        return self._get(f"/api/sessions/{session}/missing-chunks", plain=True).json()

    def session(self, session: str) -> dict:
        return self._get(f"/api/sessions/{session}", plain=True).json()

    def sessions(self) -> list[dict]:
        return self._get("/api/sessions", plain=True).json()["sessions"]

    def chunk(self, session: str, seq: int) -> bytes:
        return self._get(f"/api/sessions/{session}/chunks/{seq}").content

    def export(self, session: str, path: Path, fmt: str, allow_gaps: bool) -> int:
        """Download the assembled session to ``path`` (atomically); return its size."""
        params = {"format": fmt, "allowGaps": "1" if allow_gaps else "0"}
        response = self._get(f"/api/sessions/{session}/audio", params=params, stream=True)
        tmp = path.with_name(f".{path.name}.part")
        size = 0
        try:
            with open(tmp, "wb") as out:
                for block in response.iter_content(1 << 20):
                    out.write(block)
                    size += len(block)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size

    def download_file(self, session: str, rel: str, version: int, target: Path) -> tuple[int, str, str | None]:
        """Download one watched file to ``target`` (atomically, sha256 computed on the way); (size, sha256,
        the sha256 the server says the version has)."""
        import hashlib

        response = self._get(f"/api/sessions/{session}/file", params={"path": rel, "version": str(version)},
                             stream=True)
        tmp = target.with_name(f".{target.name}.part")
        digest, size = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as out:
                for block in response.iter_content(1 << 20):
                    out.write(block)
                    digest.update(block)
                    size += len(block)
            tmp.replace(target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size, digest.hexdigest(), response.headers.get("X-File-Sha256")


def _reason(exc: requests.RequestException) -> str:
    """A few words for why a request failed (requests' own messages are paragraphs)."""
    import requests

    if isinstance(exc, requests.Timeout):
        return "timed out"
    return _reason_words(str(exc).lower()) or exc.__class__.__name__


def _reason_words(text: str) -> str | None:
    for needle, words in (("refused", "connection refused"), ("name or service not known", "unknown host name"),
                          ("nodename nor servname", "unknown host name"), ("no route to host", "no route to host"),
                          ("network is unreachable", "network unreachable"), ("certificate", "TLS certificate rejected"),
                          ("reset by peer", "connection reset")):
        if needle in text:
            return words
    return None


def _is_scribe_error(response: requests.Response | _PlainResponse) -> bool:
    """True when the body is scribe-server's ``{"error": {...}}`` (docs/protocol.md)."""
    try:
        return isinstance(response.json()["error"], dict)
    except (ValueError, KeyError, TypeError):
        return False


def _message(response: requests.Response | _PlainResponse) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


# The read-only commands' GET without requests ------------------------------------------------

#: Environment variables requests reads for a plain http:// GET (proxies, netrc): with any set, requests does it.
_REQUESTS_ENV = ("_proxy", "netrc")


class _PlainFailure(Exception):
    """The request failed; ``reason`` is the few words ``_reason`` would give for requests' exception."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def ca_bundle_for_requests() -> str | None:
    """The CA file named by ``SSL_CERT_FILE`` (OpenSSL's variable, which the Socket.IO
    connection follows) when requests' own variables name none: one variable makes a
    private CA trusted by both of the client's HTTP stacks (see ``sio.py`` for the other
    direction)."""
    if os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE"):
        return None
    return os.environ.get("SSL_CERT_FILE") or None


def _plain_get(server: str, path: str, token: str | None, timeout: float) -> _PlainResponse | None:
    """GET ``server + path`` over http.client; None when requests must do it (see the module doc).

    Raises _PlainFailure where requests would raise a RequestException."""
    from urllib.parse import urlsplit

    url = urlsplit(server + path)
    if (url.scheme != "http" or url.username is not None or url.password is not None
            or any(name.lower().endswith(_REQUESTS_ENV) and value for name, value in os.environ.items())
            or any(os.path.exists(os.path.expanduser(f"~/{name}")) for name in (".netrc", "_netrc"))):
        return None
    import http.client

    host, port = url.hostname, url.port or 80
    target = url.path + (f"?{url.query}" if url.query else "")
    headers = {"Accept": "*/*", "Connection": "close", **({"Authorization": f"Bearer {token}"} if token else {})}
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        try:
            conn.connect()
        except OSError as exc:  # urllib3: NewConnectionError -> MaxRetryError -> requests' ConnectionError
            raise _PlainFailure(_plain_reason(exc, f"host={host!r}, port={port}, url: {target}: {exc}")) from None
        try:
            conn.request("GET", target, headers=headers)
            raw = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:  # urllib3: ProtocolError("Connection aborted.", exc)
            raise _PlainFailure(_plain_reason(exc, repr(exc))) from None
        if 300 <= raw.status < 400 or raw.getheader("Content-Encoding", "identity").lower() != "identity":
            return None  # requests follows redirects and decodes content
        try:
            body = raw.read()
        except TimeoutError:  # urllib3: ReadTimeoutError while reading the body -> requests' ConnectionError
            raise _PlainFailure("ConnectionError") from None
        except (OSError, http.client.HTTPException) as exc:  # urllib3: ProtocolError -> ChunkedEncodingError
            raise _PlainFailure(_plain_reason(exc, repr(exc), "ChunkedEncodingError")) from None
        return _PlainResponse(raw.status, raw.reason, {k.lower(): v for k, v in raw.getheaders()}, body,
                              server + path)
    finally:
        conn.close()


def _plain_reason(exc: BaseException, text: str, fallback: str = "ConnectionError") -> str:
    """What ``_reason`` says for the requests exception a socket error ``exc`` would have become."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    return _reason_words(text.lower()) or fallback


class _PlainResponse:
    """The parts of a ``requests.Response`` that Api's callers use, decoded as requests decodes them."""

    def __init__(self, status_code: int, reason: str, headers: dict[str, str], content: bytes, url: str):
        self.status_code, self.reason, self.headers, self.content, self.url = status_code, reason, headers, content, url
        self.encoding = _charset(headers.get("content-type", ""))

    def as_requests(self) -> requests.Response:
        """The same response as a ``requests.Response`` (for what only requests decodes the same way)."""
        import requests
        from requests.structures import CaseInsensitiveDict
        from requests.utils import get_encoding_from_headers

        response = requests.Response()
        response.status_code, response.reason, response.url = self.status_code, self.reason, self.url
        response.headers = CaseInsensitiveDict(self.headers)
        response.encoding = get_encoding_from_headers(response.headers)
        response._content = self.content
        return response

    @property
    def text(self) -> str:
        if not self.content:
            return ""
        if self.encoding:
            try:
                return str(self.content, self.encoding, errors="replace")
            except LookupError:
                pass
        return self.as_requests().text

    def json(self):
        import json

        if self.encoding and self.content:
            try:
                return json.loads(str(self.content, self.encoding, errors="replace"))
            except (LookupError, ValueError):
                pass  # requests raises its own JSONDecodeError
        return self.as_requests().json()


def _charset(content_type: str) -> str | None:
    """The encoding requests takes from a Content-Type: its charset, or UTF-8 for JSON, ISO-8859-1 for text."""
    kind, _, params = content_type.partition(";")
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "charset" and value:
            return value.strip().strip("'\"")
    if "text" in kind.lower():
        return "ISO-8859-1"
    if "application/json" in kind.lower():
        return "utf-8"
    return None
