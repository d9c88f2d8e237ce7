"""Does the server hold what this spool uploaded?  The check behind ``resume`` and ``gaps``.

The spool remembers, for each session, the seqs it had acknowledged and
removed and a digest of their checksums (``spool.SessionMemory``).  A server
that answers "0 chunks, no gaps" for such a session is not the server (or not
the token) they went to; claiming "complete" there would be a lie.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scribe_cli.spool import SessionMemory, session_digest

#: The server's answer for a session it does not have (for this token).
EMPTY_REPORT = {"missing": [], "missingCount": 0, "missingTruncated": False, "ranges": [], "maxSeq": -1,
                "totalChunks": 0, "finalSeq": None, "complete": False}


HINT = ("check --server / SCRIBE_SERVER and --token / SCRIBE_TOKEN: they must name the server and token the "
        "audio was uploaded with (scribe resume {session} --server URL --token TOKEN)")


def held_ranges(report: dict) -> list[list[int]]:
    """The seqs a server holds, as ranges, from its missing-chunks report."""
    held, expected = [], 0
    top = report.get("maxSeq", -1)
    for first, last in report.get("ranges", []):
        if first > top:
            break
        if first > expected:
            held.append([expected, first - 1])
        expected = last + 1
    if top >= expected:
        held.append([expected, top])
    return held


def subtract(ranges: list[list[int]], minus: list[list[int]]) -> list[list[int]]:
    """``ranges`` without ``minus`` (both sorted and disjoint)."""
    out, j = [], 0
    for first, last in ranges:
        start = first
        while j < len(minus) and minus[j][1] < start:
            j += 1
        k = j
        while start <= last and k < len(minus) and minus[k][0] <= last:
            if minus[k][0] > start:
                out.append([start, minus[k][0] - 1])
            start = max(start, minus[k][1] + 1)
            k += 1
        if start <= last:
            out.append([start, last])
    return out


def count(ranges: list[list[int]]) -> int:
    return sum(last - first + 1 for first, last in ranges)


def describe(ranges: list[list[int]], limit: int = 5) -> str:
    """``0-9, 12, 15-20`` (and "...": at most ``limit`` ranges)."""
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in ranges[:limit]]
    return ", ".join(parts) + (f" and {len(ranges) - limit} more range(s)" if len(ranges) > limit else "")


@dataclass
class Verdict:
    """The server's answer compared with the spool's memory of a session."""

    uploaded: int = 0
    uploaded_ranges: list[list[int]] = field(default_factory=list)
    not_on_server: list[list[int]] = field(default_factory=list)
    checksums: str = "unchecked"  # "match", "differ" or "unchecked"

    @property
    def ok(self) -> bool:
        return not self.not_on_server and self.checksums != "differ"

    def to_json(self) -> dict:
        return {"uploaded": self.uploaded, "uploadedRanges": self.uploaded_ranges,
                "notOnServer": self.not_on_server, "notOnServerCount": count(self.not_on_server),
                "checksums": self.checksums}


def check(memory: SessionMemory, report: dict, chunks: list[dict] | None = None) -> Verdict:
    """Compare what the spool uploaded with what the server reports holding.

    ``chunks`` (the server's chunk list with ``sequence`` and ``sha256``, may
    be truncated) lets the checksums be compared too when it covers every
    remembered seq.
    """
    verdict = Verdict(memory.count, memory.ranges, subtract(memory.ranges, held_ranges(report)))
    if chunks is None or not memory.ranges or verdict.not_on_server:
        return verdict
    listed = {c["sequence"]: c["sha256"] for c in chunks}
    if not listed or max(listed) < memory.ranges[-1][1]:
        return verdict  # the list (in seq order, capped) stops before the last remembered seq
    mine = session_digest((seq, sha) for seq, sha in listed.items() if memory.contains(seq))
    verdict.checksums = "match" if mine == memory.digest else "differ"
    return verdict


def cause(session: str, server: str, verdict: Verdict) -> tuple[str, str]:
    """The Error and Try lines for a verdict that is not ok."""
    hint = HINT.format(session=session)
    missing = count(verdict.not_on_server)
    if missing and missing == verdict.uploaded:
        return (f"the server at {server} holds none of the {verdict.uploaded} chunk(s) this spool uploaded for "
                f"{session} (seq {describe(verdict.not_on_server)}): probably a different server or token", hint)
    if missing:
        return (f"the server at {server} lacks {missing} of the {verdict.uploaded} chunk(s) this spool uploaded "
                f"for {session} (seq {describe(verdict.not_on_server)}): a different server or token, or the "
                f"server lost them", hint)
    return (f"the server at {server} holds other bytes than this spool uploaded for some chunks of {session}: "
            f"probably a different server or token", hint)
