"""Assemble a whole session into one audio file, chunks decoded in seq order.

Chunks must be formats libsndfile decodes (WAV, FLAC, Ogg Vorbis/Opus) and
share one sample rate and channel count.  Integer PCM is copied sample for
sample, so a lossless session exports bit-exact.

Memory stays bounded whatever the chunks hold: each chunk is decoded in blocks
of ``BLOCK_FRAMES`` into a temporary file, which is then streamed out.  A
compressed chunk can decode to far more than its size (534 KiB of FLAC
silence: 330 MiB of PCM), so a chunk may decode to at most its declared
``durationMs`` (+ ``DURATION_SLACK``), or ``MAX_UNDECLARED_SECONDS`` when it
declared none, at no more than ``MAX_RATE`` Hz x ``MAX_CHANNELS``; beyond that
the export is refused with ``decode_limit``.
"""

from __future__ import annotations

import io
import tempfile
from typing import IO

import soundfile as sf

from scribe_protocol import ErrorCode, ProtocolError
from scribe_server.store import ChunkStore

CONTENT_TYPES = {"wav": "audio/wav", "flac": "audio/flac"}
BLOCK_FRAMES = 65_536
DURATION_SLACK = 1.10  # x declared duration, + 1 s
MAX_UNDECLARED_SECONDS = 600
MAX_RATE = 384_000
MAX_CHANNELS = 8
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
        for seq, mime, data, duration_ms in store.iter_audio(owner, session_id, with_duration=True):
            try:
                source = sf.SoundFile(io.BytesIO(data))
            except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
                raise ProtocolError(
                    ErrorCode.UNSUPPORTED_MIME_TYPE, f"chunk {seq} ({mime}) cannot be decoded for export: {exc}"
                ) from None
            with source:
                limit = _frame_limit(seq, source, duration_ms)
                dtype, subtype = _DTYPE.get(source.subtype, ("float32", "FLOAT" if fmt == "wav" else "PCM_24"))
                if writer is None:
                    layout = (source.samplerate, source.channels)
                    if fmt == "flac" and subtype in ("FLOAT", "PCM_32"):
                        subtype = "PCM_24"
                    writer = sf.SoundFile(out, "w", samplerate=source.samplerate, channels=source.channels,
                                          format=fmt.upper(), subtype=subtype)
                elif (source.samplerate, source.channels) != layout:
                    raise ProtocolError(
                        ErrorCode.UNSUPPORTED_MIME_TYPE,
                        f"chunk {seq} is {source.samplerate} Hz x{source.channels}, the session started at "
                        f"{layout[0]} Hz x{layout[1]}",
                    )
                _copy(seq, source, writer, dtype, limit)
        writer.close()
    except BaseException:
        if writer is not None and not writer.closed:
            writer.close()
        out.close()
        raise
    return out


def _frame_limit(seq: int, source: sf.SoundFile, duration_ms: int | None) -> int:
    """The most frames chunk ``seq`` may decode to (see the module docstring)."""
    if source.samplerate > MAX_RATE or source.channels > MAX_CHANNELS:
        raise ProtocolError(ErrorCode.DECODE_LIMIT, f"chunk {seq} is {source.samplerate} Hz x{source.channels}: "
                                                    f"at most {MAX_RATE} Hz x{MAX_CHANNELS} can be exported")
    seconds = duration_ms / 1000 * DURATION_SLACK + 1 if duration_ms is not None else MAX_UNDECLARED_SECONDS
    return int(seconds * source.samplerate)


def _copy(seq: int, source: sf.SoundFile, writer: sf.SoundFile, dtype: str, limit: int) -> None:
    """Decode ``source`` block by block into ``writer``; refuse it past ``limit`` frames."""
    copied = 0
    try:
        for block in source.blocks(blocksize=BLOCK_FRAMES, dtype=dtype, always_2d=True):
            copied += len(block)
            if copied > limit:
                raise ProtocolError(ErrorCode.DECODE_LIMIT,
                                    f"chunk {seq} decodes to more audio than it declared "
                                    f"(over {limit / source.samplerate:.1f} s); it is not exported")
            writer.write(block)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise ProtocolError(ErrorCode.UNSUPPORTED_MIME_TYPE, f"chunk {seq} cannot be decoded for export: {exc}") from None
