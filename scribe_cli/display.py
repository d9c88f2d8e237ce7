"""Everything people see: rich tables, progress bars and the session timeline.

The only client module besides ``cli`` that imports rich.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Iterable

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

class _Console(Console):
    def on_broken_pipe(self) -> None:
        """The reader went away (``| head``): rich would exit 1; the command ends with exit 141
        (``cli.handle_errors``), as for every other output of scribe."""
        self.quiet = True
        raise BrokenPipeError


def _console(stderr: bool) -> Console:
    """A console that hard-wraps only on a terminal: piped or logged output keeps whole lines."""
    probe = _Console(stderr=stderr)
    if probe.is_terminal:
        return probe
    return _Console(stderr=stderr, soft_wrap=True, width=max(probe.width, 200))


console = _console(stderr=False)
err_console = _console(stderr=True)


def plain_fields(data: dict) -> str:
    """``key=value`` pairs for a line of human output (never a Python dict repr), safe from rich markup."""
    from rich.markup import escape

    return escape(" ".join(f"{key}={value}" for key, value in data.items() if value is not None and value != ""))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


@functools.cache
def _speed_column() -> type:
    from rich.progress import ProgressColumn

    class BinarySpeedColumn(ProgressColumn):
        """Transfer speed in the units of the summary line (KiB/s, MiB/s), not rich's decimal MB/s."""

        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("?" if speed is None else f"{human_bytes(speed)}/s", style="progress.data.speed")

    return BinarySpeedColumn


def __getattr__(name: str):
    """``BinarySpeedColumn``, made when first used: rich.progress (~8 ms) is for the commands that upload."""
    if name == "BinarySpeedColumn":
        return _speed_column()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class UploadProgress:
    """A progress display fed by the uploader's listener events."""

    def __init__(self, total_chunks: int, total_bytes: int, title: str):
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self.state = "connecting"
        self.failed = 0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[chunks]} chunks"),
            DownloadColumn(binary_units=True), _speed_column()(), TimeRemainingColumn(),
            TextColumn("{task.fields[state]}"),
            console=err_console, transient=False,
        )
        self.total_chunks, self.done_chunks = total_chunks, 0
        self.task = self.progress.add_task(title, total=max(total_bytes, 1), state=self.state,
                                           chunks=f"0/{total_chunks}")

    def __enter__(self) -> "UploadProgress":
        if err_console.is_terminal:  # a log file gets the summary, not a frozen bar
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if err_console.is_terminal:
            self.progress.stop()

    def __call__(self, kind: str, data: dict) -> None:
        if kind in ("acked", "skipped"):
            self.done_chunks += 1
            self.progress.update(self.task, advance=data.get("size", 0),
                                 chunks=f"{self.done_chunks}/{self.total_chunks}")
        elif kind == "connected":
            self.state = "[green]connected"
        elif kind == "disconnected":
            self.state = f"[yellow]reconnecting ({data.get('reason', '')})"
        elif kind == "waiting":
            self.state = f"[yellow]server unreachable, retry in {data['retry_in']:.1f}s"
        elif kind in ("failed", "quarantined"):
            self.failed += 1
            self.progress.console.print(
                f"[red]chunk {data.get('session')}/{data.get('seq')} {kind}: "
                f"{data.get('message') or data.get('reason') or data.get('code')}"
            )
        self.progress.update(self.task, state=self.state)


def print_resume(result) -> None:
    s = result.stats
    rate = s.acked_bytes / s.elapsed if s.elapsed > 0 else 0
    console.print(
        f"[bold]{result.session}[/]: sent {s.sent} chunk(s), {s.acked} acknowledged "
        f"({s.duplicates} already stored), {s.skipped} skipped (server had them), "
        f"{human_bytes(s.acked_bytes)} in {s.elapsed:.1f}s ({human_bytes(rate)}/s), "
        f"{s.disconnects} disconnect(s)"
    )
    server = result.server
    held = (f"server holds {server.get('totalChunks', 0)} chunk(s), max seq {server.get('maxSeq', -1)}, "
            f"missing {server.get('missingCount', 0)}") if result.found else "server has no such session for this token"
    v = result.verdict
    console.print(f"{held}; this spool has uploaded {v.uploaded} chunk(s) of it"
                  + (f", {sum(b - a + 1 for a, b in v.not_on_server)} of them not on this server" if v.not_on_server
                     else ""))
    for f in result.failed:
        console.print(f"[red]failed[/] seq {f['seq']}: {f['error']}")
    for q in result.quarantined:
        console.print(f"[red]quarantined[/] seq {q['seq']}: {q['reason']}")
    if result.complete:
        console.print("[green]complete: the server holds every chunk this spool captured and reports no gaps")
    elif result.uploaded:
        console.print("[green]uploaded:[/] the server holds every chunk this spool captured; no final seq is "
                      "known yet, so the session is still open")


def print_pending(result) -> None:
    chunks, quarantined = result.chunks, result.quarantined
    if not chunks and not quarantined and not result.audio_missing:
        console.print("the spool is empty: nothing waits to be uploaded")
        return
    table = Table(title="spooled chunks")
    for col in ("session", "seq", "size", "age", "attempts", "state", "last error"):
        table.add_column(col, justify="right" if col in ("seq", "size", "age", "attempts") else "left")
    now = time.time()
    for m in chunks:
        table.add_row(m.session, str(m.seq), human_bytes(m.size), human_age(now - m.created), str(m.attempts),
                      "[red]failed" if m.state == "failed" else "pending", m.last_error or "")
    for q in quarantined:
        table.add_row(q["session"], str(q["seq"]), human_bytes(q["size"]), human_age(now - q["created"]),
                      str(q["attempts"]), "[red]quarantined", q["reason"])
    for m in result.audio_missing:
        table.add_row(m.session, str(m.seq), human_bytes(m.size), human_age(now - m.created), str(m.attempts),
                      "[red]audio missing", "run scribe fsck")
    console.print(table)


#: Cells of the timeline, distinct without colour: stored, missing but in the spool, missing.
TIMELINE_CELLS = ("█", "▒", "·")


def timeline(upper: int, ranges: Iterable[list[int]], spooled: set[int], width: int = 64) -> Text:
    """One row of cells over seq 0..upper: stored, missing but in the spool, or lost."""
    text = Text()
    if upper < 0:
        return text.append("(no chunks yet)", style="dim")
    cells = min(width, upper + 1)
    per = (upper + 1) / cells
    state = [0] * cells  # 0 stored, 1 repairable, 2 missing
    for first, last in ranges:
        for cell in range(int(first / per), min(cells - 1, int(last / per)) + 1):
            lo, hi = int(cell * per), int((cell + 1) * per) - 1
            a, b = max(first, lo), min(last, hi)
            if a > b:
                continue
            if any(s not in spooled for s in range(a, min(b, a + 10_000) + 1)):
                state[cell] = 2
            else:
                state[cell] = max(state[cell], 1)
    for value in state:
        text.append(TIMELINE_CELLS[value], style=("green", "yellow", "red")[value])
    return text


def print_gaps(result) -> None:
    if not result.found:
        spooled = len(result.spooled)
        console.print(f"{result.session}: the server has no such session for this token"
                      + (f"; {spooled} chunk(s) spooled, not yet uploaded: run scribe resume {result.session}"
                         if spooled else "")
                      + (f"; this spool has uploaded {result.verdict.uploaded} chunk(s) of it"
                         if result.verdict.uploaded else ""))
        return
    data = result.to_json()
    spooled = set(result.spooled)
    upper = max(data.get("maxSeq", -1), data.get("finalSeq") if data.get("finalSeq") is not None else -1)
    table = Table(show_header=True, title=f"gaps of {result.session}")
    table.add_column("missing seqs")
    table.add_column("count", justify="right")
    table.add_column("in local spool", justify="right")
    for gap in data["gaps"][:50]:
        seqs = str(gap["first"]) if gap["first"] == gap["last"] else f"{gap['first']}-{gap['last']}"
        style = "yellow" if gap["repairable"] else "red"
        table.add_row(f"[{style}]{seqs}", str(gap["count"]),
                      "all (scribe resume repairs it)" if gap["repairable"] else str(gap["inSpool"]))
    summary = Text(
        f"stored {data['totalChunks']} chunk(s), max seq {data['maxSeq']}, "
        f"final seq {data['finalSeq'] if data['finalSeq'] is not None else 'not set'}, "
        f"missing {data['missingCount']}, repairable from spool {data['repairableCount']}"
    )
    legend = Text.assemble((TIMELINE_CELLS[0], "green"), " stored  ", (TIMELINE_CELLS[1], "yellow"),
                           " missing, in spool  ", (TIMELINE_CELLS[2], "red"), " missing")
    parts = [summary, timeline(upper, data["ranges"], spooled), legend]
    if data["gaps"]:
        parts.append(table)
    elif result.verdict.ok:
        parts.append(Text("no gaps" + (": the session is complete" if data["complete"] else ""), style="green"))
    if result.verdict.not_on_server:
        parts.append(Text(f"this spool uploaded {result.verdict.uploaded} chunk(s) of {result.session}; the server "
                          f"lacks {data['spool']['notOnServerCount']} of them", style="red"))
    console.print(Group(*parts))


def print_fsck(report) -> None:
    verb = "removed" if report.repaired else "found"
    console.print(f"unreferenced value files: {verb} {report.orphan_files} ({human_bytes(report.orphan_bytes)})")
    if report.missing_audio:
        action = "quarantined them" if report.repaired else "scribe fsck quarantines them"
        console.print(f"[red]{len(report.missing_audio)} chunk(s) whose audio file is gone[/] ({action}; "
                      f"scribe resume SESSION tells whether the server holds them)")
    else:
        console.print("every spooled chunk has its audio")


def print_sessions(result) -> None:
    table = Table(title="local spool")
    for col in ("session", "pending", "failed", "quarantined", "bytes", "final seq"):
        table.add_column(col, justify="left" if col == "session" else "right")
    for s in result.local:
        table.add_row(s["session"], str(s["pending"]), str(s["failed"]), str(s["quarantined"]),
                      human_bytes(s["bytes"]), "" if s["final_seq"] is None else str(s["final_seq"]))
    console.print(table if result.local else "local spool: empty")
    if result.server is None:
        console.print(f"[yellow]server: unavailable ({result.server_error})")
        return
    table = Table(title="server")
    for col in ("session", "chunks", "max seq", "final seq", "bytes"):
        table.add_column(col, justify="left" if col == "session" else "right")
    for s in result.server:
        table.add_row(s["sessionId"], str(s["totalChunks"]), str(s["maxSeq"]),
                      "" if s["finalSeq"] is None else str(s["finalSeq"]), human_bytes(s["bytes"]))
    console.print(table if result.server else "server: no sessions for this token")


def error(message: str, hint: str) -> None:
    """The one-line error and its hint, on stderr, never wrapped or marked up."""
    print(f"Error: {message}", file=sys.stderr, flush=True)
    print(f"Try: {hint}", file=sys.stderr, flush=True)


def level_meter(level: float, width: int = 30) -> Text:
    """A peak meter: green, yellow above -12 dBFS, red near clipping."""
    filled = int(min(1.0, level) * width)
    style = "red" if level > 0.9 else "yellow" if level > 0.25 else "green"
    return Text("▮" * filled, style=style) + Text("▯" * (width - filled), style="dim")


def record_panel(state) -> Table:
    """The live display of ``scribe record`` / ``scribe demo``."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", justify="right")
    table.add_column()
    minutes, seconds = divmod(int(state.elapsed), 60)
    table.add_row("session", state.session)
    table.add_row("elapsed", f"{minutes:02d}:{seconds:02d}  ({state.rate} Hz, {state.channels} ch)")
    table.add_row("level", level_meter(state.level))
    pending = state.captured - state.acked
    table.add_row("chunks", f"{state.captured} captured, {state.acked} acknowledged, {pending} pending"
                  + (f", [red]{state.failed} failed[/]" if state.failed else ""))
    style = {"connected": "green", "offline": "dim"}.get(state.connection, "yellow")
    if state.connection.startswith("refused"):
        style = "red"
    table.add_row("server", Text(state.connection, style=style))
    table.add_row("overflows", Text(str(state.overflows), style="red" if state.overflows else "green"))
    return table


class LiveRecord:
    """Refreshes ``record_panel`` a few times a second while recording (people only)."""

    def __init__(self, state):
        from rich.live import Live

        self.state = state
        self.live = Live(record_panel(state), console=err_console, refresh_per_second=4,
                         get_renderable=lambda: record_panel(self.state), transient=False)

    def __enter__(self):
        if err_console.is_terminal:
            self.live.start()
        return self

    def __exit__(self, exc_type, *exc):
        if err_console.is_terminal:
            self.live.stop()
        elif exc_type is None:
            err_console.print(record_panel(self.state))


def print_demo(result) -> None:
    report = result.report
    upper = max(report.get("maxSeq", -1), report.get("finalSeq") or -1)
    console.print(Text.assemble(("timeline ", "bold"), timeline(upper, report.get("ranges", []), set())))
    console.print(
        f"recorded {result.state.elapsed:.1f} s in {result.state.captured} chunk(s); the network was cut "
        f"{result.cuts} time(s) and refused {result.refused} reconnect(s); the server holds "
        f"{report.get('totalChunks')} chunk(s), missing {report.get('missingCount')}"
    )
    if report.get("complete"):
        console.print("[green]no gaps: every chunk arrived exactly once")
    console.print(f"exported {result.output} ({human_bytes(result.output_bytes)})")


def print_chaos(report) -> None:
    table = Table(title=f"chaos run {report.session} (seed {report.seed})", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")

    def verdict(value, good: bool) -> Text:
        return Text(str(value), style="green" if good else "bold red")

    rows = [
        ("chunks / bytes", f"{report.chunks} / {human_bytes(report.bytes)}"),
        ("sent by the uploader (resends)", f"{report.sent} ({report.resends})"),
        ("connection cuts / stalls", f"{report.cuts} / {report.stalls}"),
        ("server kills / uploader kills", f"{report.server_kills} / {report.client_kills}"),
        ("duplicates sent / acked as duplicate", f"{report.duplicates_sent} / {report.duplicates_acked}"),
        ("chunks stored", str(report.stored)),
    ]
    for name, value in rows:
        table.add_row(name, value)
    table.add_row("lost", verdict(len(report.lost), not report.lost))
    table.add_row("stored twice", verdict(report.stored_twice, not report.stored_twice))
    table.add_row("corrupted", verdict(len(report.corrupted), not report.corrupted))
    table.add_row("left in the spool", verdict(report.spool_left, not report.spool_left))
    table.add_row("temp files on the server", verdict(report.temp_files, not report.temp_files))
    table.add_row("elapsed / throughput", f"{report.elapsed:.1f} s / {human_bytes(report.throughput)}/s")
    console.print(table)
    for violation in report.violations:
        console.print(f"[bold red]VIOLATION[/] {violation}")
    if report.ok:
        console.print("[green]all invariants hold: nothing lost, nothing stored twice, nothing corrupted")


def follow_panel(state) -> Group:
    report = state.report or {}
    upper = max(report.get("maxSeq", -1), report.get("finalSeq") if report.get("finalSeq") is not None else -1)
    head = Text(f"{state.session}: {report.get('totalChunks', 0)} chunk(s) stored, max seq {report.get('maxSeq', -1)}, "
                f"final seq {report.get('finalSeq') if report.get('finalSeq') is not None else 'not yet'}, "
                f"missing {report.get('missingCount', 0)}; {state.events} live event(s)")
    return Group(head, timeline(upper, report.get("ranges", []), set()))


class LiveFollow:
    """The live display of ``scribe follow`` (people only)."""

    def __init__(self, state):
        from rich.live import Live

        self.state = state
        self.live = Live(follow_panel(state), console=err_console, refresh_per_second=4,
                         get_renderable=lambda: follow_panel(self.state))

    def __enter__(self):
        if err_console.is_terminal:
            self.live.start()
        return self

    def __exit__(self, *exc):
        if err_console.is_terminal:
            self.live.stop()
