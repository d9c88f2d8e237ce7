"""Files written the way real field recorders write them, for the watch tests.

Every RIFF chunk is written by hand (``riff``/``wav_file``) so that the byte
layout is the recorders' own, not libsndfile's: BWF ``bext`` + ``iXML`` as
Zoom/Tascam write them, AudioMoth's ``LIST/INFO`` + ``guan`` (GUANO), float
(format 3 and WAVE_FORMAT_EXTENSIBLE), multichannel EXTENSIBLE, 8-bit
unsigned, u-law, and a WAV left with zero sizes by a power loss.  FLAC, Ogg
and MP3 come from libsndfile (tags through soundfile).  ``card`` lays out a
whole card: nested folders, the same file name twice, spaces and non-ASCII
names, a 0-byte file and CONFIG.TXT beside the audio.

Each maker returns the expected metadata (what the parser must report).
"""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import numpy as np
import soundfile as sf

KSDATAFORMAT_PCM = uuid.UUID("00000001-0000-0010-8000-00aa00389b71").bytes_le
KSDATAFORMAT_FLOAT = uuid.UUID("00000003-0000-0010-8000-00aa00389b71").bytes_le


def chunk(cid: bytes, body: bytes) -> bytes:
    """One RIFF chunk: id, little-endian size, body, pad byte to an even length."""
    return cid + struct.pack("<I", len(body)) + body + (b"\0" if len(body) % 2 else b"")


def fmt_chunk(tag: int, channels: int, rate: int, bits: int, extensible: bool = False,
              container_bits: int | None = None) -> bytes:
    container = container_bits or bits
    align = channels * container // 8
    if not extensible:
        body = struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, container)
        if tag not in (1,):
            body += struct.pack("<H", 0)  # cbSize for non-PCM formats
        return chunk(b"fmt ", body)
    mask = (1 << channels) - 1
    sub = KSDATAFORMAT_FLOAT if tag == 3 else KSDATAFORMAT_PCM
    body = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * align, align, container, 22, bits, mask) + sub
    return chunk(b"fmt ", body)


def wav_file(chunks: list[bytes], riff_size: int | None = None) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body) if riff_size is None else riff_size) + body


def pcm_bytes(frames: np.ndarray, bits: int) -> bytes:
    """Interleaved little-endian integer PCM of ``frames`` (int32 holding ``bits``-bit values)."""
    if bits == 8:
        return (frames.astype(np.int16) + 128).astype(np.uint8).tobytes()
    if bits == 16:
        return frames.astype("<i2").tobytes()
    if bits == 24:
        raw = frames.astype("<i4").tobytes()
        return b"".join(raw[i : i + 3] for i in range(0, len(raw), 4))
    return frames.astype("<i4").tobytes()


def noise(frames: int, channels: int, bits: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    top = 2 ** (bits - 1) - 1
    return rng.integers(-top, top, size=(frames, channels), dtype=np.int64).astype(np.int32)


def bext(description: str, originator: str, date: str, time: str, time_reference: int,
         coding_history: str = "") -> bytes:
    body = (description.encode().ljust(256, b"\0") + originator.encode().ljust(32, b"\0")
            + b"ZOOM_REF".ljust(32, b"\0") + date.encode() + time.encode()
            + struct.pack("<QH", time_reference, 1) + b"\0" * 64 + b"\0" * 10 + b"\0" * 180
            + coding_history.encode())
    return chunk(b"bext", body)


def info_list(tags: dict[str, str]) -> bytes:
    body = b"INFO" + b"".join(chunk(k.encode(), v.encode() + b"\0") for k, v in tags.items())
    return chunk(b"LIST", body)


# --- the makers: each writes ``path`` and returns what the parser must report --------------
def zoom_bwf(path: Path, seconds: float = 1.0, seed: int = 1) -> dict:
    """48 kHz / 24-bit stereo Broadcast WAV with bext + iXML, as a Zoom F-series writes it."""
    rate = 48000
    frames = noise(int(rate * seconds), 2, 24, seed)
    ixml = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?><BWFXML><PROJECT>FIELD</PROJECT>"
            "<SCENE>S01</SCENE><TAKE>3</TAKE><TAPE>ZOOM0001</TAPE></BWFXML>")
    data = wav_file([
        bext("ZOOM F6", "ZOOM F6", "2026-11-30", "06:15:42", (6 * 3600 + 15 * 60 + 42) * rate,
             "A=PCM,F=48000,W=24,M=stereo,T=ZOOM F6\r\n"),
        fmt_chunk(1, 2, rate, 24),
        chunk(b"iXML", ixml.encode()),
        chunk(b"data", pcm_bytes(frames, 24)),
    ])
    path.write_bytes(data)
    return {"sampleRate": rate, "channels": 2, "sampleFormat": "PCM_24", "startTime": "2026-11-30T06:15:42",
            "frames": len(frames),
            "metadata": {"bext.originator": "ZOOM F6", "bext.originationDate": "2026-11-30",
                         "bext.originationTime": "06:15:42", "bext.timeReference": (6 * 3600 + 15 * 60 + 42) * rate,
                         "ixml.SCENE": "S01", "ixml.TAKE": "3"}}


GUANO = ("GUANO|Version:1.0\nMake:Open Acoustic Devices\nModel:AudioMoth\nFirmware Version:1.8.1\n"
         "Timestamp:2026-11-30T04:00:00+00:00\nLoc Position:51.75920 -1.25780\nTemperature Int:11.2\n"
         "Samplerate:{rate}\n")


def audiomoth(path: Path, rate: int = 384000, seconds: float = 0.5, seed: int = 2) -> dict:
    """AudioMoth 16-bit mono with LIST/INFO and a ``guan`` chunk (GUANO text)."""
    frames = noise(int(rate * seconds), 1, 16, seed) // 8
    comment = "Recorded at 04:00:00 30/11/2026 (UTC) by AudioMoth 24F3190361DA2D12 at medium gain."
    data = wav_file([
        fmt_chunk(1, 1, rate, 16),
        info_list({"ICMT": comment, "IART": "AudioMoth 24F3190361DA2D12"}),
        chunk(b"guan", GUANO.format(rate=rate).encode()),
        chunk(b"data", pcm_bytes(frames, 16)),
    ])
    path.write_bytes(data)
    return {"sampleRate": rate, "channels": 1, "sampleFormat": "PCM_16", "startTime": "2026-11-30T04:00:00+00:00",
            "frames": len(frames),
            "metadata": {"info.ICMT": comment, "info.IART": "AudioMoth 24F3190361DA2D12",
                         "guano.Model": "AudioMoth", "guano.Loc Position": "51.75920 -1.25780",
                         "guano.Temperature Int": "11.2"}}


def float_wav(path: Path, extensible: bool = False, channels: int = 2, rate: int = 48000,
              seconds: float = 0.5, seed: int = 3) -> dict:
    """32-bit float (format 3, or EXTENSIBLE) with peaks above 0 dBFS."""
    rng = np.random.default_rng(seed)
    frames = (rng.standard_normal((int(rate * seconds), channels)) * 0.5).astype("<f4")
    frames[10] = 3.5  # +11 dBFS: the headroom float recorders exist for
    frames[20] = -2.25
    data = wav_file([fmt_chunk(3, channels, rate, 32, extensible=extensible),
                     chunk(b"fact", struct.pack("<I", len(frames))),
                     chunk(b"data", frames.tobytes())])
    path.write_bytes(data)
    return {"sampleRate": rate, "channels": channels, "sampleFormat": "FLOAT", "startTime": None,
            "frames": len(frames), "metadata": {}, "peak": 3.5}


def multichannel24(path: Path, channels: int = 6, rate: int = 96000, seconds: float = 0.3, seed: int = 4) -> dict:
    """6-channel 24-bit WAVE_FORMAT_EXTENSIBLE (a 6-track field mixer)."""
    frames = noise(int(rate * seconds), channels, 24, seed)
    path.write_bytes(wav_file([fmt_chunk(1, channels, rate, 24, extensible=True),
                               chunk(b"data", pcm_bytes(frames, 24))]))
    return {"sampleRate": rate, "channels": channels, "sampleFormat": "PCM_24", "startTime": None,
            "frames": len(frames), "metadata": {}}


def unsigned8(path: Path, rate: int = 8000, seconds: float = 0.5, seed: int = 5) -> dict:
    """8-bit unsigned PCM (old loggers)."""
    frames = noise(int(rate * seconds), 1, 8, seed)
    path.write_bytes(wav_file([fmt_chunk(1, 1, rate, 8), chunk(b"data", pcm_bytes(frames, 8))]))
    return {"sampleRate": rate, "channels": 1, "sampleFormat": "PCM_U8", "startTime": None,
            "frames": len(frames), "metadata": {}}


def ulaw(path: Path, rate: int = 8000, seconds: float = 0.5, seed: int = 6) -> dict:
    """G.711 u-law WAV (format 7)."""
    rng = np.random.default_rng(seed)
    body = rng.integers(0, 256, size=int(rate * seconds), dtype=np.uint8).tobytes()
    path.write_bytes(wav_file([fmt_chunk(7, 1, rate, 8), chunk(b"fact", struct.pack("<I", len(body))),
                               chunk(b"data", body)]))
    return {"sampleRate": rate, "channels": 1, "sampleFormat": "ULAW", "startTime": None,
            "frames": len(body), "metadata": {}}


def power_loss(path: Path, rate: int = 48000, seconds: float = 0.5, seed: int = 7) -> dict:
    """A 24-bit stereo WAV whose RIFF and data sizes are still 0: the recorder lost power."""
    frames = noise(int(rate * seconds), 2, 24, seed)
    riff = wav_file([fmt_chunk(1, 2, rate, 24)], riff_size=0)
    path.write_bytes(riff + b"data" + struct.pack("<I", 0) + pcm_bytes(frames, 24))
    return {"sampleRate": rate, "channels": 2, "sampleFormat": "PCM_24", "startTime": None,
            "frames": len(frames), "metadata": {}, "recovered": True}


def tagged(path: Path, fmt: str, rate: int = 44100, seconds: float = 0.5, seed: int = 8) -> dict:
    """FLAC (16-bit), Ogg Vorbis or MP3 with title/artist/date tags, written by libsndfile."""
    rng = np.random.default_rng(seed)
    frames = (rng.standard_normal((int(rate * seconds), 2)) * 0.2).astype("float32")
    subtype = {"FLAC": "PCM_16", "OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}[fmt]
    with sf.SoundFile(path, "w", samplerate=rate, channels=2, format=fmt, subtype=subtype) as f:
        f.title, f.artist, f.date = "Dawn chorus", "Site A", "2026-11-30"
        f.write(frames)
    sample_format = {"FLAC": "PCM_16", "OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}[fmt]
    if fmt == "MP3":  # libsndfile writes no ID3 tags it reads back
        return {"sampleRate": rate, "channels": 2, "sampleFormat": sample_format, "startTime": None, "metadata": {}}
    return {"sampleRate": rate, "channels": 2, "sampleFormat": sample_format, "startTime": "2026-11-30",
            "frames": len(frames), "metadata": {"tags.title": "Dawn chorus", "tags.artist": "Site A"}}


def card(root: Path) -> dict[str, dict]:
    """A whole recorder card under ``root``; returns ``{relative path: expected}`` of the audio files."""
    files: dict[str, dict] = {}
    layout = {
        "FOLDER01/ZOOM0001.WAV": lambda p: zoom_bwf(p, seed=11),
        "FOLDER02/ZOOM0001.WAV": lambda p: zoom_bwf(p, seed=12),
        "MOTH/20261130_040000.WAV": lambda p: audiomoth(p, 384000),
        "MOTH/20261130_041000.WAV": lambda p: audiomoth(p, 48000, seconds=1.0, seed=3),
        "float/FLOAT 3.wav": lambda p: float_wav(p),
        "float/extensible float.wav": lambda p: float_wav(p, extensible=True, seed=9),
        "float/6ch float.wav": lambda p: float_wav(p, extensible=True, channels=6, seed=10),
        "mixer/6ch 24bit.wav": multichannel24,
        "old/u8.wav": unsigned8,
        "old/ulaw.wav": ulaw,
        "LOST/ZOOM0002.WAV": power_loss,
        "Aufnahmen/Vögel am Morgen.flac": lambda p: tagged(p, "FLAC"),
        "lossy/dawn.ogg": lambda p: tagged(p, "OGG"),
    }
    if "MP3" in sf.available_formats():
        layout["lossy/dawn.mp3"] = lambda p: tagged(p, "MP3")
    for rel, make in layout.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        files[rel] = make(path)
    (root / "CONFIG.TXT").write_text("GAIN=MED\nRATE=48000\n")
    (root / "FOLDER01" / "EMPTY.WAV").write_bytes(b"")
    return files
