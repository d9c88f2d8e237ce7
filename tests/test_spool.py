"""The spool's durability settings and behaviour, on a real diskcache directory."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3

import pytest
from diskcache.core import MODE_BINARY, MODE_PICKLE, MODE_RAW, MODE_TEXT

from scribe_cli.errors import SpoolConflict
from scribe_cli.spool import FAILED, INLINE_MAX, PENDING, DamagedChunk, Spool


def test_spool_settings_are_durable(tmp_path):
    """No eviction, FULL synchronous SQLite, our fsyncing Disk: diskcache's unsafe defaults are off."""
    with Spool(tmp_path) as spool:
        assert spool.cache.eviction_policy == "none"
        assert spool.cache.sqlite_synchronous == 2
        assert spool.cache.disk.__class__.__name__ == "DurableDisk"
        (mode,) = spool.cache._sql("PRAGMA synchronous").fetchone()
        assert mode == 2
        (temp_store,) = spool.cache._sql("PRAGMA temp_store").fetchone()
        assert temp_store == 2  # MEMORY: no SQLite temp file in $TMPDIR for a killed process to leave behind


def test_values_are_raw_bytes_and_json_never_pickle(tmp_path):
    """Metadata is JSON text and audio raw bytes (small audio in its row, large in a file); no pickle."""
    with Spool(tmp_path) as spool:
        spool.add("s", 0, b"\x00" * 100_000, "audio/wav")
        spool.add("s", 1, b"\x01" * (INLINE_MAX + 1), "audio/wav")
        with pytest.raises(TypeError):
            spool.cache.set("x", {"a": 1})
        assert spool.read_audio(spool.chunks("s")[0]) == b"\x00" * 100_000
    db = sqlite3.connect(tmp_path / "cache.db")
    modes = {key: mode for key, mode in db.execute("SELECT key, mode FROM Cache")}
    assert MODE_PICKLE not in modes.values()
    assert modes["a/s/0000000000"] == MODE_RAW  # in the row: durable when the row commits
    assert modes["a/s/0000000001"] == MODE_BINARY  # a value file, fsynced by DurableDisk
    assert modes["c/s/0000000000"] in (MODE_RAW, MODE_TEXT)


def test_add_is_idempotent_and_refuses_other_bytes(tmp_path):
    """The same chunk twice is one entry; other bytes under the same key raise SpoolConflict."""
    with Spool(tmp_path) as spool:
        first = spool.add("s", 3, b"abc", "audio/wav")
        again = spool.add("s", 3, b"abc", "audio/wav")
        assert first.sha256 == again.sha256 and len(spool.chunks("s")) == 1
        with pytest.raises(SpoolConflict):
            spool.add("s", 3, b"xyz", "audio/wav")
        assert spool.read_audio(spool.chunks("s")[0]) == b"abc"


def test_corrupt_value_is_quarantined(tmp_path):
    """A value file whose bytes changed fails its checksum: quarantined, reported, not sent."""
    with Spool(tmp_path) as spool:
        spool.add("s", 0, os.urandom(INLINE_MAX + 70_000), "audio/wav")
        handle = spool.cache.get("a/s/0000000000", read=True)
        path = handle.name
        handle.close()
        with open(path, "r+b") as f:
            f.write(b"garbage")
        meta = spool.chunks("s")[0]
        with pytest.raises(DamagedChunk, match="checksum"):
            spool.read_audio(meta)
        assert spool.chunks("s") == [] and spool.quarantined("s")[0]["reason"] == "checksum mismatch"
        assert [s.quarantined for s in spool.sessions()] == [1]


def test_corrupt_inline_value_is_quarantined(tmp_path):
    """Audio stored in its row is verified too: other bytes in the row fail the checksum and are quarantined."""
    with Spool(tmp_path) as spool:
        spool.add("s", 0, os.urandom(40_000), "audio/wav")
        spool.cache._sql("UPDATE Cache SET value = ? WHERE key = ?", (sqlite3.Binary(os.urandom(40_000)), "a/s/0000000000"))
        meta = spool.chunks("s")[0]
        with pytest.raises(DamagedChunk, match="checksum"):
            spool.read_audio(meta)
        assert spool.chunks("s") == [] and spool.quarantined("s")[0]["reason"] == "checksum mismatch"


def test_failed_state_and_retry(tmp_path):
    """mark_failed keeps the chunk with its error; retry_failed puts it back to pending."""
    with Spool(tmp_path) as spool:
        spool.add("s", 0, b"a", "audio/wav")
        spool.mark_failed("s", 0, "conflict: other bytes")
        (meta,) = spool.chunks("s")
        assert (meta.state, meta.attempts, meta.last_error) == (FAILED, 1, "conflict: other bytes")
        assert spool.pending("s") == []
        assert spool.retry_failed("s") == 1 and spool.chunks("s")[0].state == PENDING


def _writer(directory: str, session: str, count: int) -> None:
    with Spool(directory) as spool:
        for seq in range(count):
            spool.add(session, seq, os.urandom(40_000), "audio/wav")


def test_several_processes_share_one_spool(tmp_path):
    """Two processes writing and one removing at once: every entry is consistent afterwards."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), f"p{i}", 60)) for i in range(2)]
    for p in procs:
        p.start()
    with Spool(tmp_path) as spool:
        removed = 0
        while any(p.is_alive() for p in procs) or removed < 60:
            batch = [(m.session, m.seq) for m in spool.chunks("p0")]
            spool.remove_many(batch)
            removed += len(batch)
            if removed >= 60 and not any(p.is_alive() for p in procs):
                break
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with Spool(tmp_path) as spool:
        assert spool.chunks("p0") == []
        metas = spool.chunks("p1")
        assert [m.seq for m in metas] == list(range(60))
        assert all(spool.read_audio(m) is not None for m in metas)


def test_removing_acked_chunks_in_bulk_keeps_diskcache_consistent(tmp_path):
    """remove_many deletes rows in bulk under diskcache (spool_disk.delete_keys): diskcache's own
    count and size stay equal to its table, value files of large chunks are unlinked after the
    commit, small (inline) and large chunks alike, and what is left still reads back."""
    spool = Spool(tmp_path / "spool")
    audio = {seq: os.urandom(INLINE_MAX * 2 if seq % 3 == 0 else 1000 + seq) for seq in range(30)}
    for seq, data in audio.items():
        spool.add("bulk", seq, data, "audio/wav")
    files_before = sum(len(files) for _, _, files in os.walk(tmp_path / "spool") if files)
    spool.remove_many([("bulk", seq) for seq in range(0, 30, 2)] + [("bulk", 999)])  # 999: never spooled
    con = sqlite3.connect(tmp_path / "spool" / "cache.db")
    rows, size = con.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM Cache").fetchone()
    settings = dict(con.execute("SELECT key, value FROM Settings WHERE key IN ('count', 'size')"))
    assert settings == {"count": rows, "size": size}
    assert len(spool.cache) == rows
    assert [m.seq for m in spool.pending("bulk")] == list(range(1, 30, 2))
    for meta in spool.pending("bulk"):
        assert spool.read_audio(meta) == audio[meta.seq]
    value_files = [f for _, _, files in os.walk(tmp_path / "spool") for f in files if f.endswith(".val")]
    assert len(value_files) == sum(1 for seq in range(1, 30, 2) if seq % 3 == 0) < files_before
    assert spool.memory("bulk").count == 15
    spool.close()


def _db_bytes(directory) -> int:
    return sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)
               if name.startswith("cache.db"))


def test_removed_audio_pages_are_kept_for_reuse_until_compact_gives_them_back(tmp_path):
    """Removal does not rewrite the database (incremental auto-vacuum, no zeroing of freed
    pages); compact() shrinks the file once the spool is nearly empty, and what is left reads
    back verified."""
    with Spool(tmp_path) as spool:
        assert spool.cache._sql("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
        assert spool.cache._sql("PRAGMA secure_delete").fetchone()[0] == 2  # FAST
        audio = {seq: os.urandom(64 * 1024) for seq in range(400)}  # 25 MiB, all inline
        for seq, data in audio.items():
            spool.add("s", seq, data, "audio/wav")
        spool.remove_many([("s", seq) for seq in range(395)])
        assert spool.cache._sql("PRAGMA freelist_count").fetchone()[0] * 4096 > 20 * 2**20
        assert spool.compact() > 20 * 2**20
        assert _db_bytes(tmp_path) < 3 * 2**20
        assert [m.seq for m in spool.chunks("s")] == list(range(395, 400))
        assert all(spool.read_audio(m) == audio[m.seq] for m in spool.chunks("s"))
        spool.add("s", 400, b"more", "audio/wav")  # and it goes on working
        assert spool.compact() == 0  # nothing worth giving back now


def test_compact_leaves_a_spool_with_much_live_audio_alone(tmp_path):
    """Compacting costs a copy of the live data: with most chunks still waiting it does nothing."""
    with Spool(tmp_path) as spool:
        for seq in range(400):
            spool.add("s", seq, os.urandom(64 * 1024), "audio/wav")
        spool.remove_many([("s", seq) for seq in range(150)])
        size = _db_bytes(tmp_path)
        assert spool.compact() == 0
        assert _db_bytes(tmp_path) >= size


def test_compact_gives_up_while_another_process_writes(tmp_path):
    with Spool(tmp_path) as spool:
        for seq in range(400):
            spool.add("s", seq, os.urandom(64 * 1024), "audio/wav")
        spool.remove_many([("s", seq) for seq in range(399)])
        other = sqlite3.connect(tmp_path / "cache.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # a second `scribe record` in the middle of a commit
        try:
            assert spool.compact() == 0
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert spool.read_audio(spool.chunks("s")[0]) is not None
        assert spool.compact() > 16 * 2**20


def test_a_spool_made_with_diskcache_defaults_switches_to_incremental_vacuum(tmp_path):
    """Spools of earlier versions were created with diskcache's auto_vacuum=FULL."""
    import diskcache

    old = diskcache.Cache(str(tmp_path))
    old.set("x", b"y")
    assert old._sql("PRAGMA auto_vacuum").fetchone()[0] == 1
    old.close()
    with Spool(tmp_path) as spool:
        assert spool.cache._sql("PRAGMA auto_vacuum").fetchone()[0] == 2
        spool.add("s", 0, b"audio", "audio/wav")
        assert spool.read_audio(spool.chunks("s")[0]) == b"audio"
