"""The chunk writer: one thread that stores chunks in batches.

Chunks that arrive together (a client's window, many live recorders) are
stored together: their files are written and fsynced side by side, renamed,
their directories fsynced once, and their rows committed in one transaction;
then every caller learns its own outcome.  No chunk pays for a thread hop or a
commit of its own, and the durability contract is unchanged: a caller hears
"stored" only after its file, its directory entry and its row are durable.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

MAX_BATCH = 256
MAX_BATCH_BYTES = 64 * 2**20
_STOP = object()


@dataclass
class Job:
    """One chunk to store.  ``chunk`` is the chunk itself or a callable that
    produces it (validation and hashing then run on the writer thread, off the
    event loop); ``done(job)`` is called on the writer thread when settled."""

    owner: str
    chunk: Any
    done: Callable[["Job"], None]
    result: Any = None
    error: BaseException | None = None
    size: int = 0
    settled: bool = False

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        if self.settled:
            return
        self.result, self.error, self.settled = result, error, True
        try:
            self.done(self)
        except Exception:  # a caller's callback must never stop the writer
            log.exception("chunk writer: a completion callback failed")


class BatchWriter:
    """Runs ``store_batch(jobs)`` on one thread for whatever jobs are queued.

    ``store_batch`` must settle every job it is given; a job it leaves
    unsettled (a bug) is failed here rather than left waiting forever.
    """

    def __init__(self, store_batch: Callable[[list[Job]], None], name: str = "chunk-writer"):
        self.store_batch = store_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._name = name
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, job: Job) -> None:
        if self._closed:
            job.settle(error=RuntimeError("the chunk writer is closed"))
            return
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    self._thread.start()
        self._queue.put(job)

    def close(self, timeout: float = 10.0) -> None:
        """Store what is queued, then stop the thread."""
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _STOP:
                return
            batch, size = [item], item.size
            while len(batch) < MAX_BATCH and size < MAX_BATCH_BYTES:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
                size += item.size
            self._store(batch)

    def _store(self, batch: list[Job]) -> None:
        error: BaseException = RuntimeError("the chunk writer left a chunk unsettled")
        try:
            self.store_batch(batch)
        except Exception as exc:
            log.exception("chunk writer: a batch failed")
            error = exc
        for job in batch:
            job.settle(error=error)  # no-op for the settled ones
