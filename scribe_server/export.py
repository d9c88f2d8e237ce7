"""Assemble a whole session into one audio file, chunks decoded in seq order.

Chunks must be formats libsndfile decodes (WAV, FLAC, Ogg Vorbis/Opus) and
share one sample rate and channel count.  Integer PCM is copied sample for
sample, so a lossless session exports bit-exact.

A session of watched files (see ``store/manifest.py``) is exported file by
file, the latest version of each in path order, never clipped or cut:
float stays float, 32-bit stays 32-bit (so FLAC, which holds at most 24-bit
integers, is refused for them with a clear message: export WAV), 16 and
24-bit together become 24-bit.  Files of different rates or channel counts
cannot form one stream: the error names them and points at the per-file
export.  A WAV whose header sizes are 0 or wrong (power loss) is decoded to
the end of its data.

Memory stays bounded whatever the chunks hold: each chunk is decoded in blocks
of ``BLOCK_FRAMES`` into a temporary file, which is then streamed out.  A
compressed chunk can decode to far more than its size (534 KiB of FLAC
silence: 330 MiB of PCM), so a chunk may decode to at most its declared
``durationMs`` (+ ``DURATION_SLACK``), or ``MAX_UNDECLARED_SECONDS`` when it
declared none, at no more than ``MAX_RATE`` Hz x ``MAX_CHANNELS``; beyond that
the export is refused with ``decode_limit``.  A watched file is held to the
same rule by what its manifest declares: at most its ``frames`` (+ the same
slack), or when it declared none, ``MAX_UNDECLARED_SECONDS`` or one frame per
``channels`` bytes of the file, whichever is more (an uncompressed file never
holds more, so an honest long WAV always fits).
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
from typing import IO, TYPE_CHECKING

from scribe_protocol import ErrorCode, ProtocolError
from scribe_server.store import ChunkStore

if TYPE_CHECKING:
    import soundfile as sf

CONTENT_TYPES = {"wav": "audio/wav", "flac": "audio/flac"}
BLOCK_FRAMES = 65_536
DURATION_SLACK = 1.10  # x declared duration, + 1 s
MAX_UNDECLARED_SECONDS = 600
MAX_RATE = 384_000
MAX_CHANNELS = 8
_DTYPE = {"PCM_16": ("int16", "PCM_16"), "PCM_24": ("int32", "PCM_24"), "PCM_32": ("int32", "PCM_32")}


def assemble(store: ChunkStore, owner: str, session_id: str, fmt: str, allow_gaps: bool) -> IO[bytes]:
    """Return a temporary file (positioned anywhere) holding the session's audio."""
    import soundfile as sf  # numpy with it: only when exporting (the server starts and runs without)

    report = store.missing(owner, session_id)
    files = store.manifest.files(owner, session_id)
    if files:
        others = report.total_chunks - store.manifest.chunk_count(owner, session_id)
        if others > 0:  # recorded chunks have no place in a stream of files: never drop them silently
            raise ProtocolError(ErrorCode.UNSUPPORTED_MIME_TYPE,
                                f"this session holds {others} recorded chunk(s) besides its watched files, which "
                                "cannot be joined into one stream; get the files with scribe export "
                                f"{session_id} --files -o DIR (record and watch into separate sessions)")
        return assemble_files(store, owner, session_id, files, fmt)
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
                    ErrorCode.UNSUPPORTED_MIME_TYPE, f"chunk {seq} ({mime}) cannot be decoded for export: "
                    f"{getattr(exc, 'error_string', None) or exc}"  # libsndfile's reason, not 'Error opening <BytesIO ...>'
                ) from None
            with source:
                limit = _frame_limit(f"chunk {seq}", source, duration_ms)
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
                _copy(f"chunk {seq}", source, writer, dtype, limit)
        writer.close()
    except BaseException:
        if writer is not None and not writer.closed:
            writer.close()
        out.close()
        raise
    return out


#: how a file's sample format is read and which output subtype keeps it whole
_RANK = {"PCM_U8": 0, "PCM_S8": 0, "ULAW": 0, "ALAW": 0, "PCM_16": 0, "PCM_24": 1, "PCM_32": 2, "FLOAT": 3,
         "DOUBLE": 4}
_OUT = {0: ("int16", "PCM_16"), 1: ("int32", "PCM_24"), 2: ("int32", "PCM_32"), 3: ("float32", "FLOAT"),
        4: ("float64", "DOUBLE")}


def _rank(sample_format: str | None) -> int:
    """Lossy or unknown formats decode to float: exported as float so nothing is clipped."""
    return _RANK.get(sample_format or "", 3)


def assemble_files(store: ChunkStore, owner: str, session_id: str, files: list[dict], fmt: str) -> IO[bytes]:
    """The watched files of a session joined into one WAV or FLAC; see the module docstring."""
    import soundfile as sf  # numpy with it: only when exporting (the server starts and runs without)

    layouts = {(f["sampleRate"], f["channels"]) for f in files}
    if len(layouts) > 1:
        described = "; ".join(f"{f['path']} is {f['sampleRate']} Hz x{f['channels']}" for f in files[:6])
        raise ProtocolError(ErrorCode.UNSUPPORTED_MIME_TYPE,
                            f"the files of this session differ in sample rate or channels ({described}), so they "
                            f"cannot form one stream; get them one by one: scribe export {session_id} --files -o DIR")
    rank = max(_rank(f["sampleFormat"]) for f in files)
    dtype, subtype = _OUT[rank]
    if fmt == "flac" and rank >= 2:
        raise ProtocolError(ErrorCode.UNSUPPORTED_MIME_TYPE,
                            f"this session holds {subtype.lower().replace('_', ' ')} audio, which FLAC cannot hold "
                            "without clipping or cutting bits; export it as .wav")
    rate, channels = layouts.pop()
    out = tempfile.TemporaryFile()
    try:
        with sf.SoundFile(out, "w", samplerate=rate, channels=channels, format=fmt.upper(), subtype=subtype) as writer:
            for entry in files:
                source, _ = store.manifest.rebuild(owner, session_id, entry["path"], entry["version"])
                with source:
                    _repair_wav_sizes(source)
                    try:
                        with sf.SoundFile(source) as reader:
                            _check_file_layout(entry, reader, (rate, channels))
                            _copy(entry["path"], reader, writer, dtype, _file_frame_limit(entry, reader))
                    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
                        raise ProtocolError(ErrorCode.UNSUPPORTED_MIME_TYPE,
                                            f"{entry['path']} cannot be decoded for export ({exc}); its original "
                                            f"bytes: scribe export {session_id} --files -o DIR") from None
    except BaseException:
        out.close()
        raise
    return out


def _repair_wav_sizes(f: IO[bytes]) -> None:
    """In a (temporary) WAV copy, set RIFF/data sizes that are 0 or past the end to "to the end of the file"."""
    f.seek(0)
    head = f.read(12)
    end = f.seek(0, os.SEEK_END)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        f.seek(0)
        return
    pos = 12
    for _ in range(512):
        f.seek(pos)
        header = f.read(8)
        if len(header) < 8:
            break
        cid, size = struct.unpack("<4sI", header)
        if cid == b"data":
            if size == 0 or pos + 8 + size > end:
                f.seek(pos + 4)
                f.write(struct.pack("<I", min(end - pos - 8, 0xFFFFFFFF)))
                f.seek(4)
                f.write(struct.pack("<I", min(end - 8, 0xFFFFFFFF)))
            break
        pos += 8 + size + (size & 1)
    f.seek(0)


def _check_file_layout(entry: dict, reader: sf.SoundFile, layout: tuple[int, int]) -> None:
    """The file must decode to the rate and channels its manifest declares (the stream was opened so)."""
    if (reader.samplerate, reader.channels) != layout:
        raise ProtocolError(ErrorCode.UNSUPPORTED_MIME_TYPE,
                            f"{entry['path']} is {reader.samplerate} Hz x{reader.channels} although its manifest says "
                            f"{layout[0]} Hz x{layout[1]}; get the original: scribe export --files")


def _file_frame_limit(entry: dict, reader: sf.SoundFile) -> int:
    """The most frames a watched file may decode to (see the module docstring)."""
    _frame_limit(entry["path"], reader, None)  # the rate and channel caps
    frames = entry.get("frames")
    uncompressed = int(entry.get("size") or 0) // max(1, reader.channels)
    if isinstance(frames, int) and not isinstance(frames, bool) and frames > 0:
        return max(int(frames * DURATION_SLACK + reader.samplerate), uncompressed)
    return max(MAX_UNDECLARED_SECONDS * reader.samplerate, uncompressed)


def _frame_limit(what: str, source: sf.SoundFile, duration_ms: int | None) -> int:
    """The most frames ``what`` (a chunk or file) may decode to (see the module docstring)."""
    if source.samplerate > MAX_RATE or source.channels > MAX_CHANNELS:
        raise ProtocolError(ErrorCode.DECODE_LIMIT, f"{what} is {source.samplerate} Hz x{source.channels}: "
                                                    f"at most {MAX_RATE} Hz x{MAX_CHANNELS} can be exported")
    seconds = duration_ms / 1000 * DURATION_SLACK + 1 if duration_ms is not None else MAX_UNDECLARED_SECONDS
    return int(seconds * source.samplerate)


def _copy(what: str, source: sf.SoundFile, writer: sf.SoundFile, dtype: str, limit: int) -> None:
    """Decode ``source`` block by block into ``writer``; refuse it past ``limit`` frames."""
    import soundfile as sf  # numpy with it: only when exporting (the server starts and runs without)

    copied = 0
    try:
        for block in source.blocks(blocksize=BLOCK_FRAMES, dtype=dtype, always_2d=True):
            copied += len(block)
            if copied > limit:
                raise ProtocolError(ErrorCode.DECODE_LIMIT,
                                    f"{what} decodes to more audio than it declared "
                                    f"(over {limit / source.samplerate:.1f} s), so it is not exported")
            writer.write(block)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise ProtocolError(ErrorCode.UNSUPPORTED_MIME_TYPE, f"{what} cannot be decoded for export: {exc}") from None
