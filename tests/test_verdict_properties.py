"""Property tests of the resume verdict: what the spool remembers minus what the server holds."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from scribe_cli import verdict
from scribe_cli.spool import ChunkMeta, SessionMemory
from scribe_protocol.gaps import missing_report

seq_sets = st.sets(st.integers(min_value=0, max_value=200), max_size=80)


def meta(seq: int, salt: str = "") -> ChunkMeta:
    return ChunkMeta("s", seq, 1, hashlib.sha256(f"{salt}{seq}".encode()).hexdigest(), "audio/wav")


def seqs_of(ranges) -> set[int]:
    return {n for a, b in ranges for n in range(a, b + 1)}


@given(seq_sets, seq_sets, st.one_of(st.none(), st.integers(min_value=0, max_value=250)))
def test_not_on_server_is_exactly_the_remembered_seqs_the_server_lacks(uploaded, held, final):
    """notOnServer == remembered - held, whatever the server's gaps and final seq."""
    if final is not None and held and final < max(held):
        final = None
    memory = SessionMemory("s")
    memory.add([meta(seq) for seq in sorted(uploaded)])
    report = missing_report(sorted(held), final).to_json()
    assert seqs_of(verdict.held_ranges(report)) == held
    result = verdict.check(memory, report)
    assert seqs_of(result.not_on_server) == uploaded - held
    assert result.ok == (uploaded <= held)


@given(seq_sets, st.sets(st.integers(min_value=0, max_value=200), max_size=5))
def test_checksums_differ_exactly_when_a_remembered_chunk_has_other_bytes(uploaded, changed):
    """With the server holding every remembered seq, the digest tells same bytes from other bytes."""
    memory = SessionMemory("s")
    memory.add([meta(seq) for seq in sorted(uploaded)])
    chunks = [{"sequence": seq, "sha256": meta(seq, "x" if seq in changed else "").sha256} for seq in sorted(uploaded)]
    result = verdict.check(memory, missing_report(sorted(uploaded)).to_json(), chunks)
    if not uploaded:
        assert result.checksums == "unchecked"
    else:
        assert result.checksums == ("differ" if changed & uploaded else "match")


@given(st.lists(seq_sets, max_size=5))
def test_memory_ranges_are_the_union_of_all_batches(batches):
    """Remembering batches one after another gives sorted, disjoint, non-adjacent ranges of their union."""
    memory = SessionMemory("s")
    for batch in batches:
        memory.add([meta(seq) for seq in sorted(batch)])
    union = set().union(*batches) if batches else set()
    assert seqs_of(memory.ranges) == union and memory.count == len(union)
    assert all(prev[1] + 1 < nxt[0] for prev, nxt in zip(memory.ranges, memory.ranges[1:]))
