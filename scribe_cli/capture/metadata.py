"""What an audio file is and what its recorder wrote about it, without loading its audio.

``probe(path)`` reads headers only (a few KiB, wherever they sit in the file):

* RIFF/RF64/BW64 WAV: a walk over the chunks: ``fmt `` (PCM, float, u-law,
  A-law, WAVE_FORMAT_EXTENSIBLE), ``bext`` (origination date/time, time
  reference), ``iXML``, ``LIST/INFO``, AudioMoth's ``guan`` (GUANO), ``ds64``
  and ``data`` (offset and size).  A ``data`` size of 0 or past the end of the
  file (a recorder that lost power before closing it) is recovered as "to the
  end of the file" with a warning; chunks after ``data`` are read too.
* FLAC, Ogg and MP3 through libsndfile's header reader (rate, channels,
  sample format, tags).

Pure: no typer, no rich, no network.  Raises ``NotAudio`` for files that are
no audio at all (CONFIG.TXT) and ``BadAudio`` (with a plain reason) for audio
files that cannot be read.
"""

from __future__ import annotations

import re
import struct
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

AUDIO_SUFFIXES = {".wav", ".wave", ".bwf", ".rf64", ".w64", ".flac", ".ogg", ".oga", ".opus", ".mp3",
                  ".aif", ".aiff", ".aifc", ".caf", ".au", ".snd"}
MAX_TEXT = 4096  # longest metadata value kept (iXML/coding history can be long)
MAX_HEADER_CHUNK = 1 << 20  # metadata chunks larger than this are not read
MAX_CHUNKS = 512

_WAVE_TAGS = {3: "FLOAT", 6: "ALAW", 7: "ULAW", 0x11: "IMA_ADPCM", 2: "MS_ADPCM", 0x55: "MPEG_LAYER_III"}
_KS_TAIL = bytes.fromhex("000000001000800000aa00389b71")


class ProbeError(Exception):
    """Raised when a file cannot be described; ``reason`` is plain words for the user."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class NotAudio(ProbeError):
    """Raised for a file that is not audio at all (a config file, a project file)."""


class BadAudio(ProbeError):
    """Raised for an audio file that cannot be read (empty, truncated, not decodable)."""


@dataclass
class AudioInfo:
    """What ``probe`` found.  ``data_offset``/``data_size`` locate the samples of a WAV."""

    container: str
    sample_rate: int
    channels: int
    sample_format: str
    frames: int | None = None
    start_time: str | None = None
    metadata: dict = field(default_factory=dict)
    data_offset: int | None = None
    data_size: int | None = None
    block_align: int | None = None
    warnings: list[str] = field(default_factory=list)
    #: the header's data size was never written (0, or past the end of the file): a recorder
    #: still writing the file, or one that lost power before closing it
    unfinished: bool = False

    @property
    def byte_rate(self) -> int | None:
        """Bytes per second of the sample data (None when compressed)."""
        return self.sample_rate * self.block_align if self.block_align else None

    def to_manifest(self) -> dict:
        """The fields the server's manifest keeps."""
        return {"startTime": self.start_time, "sampleRate": self.sample_rate, "channels": self.channels,
                "sampleFormat": self.sample_format, "container": self.container, "frames": self.frames,
                "metadata": self.metadata, "warnings": self.warnings}

    def to_json(self) -> dict:
        return asdict(self)


def looks_like_audio_name(path: Path) -> bool:
    return path.suffix.lower() in AUDIO_SUFFIXES


def probe(path: Path) -> AudioInfo:
    """Describe ``path`` from its headers; see the module docstring."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        if looks_like_audio_name(path):
            raise BadAudio("the file is empty (0 bytes)")
        raise NotAudio("an empty file")
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
            return _wav(f, size, head[:4])
        mpeg = _mpeg_frames(f, head)
    if head[:4] in (b"RIFF", b"RF64") and len(head) < 12:
        raise BadAudio("truncated: the file ends inside its WAV header")
    if head[:4] == b"fLaC" or head[:4] == b"OggS" or head[:3] == b"ID3" or mpeg \
            or head[:4] in (b"FORM", b".snd", b"caff"):
        return _libsndfile(path)
    if _mpeg_sync(head) and path.suffix.lower() in (".mp3", ".mp2", ".mpa"):
        return _libsndfile(path)  # one frame header only, or junk before the first frame: libsndfile decides
    if looks_like_audio_name(path):
        if head[:4] in (b"RIFF", b"RF64"):
            raise BadAudio("not decodable audio (a RIFF file that is not WAVE)")
        raise BadAudio("not decodable audio (format not recognised)")
    raise NotAudio("not an audio file")


def _mpeg_sync(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0


#: kbit/s by (MPEG-1?, layer) and bitrate index 1-14
_MPEG_KBPS = {
    (True, 1): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MPEG_KBPS[(False, 3)] = _MPEG_KBPS[(False, 2)]
_MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _mpeg_frame_length(header: bytes) -> int | None:
    """The length in bytes of the MPEG audio frame starting with ``header`` (4 bytes), None when
    those bytes are no frame header (reserved values, free-format bitrate)."""
    if len(header) < 4 or not _mpeg_sync(header):
        return None
    version, layer = (header[1] >> 3) & 3, 4 - ((header[1] >> 1) & 3)  # version 3: MPEG-1; layer 1-3
    index, rate_index, padding = header[2] >> 4, (header[2] >> 2) & 3, (header[2] >> 1) & 1
    if version == 1 or layer == 4 or index in (0, 15) or rate_index == 3:
        return None
    kbps, rate = _MPEG_KBPS[(version == 3, layer)][index - 1], _MPEG_RATES[version][rate_index]
    if layer == 1:
        return (12000 * kbps // rate + padding) * 4
    return (144000 if layer == 2 or version == 3 else 72000) * kbps // rate + padding


def _mpeg_frames(f, head: bytes) -> bool:
    """True when the file starts with two MPEG audio frames in a row (an MP3 without an ID3 tag).

    Two bytes of sync alone are no proof: a UTF-16 text file starts with ``FF FE`` (Windows
    writes ``System Volume Information/IndexerVolumeGuid`` so on every card it touches)."""
    length = _mpeg_frame_length(head[:4])
    if length is None:
        return False
    f.seek(length)
    return _mpeg_frame_length(f.read(4)) is not None


# --- WAV -------------------------------------------------------------------------------------
def _wav(f, size: int, magic: bytes) -> AudioInfo:
    fmt: dict | None = None
    meta: dict = {}
    warnings: list[str] = []
    start: str | None = None
    data_offset = data_size = None
    unfinished = False
    ds64_data: int | None = None
    pos = 12
    for _ in range(MAX_CHUNKS):
        if pos + 8 > size:
            break
        f.seek(pos)
        cid, csize = struct.unpack("<4sI", f.read(8))
        body_at = pos + 8
        if cid == b"ds64":
            body = f.read(min(csize, 64))
            if len(body) >= 16:
                ds64_data = struct.unpack("<Q", body[8:16])[0]
        elif cid == b"data":
            data_offset = body_at
            declared = ds64_data if (csize == 0xFFFFFFFF and ds64_data is not None) else csize
            if declared == 0 or body_at + declared > size:
                data_size, unfinished = size - body_at, True
                if data_size:
                    warnings.append(f"the data size in the header is {declared} but {data_size} bytes follow: the "
                                    "recorder did not close the file (power loss?); audio recovered to the end")
                else:
                    warnings.append("no audio data: the file ends after its header (a recording stopped at once, "
                                    "or a recorder that lost power before writing any)")
                break
            data_size = declared
        elif cid == b"fmt ":
            fmt = _parse_fmt(f.read(min(csize, 64)))
        elif csize <= MAX_HEADER_CHUNK:
            reader = _CHUNK_READERS.get(cid)
            if reader is not None:
                body = f.read(csize)
                try:
                    found_start = reader(body, meta)
                except (ValueError, struct.error, ET.ParseError, UnicodeError):
                    warnings.append(f"the {cid.decode('latin-1').strip()} chunk could not be read")
                    found_start = None
                start = start or found_start
        pos = body_at + csize + (csize & 1)
    if fmt is None:
        if pos >= size or data_offset is None:
            raise BadAudio("not decodable audio (no format chunk)" if size > 44
                           else "truncated: the file ends inside its WAV header")
        raise BadAudio("not decodable audio (no format chunk)")
    if data_offset is None:
        raise BadAudio("truncated: no audio data (the file ends before its data chunk)")
    align = fmt["block_align"] or 1
    if data_size % align:
        warnings.append(f"the data ends in the middle of a frame ({data_size % align} stray bytes)")
    start = start or meta.get("guano.Timestamp") or _audiomoth_comment_time(meta.get("info.ICMT", ""))
    container = {b"RIFF": "WAV", b"RF64": "RF64", b"BW64": "BW64"}[magic]
    return AudioInfo(container, fmt["rate"], fmt["channels"], fmt["format"], data_size // align, start, meta,
                     data_offset, data_size, align, warnings, unfinished)


def _parse_fmt(body: bytes) -> dict:
    if len(body) < 16:
        raise BadAudio("not decodable audio (the format chunk is cut short)")
    tag, channels, rate, _byte_rate, align, bits = struct.unpack("<HHIIHH", body[:16])
    extensible = tag == 0xFFFE and len(body) >= 40
    if extensible:
        valid_bits = struct.unpack("<H", body[18:20])[0] or bits
        sub = body[24:40]
        tag = struct.unpack("<H", sub[:2])[0] if sub[2:] == _KS_TAIL else -1
        bits = valid_bits if tag == 1 else bits
    if channels == 0 or rate == 0:
        raise BadAudio("not decodable audio (the header says 0 channels or 0 Hz)")
    if tag == 1:
        name = "PCM_U8" if bits <= 8 else f"PCM_{(bits + 7) // 8 * 8}"
    elif tag == 3:
        name = "DOUBLE" if bits == 64 else "FLOAT"
    else:
        name = _WAVE_TAGS.get(tag, f"WAVE_FORMAT_{tag:#06x}" if tag >= 0 else "EXTENSIBLE_UNKNOWN")
    return {"format": name, "channels": channels, "rate": rate, "block_align": align, "bits": bits}


def _text(raw: bytes) -> str:
    text = raw.split(b"\0", 1)[0]
    try:
        value = text.decode("utf-8")
    except UnicodeDecodeError:
        value = text.decode("latin-1")
    return value.strip()[:MAX_TEXT]


def _bext(body: bytes, meta: dict) -> str | None:
    if len(body) < 346:
        raise ValueError("short bext")
    meta["bext.description"] = _text(body[0:256])
    meta["bext.originator"] = _text(body[256:288])
    meta["bext.originatorReference"] = _text(body[288:320])
    date, time = _text(body[320:330]), _text(body[330:338])
    meta["bext.originationDate"], meta["bext.originationTime"] = date, time
    meta["bext.timeReference"] = struct.unpack("<Q", body[338:346])[0]
    if len(body) > 602:
        history = _text(body[602:])
        if history:
            meta["bext.codingHistory"] = history
    for key in [k for k, v in meta.items() if k.startswith("bext.") and v == ""]:
        del meta[key]
    if re.fullmatch(r"\d{4}[-:/ ]\d\d[-:/ ]\d\d", date) and re.fullmatch(r"\d\d[-:/ ]\d\d[-:/ ]\d\d", time):
        return f"{date[:4]}-{date[5:7]}-{date[8:10]}T{time[:2]}:{time[3:5]}:{time[6:8]}"
    return None


def _ixml(body: bytes, meta: dict) -> None:
    text = body.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    meta["ixml"] = text[:MAX_TEXT]
    root = ET.fromstring(text)
    for element in root:
        if len(element) == 0 and element.text and element.text.strip():
            meta[f"ixml.{element.tag}"] = element.text.strip()[:MAX_TEXT]
    return None


def _list(body: bytes, meta: dict) -> None:
    if body[:4] != b"INFO":
        return None
    pos = 4
    while pos + 8 <= len(body):
        cid, csize = struct.unpack("<4sI", body[pos : pos + 8])
        value = _text(body[pos + 8 : pos + 8 + csize])
        if value:
            meta[f"info.{cid.decode('latin-1').strip()}"] = value
        pos += 8 + csize + (csize & 1)
    return None


def _guano(body: bytes, meta: dict) -> None:
    text = body.split(b"\0", 1)[0].decode("utf-8", "replace")
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and key.strip() != "GUANO|Version":
            meta[f"guano.{key.strip()}"] = value.strip()[:MAX_TEXT]
        elif sep:
            meta["guano.Version"] = value.strip()
    return None


def _audiomoth_comment_time(comment: str) -> str | None:
    match = re.search(r"Recorded at (\d\d):(\d\d):(\d\d) (\d\d)/(\d\d)/(\d{4}) \(UTC([+-]\d+)?\)", comment)
    if not match:
        return None
    hh, mm, ss, day, month, year, offset = match.groups()
    zone = "+00:00" if not offset else f"{int(offset):+03d}:00"
    return f"{year}-{month}-{day}T{hh}:{mm}:{ss}{zone}"


_CHUNK_READERS = {b"bext": _bext, b"iXML": _ixml, b"LIST": _list, b"guan": _guano}


def _plain(exc: Exception) -> str:
    """libsndfile's reason without the file name it repeats."""
    text = getattr(exc, "error_string", None) or str(exc)
    text = re.sub(r"^Error opening [^:]*:\s*", "", text).strip().rstrip(".")
    return (text[:1].lower() + text[1:]) or exc.__class__.__name__


# --- FLAC, Ogg, MP3 and the rest, through libsndfile's header reader -------------------------
def _libsndfile(path: Path) -> AudioInfo:
    import soundfile as sf  # imported here: the WAV walk needs no libsndfile

    try:
        with sf.SoundFile(str(path)) as f:
            tags = {f"tags.{k}": v[:MAX_TEXT] for k, v in f.copy_metadata().items() if v}
            container, subtype, frames = f.format, f.subtype, f.frames
            rate, channels = f.samplerate, f.channels
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise BadAudio(f"not decodable audio ({_plain(exc)})") from None
    start = None
    date = tags.get("tags.date", "")
    if re.fullmatch(r"\d{4}-\d\d-\d\d([T ]\d\d:\d\d(:\d\d)?)?", date):
        start = date.replace(" ", "T")
    return AudioInfo(container, rate, channels, subtype, frames if frames > 0 else None, start, tags)
