"""Encoding chunks with soundfile: each chunk an independently decodable file.

FLAC is the default (lossless, about half the size of WAV for speech), WAV is
plain PCM, Opus (in Ogg) is lossy and small for thin links.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from scribe_cli.errors import CaptureError, ConfigError

if TYPE_CHECKING:  # numpy and libsndfile are loaded when audio is encoded, not by `scribe watch`
    import numpy as np

FORMATS = {
    # name: (soundfile format, subtype, mime type)
    "flac": ("FLAC", "PCM_16", "audio/flac"),
    "wav": ("WAV", "PCM_16", "audio/wav"),
    "opus": ("OGG", "OPUS", "audio/ogg;codecs=opus"),
}
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


def check_format(fmt: str, rate: int) -> None:
    """Raise ConfigError for an unknown format or a rate it cannot encode, CaptureError when libsndfile lacks it."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}", "use --format flac, wav or opus")
    if fmt == "opus":
        if rate not in OPUS_RATES:
            raise ConfigError(f"Opus cannot encode {rate} Hz", f"use --rate one of {OPUS_RATES} or --format flac")
        import soundfile as sf

        if "OPUS" not in sf.available_subtypes("OGG"):
            raise CaptureError("this libsndfile has no Opus encoder", "use --format flac (lossless)")


def encode(frames: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> tuple[bytes, str]:
    """Encode frames (n x channels) into one file; return (bytes, mime type).

    ``subtype`` keeps a source's sample format (lossless for FLAC and WAV):
    int16 frames default to PCM_16.  FLAC cannot hold float or 32-bit samples;
    those are written as WAV instead, never truncated.
    """
    container, default_subtype, mime = FORMATS[fmt]
    if subtype and fmt != "opus":
        if fmt == "flac" and subtype not in ("PCM_16", "PCM_24", "PCM_S8"):
            container, mime = "WAV", "audio/wav"
        default_subtype = subtype
    subtype = default_subtype
    import soundfile as sf

    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", samplerate=rate, channels=frames.shape[1], format=container, subtype=subtype) as f:
        f.write(frames)
    return buf.getvalue(), mime


def duration_ms(frames: np.ndarray, rate: int) -> int:
    return int(round(len(frames) * 1000 / rate))
