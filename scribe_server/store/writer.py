"""The chunk writer: chunks stored in batches by two threads in a pipeline.

Chunks that arrive together (a client's window, many live recorders) are
stored together.  The first thread validates a batch, writes its files (each
created under its final name) and starts their flushes (the files and their
directories fsynced side by side, on the storage's own threads); the second
waits until a batch's files are durable, commits the rows of every batch that
is ready in one transaction (or, where the rows ride on the files' syncfs, runs
that syncfs, which makes the files and the rows that the first thread's helper
committed meanwhile durable together: see ``ChunkStore._begin_riding``), then
every caller learns its own outcome.  While
one batch is being flushed and committed, the next one is already being
validated and written.

No chunk pays for a thread hop or a commit of its own, and the durability
contract is unchanged: a caller hears "stored" only after its file, its
directory entry and its row are durable.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

MAX_BATCH = 256
MAX_BATCH_BYTES = 64 * 2**20
#: a batch smaller than this is not split between the writer thread and its helper (the hand-off costs more)
SPLIT_MIN_BYTES = 256 * 2**10
_STOP = object()


@dataclass(eq=False)
class Job:
    """One chunk to store.  ``chunk`` is the chunk itself or a callable that
    produces it (validation and hashing then run on the writer thread, off the
    event loop); ``done(job)`` is called on a writer thread when settled."""

    owner: str
    chunk: Any
    done: Callable[["Job"], None]
    size: int = 0
    name: str | None = None  # the storage name, once its file is written
    stored: Any = None  # how the commit stage learns that the file is durable (the store's business)
    result: Any = None
    error: BaseException | None = None
    settled: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        if self.settled:
            return
        self.result, self.error, self.settled = result, error, True
        try:
            self.done(self)
        except Exception:  # a caller's callback must never stop the writer
            log.exception("chunk writer: a completion callback failed")


class BatchWriter:
    """``write(jobs)`` on one thread, ``commit(jobs)`` on another, in a pipeline.

    ``write`` settles the jobs it refuses or answers at once and returns those
    whose files it wrote; ``commit`` must settle every job it is given.  A job
    left unsettled (a bug, an unexpected exception) is failed here rather than
    left waiting forever.
    """

    def __init__(self, write: Callable[[list[Job]], list[Job]], commit: Callable[[list[Job]], None],
                 name: str = "chunk-writer"):
        self.write, self.commit = write, commit
        self._incoming: queue.SimpleQueue = queue.SimpleQueue()
        self._written: queue.SimpleQueue = queue.SimpleQueue()
        self._name = name
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        #: the write stage's helper thread (see ``share_work``)
        self.helper: Executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-helper")

    def submit(self, job: Job) -> None:
        if self._closed:
            job.settle(error=RuntimeError("the chunk writer is closed"))
            return
        if not self._threads:
            with self._lock:
                if not self._threads:
                    self._threads = [threading.Thread(target=self._write_loop, name=f"{self._name}-files", daemon=True),
                                     threading.Thread(target=self._commit_loop, name=f"{self._name}-commit", daemon=True)]
                    for thread in self._threads:
                        thread.start()
        self._incoming.put(job)

    def close(self, timeout: float = 10.0) -> None:
        """Store what is queued, then stop the threads."""
        self._closed = True
        if self._threads:
            self._incoming.put(_STOP)
            for thread in self._threads:
                thread.join(timeout)
        self.helper.shutdown(wait=False)

    def _write_loop(self) -> None:
        while True:
            batch, stopping = _take(self._incoming, lambda job: job.size)
            if batch:
                written = self._run(self.write, batch) or []
                passed_on = {id(job) for job in written}
                for job in batch:
                    if id(job) not in passed_on:
                        job.settle(error=RuntimeError("the chunk writer left a chunk unsettled"))
                if written:
                    self._written.put(written)
            if stopping:
                self._written.put(_STOP)
                return

    def _commit_loop(self) -> None:
        while True:
            lists, stopping = _take(self._written, len)
            jobs = [job for written in lists for job in written]
            if jobs:
                self._run(self.commit, jobs)
                for job in jobs:
                    job.settle(error=RuntimeError("the chunk writer left a chunk unsettled"))
            if stopping:
                return

    @staticmethod
    def _run(stage: Callable[[list[Job]], Any], jobs: list[Job]) -> Any:
        try:
            return stage(jobs)
        except Exception as exc:
            log.exception("chunk writer: a batch failed")
            for job in jobs:
                job.settle(error=exc)
            return None


class ReadGate:
    """Keeps reads of chunk rows out of the moments when committed rows may not be durable.

    The chunk writer commits a batch's rows before the flush that makes them durable
    (see ``ChunkStore``); it holds the gate as a writer (``begin_write``) from before that
    commit until the flush has succeeded or its rows are gone again (``end_write``, maybe
    on another thread), and every read that could tell a client a chunk is stored holds
    ``reading()``, so none sees such a row.  Writers share the gate with each other (the
    next batch's rows may be committed while the last one's flush runs); readers share it
    with each other, never with a writer.  When the last writer lets go while readers
    wait, those readers go before any new writer (a busy writer never starves them), and
    a writer arriving while readers wait for a writer to finish waits behind them.
    ``broken``: set when rows of a failed flush could not be removed; every read then
    fails (the server must restart, which checks them).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0  # reading now
        self._queued = 0  # readers waiting
        self._holding = 0  # writers holding the gate
        self._waiting = 0  # writers waiting for it
        self._readers_turn = False  # set by the last writer to let go while readers wait
        self.broken: BaseException | None = None

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            self._queued += 1
            while self._holding or (self._waiting and not self._readers_turn):
                self._cond.wait()
            self._queued -= 1
            if not self._queued and self._readers_turn:
                self._readers_turn = False
                self._cond.notify_all()
            if self.broken is not None:
                raise self.broken
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    def begin_write(self) -> None:
        with self._cond:
            self._waiting += 1
            while self._readers or self._readers_turn or (self._queued and self._holding):
                self._cond.wait()
            self._waiting -= 1
            self._holding += 1

    def end_write(self) -> None:
        with self._cond:
            self._holding -= 1
            if not self._holding:
                self._readers_turn = self._queued > 0
            self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        self.begin_write()
        try:
            yield
        finally:
            self.end_write()


def share_work(helper: Executor | None, fn: Callable[[Any], Any], items: list, weight: Callable[[Any], int]) -> list:
    """``[fn(item) for item in items]``, the items shared between this thread and ``helper``:
    each takes the next item left until none is, so the helper does as many as it gets
    the CPU for.  Worth it where ``fn`` mostly runs without the GIL (hashing, writing
    files).  This thread never waits for the helper to start: on a machine whose other
    cores are busy (the client beside the server, on two cores) it simply does them all;
    it waits only for the item the helper is working on.  Below ``SPLIT_MIN_BYTES`` of
    weight in all, or without a helper, everything is done here.  An item that raises
    stops the thread it ran on; the first such error is raised once both are done."""
    if helper is None or len(items) < 2 or sum(weight(item) for item in items) < SPLIT_MIN_BYTES:
        return [fn(item) for item in items]
    results: list = [None] * len(items)
    errors: list[BaseException] = []
    indices = iter(range(len(items)))  # next() on it is atomic: each index goes to one thread

    def work() -> None:
        for index in indices:
            try:
                results[index] = fn(items[index])
            except BaseException as exc:
                errors.append(exc)
                return

    helping = helper.submit(work)
    try:
        work()
    finally:
        if not helping.cancel():  # it started: wait for the item it is on
            helping.result()
    if errors:
        raise errors[0]
    return results


def _take(source: queue.SimpleQueue, weight: Callable[[Any], int]) -> tuple[list, bool]:
    """Block for one item, then take what else is queued (bounded); True when told to stop."""
    item = source.get()
    if item is _STOP:
        return [], True
    batch, total = [item], weight(item)
    while len(batch) < MAX_BATCH and total < MAX_BATCH_BYTES:
        try:
            item = source.get_nowait()
        except queue.Empty:
            break
        if item is _STOP:
            return batch, True
        batch.append(item)
        total += weight(item)
    return batch, False
