"""What the commands do, as plain functions a script or a test can call.

No typer or rich here: results are dataclasses, progress goes to a listener.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from scribe_cli.api import Api
from scribe_cli.config import Settings
from scribe_cli import verdict
from scribe_cli.errors import (ConfigError, Interrupted, LocalDiskFull, NotFound, NotScribeServer, ScribeError,
                               ServerUnreachable, SpoolError)
from scribe_cli.spool import FAILED, HELD, ChunkMeta, FsckReport, Spool
from scribe_cli.verdict import Verdict

if TYPE_CHECKING:  # the uploader (socketio, aiohttp) and asyncio: imported by the commands that upload, not at start-up
    from scribe_cli import stopping
    from scribe_cli.upload import Listener, UploadStats


def check_session_id(session: str) -> str:
    from scribe_protocol import ProtocolError, validate_session_id  # not needed by `scribe pending` without one

    try:
        return validate_session_id(session)
    except ProtocolError:
        raise ConfigError(f"{session!r} is not a valid session id",
                          "session ids are 1-64 of letters, digits, '.', '_' and '-', starting with a letter or digit")


def open_spool(settings: Settings) -> Spool:
    """The spool under SCRIBE_HOME, for reading and writing; a clear SpoolError when SCRIBE_HOME is read-only."""
    from scribe_cli.spool_readonly import writable

    try:
        return Spool(settings.spool_dir)
    except SpoolError:
        if writable(settings.spool_dir):
            raise
        raise SpoolError(f"SCRIBE_HOME ({settings.home}) is read-only: cannot write the spool in {settings.spool_dir}",
                         "set SCRIBE_HOME to a writable directory, or make it writable; "
                         "scribe pending, sessions and gaps can still read it") from None


def open_spool_for_reading(settings: Settings) -> Spool:
    """The spool for listing, read without writing anything (see spool_readonly); a read-only SCRIBE_HOME too.

    Opening the ordinary ``Spool`` commits diskcache's settings (~16 fsyncs) each time, which a
    listing does not need.  Before the first spool exists, and when the read-only view cannot read
    it, the ordinary ``Spool`` opens it, with its own errors, as for any other command."""
    from scribe_cli.spool_readonly import open_readonly, writable

    if not writable(settings.spool_dir):
        return open_readonly(settings.spool_dir)
    if (settings.spool_dir / "cache.db").exists():
        try:
            return open_readonly(settings.spool_dir, immutable=False)
        except SpoolError:
            pass
    return open_spool(settings)


@dataclass
class ResumeResult:
    """What ``resume`` did and found.

    ``uploaded``: nothing is left in the spool and the server holds every
    chunk this spool ever captured for the session, with the same checksums
    where they could be compared, and reports no gaps.  ``complete``: that,
    and the server calls the session complete (its final seq is known and
    stored).  ``complete`` is never true while ``server.complete`` is false.
    """

    session: str
    stats: UploadStats
    pending: int
    failed: list[dict]
    quarantined: list[dict]
    server: dict
    verdict: Verdict = field(default_factory=Verdict)
    server_url: str = ""
    found: bool = True

    @property
    def uploaded(self) -> bool:
        return (self.found and not self.pending and not self.failed and not self.quarantined
                and self.server.get("missingCount", 0) == 0 and self.verdict.ok)

    @property
    def complete(self) -> bool:
        return self.uploaded and bool(self.server.get("complete"))

    def problem(self) -> tuple[str, str | None]:
        """The Error and Try lines when the session is not uploaded."""
        if self.pending or self.failed or self.quarantined or self.server.get("missingCount", 0):
            held = sum(1 for f in self.failed if (f.get("error") or "").startswith(HELD))
            hint = (f"{held} chunk(s) wait for their card: put it back and run scribe resume {self.session} "
                    "--retry-failed") if held else None
            return (f"session {self.session} is not complete: {self.pending} pending, {len(self.failed)} failed, "
                    f"{len(self.quarantined)} quarantined, {self.server.get('missingCount', 0)} missing on the "
                    f"server", hint)
        if not self.verdict.ok:
            return verdict.cause(self.session, self.server_url, self.verdict)
        return (f"the server at {self.server_url} has no session {self.session} for this token",
                verdict.HINT.format(session=self.session))

    def to_json(self) -> dict:
        stats = asdict(self.stats)
        stats["elapsed"] = round(self.stats.elapsed, 3)
        stats.pop("started", None)
        return {"session": self.session, "complete": self.complete, "uploaded": self.uploaded,
                "pending": self.pending, "failed": self.failed, "quarantined": self.quarantined, "upload": stats,
                "server": {**self.server, "found": self.found}, "spool": self.verdict.to_json()}


def upload(settings: Settings, sessions: list[str] | None, listener: Listener | None = None,
           give_up_after: float | None = 60.0, stop: stopping.StopRequest | None = None,
           spool: Spool | None = None, compact: bool = True) -> UploadStats:
    """Drain the spool of ``sessions`` (all when None) to the server (``spool``: one already open;
    ``compact``: give the space of what was sent back to the disk at the end, see ``Spool.compact``).

    A stop request ends it promptly (chunks in flight stay spooled) with Interrupted."""
    import asyncio

    from scribe_cli import stopping
    from scribe_cli.upload import Uploader

    token = settings.require_token()
    with (contextlib.nullcontext(spool) if spool is not None else open_spool(settings)) as spool:
        uploader = Uploader(spool, settings.server, token, window=settings.window, ack_timeout=settings.ack_timeout,
                            give_up_after=give_up_after, listener=listener)
        try:
            return asyncio.run(stopping.cancel_on_stop(uploader.run(sessions, compact=compact), stop))
        except Interrupted:
            left = sum(spool.count(name) for name in sessions) if sessions else len(spool.chunks())
            where = f" of {sessions[0]}" if sessions and len(sessions) == 1 else ""
            raise Interrupted(f"stopped uploading: {left} chunk(s){where} still wait in the spool",
                              f"scribe resume {sessions[0]}" if where else "scribe resume SESSION") from None


def known_locally(spool: Spool, session: str) -> bool:
    return bool(spool.count(session) or spool.session_info(session) or spool.quarantined(session)
                or spool.memory(session).count)


def server_view(settings: Settings, session: str) -> tuple[dict, list[dict] | None]:
    """The server's missing-chunks report and (first 10,000) chunk checksums; EMPTY_REPORT when it has none."""
    api = Api(settings.server, settings.token)
    started = time.monotonic()
    for attempt in range(5):  # a flaky link that let the upload through should not fail the check
        try:
            body = api.session(session)
            break
        except NotFound:
            return dict(verdict.EMPTY_REPORT), None
        except ServerUnreachable:
            if attempt == 4 or time.monotonic() - started > 20:  # (a server that takes the question and never
                raise                                              # answers is not asked 5 x 30 s)
            time.sleep(0.5 * (attempt + 1))
    chunks = body.pop("chunks", None)
    body.pop("sessionId", None)
    return body, chunks


def resume(settings: Settings, session: str, listener: Listener | None = None,
           give_up_after: float | None = 60.0, retry_failed: bool = False,
           stop: stopping.StopRequest | None = None) -> ResumeResult:
    """Upload everything pending for ``session``, then check the server against what the spool remembers."""
    check_session_id(session)
    settings.require_token()
    with open_spool(settings) as spool:  # one open spool for the whole command
        spool.sweep()
        if (settings.journal_dir / session / "header.json").exists():  # numpy and the encoders only when needed
            from scribe_cli.capture.journal import recover_session

            recover_session(settings.journal_dir, spool, session)
        if retry_failed:
            spool.retry_failed(session)
        local = known_locally(spool, session)
        stats = upload(settings, [session], listener, give_up_after, stop, spool=spool, compact=False)
        from concurrent.futures import ThreadPoolExecutor  # (imported by the upload's asyncio already)

        # the spool gives its space back while the server is asked (a VACUUM here, a query and its JSON there)
        with ThreadPoolExecutor(1, thread_name_prefix="compact") as pool:
            compacting = pool.submit(spool.compact)
            try:
                server, chunks = server_view(settings, session)
            finally:
                compacting.result()
        found = chunks is not None
        if not found and not local:
            raise NotFound(f"session {session} is neither in the local spool nor on the server")
        _settle_quarantined(spool, session, chunks or [])
        found_chunks = spool.chunks(session)
        failed = [{"seq": m.seq, "error": m.last_error} for m in found_chunks if m.state == FAILED]
        pending = sum(1 for m in found_chunks if m.state != FAILED)
        quarantined = [{"seq": q["seq"], "reason": q["reason"]} for q in spool.quarantined(session)]
        judged = verdict.check(spool.memory(session), server, chunks)
    return ResumeResult(session, stats, pending, failed, quarantined, server, judged, settings.server, found)


def _settle_quarantined(spool: Spool, session: str, chunks: list[dict]) -> None:
    """A chunk quarantined here that the server holds with the same checksum is not lost: forget it."""
    held = {c["sequence"]: c["sha256"] for c in chunks}
    settled = [q["seq"] for q in spool.quarantined(session) if held.get(q["seq"]) == q["sha256"]]
    if settled:
        spool.resolve_quarantined(session, settled)


@dataclass
class GapsResult:
    session: str
    server: dict
    spooled: list[int] = field(default_factory=list)
    verdict: Verdict = field(default_factory=Verdict)
    found: bool = True
    server_url: str = ""

    @property
    def repairable(self) -> list[list[int]]:
        """Missing ranges split by whether the local spool still holds the chunks."""
        spooled = set(self.spooled)
        return [[first, last, sum(1 for s in range(first, last + 1) if s in spooled)]
                for first, last in self.server.get("ranges", [])] if len(spooled) < 1_000_000 else []

    @property
    def ok(self) -> bool:
        """Nothing missing on the server, nothing waiting in the spool, nothing uploaded that it lacks."""
        return self.found and not self.server.get("missingCount") and not self.spooled and self.verdict.ok

    def problem(self) -> tuple[str, str] | None:
        """Error and Try lines when the local spool knows something the server's answer does not show."""
        if self.spooled and not self.found:
            return (f"{len(self.spooled)} chunk(s) of {self.session} spooled, not yet uploaded",
                    f"run scribe resume {self.session}")
        if not self.verdict.ok:
            return verdict.cause(self.session, self.server_url, self.verdict)
        if self.spooled:
            return (f"{len(self.spooled)} chunk(s) of {self.session} still wait in the local spool",
                    f"run scribe resume {self.session}")
        if not self.found:
            return (f"the server at {self.server_url} has no session {self.session} for this token",
                    verdict.HINT.format(session=self.session))
        return None

    def to_json(self) -> dict:
        spooled = set(self.spooled)
        ranges = [{"first": f, "last": l, "count": l - f + 1, "inSpool": n, "repairable": n == l - f + 1}
                  for f, l, n in self.repairable]
        return {"session": self.session, **self.server,
                "complete": bool(self.server.get("complete")) and self.ok, "found": self.found,
                "gaps": ranges, "repairableCount": sum(r["inSpool"] for r in ranges),
                "spooled": len(spooled), "spool": self.verdict.to_json()}


def gaps(settings: Settings, session: str) -> GapsResult:
    """The server's gaps of ``session``, compared with what the local spool holds and remembers."""
    check_session_id(session)
    settings.require_token()
    with open_spool_for_reading(settings) as spool:
        spooled = [m.seq for m in spool.chunks(session)]
        memory = spool.memory(session)
        local = known_locally(spool, session)
    server, chunks = server_view(settings, session)
    found = chunks is not None
    if not found and not local:
        raise NotFound(f"the server has no session {session} for this token, and the local spool has none either")
    return GapsResult(session, server, spooled, verdict.check(memory, server, chunks), found, settings.server)


@dataclass
class PendingResult:
    """What waits in the spool: chunks with intact audio, quarantined ones, and ones whose audio is gone."""

    chunks: list[ChunkMeta]
    quarantined: list[dict]
    audio_missing: list[ChunkMeta]

    def to_json(self) -> dict:
        return {"chunks": [asdict(m) for m in self.chunks], "quarantined": self.quarantined,
                "audioMissing": [asdict(m) for m in self.audio_missing]}


def pending(settings: Settings, session: str | None) -> PendingResult:
    """The spool's chunks; those whose value file is gone are listed apart (``scribe fsck`` settles them)."""
    if session is not None:
        check_session_id(session)
    with open_spool_for_reading(settings) as spool:
        if session is not None and not known_locally(spool, session):
            raise NotFound(f"session {session} is not in the local spool (nothing of it was recorded or spooled here)",
                           "scribe sessions lists the sessions this machine knows; scribe gaps SESSION asks the server")
        missing = spool.missing_audio(session)
        gone = {(m.session, m.seq) for m in missing}
        chunks = [m for m in spool.chunks(session) if (m.session, m.seq) not in gone]
        return PendingResult(chunks, spool.quarantined(session), missing)


def fsck(settings: Settings, repair: bool = True) -> FsckReport:
    """Check the spool after a crash: remove unreferenced value files, quarantine chunks whose audio is gone
    (``repair=False``, ``--dry-run``: only report, reading the spool without writing, a read-only one too)."""
    with (open_spool(settings) if repair else open_spool_for_reading(settings)) as spool:
        return spool.fsck(repair)


@dataclass
class SessionsResult:
    local: list[dict]
    server: list[dict] | None
    server_error: str | None = None

    def to_json(self) -> dict:
        return {"local": self.local, "server": self.server, "serverError": self.server_error}


def sessions(settings: Settings) -> SessionsResult:
    """Local sessions with their counts, and the server's view when it can be reached."""
    with open_spool_for_reading(settings) as spool:
        local = [asdict(s) for s in spool.sessions()]
    if not settings.token:
        return SessionsResult(local, None, "no token set")
    try:
        return SessionsResult(local, Api(settings.server, settings.token).sessions())
    except (ServerUnreachable, NotScribeServer) as exc:
        return SessionsResult(local, None, exc.message)


def export_files(settings: Settings, session: str, out_dir: Path, listener: Listener | None = None,
                 all_versions: bool = False) -> dict:
    """Download the original files of a watched session under ``out_dir``, by their relative paths.

    Each file is checked against the sha256 the manifest holds; an existing
    file with the same bytes is left as it is.  A path taken more than once
    (a file changed after it was taken, or another card's file of the same
    name) is written as its latest version; with ``all_versions`` each earlier
    version N is written beside it as ``<stem>.vN<suffix>``.
    """
    from scribe_protocol import ProtocolError, validate_file_path

    check_session_id(session)
    settings.require_token()
    check_output(out_dir, folder=True)
    api = Api(settings.server, settings.token, timeout=300)
    files = api.session(session).get("files") or []
    if not files:
        raise NotFound(f"session {session} holds no watched files",
                       f"export its audio stream instead: scribe export {session} -o {session}.flac")
    paths = {entry["path"] for entry in files}
    written = []
    for entry in files:
        try:
            rel = validate_file_path(entry["path"])
        except ProtocolError:
            raise ScribeError(f"the server listed an unsafe file path {entry['path']!r}", "report this") from None
        latest = entry["version"]
        versions = [(latest, rel)]
        if all_versions:
            versions += [(n, _version_path(rel, n, paths)) for n in range(1, latest)]
        for version, name in versions:
            target = out_dir.joinpath(*name.split("/"))
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                size, digest, said = api.download_file(session, rel, version, target)
            except OSError as exc:
                raise output_error(target, exc) from None
            expected = entry["sha256"] if version == latest else said
            if digest != expected:
                target.unlink(missing_ok=True)
                raise ScribeError(f"{rel} (version {version}) arrived with sha256 {digest[:12]}..., the manifest "
                                  f"says {str(expected)[:12]}...", "run the export again")
            written.append({"path": rel, "file": str(target), "bytes": size, "sha256": digest,
                            "version": version, "versions": entry.get("versions", latest)})
            if listener:
                listener("file", written[-1])
    return {"session": session, "dir": str(out_dir), "files": written}


def _version_path(rel: str, version: int, taken: set[str]) -> str:
    """Where ``--all-versions`` writes version ``version`` of ``rel``: ``DIR/NAME.vN.EXT``, refused when
    the session holds a file of that very name."""
    folder, _, name = rel.rpartition("/")
    stem, dot, suffix = name.rpartition(".") if "." in name else (name, "", "")
    versioned = f"{folder}/{stem}.v{version}{dot}{suffix}".lstrip("/")
    if versioned in taken:
        raise ScribeError(f"version {version} of {rel} would be written as {versioned}, a file the session holds "
                          "too", "export without --all-versions, or download that version from "
                          f"/api/sessions/SESSION/file?path=...&version={version}")
    return versioned


def check_output(out: Path, folder: bool = False) -> None:
    """Refuse an ``-o`` path that cannot be written before any work is done: its folder missing or a
    file, (``folder``) the path itself a file."""
    parent = out if folder else out.parent
    if folder and out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder", "give -o a folder (it is created when missing)")
    for above in (parent, *parent.parents):
        if above.exists():
            if not above.is_dir():
                raise ConfigError(f"cannot write {out}: {above} is a file, not a folder", "choose another -o path")
            break
    if not folder and not parent.is_dir():
        raise ConfigError(f"cannot write {out}: the folder {parent} does not exist",
                          f"create it first (mkdir -p {parent}), or choose another -o path")


def output_error(target: Path, exc: OSError) -> ScribeError:
    """What writing an ``-o`` file failed on, with its exit code: a full disk 8, the rest 9."""
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return LocalDiskFull(f"cannot write {target}: the disk is full")
    return ConfigError(f"cannot write {target}: {exc.strerror or exc}", "choose another -o path")


def export(settings: Settings, session: str, out: Path, allow_gaps: bool) -> dict:
    """Fetch the session assembled by the server into ``out`` (.wav or .flac)."""
    check_session_id(session)
    settings.require_token()
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in ("wav", "flac"):
        raise ConfigError(f"cannot tell the format of {out.name}", "name the output file .wav or .flac")
    check_output(out)
    try:
        size = Api(settings.server, settings.token, timeout=300).export(session, out, fmt, allow_gaps)
    except OSError as exc:
        raise output_error(out, exc) from None
    return {"session": session, "file": str(out), "format": fmt, "bytes": size}
