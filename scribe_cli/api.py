"""The server's HTTP API as plain functions (requests), errors mapped to ScribeError.

``requests`` is imported when the first ``Api`` is made, not with this module:
read-only commands that never call the server start faster.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from scribe_cli.errors import AuthError, CaptureError, Incomplete, NotFound, ScribeError, ServerUnreachable


if TYPE_CHECKING:
    import requests


class Api:
    def __init__(self, server: str, token: str | None, timeout: float = 30.0):
        import requests

        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.http = requests.Session()
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"

    def _get(self, path: str, **kwargs) -> requests.Response:
        import requests

        try:
            response = self.http.get(self.server + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise ServerUnreachable(f"cannot reach the server at {self.server} ({_reason(exc)})") from None
        if response.status_code == 401:
            raise AuthError("the server refused the token")
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
        if response.status_code >= 500:
            raise ServerUnreachable(f"the server answered {response.status_code}: {_message(response)}")
        if response.status_code >= 400:
            what, _, hint = _message(response).partition("; ")  # the server's advice follows "; " (export refusals)
            raise ScribeError(f"the server answered {response.status_code}: {what}", *([hint] if hint else []))
        return response

    def info(self) -> dict:
        return self._get("/api/info").json()

    def missing(self, session: str) -> dict:
        return self._get(f"/api/sessions/{session}/missing-chunks").json()

    def session(self, session: str) -> dict:
        return self._get(f"/api/sessions/{session}").json()

    def sessions(self) -> list[dict]:
        return self._get("/api/sessions").json()["sessions"]

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

    def download_file(self, session: str, rel: str, version: int, target: Path) -> tuple[int, str]:
        """Download one watched file to ``target`` (atomically, sha256 computed on the way); (size, sha256)."""
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
        return size, digest.hexdigest()


def _reason(exc: requests.RequestException) -> str:
    """A few words for why a request failed (requests' own messages are paragraphs)."""
    import requests

    text = str(exc).lower()
    if isinstance(exc, requests.Timeout):
        return "timed out"
    for needle, words in (("refused", "connection refused"), ("name or service not known", "unknown host name"),
                          ("nodename nor servname", "unknown host name"), ("no route to host", "no route to host"),
                          ("network is unreachable", "network unreachable"), ("certificate", "TLS certificate rejected"),
                          ("reset by peer", "connection reset")):
        if needle in text:
            return words
    return exc.__class__.__name__


def _message(response: requests.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
