"""Stopping when asked: the first Ctrl-C, SIGTERM or SIGHUP winds a command down, the second aborts it.

SIGHUP (the terminal was closed, an SSH session dropped) is a stop request
like the others: without it the process would die on the spot, leaving the
partial chunk in the journal and the children that ``demo`` and ``chaos`` run
in their own process groups (embedded server, uploader) running for ever.

Levels::

    REQUEST (first signal)   stop capturing, commit the partial chunk, drain briefly
    ABORT   (second signal)  stop draining at once; the spool keeps the rest

How a signal travels::

    signal handler (main thread) --one byte--> pipe --> "stop-requests" thread --> callbacks

The handler only counts and writes a byte; a small thread runs the callbacks
the work registered with ``StopRequest.on`` (set a ``threading.Event``, wake
an event loop with ``call_soon_threadsafe``).  So no callback runs inside the
interrupted code of the main thread, where one taking a lock the main thread
holds would deadlock.  When nothing is registered for a level (a command
between phases, a third signal) the handler raises ``KeyboardInterrupt``,
which the CLI maps to exit 130.

No typer or rich here; ``on_signals`` is called by the CLI only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import threading
from typing import Awaitable, Callable, Iterator, TypeVar

from scribe_cli.errors import Interrupted

REQUEST, ABORT = 1, 2
#: Seconds the uploader may keep draining after a stop request (or --drain-timeout when smaller).
STOP_DRAIN_SECONDS = 5.0

T = TypeVar("T")


class StopRequest:
    """How far a stop was asked for (0 running, REQUEST, ABORT), and who to tell."""

    def __init__(self):
        self.level = 0
        self.signal_name: str | None = None
        self._callbacks: dict[int, list[Callable[[], None]]] = {REQUEST: [], ABORT: []}
        self._lock = threading.Lock()

    @property
    def requested(self) -> bool:
        return self.level >= REQUEST

    @property
    def aborted(self) -> bool:
        return self.level >= ABORT

    def listening(self, level: int) -> bool:
        """Whether some work will act on ``level`` (read from the signal handler: no lock)."""
        return bool(self._callbacks.get(level))

    @contextlib.contextmanager
    def on(self, level: int, callback: Callable[[], None]) -> Iterator[None]:
        """Call ``callback`` (from another thread) when ``level`` is reached, while the block runs.

        Called at once when the level was reached before the block began."""
        with self._lock:
            self._callbacks[level].append(callback)
            reached = self.level >= level
        if reached:
            callback()
        try:
            yield
        finally:
            with self._lock:
                self._callbacks[level].remove(callback)

    def escalate(self, level: int, signal_name: str | None = None) -> None:
        """Reach ``level`` (and every level below it) and run the callbacks registered for them."""
        with self._lock:
            if level <= self.level:
                return
            reached = range(self.level + 1, level + 1)
            self.level = level
            self.signal_name = self.signal_name or signal_name
            callbacks = [cb for lv in reached for cb in self._callbacks.get(lv, [])]
        for callback in callbacks:
            callback()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> StopRequest:
    """Route ``signals`` (main thread only) to a new StopRequest; return it.

    A signal the process inherited as ignored (``nohup``, ``&`` in a script)
    stays ignored.
    """
    stop = StopRequest()
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    count = [0]

    def handle(signum, frame) -> None:
        if signum == signal.SIGHUP:
            detach_from_terminal()
        count[0] += 1
        level = count[0]
        if level > ABORT or not stop.listening(level):
            # Torn down from wherever the main thread is: what asyncio or aiohttp then log about
            # tasks and sessions left open ("Unclosed client session") is noise, not news.
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            raise KeyboardInterrupt
        os.write(write_fd, bytes([level, signum]))

    def deliver() -> None:
        while True:
            data = os.read(read_fd, 2)
            if len(data) == 2:
                stop.escalate(data[0], signal.Signals(data[1]).name)

    threading.Thread(target=deliver, name="stop-requests", daemon=True).start()
    for sig in signals:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, handle)
    return stop


def detach_from_terminal() -> None:
    """Point stdout and stderr at /dev/null when they are a terminal that was hung up.

    After a hangup every write to the terminal fails with EIO, which would turn the
    wind-down (final display refresh, summary, ``Error:`` lines) into a crash half-way
    through.  The kernel marks the terminal hung up before it sends the signal, and
    from then on it no longer answers as a terminal (``isatty`` is false) though it is
    still a character device.  A terminal that is still open (a ``kill -HUP`` by hand),
    files and pipes (a log, ``| tee``) keep getting everything."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                if stat.S_ISCHR(os.fstat(fd).st_mode) and not os.isatty(fd):
                    os.dup2(devnull, fd)
    finally:
        os.close(devnull)


@contextlib.contextmanager
def loop_events(stop: StopRequest | None) -> Iterator[tuple[asyncio.Event, asyncio.Event]]:
    """Two asyncio events of the running loop, set when ``stop`` reaches REQUEST and ABORT."""
    requested, aborted = asyncio.Event(), asyncio.Event()
    if stop is None:
        yield requested, aborted
        return
    loop = asyncio.get_running_loop()

    def waker(event: asyncio.Event) -> Callable[[], None]:
        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(event.set)
        return wake

    with stop.on(REQUEST, waker(requested)), stop.on(ABORT, waker(aborted)):
        yield requested, aborted


async def cancel_on_stop(work: Awaitable[T], stop: StopRequest | None, what: str = "stopped",
                         hint: str | None = None) -> T:
    """Await ``work``; the first stop request cancels it (a second one cancels its cleanup)
    and raises Interrupted(``what``, ``hint``)."""
    task = asyncio.ensure_future(work)
    if stop is None:
        return await task
    loop = asyncio.get_running_loop()

    def cancel() -> None:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(task.cancel)

    with stop.on(REQUEST, cancel), stop.on(ABORT, cancel):
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if stop.requested and not (current and current.cancelling()):
                raise Interrupted(what, hint) from None
            raise
