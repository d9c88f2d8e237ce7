"""Gap arithmetic: which sequence numbers of a session are missing.

One ordered pass over the stored sequence numbers, O(n) in the number of
chunks held and independent of how large the numbers are: a session holding
only seq 2^31-1 yields one range, not two billion list items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

#: ``missing`` lists at most this many numbers; ``ranges`` is always whole.
MISSING_LIST_CAP = 10_000


@dataclass
class MissingReport:
    """The answer of ``missing-chunks`` and ``session-state``."""

    max_seq: int
    total_chunks: int
    final_seq: int | None
    ranges: list[list[int]] = field(default_factory=list)
    missing_count: int = 0
    missing: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when the session is finished and nothing up to its last seq is missing."""
        return self.final_seq is not None and self.missing_count == 0 and self.max_seq == self.final_seq

    def to_json(self) -> dict:
        return {
            "missing": self.missing,
            "missingCount": self.missing_count,
            "missingTruncated": len(self.missing) < self.missing_count,
            "ranges": self.ranges,
            "maxSeq": self.max_seq,
            "totalChunks": self.total_chunks,
            "finalSeq": self.final_seq,
            "complete": self.complete,
        }


def missing_report(seqs: Iterable[int], final_seq: int | None = None, cap: int = MISSING_LIST_CAP) -> MissingReport:
    """Compute the gaps of a session from its stored sequence numbers.

    ``seqs`` must be ascending and distinct (as ``ORDER BY seq`` on a unique
    column yields).  Numbers from 0 up to ``max(maxSeq, finalSeq)`` that are
    absent count as missing.
    """
    ranges: list[list[int]] = []
    expected = 0
    total = 0
    max_seq = -1
    for seq in seqs:
        if seq > expected:
            ranges.append([expected, seq - 1])
        expected = seq + 1
        max_seq = seq
        total += 1
    if final_seq is not None and final_seq >= expected:
        ranges.append([expected, final_seq])
    count = sum(last - first + 1 for first, last in ranges)
    return MissingReport(
        max_seq=max_seq,
        total_chunks=total,
        final_seq=final_seq,
        ranges=ranges,
        missing_count=count,
        missing=expand_ranges(ranges, cap),
    )


def expand_ranges(ranges: Iterable[Iterable[int]], cap: int) -> list[int]:
    """Expand ``[first, last]`` ranges into at most ``cap`` numbers."""
    out: list[int] = []
    for first, last in ranges:
        stop = min(last + 1, first + cap - len(out))
        out.extend(range(first, stop))
        if len(out) >= cap:
            break
    return out
