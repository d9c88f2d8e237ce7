"""Property tests of the shared protocol module: gap arithmetic and payload validation."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

import scribe_protocol as proto
from scribe_protocol.gaps import expand_ranges, missing_report

seq_sets = st.sets(st.integers(min_value=0, max_value=300), max_size=120)


@given(seq_sets, st.one_of(st.none(), st.integers(min_value=0, max_value=400)))
def test_missing_report_matches_the_naive_definition(seqs, final):
    """Ranges and list equal the seed's definition: every number up to max(maxSeq, finalSeq) not stored."""
    ordered = sorted(seqs)
    if final is not None and ordered and final < ordered[-1]:
        final = None
    report = missing_report(ordered, final)
    upper = max([-1, *ordered] + ([final] if final is not None else []))
    naive = [n for n in range(upper + 1) if n not in seqs]
    assert report.missing == naive
    assert expand_ranges(report.ranges, 10**6) == naive
    assert report.missing_count == len(naive)
    assert report.total_chunks == len(seqs) and report.max_seq == (ordered[-1] if ordered else -1)
    assert all(a <= b for a, b in report.ranges)
    assert all(prev[1] + 1 < nxt[0] for prev, nxt in zip(report.ranges, report.ranges[1:]))
    assert report.complete == (final is not None and not naive)


@given(st.integers(min_value=0, max_value=proto.MAX_SEQ), st.integers(min_value=1, max_value=50))
def test_capped_list_keeps_whole_ranges(seq, cap):
    """A huge lone seq: one range covering everything below it, the list cut at the cap."""
    report = missing_report([seq], cap=cap)
    assert report.ranges == ([[0, seq - 1]] if seq else [])
    assert report.missing == list(range(min(seq, cap)))


@given(st.text(max_size=80))
def test_session_id_validation_never_allows_path_tricks(text):
    """Whatever the text, an accepted session id is a plain name: no separators, no dots-only, no NUL."""
    try:
        sid = proto.validate_session_id(text)
    except proto.ProtocolError as exc:
        assert exc.code == proto.ErrorCode.INVALID_SESSION_ID
        return
    assert "/" not in sid and "\\" not in sid and "\x00" not in sid
    assert sid[0].isascii() and sid[0].isalnum() and sid not in (".", "..")
    assert len(sid) <= 64


payload_values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                           st.binary(max_size=64), st.lists(st.integers(), max_size=3))


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["sessionId", "sequence", "audio", "size", "mimeType", "checksum",
                                        "durationMs", "timestamp", "other"]), payload_values))
def test_parse_audio_chunk_accepts_or_raises_protocol_error(data):
    """Any dict either parses into a consistent chunk or raises ProtocolError, never anything else."""
    try:
        chunk = proto.parse_audio_chunk(data, max_bytes=32)
    except proto.ProtocolError as exc:
        assert isinstance(exc.code, proto.ErrorCode) and exc.message
        return
    assert chunk.sha256 == hashlib.sha256(chunk.audio).hexdigest()
    assert 0 < chunk.size <= 32 and 0 <= chunk.sequence <= proto.MAX_SEQ
