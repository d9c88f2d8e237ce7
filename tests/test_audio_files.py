"""The server's audio files on their own: each file created under its final name and made
durable in one round of flushes, and the careful path (temp -> fsync -> rename) whenever the
name exists already: an incomplete file left by a crash, a copy being written at the same
moment by another writer (another node sharing the volume), a write that failed."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from scribe_server.store import direct, writeback
from scribe_server.store import files as files_module
from scribe_server.store.files import DIRECT_MIN, TMP_SUFFIX, LocalAudioFiles


def name(seq: int, sha16: str = "0123456789abcdef", session: str = "s1") -> str:
    return f"@alice/{session}/{seq:010d}.{sha16}.wav"


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(TMP_SUFFIX) and ".instances" not in p.parts]


FLUSHES = ["fsync"] + (["syncfs"] if writeback.syncfs_available else [])


@pytest.mark.parametrize("flush", FLUSHES)
def test_a_batch_lands_complete_under_its_names_in_several_directories(tmp_path, flush, monkeypatch):
    """Either way of flushing; with syncfs, one syncfs per batch and no fsync of a new file."""
    synced, fsynced = [], []
    real_syncfs, real_fsync = files_module.syncfs, os.fsync
    monkeypatch.setattr(files_module, "syncfs", lambda fd: synced.append(fd) or real_syncfs(fd))
    monkeypatch.setattr(os, "fsync", lambda fd: fsynced.append(fd) or real_fsync(fd))
    files = LocalAudioFiles(tmp_path, flush=flush)
    items = [(name(seq, session=f"s{seq % 3}"), os.urandom(1000 + seq)) for seq in range(12)]
    assert files.write_many(items) == [None] * 12
    for item_name, data in items:
        assert files.read(item_name) == data
    assert leftovers(tmp_path) == []
    if flush == "syncfs":
        assert len(synced) == 1 and len(fsynced) == 2  # the owner directory that gained three sessions, and the root
    else:
        assert synced == [] and len(fsynced) >= 12 + 3
    files.close()


def test_new_session_directories_are_made_durable_in_their_owner_directories(tmp_path, monkeypatch):
    """A new session's directory entry lives in its owner's directory: that one is fsynced, and
    the root for a new owner directory, before any file in it is reported written."""
    flushed = []
    real = files_module._fsync_dir
    monkeypatch.setattr(files_module, "_fsync_dir", lambda path: flushed.append(str(path)) or real(path))
    files = LocalAudioFiles(tmp_path, flush="fsync")
    assert files.write_many([(name(1, session="s1"), b"x"), (f"@bob/s2/{1:010d}.0123456789abcdef.wav", b"y")]) == [None] * 2
    assert {str(tmp_path / "@alice"), str(tmp_path / "@bob"), str(tmp_path)} <= set(flushed)
    files.close()


@pytest.mark.skipif(not writeback.syncfs_available, reason="syncfs needs Linux 5.8+ (CI runs Linux 6)")
def test_a_failed_syncfs_fails_its_whole_batch_removes_the_files_and_the_retry_completes_them(tmp_path, monkeypatch):
    """A write-back error reported by syncfs cannot be pinned on one file: every small file of the
    batch is refused (and removed: its bytes may never reach the disk), none is left half there,
    and the next copy writes them whole.  Large files are fsynced on their own and unaffected."""
    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")

    files = LocalAudioFiles(tmp_path, flush="syncfs")
    small = [(name(seq), os.urandom(30_000)) for seq in range(5)]
    large = (name(9), os.urandom(DIRECT_MIN + 5))
    monkeypatch.setattr(files_module, "syncfs", broken)
    outcomes = files.write_many(small + [large])
    assert [getattr(error, "errno", None) for error in outcomes] == [errno.EIO] * 5 + [None]
    assert [(tmp_path / item).exists() for item, _ in small] == [False] * 5
    assert files.read(large[0]) == large[1]
    monkeypatch.undo()
    assert files.write_many(small) == [None] * 5
    assert all(files.read(item) == data for item, data in small)
    files.close()


def test_an_incomplete_file_left_by_a_crash_is_replaced_whole(tmp_path):
    files = LocalAudioFiles(tmp_path)
    data = os.urandom(50_000)
    stale = tmp_path / name(7)
    stale.parent.mkdir(parents=True)
    stale.write_bytes(data[:1234])  # a writer died here: the name exists, its bytes do not
    assert files.write_many([(name(7), data), (name(8), data)]) == [None, None]
    assert files.read(name(7)) == data and files.read(name(8)) == data
    assert leftovers(tmp_path) == []
    files.close()


def test_many_leftovers_in_the_first_batch_of_a_fresh_writer_are_all_replaced(tmp_path):
    """Each leftover goes the careful way on its own flusher thread, all at once, before this
    writer holds its instance lock (which its temp files name)."""
    data = {seq: os.urandom(20_000 + seq) for seq in range(12)}
    for seq in data:
        stale = tmp_path / name(seq)
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_bytes(data[seq][:100])
    for _ in range(3):
        files = LocalAudioFiles(tmp_path)
        assert files.write_many(list((name(seq), data[seq]) for seq in data)) == [None] * len(data)
        assert all(files.read(name(seq)) == data[seq] for seq in data)
        files.close()
    assert leftovers(tmp_path) == []


def test_the_same_name_twice_in_one_batch_ends_complete(tmp_path):
    files = LocalAudioFiles(tmp_path)
    data = os.urandom(200_000)
    assert files.write_many([(name(1), data), (name(1), data), (name(2), data)]) == [None, None, None]
    assert files.read(name(1)) == data
    files.close()


def test_two_writers_racing_for_the_same_names_never_expose_a_partial_file(tmp_path):
    """Two instances on one directory (two nodes on a shared volume) write the same chunks
    at once; whenever either reports a name written, the name holds the complete bytes."""
    nodes = [LocalAudioFiles(tmp_path), LocalAudioFiles(tmp_path)]
    payloads = {seq: os.urandom(300_000) for seq in range(40)}
    problems: list[str] = []
    start = threading.Barrier(2)

    def node(files: LocalAudioFiles) -> None:
        start.wait()
        for seq in range(40):
            outcome = files.write_many([(name(seq), payloads[seq])])
            if outcome != [None]:
                problems.append(f"seq {seq}: {outcome}")
            elif files.read(name(seq)) != payloads[seq]:
                problems.append(f"seq {seq}: reported written but incomplete")

    threads = [threading.Thread(target=node, args=(files,)) for files in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert problems == []
    assert all(nodes[0].read(name(seq)) == payloads[seq] for seq in payloads)
    assert leftovers(tmp_path) == []
    for files in nodes:
        files.close()


FAILING_WRITE = r"""
import errno, os, resource, signal, sys
from scribe_server.store.files import LocalAudioFiles
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)            # a write past the limit fails with EFBIG
root = sys.argv[1]
files = LocalAudioFiles(root)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
small, big = "@alice/s1/0000000001.0123456789abcdef.wav", "@alice/s1/0000000002.0123456789abcdef.wav"
large = "@alice/s1/0000000003.0123456789abcdef.wav"          # written straight to the device
outcomes = files.write_many([(small, b"x" * 1000), (big, b"y" * 300_000), (large, b"z" * 5_000_000)])
assert outcomes[0] is None, outcomes
assert outcomes[1] is not None and outcomes[1].errno == errno.EFBIG, outcomes
assert outcomes[2] is not None and outcomes[2].errno == errno.EFBIG, outcomes
assert not os.path.exists(os.path.join(root, big)), "a failed write leaves no file"
assert not os.path.exists(os.path.join(root, large)), "a failed direct write leaves no file"
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
assert files.write_many([(big, b"y" * 300_000), (large, b"z" * 5_000_000)]) == [None, None]  # the retry writes them
assert files.read(big) == b"y" * 300_000 and files.read(small) == b"x" * 1000
assert files.read(large) == b"z" * 5_000_000
print("ok")
"""


def test_a_failed_write_reports_its_error_leaves_no_file_and_the_retry_completes_it(tmp_path):
    result = subprocess.run([sys.executable, "-c", FAILING_WRITE, str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_writeback_is_started_through_the_c_library_and_refuses_a_bad_descriptor(tmp_path):
    import errno
    import sys as _sys

    import pytest

    from scribe_server.store import writeback

    assert writeback.available or not _sys.platform.startswith("linux")
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    os.write(fd, os.urandom(1 << 20))
    writeback.start_writeback(fd)  # a hint: no error, no effect on what fsync must do
    os.fsync(fd)
    os.close(fd)
    if writeback.available:
        with pytest.raises(OSError) as bad:
            writeback.start_writeback(fd)
        assert bad.value.errno == errno.EBADF


DIRECT_SIZES = [DIRECT_MIN - 1, DIRECT_MIN, DIRECT_MIN + 1, DIRECT_MIN + 4095, 5 * 2**20 + 3, 9 * 2**20 + 17]


def resident_bytes(path: Path) -> int:
    """How much of ``path`` the page cache holds, as util-linux's fincore counts it."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def test_large_files_go_straight_to_the_device_whole_at_any_size(tmp_path):
    """A file of at least DIRECT_MIN bytes is written with O_DIRECT: it lands whole at every
    length around the alignment, and its bytes never fill the page cache (at most the unaligned
    tail passes through it); a smaller one is written the ordinary way."""
    files = LocalAudioFiles(tmp_path)
    items = [(name(seq), os.urandom(size)) for seq, size in enumerate(DIRECT_SIZES)]
    items.append((name(99), os.urandom(50_000)))
    assert files.write_many(items) == [None] * len(items)
    # (on tmpfs the page cache is the file itself: there direct I/O cannot bypass it)
    in_memory = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                               text=True).stdout.strip() in ("tmpfs", "ramfs")
    for item_name, data in items:
        path = tmp_path / item_name
        size = len(data)
        if size >= DIRECT_MIN and not in_memory:
            assert resident_bytes(path) <= 2 * 4096, (size, resident_bytes(path))
        assert files.read(item_name) == data
    assert leftovers(tmp_path) == []
    # six large files at once, one flusher thread each: still at most BUFFERS aligned buffers, all
    # given back, none over KEEP_BUFFER kept (the 9 MiB one's was dropped)
    assert len(direct._free) == direct.BUFFERS
    assert all(buffer is None or len(buffer) <= direct.KEEP_BUFFER for buffer in direct._free)
    files.close()


@pytest.fixture
def no_direct_io_disk(tmp_path):
    """A real filesystem without direct I/O (ramfs refuses O_DIRECT)."""
    mount = tmp_path / "ramfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_large_files_on_a_filesystem_without_direct_io_are_written_the_ordinary_way(no_direct_io_disk):
    probe = os.open(no_direct_io_disk / "probe", os.O_WRONLY | os.O_CREAT)
    try:
        assert direct.write_direct(probe, b"x" * 8192) is False  # refused, nothing to undo
    finally:
        os.close(probe)
    files = LocalAudioFiles(no_direct_io_disk)
    items = [(name(seq), os.urandom(size)) for seq, size in enumerate(DIRECT_SIZES[:4])]
    assert files.write_many(items) == [None] * len(items)
    assert all(files.read(item_name) == data for item_name, data in items)
    files.close()


def test_a_direct_write_refused_midway_is_written_again_from_the_start(tmp_path, monkeypatch):
    """Some filesystems accept O_DIRECT and then refuse an alignment (EINVAL) part of the way:
    the file is written the ordinary way from offset 0, whole."""
    calls = []
    real_write = os.write

    def refusing_second_write(fd, data):
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data[: len(data) // 2 // direct.ALIGN * direct.ALIGN])

    monkeypatch.setattr(direct.os, "write", refusing_second_write)
    files = LocalAudioFiles(tmp_path)
    data = os.urandom(DIRECT_MIN + 2**20 + 5)
    assert files.write_many([(name(1), data)]) == [None]
    monkeypatch.undo()
    assert len(calls) == 2 and files.read(name(1)) == data
    files.close()


class ThinDisk:
    """A real ext4 (no journal, like these machines' disks) on a loop device whose backing
    file lives on a small tmpfs: the filesystem has room, its device does not, so writes are
    accepted into the page cache and fail at write-back (ENOSPC from the device, as a
    thin-provisioned volume does when its pool runs out)."""

    def __init__(self, root: Path, room: str = "6m"):
        self.pool, self.mount = root / "pool", root / "ext4"
        self.pool.mkdir()
        self.mount.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(self.pool)], check=True)
        image = self.pool / "image"
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        self.device = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True,
                                     text=True).stdout.strip()
        subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard",
                        self.device], check=True)
        self.remount()

    def remount(self) -> None:
        """Unmount (dropping the page cache of what is on it) and mount again."""
        subprocess.run(["umount", str(self.mount)], check=False, capture_output=True)
        subprocess.run(["mount", self.device, str(self.mount)], check=True)

    def grow(self, room: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={room}", str(self.pool)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", str(self.mount)], check=False)
        subprocess.run(["losetup", "-d", self.device], check=False)
        subprocess.run(["umount", "-l", str(self.pool)], check=False)


@pytest.fixture
def thin_disk(tmp_path):
    disk = ThinDisk(tmp_path)
    yield disk
    disk.close()


@pytest.mark.skipif(not writeback.syncfs_available, reason="syncfs needs Linux 5.8+ (CI runs Linux 6)")
def test_a_batch_whose_write_back_fails_is_refused_whole_and_its_retry_lands_on_the_device(thin_disk):
    """8 MB into a filesystem whose device holds ~5 MB: the writes succeed into memory and the
    syncfs fails (the device's ENOSPC, a real write-back error).  Every file of the batch is
    refused and gone; once the device has room again, the retry writes them, and they read
    back whole from the device (after an unmount, so nothing comes from the page cache).

    (With ``--flush fsync`` the files that fit are reported written one by one; on ext4
    without a journal a neighbour's failed metadata write-back can still damage them, so
    that mode is not held to this here: a device that fails writes is e2fsck's business.)"""
    files = LocalAudioFiles(thin_disk.mount / "audio", flush="syncfs")
    items = [(name(seq), os.urandom(400_000)) for seq in range(20)]
    outcomes = files.write_many(items)
    refused = [item for item, error in zip(items, outcomes) if error is not None]
    assert refused, "the thin disk took everything: this test no longer tests a failed write-back"
    assert {error.errno for error in outcomes if error is not None} <= {errno.ENOSPC, errno.EIO}
    assert not any((thin_disk.mount / "audio" / item).exists() for item, _ in refused)
    thin_disk.grow("100m")
    assert files.write_many(refused) == [None] * len(refused)
    files.close()
    thin_disk.remount()
    assert all((thin_disk.mount / "audio" / item).read_bytes() == data for item, data in items)
