"""Assemble a whole session into one audio file, chunks decoded in seq order.

Chunks must be formats libsndfile decodes (WAV, FLAC, Ogg Vorbis/Opus) and
share one sample rate and channel count.  Integer PCM is copied sample for
sample, so a lossless session exports bit-exact.
"""

from __future__ import annotations

import io
import tempfile
from typing import IO

import soundfile as sf

from scribe_protocol import ErrorCode, ProtocolError
from scribe_server.store import ChunkStore

CONTENT_TYPES = {"wav": "audio/wav", "flac": "audio/flac"}
_DTYPE = {"PCM_16": ("int16", "PCM_16"), "PCM_24": ("int32", "PCM_24"), "PCM_32": ("int32", "PCM_32")}


def assemble(store: ChunkStore, owner: str, session_id: str, fmt: str, allow_gaps: bool) -> IO[bytes]:
    """Return a temporary file (positioned anywhere) holding the session's audio."""
    report = store.missing(owner, session_id)
    if report.total_chunks == 0:
        raise ProtocolError(ErrorCode.INCOMPLETE, "the session holds no chunks yet")
    if report.missing_count and not allow_gaps:
        raise ProtocolError(
            ErrorCode.INCOMPLETE,
            f"{report.missing_count} chunk(s) are missing (first ranges: {report.ranges[:3]}); "
            "export with allowGaps to join what is there",
        )
    out = tempfile.TemporaryFile()
    writer = None
    try:
        for seq, mime, data in store.iter_audio(owner, session_id):
            try:
                info = sf.info(io.BytesIO(data))
                dtype, subtype = _DTYPE.get(info.subtype, ("float32", "FLOAT" if fmt == "wav" else "PCM_24"))
                frames = sf.read(io.BytesIO(data), dtype=dtype, always_2d=True)[0]
            except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
                raise ProtocolError(
                    ErrorCode.UNSUPPORTED_MIME_TYPE, f"chunk {seq} ({mime}) cannot be decoded for export: {exc}"
                ) from None
            if writer is None:
                layout = (info.samplerate, info.channels)
                if fmt == "flac" and subtype in ("FLOAT", "PCM_32"):
                    subtype = "PCM_24"
                writer = sf.SoundFile(out, "w", samplerate=info.samplerate, channels=info.channels,
                                      format=fmt.upper(), subtype=subtype)
            elif (info.samplerate, info.channels) != layout:
                raise ProtocolError(
                    ErrorCode.UNSUPPORTED_MIME_TYPE,
                    f"chunk {seq} is {info.samplerate} Hz x{info.channels}, the session started at "
                    f"{layout[0]} Hz x{layout[1]}",
                )
            writer.write(frames)
        writer.close()
    except BaseException:
        if writer is not None and not writer.closed:
            writer.close()
        out.close()
        raise
    return out
