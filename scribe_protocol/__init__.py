"""The wire contract between ``scribe`` and ``scribe-server``, in one place.

Both packages import this module: event names, payload validation, ack and
error shapes, error codes and gap arithmetic live here so that the client and
the server cannot drift apart.  It depends on the standard library only.

Exception tree::

    ProtocolError             raised when a payload breaks the contract
                              (carries an ErrorCode and a safe message)
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from scribe_protocol.gaps import MissingReport, missing_report  # noqa: F401  (re-exported)

PROTOCOL_VERSION = 1

# Socket.IO events ---------------------------------------------------------
AUDIO_CHUNK = "audio-chunk"  # client -> server: one chunk
AUDIO_CHUNKS = "audio-chunks"  # client -> server: several chunks, one reply each (scribe's own client)
CHUNK_ACK = "chunk-ack"  # server -> client: stored (when no Socket.IO ack asked)
CHUNK_ERROR = "chunk-error"  # server -> client: refused (when no ack asked)
SESSION_STATE = "session-state"  # client -> server: what do you hold?
SESSION_FINISH = "session-finish"  # client -> server: the last seq is N
CHUNK_STORED = "chunk-stored"  # server -> room of a session: live feed
SESSION_FOLLOW = "session-follow"  # client -> server: join a session's room

# Limits -------------------------------------------------------------------
MAX_SEQ = 2**31 - 1
MAX_BATCH_CHUNKS = 64  # chunks one ``audio-chunks`` event may carry
DEFAULT_MAX_CHUNK_BYTES = 8 * 1024 * 1024
SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CHECKSUM_RE = re.compile(r"[0-9a-f]{64}")
MAX_DURATION_MS = 24 * 3600 * 1000
MAX_MIME_LEN = 100
MAX_FILE_PATH = 1024
MAX_FILE_META_BYTES = 64 * 1024  # the JSON of one file's ``final`` object
MAX_FILE_SIZE = 2**53
MAX_FILE_VERSION = 2**31 - 1
MIME_PARAMS_RE = re.compile(r"(;\s*[A-Za-z0-9_.-]+=\"?[A-Za-z0-9_.,+ -]*\"?)*\s*")

#: Allowed audio container types and the file extension each is stored under.
MIME_EXTENSIONS = {
    "audio/webm": "webm",
    "audio/ogg": "ogg",
    "audio/opus": "opus",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/flac": "flac",
    "audio/x-flac": "flac",
    "audio/mpeg": "mp3",
    "audio/mp4": "m4a",
    "audio/aac": "aac",
    "audio/l16": "pcm",
    "application/octet-stream": "bin",
}


class ErrorCode(str, enum.Enum):
    """Error codes carried in ``error.code`` of a failed ack.

    ``transient`` codes mean "keep the chunk and try again later";
    all others are permanent for that chunk.
    """

    INVALID_PAYLOAD = "invalid_payload"
    INVALID_SESSION_ID = "invalid_session_id"
    INVALID_SEQUENCE = "invalid_sequence"
    UNSUPPORTED_MIME_TYPE = "unsupported_mime_type"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    SIZE_MISMATCH = "size_mismatch"
    TOO_LARGE = "too_large"
    CONFLICT = "conflict"
    BEYOND_FINAL = "beyond_final"
    NOT_FOUND = "not_found"
    INCOMPLETE = "incomplete"
    UNAUTHORIZED = "unauthorized"
    TOO_MANY_SESSIONS = "too_many_sessions"
    TOO_MANY_IN_FLIGHT = "too_many_in_flight"
    SERVER_BUSY = "server_busy"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    DECODE_LIMIT = "decode_limit"
    INTERNAL = "internal"

    @property
    def transient(self) -> bool:
        """True when retrying the same request later may succeed."""
        return self in _TRANSIENT


_TRANSIENT = {ErrorCode.TOO_MANY_IN_FLIGHT, ErrorCode.SERVER_BUSY, ErrorCode.STORAGE_UNAVAILABLE, ErrorCode.INTERNAL}


class ProtocolError(Exception):
    """Raised when a payload breaks the contract; the message is safe to send."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def to_error(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


# Payloads -----------------------------------------------------------------
@dataclass(frozen=True)
class FileRange:
    """Where a chunk's bytes belong in an original file (the optional ``file`` of ``audio-chunk``).

    ``final`` is set on the chunk that closes a version of the file: its
    ``size``, ``sha256`` and what the client read from its headers.
    """

    path: str
    version: int
    offset: int
    final: dict | None = None


@dataclass(frozen=True)
class AudioChunk:
    """A validated ``audio-chunk`` payload."""

    session_id: str
    sequence: int
    audio: bytes
    sha256: str
    mime_type: str
    timestamp: float | None = None
    duration_ms: int | None = None
    file: FileRange | None = None

    @property
    def size(self) -> int:
        return len(self.audio)

    @property
    def extension(self) -> str:
        return MIME_EXTENSIONS[base_mime(self.mime_type)]


@dataclass(frozen=True)
class SessionFinish:
    """A validated ``session-finish`` payload."""

    session_id: str
    last_seq: int


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def base_mime(mime_type: str) -> str:
    return mime_type.split(";", 1)[0].strip().lower()


def validate_session_id(value: Any) -> str:
    """Return ``value`` if it is a well-formed session id, else raise."""
    if not isinstance(value, str) or not SESSION_ID_RE.fullmatch(value):
        raise ProtocolError(
            ErrorCode.INVALID_SESSION_ID,
            "sessionId must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}",
        )
    return value


def validate_seq(value: Any, name: str = "sequence") -> int:
    """Return ``value`` if it is an integer in 0 .. 2^31-1, else raise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise ProtocolError(ErrorCode.INVALID_SEQUENCE, f"{name} must be an integer in 0..{MAX_SEQ}")
    return value


def validate_mime(value: Any) -> str:
    if value is None:
        return "application/octet-stream"
    if not isinstance(value, str) or len(value) > MAX_MIME_LEN:
        raise ProtocolError(ErrorCode.UNSUPPORTED_MIME_TYPE, "mimeType must be a short string")
    base, _, params = value.partition(";")
    if base.strip().lower() not in MIME_EXTENSIONS or (
        params and not MIME_PARAMS_RE.fullmatch(";" + params)
    ):
        raise ProtocolError(ErrorCode.UNSUPPORTED_MIME_TYPE, "mimeType is not an allowed audio type")
    return value.strip()


def _require_dict(data: Any) -> dict:
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "payload must be an object")
    return data


def _optional_number(data: dict, key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(ErrorCode.INVALID_PAYLOAD, f"{key} must be a finite number")
    return value


def parse_audio_chunk(data: Any, max_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> AudioChunk:
    """Validate an ``audio-chunk`` payload; raise ProtocolError when invalid."""
    data = _require_dict(data)
    session_id = validate_session_id(data.get("sessionId"))
    sequence = validate_seq(data.get("sequence"))
    audio = data.get("audio")
    if isinstance(audio, (bytearray, memoryview)):
        audio = bytes(audio)
    if not isinstance(audio, bytes):
        raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "audio must be binary")
    if len(audio) == 0:
        raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "audio must not be empty")
    if len(audio) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"chunk of {len(audio)} bytes exceeds the limit of {max_bytes}")
    size = data.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size != len(audio)):
        raise ProtocolError(ErrorCode.SIZE_MISMATCH, "size does not match the audio length")
    digest = sha256_hex(audio)
    checksum = data.get("checksum")
    if checksum is not None:
        if not isinstance(checksum, str) or not CHECKSUM_RE.fullmatch(checksum):
            raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "checksum must be 64 lowercase hex digits (sha256)")
        if checksum != digest:
            raise ProtocolError(ErrorCode.CHECKSUM_MISMATCH, "checksum does not match the audio bytes")
    duration = data.get("durationMs")
    if duration is not None and (
        isinstance(duration, bool) or not isinstance(duration, int) or not 0 <= duration <= MAX_DURATION_MS
    ):
        raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "durationMs must be an integer in 0..86400000")
    return AudioChunk(
        session_id=session_id,
        sequence=sequence,
        audio=audio,
        sha256=digest,
        mime_type=validate_mime(data.get("mimeType")),
        timestamp=_optional_number(data, "timestamp"),
        duration_ms=duration,
        file=parse_file_range(data.get("file"), len(audio)),
    )


def validate_file_path(value: Any) -> str:
    """A relative, '/'-separated path inside the watched folder: no '..', no leading '/', no control chars.
    The error names what is wrong (``scribe watch`` shows it for a file it cannot send)."""
    def bad(why: str) -> ProtocolError:
        return ProtocolError(ErrorCode.INVALID_PAYLOAD, f"file.path {why}")

    if not isinstance(value, str) or not value:
        raise bad("must be a non-empty string")
    if len(value) > MAX_FILE_PATH:
        raise bad(f"is {len(value)} characters long, over {MAX_FILE_PATH}")
    if "\\" in value:
        raise bad("contains a backslash")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise bad("contains a control character (a newline or a tab, say)")
    if any(part in ("", ".", "..") for part in value.split("/")):
        raise bad("must be relative and '/'-separated, without '..', '.' or empty parts")
    return value


def _int_field(data: dict, key: str, low: int, high: int, required: bool = True) -> int | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(ErrorCode.INVALID_PAYLOAD, f"file.{key} must be an integer in {low}..{high}")
    return value


def split_audio_batch(data: Any, max_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                      max_chunks: int = MAX_BATCH_CHUNKS) -> list[dict]:
    """Split an ``audio-chunks`` payload into ``audio-chunk`` payloads; raise ProtocolError when invalid.

    The payload is ``{"chunks": [HEADER, ...], "audio": BYTES}``: each header is an
    ``audio-chunk`` payload without its ``audio`` and with its ``size``, and
    ``audio`` is the chunks' bytes one after the other (one binary attachment
    for the whole batch).  The headers are not otherwise validated here: each
    chunk is then checked on its own, as if it had come in its own event.
    """
    data = _require_dict(data)
    headers, audio = data.get("chunks"), data.get("audio")
    if not isinstance(headers, list) or not 1 <= len(headers) <= max_chunks:
        raise ProtocolError(ErrorCode.INVALID_PAYLOAD, f"chunks must be a list of 1 to {max_chunks} chunk headers")
    if isinstance(audio, (bytearray, memoryview)):
        audio = bytes(audio)
    if not isinstance(audio, bytes):
        raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "audio must be binary")
    if len(audio) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"a batch of {len(audio)} bytes exceeds the limit of {max_bytes}")
    sizes = []
    for header in headers:
        if not isinstance(header, dict) or "audio" in header:
            raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "each chunk header must be an object without audio")
        size = header.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "each chunk header needs its size in bytes")
        sizes.append(size)
    if sum(sizes) != len(audio):
        raise ProtocolError(ErrorCode.SIZE_MISMATCH, "the chunks' sizes do not add up to the audio length")
    chunks, offset = [], 0
    for header, size in zip(headers, sizes):
        chunks.append({**header, "audio": audio[offset : offset + size]})
        offset += size
    return chunks


def parse_file_range(data: Any, audio_size: int) -> FileRange | None:
    """Validate the optional ``file`` object of an ``audio-chunk``; None when absent."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "file must be an object")
    path = validate_file_path(data.get("path"))
    version = _int_field(data, "version", 1, MAX_FILE_VERSION)
    offset = _int_field(data, "offset", 0, MAX_FILE_SIZE)
    final = data.get("final")
    if final is not None:
        if not isinstance(final, dict):
            raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "file.final must be an object")
        size = _int_field(final, "size", 1, MAX_FILE_SIZE)
        sha = final.get("sha256")
        if not isinstance(sha, str) or not CHECKSUM_RE.fullmatch(sha):
            raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "file.final.sha256 must be 64 lowercase hex digits")
        if offset + audio_size != size:
            raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "the closing chunk of a file must end at file.final.size")
        for key in ("sampleRate", "channels"):
            _int_field(final, key, 1, 2**31 - 1, required=False)
        _int_field(final, "frames", 0, 2**53, required=False)  # the export's decode cap relies on it
        if not isinstance(final.get("metadata", {}), dict):
            raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "file.final.metadata must be an object")
        try:
            encoded = json.dumps(final, allow_nan=False)
        except (TypeError, ValueError):
            raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "file.final must be plain JSON") from None
        if len(encoded) > MAX_FILE_META_BYTES:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"file.final is over {MAX_FILE_META_BYTES} bytes of JSON")
    return FileRange(path, version, offset, final)


def parse_session_ref(data: Any) -> str:
    """Validate a ``{sessionId}`` payload (session-state, session-follow)."""
    return validate_session_id(_require_dict(data).get("sessionId"))


def parse_session_finish(data: Any) -> SessionFinish:
    """Validate a ``session-finish`` payload."""
    data = _require_dict(data)
    return SessionFinish(validate_session_id(data.get("sessionId")), validate_seq(data.get("lastSeq"), "lastSeq"))


def echo_ids(data: Any) -> dict[str, Any]:
    """The ids of a (possibly invalid) payload that are safe to echo back."""
    out: dict[str, Any] = {"sessionId": None, "sequence": None}
    if isinstance(data, dict):
        sid, seq = data.get("sessionId"), data.get("sequence")
        if isinstance(sid, str) and SESSION_ID_RE.fullmatch(sid):
            out["sessionId"] = sid
        if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq <= MAX_SEQ:
            out["sequence"] = seq
    return out


# Acks ---------------------------------------------------------------------
def ok_ack(session_id: str, sequence: int, chunk_id: str, duplicate: bool, timestamp: float | None) -> dict:
    """The success reply to ``audio-chunk`` (a superset of the seed's ``chunk-ack``)."""
    return {
        "ok": True,
        "sessionId": session_id,
        "sequence": sequence,
        "timestamp": timestamp,
        "chunkId": chunk_id,
        "duplicate": duplicate,
    }


def error_ack(error: ProtocolError, ids: dict[str, Any] | None = None) -> dict:
    """The failure reply to any event."""
    reply: dict[str, Any] = {"ok": False, "error": error.to_error()}
    if ids:
        reply.update(ids)
    return reply


def is_transient(reply: dict) -> bool:
    """True when a failed reply carries a transient error code."""
    try:
        return ErrorCode(reply["error"]["code"]).transient
    except (KeyError, TypeError, ValueError):
        return True
