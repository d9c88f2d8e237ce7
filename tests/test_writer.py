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


def test_in_halves_splits_a_large_batch_by_weight_and_keeps_the_order():
    from concurrent.futures import ThreadPoolExecutor

    from scribe_server.store.writer import SPLIT_MIN_BYTES, in_halves

    helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="helper")
    threads: dict[int, str] = {}
    both_busy = threading.Barrier(2, timeout=5)

    def work(item):
        threads[item] = threading.current_thread().name
        if item in (0, 4):  # the first item of each half waits for the other: they run at once
            both_busy.wait()
        return item * 10

    sizes = [SPLIT_MIN_BYTES // 4] * 6 + [0, SPLIT_MIN_BYTES // 2]  # half of the weight: items 0-3
    assert in_halves(helper, work, list(range(8)), lambda item: sizes[item]) == [i * 10 for i in range(8)]
    assert [threads[i] for i in range(4)] == [threading.current_thread().name] * 4
    assert all(threads[i].startswith("helper") for i in range(4, 8))

    # a small batch, or no helper: all on this thread
    threads.clear()
    assert in_halves(helper, lambda item: threads.setdefault(item, threading.current_thread().name), [1, 2],
                     lambda item: SPLIT_MIN_BYTES // 4) == [threading.current_thread().name] * 2
    assert in_halves(None, lambda item: item, [1, 2, 3], lambda item: SPLIT_MIN_BYTES) == [1, 2, 3]

    # this thread's half failing: the helper's half is still waited for before the error comes out
    finished = threading.Event()

    def failing(item):
        if item == 0:
            raise RuntimeError("boom")
        time.sleep(0.2)
        finished.set()

    try:
        in_halves(helper, failing, [0, 1], lambda item: SPLIT_MIN_BYTES)
    except RuntimeError:
        assert finished.is_set(), "returned while the helper still worked on the batch"
    else:
        raise AssertionError("the error was lost")
    helper.shutdown()
