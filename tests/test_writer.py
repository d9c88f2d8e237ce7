"""The chunk writer's pipeline on its own: every job is settled exactly once, whatever
its stages do (the store's behaviour through it is tested over sockets elsewhere)."""

from __future__ import annotations

import threading
import time

from scribe_server.store.writer import BatchWriter, Job


def collecting():
    settled: list[Job] = []
    lock = threading.Lock()
    done = threading.Event()

    def on_done(job: Job) -> None:
        with lock:
            settled.append(job)
            done.set()

    return settled, on_done


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_jobs_flow_through_both_stages_in_batches():
    batches, commits = [], []

    def write(jobs):
        batches.append(len(jobs))
        time.sleep(0.02)  # let the next jobs queue up behind this batch
        return jobs

    def commit(jobs):
        commits.append(len(jobs))
        for job in jobs:
            job.settle(job.chunk * 2)

    settled, on_done = collecting()
    writer = BatchWriter(write, commit)
    submitters = [threading.Thread(target=lambda base=base: [writer.submit(Job("o", base + i, on_done))
                                                             for i in range(100)]) for base in (0, 1000, 2000, 3000)]
    for thread in submitters:
        thread.start()
    for thread in submitters:
        thread.join()
    wait_for(lambda: len(settled) == 400)
    writer.close()
    assert sorted(job.result for job in settled) == sorted(2 * (b + i) for b in (0, 1000, 2000, 3000) for i in range(100))
    assert sum(batches) == 400 and max(batches) > 1, "jobs that wait are taken together"
    assert sum(commits) == 400


def test_a_failing_stage_fails_its_batch_and_the_writer_goes_on():
    calls = {"write": 0}

    def write(jobs):
        calls["write"] += 1
        if any(job.chunk == "boom" for job in jobs):
            raise OSError("disk on fire")
        jobs[0].settle("answered at once")  # e.g. a known duplicate
        return jobs[1:]

    def commit(jobs):
        for job in jobs[1:]:  # forgets the first one: a bug the writer must not hang on
            job.settle("committed")

    settled, on_done = collecting()
    writer = BatchWriter(write, commit)
    writer.submit(Job("o", "boom", on_done))
    wait_for(lambda: len(settled) == 1)
    assert isinstance(settled[0].error, OSError)
    jobs = [Job("o", i, on_done) for i in range(3)]
    for job in jobs:
        writer.submit(job)
    wait_for(lambda: all(job.settled for job in jobs))
    writer.close()
    outcomes = [job.result or type(job.error).__name__ for job in jobs]
    assert outcomes[0] == "answered at once"
    assert "RuntimeError" in outcomes  # the forgotten job is failed, not left waiting
    assert len(settled) == 4, "each job settled exactly once"


def test_close_stores_what_is_queued_and_refuses_later_jobs():
    gate = threading.Event()

    def write(jobs):
        gate.wait(5)
        return jobs

    def commit(jobs):
        for job in jobs:
            job.settle("stored")

    settled, on_done = collecting()
    writer = BatchWriter(write, commit)
    jobs = [Job("o", i, on_done) for i in range(20)]
    for job in jobs:
        writer.submit(job)
    threading.Timer(0.2, gate.set).start()
    writer.close()
    assert [job.result for job in jobs] == ["stored"] * 20
    late = Job("o", "late", on_done)
    writer.submit(late)
    assert isinstance(late.error, RuntimeError)


def test_the_read_gate_keeps_readers_out_while_writing_and_a_busy_writer_never_starves_them():
    from scribe_server.store.writer import ReadGate

    gate, stop, inside, overlaps = ReadGate(), threading.Event(), [0], []

    def writer():
        while not stop.is_set():
            with gate.writing():
                inside[0] += 1
                time.sleep(0.003)  # a flush
                inside[0] -= 1

    def reader(waits):
        for _ in range(20):
            started = time.monotonic()
            with gate.reading():
                waits.append(time.monotonic() - started)
                overlaps.append(inside[0])

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for thread in threads:
        thread.start()
    waits: list[float] = []
    readers = [threading.Thread(target=reader, args=(waits,)) for _ in range(3)]
    for thread in readers:
        thread.start()
    for thread in readers:
        thread.join(20)
    stop.set()
    for thread in threads:
        thread.join(5)
    assert len(waits) == 60, "every read got in while two writers kept writing"
    assert set(overlaps) == {0}, "no read overlapped a write"
    assert max(waits) < 2.0, max(waits)


def test_the_read_gate_lets_writers_overlap_and_readers_in_once_the_last_has_let_go():
    """The next batch's rows may be committed while the last batch is still being flushed:
    writers share the gate, each letting go on another thread than the one that took it;
    a reader waits for all of them, and a writer that comes while it waits goes after it."""
    from scribe_server.store.writer import ReadGate

    gate = ReadGate()
    gate.begin_write()
    gate.begin_write()  # a second batch while the first is held: no wait
    events: list[str] = []

    def read() -> None:
        with gate.reading():
            events.append("read")

    def write() -> None:
        gate.begin_write()
        events.append("late writer")
        gate.end_write()

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.2)
    late = threading.Thread(target=write)
    late.start()
    time.sleep(0.2)
    threading.Thread(target=gate.end_write).start()  # let go on another thread
    time.sleep(0.2)
    assert events == [], "a reader went in while a writer still held the gate"
    gate.end_write()
    reader.join(5)
    late.join(5)
    assert events == ["read", "late writer"], "the writer that came while the reader waited goes after it"


def test_share_work_runs_items_on_both_threads_at_once_and_keeps_the_order():
    from concurrent.futures import ThreadPoolExecutor

    from scribe_server.store.writer import SPLIT_MIN_BYTES, share_work

    helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="helper")
    threads: dict[int, str] = {}
    both_busy = threading.Barrier(2, timeout=5)

    def work(item):
        threads[item] = threading.current_thread().name
        if item < 2:  # the first two items wait for each other: one thread each, at the same time
            both_busy.wait()
        time.sleep(0.01)
        return item * 10

    items = list(range(8))
    assert share_work(helper, work, items, lambda item: SPLIT_MIN_BYTES // 4) == [i * 10 for i in items]
    here = threading.current_thread().name
    assert {threads[0], threads[1]} == {here, next(name for name in threads.values() if name.startswith("helper"))}
    assert sum(name == here for name in threads.values()) >= 2, "this thread left the work to the helper"

    # a small batch, or no helper: all on this thread
    threads.clear()
    assert share_work(helper, lambda item: threads.setdefault(item, threading.current_thread().name), [1, 2],
                      lambda item: SPLIT_MIN_BYTES // 4) == [here] * 2
    assert share_work(None, lambda item: item, [1, 2, 3], lambda item: SPLIT_MIN_BYTES) == [1, 2, 3]
    helper.shutdown()


def test_share_work_never_waits_for_a_helper_that_has_not_started():
    """The helper busy elsewhere (no CPU for it): this thread does every item and returns
    at once; the helper's share, when it finally runs, finds nothing left."""
    from concurrent.futures import ThreadPoolExecutor

    from scribe_server.store.writer import SPLIT_MIN_BYTES, share_work

    helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="helper")
    release = threading.Event()
    blocker = helper.submit(release.wait, 10)
    calls: list[tuple[int, str]] = []
    started = time.monotonic()
    result = share_work(helper, lambda item: calls.append((item, threading.current_thread().name)) or item + 1,
                        list(range(6)), lambda item: SPLIT_MIN_BYTES)
    assert result == [1, 2, 3, 4, 5, 6]
    assert time.monotonic() - started < 2, "waited for the busy helper"
    assert [name for _, name in calls] == [threading.current_thread().name] * 6
    release.set()
    blocker.result(timeout=5)
    helper.submit(lambda: None).result(timeout=5)  # whatever was queued behind the blocker has run by now
    assert len(calls) == 6, "an item was done twice"
    helper.shutdown()


def test_share_work_waits_for_the_helpers_item_before_an_error_comes_out():
    from concurrent.futures import ThreadPoolExecutor

    from scribe_server.store.writer import SPLIT_MIN_BYTES, share_work

    helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="helper")
    finished = threading.Event()
    both_busy = threading.Barrier(2, timeout=5)

    def failing(item):
        both_busy.wait()  # one item on each thread
        if threading.current_thread().name.startswith("helper"):
            time.sleep(0.2)
            finished.set()
            return item
        raise RuntimeError("boom")

    try:
        share_work(helper, failing, [0, 1], lambda item: SPLIT_MIN_BYTES)
    except RuntimeError:
        assert finished.is_set(), "returned while the helper still worked on the batch"
    else:
        raise AssertionError("the error was lost")
    helper.shutdown()
