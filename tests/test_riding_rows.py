"""Chunk rows riding on the syncfs of their files (SQLite beside the audio files).

The chunk writer commits a batch's rows without SQLite's own flush, then one syncfs
of the filesystem makes the files and the rows durable together.  Between the two,
the rows are committed but not durable: no read may see them, no caller hears of
them, a failed flush takes them back, and after a crash they are checked against
their files before anything is served.  These tests drive the real store (SQLite,
real files, real syncfs) and a real process killed at that moment.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from scribe_protocol import AudioChunk, ErrorCode, ProtocolError, sha256_hex
from scribe_server.store import ChunkStore
from scribe_server.store import files as files_module
from scribe_server.store import writeback

pytestmark = pytest.mark.skipif(not writeback.syncfs_available, reason="syncfs needs Linux 5.8+ (CI runs Linux 6)")

ROOT = Path(__file__).resolve().parent.parent


def chunk(seq: int, data: bytes | None = None, session: str = "s1") -> AudioChunk:
    data = data if data is not None else os.urandom(40_000) + seq.to_bytes(4, "big")
    return AudioChunk(session_id=session, sequence=seq, audio=data, sha256=sha256_hex(data), mime_type="audio/wav")


def raw(data_dir: Path, sql: str) -> list[tuple]:
    """What another connection (the database's own view) sees, committed."""
    conn = sqlite3.connect(data_dir / "scribe.db", timeout=30)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def stored_seqs(data_dir: Path) -> list[int]:
    return [seq for (seq,) in raw(data_dir, "SELECT seq FROM chunks ORDER BY seq")]


def notes(data_dir: Path) -> list[str]:
    return [key for (key,) in raw(data_dir, "SELECT id FROM unflushed_chunks")]


def put_many(store: ChunkStore, chunks: list[AudioChunk]) -> list:
    """Submit ``chunks`` together (one batch, as a client's window arrives) and wait for every outcome."""
    from scribe_server.store.writer import Job

    done = threading.Semaphore(0)
    jobs = [Job("alice", c, lambda job: done.release(), size=c.size) for c in chunks]
    for job in jobs:
        store.submit(job)
    for _ in jobs:
        assert done.acquire(timeout=30)
    return [job.error or job.result for job in jobs]


def test_the_rows_are_committed_before_the_syncfs_that_makes_them_durable_and_a_clean_stop_leaves_no_notes(
        tmp_path, monkeypatch):
    store = ChunkStore.open(tmp_path)
    assert store.riding_engine is not None, "SQLite beside the audio files: the rows ride"
    seen = []
    real = files_module.syncfs

    def watching(fd):  # what the database holds when the flush starts
        seen.append((stored_seqs(tmp_path), sorted(notes(tmp_path))))
        real(fd)

    monkeypatch.setattr(files_module, "syncfs", watching)
    first = put_many(store, [chunk(0), chunk(1), chunk(2)])
    assert [r.duplicate for r in first] == [False] * 3
    ids = sorted(r.chunk_id for r in first)
    assert seen == [([0, 1, 2], ids)], "rows committed (and noted as unflushed) before the syncfs"
    second = put_many(store, [chunk(3)])
    assert seen[1] == ([0, 1, 2, 3], [second[0].chunk_id]), "the next commit clears the notes of flushed rows"
    assert store.missing("alice", "s1").total_chunks == 4
    store.close()
    assert notes(tmp_path) == [], "a clean stop leaves nothing to check at the next start"
    again = ChunkStore.open(tmp_path)
    assert again.missing("alice", "s1").total_chunks == 4
    assert [again.read_chunk("alice", "s1", seq)[1] for seq in range(4)] == [chunk_bytes(tmp_path, seq) for seq in range(4)]
    again.close()


def chunk_bytes(data_dir: Path, seq: int) -> bytes:
    [(path,)] = raw(data_dir, f"SELECT audio_path FROM chunks WHERE seq = {seq}")
    return (data_dir / "audio" / path).read_bytes()


def test_fsync_mode_or_a_database_elsewhere_keeps_the_database_flush(tmp_path):
    """Rows ride only where the syncfs covers the database's log: same filesystem, syncfs flushing."""
    assert ChunkStore.open(tmp_path / "a", flush="fsync").riding_engine is None
    other = ChunkStore.open(tmp_path / "b", database_url=f"sqlite:///{tmp_path / 'b.db'}")
    assert other.riding_engine is not None  # the same filesystem here
    shm = Path("/dev/shm")
    if shm.is_dir() and shm.stat().st_dev != tmp_path.stat().st_dev:
        db_file = shm / f"scribe-riding-{os.getpid()}.db"
        try:
            elsewhere = ChunkStore.open(tmp_path / "c", database_url=f"sqlite:///{db_file}")
            assert elsewhere.riding_engine is None, "the syncfs of the audio files would not cover this database"
            assert put_many(elsewhere, [chunk(0)])[0].duplicate is False
            elsewhere.close()
        finally:
            for leftover in shm.glob(db_file.name + "*"):
                leftover.unlink()


def test_a_failed_flush_takes_its_rows_back_fails_the_batch_and_the_retry_stores_it(tmp_path, monkeypatch):
    store = ChunkStore.open(tmp_path)
    assert put_many(store, [chunk(0)])[0].duplicate is False
    batch = [chunk(1), chunk(2)]

    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files_module, "syncfs", broken)
    outcomes = put_many(store, batch)
    assert all(isinstance(o, ProtocolError) and o.code == ErrorCode.STORAGE_UNAVAILABLE for o in outcomes)
    assert stored_seqs(tmp_path) == [0], "the rows of a failed flush are gone again"
    assert notes(tmp_path) == []
    assert sorted(p.name[:10] for p in (tmp_path / "audio" / "@alice" / "s1").iterdir()) == ["0000000000"]
    report = store.missing("alice", "s1")
    assert (report.total_chunks, report.max_seq) == (1, 0)
    monkeypatch.undo()
    assert [o.duplicate for o in put_many(store, batch)] == [False, False], "sent again, stored whole"
    assert store.read_chunk("alice", "s1", 2)[1] == batch[1].audio
    store.close()


def test_no_read_sees_a_row_before_its_flush_has_succeeded(tmp_path, monkeypatch):
    store = ChunkStore.open(tmp_path)
    flushing, release = threading.Event(), threading.Event()
    real = files_module.syncfs

    def slow(fd):
        flushing.set()
        assert release.wait(30)
        real(fd)

    monkeypatch.setattr(files_module, "syncfs", slow)
    writer = threading.Thread(target=put_many, args=(store, [chunk(0)]))
    writer.start()
    assert flushing.wait(30)
    assert stored_seqs(tmp_path) == [0], "committed (not durable yet)"
    answers: dict[str, object] = {}
    readers = [threading.Thread(target=lambda name=name, read=read: answers.__setitem__(name, read()))
               for name, read in [("missing", lambda: store.missing("alice", "s1").total_chunks),
                                  ("held", lambda: store.held_checksums("alice", "s1", [0])),
                                  ("chunks", lambda: len(store.session_chunks("alice", "s1"))),
                                  ("sessions", lambda: store.list_sessions("alice")[0]["totalChunks"])]]
    for reader in readers:
        reader.start()
    time.sleep(0.5)
    assert answers == {}, "every read waits while the row is not durable"
    release.set()
    for thread in readers + [writer]:
        thread.join(30)
    assert answers == {"missing": 1, "held": {0: sha256_hex(chunk_audio(store))}, "chunks": 1, "sessions": 1}
    store.close()


def chunk_audio(store: ChunkStore) -> bytes:
    return store.read_chunk("alice", "s1", 0)[1]


CRASH = textwrap.dedent("""
    import os, sqlite3, sys, threading, time
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from scribe_protocol import AudioChunk, sha256_hex
    from scribe_server.store import ChunkStore
    from scribe_server.store import files as files_module
    from scribe_server.store.writer import Job

    data_dir = Path({data_dir!r})
    store = ChunkStore.open(data_dir)

    def chunk(seq):
        data = bytes([seq]) * 40_000
        return AudioChunk(session_id="s1", sequence=seq, audio=data, sha256=sha256_hex(data), mime_type="audio/wav")

    def put(seqs):
        done = threading.Semaphore(0)
        for seq in seqs:
            store.submit(Job("alice", chunk(seq), lambda job: done.release(), size=40_000))
        for _ in seqs:
            done.acquire()

    put([0])
    put([1])  # acknowledged; still noted as unflushed (the next commit would clear it)
    print("acked 0 1", flush=True)
    if {mode!r} == "idle":
        os._exit(9)  # killed while idle: the note of 1 stays

    def power_cut(fd):
        # The row of 2 reached the disk, its audio only in part: what a power cut right
        # before the flush can leave (the log written back before the file).
        audio = data_dir / "audio" / "@alice" / "s1"
        with open(next(p for p in audio.iterdir() if p.name.startswith("0000000002")), "r+b") as f:
            f.truncate(1234)
        os._exit(9)

    def killed_while_writing(fd, data, writeback=True):
        # The row of 2 is committed (by the writer's helper) while its file is being written:
        # the process dies before the file holds anything.
        conn = sqlite3.connect(data_dir / "scribe.db", timeout=30)
        while not conn.execute("SELECT 1 FROM chunks WHERE seq = 2").fetchall():
            time.sleep(0.01)
        os._exit(9)

    if {mode!r} == "fill":
        files_module._fill = killed_while_writing
    else:
        files_module.syncfs = power_cut
    put([2])
""")


def crash(data_dir: Path, mode: str) -> None:
    proc = subprocess.run([sys.executable, "-c", CRASH.format(root=str(ROOT), data_dir=str(data_dir), mode=mode)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9 and "acked 0 1" in proc.stdout, proc.stderr


def test_a_crash_after_the_flush_keeps_every_acknowledged_chunk(tmp_path, caplog):
    crash(tmp_path, "idle")
    assert stored_seqs(tmp_path) == [0, 1] and len(notes(tmp_path)) == 1
    store = ChunkStore.open(tmp_path)
    assert stored_seqs(tmp_path) == [0, 1] and notes(tmp_path) == []
    assert "1 kept, 0 removed" in caplog.text
    assert store.read_chunk("alice", "s1", 1)[1] == bytes([1]) * 40_000
    store.close()


def test_after_a_crash_between_the_commit_and_the_flush_rows_without_their_audio_are_removed(tmp_path, caplog):
    crash(tmp_path, "flush")
    assert stored_seqs(tmp_path) == [0, 1, 2] and len(notes(tmp_path)) == 1, "the crash left a row unflushed"

    store = ChunkStore.open(tmp_path)  # the server starting again
    assert stored_seqs(tmp_path) == [0, 1], "a row whose audio is not whole is removed, acknowledged ones kept"
    assert notes(tmp_path) == []
    assert "0 kept, 1 removed" in caplog.text
    assert sorted(p.name[:10] for p in (tmp_path / "audio" / "@alice" / "s1").iterdir()) == ["0000000000", "0000000001"]
    assert store.read_chunk("alice", "s1", 1)[1] == bytes([1]) * 40_000
    report = store.missing("alice", "s1")
    assert (report.total_chunks, report.max_seq) == (2, 1)
    resent = put_many(store, [chunk(2, bytes([2]) * 40_000), chunk(3, bytes([3]) * 40_000)])
    assert [r.duplicate for r in resent] == [False, False], "sent again: stored, never acked as a duplicate"
    assert [store.read_chunk("alice", "s1", seq)[1] for seq in (2, 3)] == [bytes([2]) * 40_000, bytes([3]) * 40_000]
    store.close()


def test_after_a_crash_while_the_files_were_written_their_committed_rows_are_removed(tmp_path, caplog):
    """The rows are committed while the batch's files are being written: a crash then leaves
    rows (noted as unflushed) whose files hold nothing, or do not exist yet."""
    crash(tmp_path, "fill")
    assert stored_seqs(tmp_path) == [0, 1, 2] and len(notes(tmp_path)) == 1

    store = ChunkStore.open(tmp_path)
    assert stored_seqs(tmp_path) == [0, 1] and notes(tmp_path) == []
    assert "0 kept, 1 removed" in caplog.text
    assert [r.duplicate for r in put_many(store, [chunk(2, bytes([2]) * 40_000)])] == [False]
    assert store.read_chunk("alice", "s1", 2)[1] == bytes([2]) * 40_000
    store.close()


def test_the_rows_are_committed_while_the_files_are_written_and_no_read_sees_them_meanwhile(tmp_path, monkeypatch):
    store = ChunkStore.open(tmp_path)
    real = files_module._fill
    during: dict[str, object] = {}
    answers: dict[str, object] = {}

    def watching(fd, data, writeback=True):
        if "rows" not in during:  # the first file of the batch, not written yet
            deadline = time.monotonic() + 10
            while stored_seqs(tmp_path) != [0, 1] and time.monotonic() < deadline:
                time.sleep(0.01)
            during["rows"] = stored_seqs(tmp_path)
            reader = threading.Thread(target=lambda: answers.__setitem__("missing", store.missing("alice", "s1")))
            reader.start()
            reader.join(0.3)
            during["answered"] = dict(answers)
        return real(fd, data, writeback)

    monkeypatch.setattr(files_module, "_fill", watching)
    outcomes = put_many(store, [chunk(0), chunk(1)])
    assert [o.duplicate for o in outcomes] == [False, False]
    assert during == {"rows": [0, 1], "answered": {}}, "rows committed before the files were written, unseen"
    deadline = time.monotonic() + 10
    while "missing" not in answers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert answers["missing"].total_chunks == 2, "the read answered once the batch was durable"
    store.close()


def test_another_process_opening_the_store_mid_batch_leaves_the_batch_alone(tmp_path, monkeypatch):
    """``scribe-server export`` (any command that opens the store) while the server is writing a
    batch whose rows are committed but whose files are not written yet: its start-up check must
    not take those rows for a crash's remains, or the server would acknowledge chunks it no
    longer holds."""
    store = ChunkStore.open(tmp_path)
    real = files_module._fill
    writing, release = threading.Event(), threading.Event()

    def held(fd, data, writeback=True):
        if not writing.is_set():
            writing.set()
            assert release.wait(30)
        return real(fd, data, writeback)

    monkeypatch.setattr(files_module, "_fill", held)
    outcome: list = []
    writer = threading.Thread(target=lambda: outcome.extend(put_many(store, [chunk(0), chunk(1)])))
    writer.start()
    assert writing.wait(30)
    deadline = time.monotonic() + 10
    while stored_seqs(tmp_path) != [0, 1] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stored_seqs(tmp_path) == [0, 1] and len(notes(tmp_path)) == 2, "rows committed, files not written"
    other = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                            "from scribe_server.store import ChunkStore; "
                            f"s = ChunkStore.open({str(tmp_path)!r}); print(s.missing('alice', 's1').total_chunks); "
                            "s.close()"], capture_output=True, text=True, timeout=60)
    assert other.returncode == 0, other.stderr
    assert stored_seqs(tmp_path) == [0, 1] and len(notes(tmp_path)) == 2, "the other process left the batch alone"
    release.set()
    writer.join(30)
    assert [o.duplicate for o in outcome] == [False, False]
    assert [store.read_chunk("alice", "s1", seq)[1] for seq in (0, 1)] == [chunk_bytes(tmp_path, 0),
                                                                          chunk_bytes(tmp_path, 1)]
    store.close()
    again = ChunkStore.open(tmp_path)
    assert again.missing("alice", "s1").total_chunks == 2 and notes(tmp_path) == []
    again.close()


def test_a_failed_commit_of_the_rows_stores_the_batch_the_careful_way(tmp_path, monkeypatch, caplog):
    from scribe_server.store import db

    store = ChunkStore.open(tmp_path)

    def locked(*_args):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(db, "commit_riding_rows", locked)
    outcomes = put_many(store, [chunk(0), chunk(1)])
    assert [o.duplicate for o in outcomes] == [False, False]
    assert stored_seqs(tmp_path) == [0, 1] and notes(tmp_path) == [], "committed with the database's own flush"
    assert "Traceback" not in caplog.text
    monkeypatch.undo()
    assert put_many(store, [chunk(2)])[0].duplicate is False
    assert store.missing("alice", "s1").total_chunks == 3
    store.close()


def test_files_that_cannot_be_written_at_all_take_their_committed_rows_back(tmp_path, monkeypatch):
    """An unexpected error while the batch's files are being written, after its rows were
    committed: the rows go again, and reads are not left waiting for a flush that never comes."""
    store = ChunkStore.open(tmp_path)
    assert put_many(store, [chunk(0)])[0].duplicate is False
    real = files_module.LocalAudioFiles.start_many

    def failing(self, items, **kwargs):
        deadline = time.monotonic() + 10
        while stored_seqs(tmp_path) != [0, 1, 2] and time.monotonic() < deadline:
            time.sleep(0.01)
        os.close(kwargs["sync_fd"])
        raise RuntimeError("a bug while writing files")

    monkeypatch.setattr(files_module.LocalAudioFiles, "start_many", failing)
    outcomes = put_many(store, [chunk(1), chunk(2)])
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert stored_seqs(tmp_path) == [0] and notes(tmp_path) == []
    answers: list = []
    reader = threading.Thread(target=lambda: answers.append(store.missing("alice", "s1").total_chunks), daemon=True)
    reader.start()
    reader.join(5)
    assert answers == [1], "a read waited for the abandoned batch"
    monkeypatch.setattr(files_module.LocalAudioFiles, "start_many", real)
    assert [o.duplicate for o in put_many(store, [chunk(1), chunk(2)])] == [False, False]
    store.close()


def test_rows_that_cannot_be_taken_back_stop_reads_and_writes_until_a_restart_checks_them(tmp_path, monkeypatch):
    store = ChunkStore.open(tmp_path)
    assert put_many(store, [chunk(0)])[0].duplicate is False

    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")

    def no_database(*_args):
        raise sa.exc.OperationalError("DELETE", {}, Exception("database is locked"))

    monkeypatch.setattr(files_module, "syncfs", broken)
    monkeypatch.setattr(ChunkStore, "_delete_rows", no_database)
    [failed] = put_many(store, [chunk(1)])
    assert failed.code == ErrorCode.STORAGE_UNAVAILABLE
    assert stored_seqs(tmp_path) == [0, 1], "the row of the failed flush is still there"
    monkeypatch.undo()
    with pytest.raises(ProtocolError) as read:
        store.missing("alice", "s1")
    assert read.value.code == ErrorCode.STORAGE_UNAVAILABLE and "restart" in str(read.value)
    assert store.readiness().startswith("restart needed")
    [refused] = put_many(store, [chunk(1)])
    assert refused.code == ErrorCode.STORAGE_UNAVAILABLE, "a copy must not be acked as a duplicate of that row"
    store.close()

    again = ChunkStore.open(tmp_path)
    assert stored_seqs(tmp_path) == [0]
    assert again.readiness() is None
    assert put_many(again, [chunk(1)])[0].duplicate is False
    again.close()


def test_on_a_device_that_runs_out_of_room_no_chunk_reported_stored_is_lost(tmp_path):
    """The whole store (database and audio) on a thin disk whose device fills at write-back:
    the syncfs fails with the device's real ENOSPC after the rows were committed.  Whatever
    was reported stored survives; once the device has room (and the server restarts), every
    chunk is stored, and all read back whole from the device after an unmount."""
    from tests.test_audio_files import ThinDisk

    disk = ThinDisk(tmp_path)
    try:
        data_dir = disk.mount / "data"
        batch = [chunk(seq, os.urandom(400_000)) for seq in range(20)]
        store = ChunkStore.open(data_dir)
        assert store.riding_engine is not None
        first = put_many(store, batch)
        refused = [c for c, o in zip(batch, first) if isinstance(o, ProtocolError)]
        assert refused, "the thin disk took everything: this test no longer tests a failed write-back"
        assert all(o.code == ErrorCode.STORAGE_UNAVAILABLE for o in first if isinstance(o, ProtocolError))
        reported = {c.sequence for c, o in zip(batch, first) if not isinstance(o, ProtocolError)}
        store.close()
        disk.grow("100m")
        disk.remount()
        store = ChunkStore.open(data_dir)
        again = put_many(store, batch)
        assert not any(isinstance(o, ProtocolError) for o in again), again
        assert {c.sequence for c, o in zip(batch, again) if o.duplicate} == reported
        store.close()
        disk.remount()  # nothing from the page cache below
        store = ChunkStore.open(data_dir)
        assert [store.read_chunk("alice", "s1", c.sequence)[1] == c.audio for c in batch] == [True] * 20
        assert store.missing("alice", "s1").total_chunks == 20
        store.close()
    finally:
        disk.close()


def test_a_chunk_whose_write_fails_gets_no_row_and_its_batch_rides_on(tmp_path):
    store = ChunkStore.open(tmp_path)
    assert put_many(store, [chunk(0)])[0].duplicate is False
    blocker = tmp_path / "audio" / "@alice" / "s2"
    blocker.write_bytes(b"not a directory")  # s2's directory cannot be made
    good, bad = put_many(store, [chunk(1), chunk(0, session="s2")])
    assert good.duplicate is False
    assert isinstance(bad, ProtocolError) and bad.code == ErrorCode.STORAGE_UNAVAILABLE
    assert raw(tmp_path, "SELECT session_id, seq FROM chunks ORDER BY session_id, seq") == [("s1", 0), ("s1", 1)]
    blocker.unlink()
    assert put_many(store, [chunk(0, session="s2")])[0].duplicate is False
    store.close()


def test_the_servers_sqlite_keeps_its_temporary_files_in_memory(tmp_path):
    """Statement journals and the transient table of a large IN list (a session-state of thousands of
    seqs) never become etilqs_* files in $TMPDIR, which a killed server would leave behind there."""
    store = ChunkStore.open(tmp_path)
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA temp_store").scalar() == 2
    finally:
        store.close()
