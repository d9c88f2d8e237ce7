"""The uploader: drains the spool to the server, pipelined, until nothing is left.

* A window of chunks is in flight at once; replies are matched per chunk and
  chunks go out in ascending seq within a session.
* On every (re)connect it asks ``session-state`` and drops from the spool,
  without resending, what the server already holds with the same checksum.
* A disconnect is noticed at once: every chunk in flight simply stays in the
  spool and is sent again on the next connection.  A stalled link is caught
  by the ack timeout and Engine.IO's heartbeat.
* Reconnects back off exponentially with jitter, forever for transient
  failures (or until ``give_up_after`` seconds without a connection).
* A chunk leaves the spool only after an ``ok`` reply.  Permanent refusals
  keep it in the spool, marked failed.
* Chunk bytes are read from the spool when sent: memory is bounded by the
  window, not by the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar


import scribe_protocol as proto
from scribe_cli import sio as sio_clients
from scribe_cli.sio import socketio
import aiohttp  # (after socketio, which imports it: see scribe_cli/sio.py)
from scribe_cli.api import Api
from scribe_cli.errors import AuthError, NotScribeServer, ScribeError, ServerUnreachable
from scribe_protocol.memory import keep_freed_memory
from scribe_cli.spool import ChunkMeta, DamagedChunk, HeldChunk, Spool

log = logging.getLogger(__name__)

FLUSH_EVERY = 64
#: ... or this many bytes: ``scribe watch`` waits for a card file's ranges to leave the spool
#: acknowledged before it copies the rest into the spool (see Spool.add's ``source``)
FLUSH_BYTES = 16 << 20
READ_BATCH = 16
T = TypeVar("T")
#: bytes of chunks in flight, and read ahead, at most (large chunks, such as a watched
#: card's 1 MiB ranges, get a smaller window so memory stays bounded)
INFLIGHT_BYTES = 16 * 2**20
READ_AHEAD_BYTES = 8 * 2**20
#: bytes of one audio-chunks event at most: each event's bytes are copied (joined, then masked and
#: framed by the WebSocket writer), but each event also has fixed costs on both sides (at 512 KiB
#: chunks, events of 2 MiB beat 1, 4 and 8 MiB ones; docs/performance.md) ...
BATCH_BYTES = 2 * 2**20
#: ... and a window of more than this many bytes goes in two events or more, so that one is sent
#: while the other is stored (at 128 KiB, two events of 1 MiB beat one of 2 MiB)
ONE_EVENT_WINDOW_BYTES = 2**20
#: event-loop turns given to the Socket.IO client's write task after the last event of a read batch
#: is queued, before the next read-ahead starts on a worker thread: else that thread holds the GIL
#: while the event's frames wait to be written (up to ~0.6 ms of each 46 KiB window's cycle);
#: fewer turns only lose that overlap (docs/performance.md)
SEND_TURNS = 3


class _Client(sio_clients.AsyncClient):
    """An AsyncClient that also signals a transport drop *during* ``connect``.

    python-socketio's ``connect`` waits out its whole ``wait_timeout`` when
    the transport drops between the Engine.IO handshake and the namespace
    reply; this hooks its (private) Engine.IO disconnect handler to end that
    wait at once.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dropped = asyncio.Event()

    async def _handle_eio_disconnect(self, reason):
        self.dropped.set()
        await super()._handle_eio_disconnect(reason)


class ConnectionLost(Exception):
    """The current connection is gone; everything in flight returns to pending."""


@dataclass
class UploadStats:
    acked: int = 0
    acked_bytes: int = 0
    duplicates: int = 0
    skipped: int = 0  # already on the server: dropped without resending
    failed: int = 0
    quarantined: int = 0
    sent: int = 0
    resends: int = 0
    connects: int = 0
    disconnects: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Backoff:
    """Exponential backoff with full jitter: 0.25 s doubling up to ``cap``."""

    def __init__(self, base: float = 0.25, cap: float = 15.0, rng: random.Random | None = None):
        self.base, self.cap, self.attempt = base, cap, 0
        self.rng = rng or random.Random()

    def next(self) -> float:
        delay = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return self.rng.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


Listener = Callable[[str, dict], None]


class Uploader:
    """Sends spooled chunks of some (or all) sessions; see the module docstring."""

    def __init__(self, spool: Spool, server: str, token: str, window: int = 32, ack_timeout: float = 30.0,
                 connect_timeout: float = 10.0, give_up_after: float | None = None, listener: Listener | None = None):
        keep_freed_memory()  # before the uploader's threads start (see memory.py)
        self.spool, self.server, self.token = spool, server, token
        self.window_size, self.ack_timeout, self.connect_timeout = window, ack_timeout, connect_timeout
        self.give_up_after = give_up_after
        self.listener = listener or (lambda kind, data: None)
        self.stats = UploadStats()
        self.max_chunk_bytes = proto.DEFAULT_MAX_CHUNK_BYTES
        self.max_connection_bytes = INFLIGHT_BYTES  # the server's per-connection budgets, once known
        self.max_in_flight = window
        self.max_batch = 1  # chunks per audio-chunks event; 1: the server does not take batches
        self.connected = False
        self.wakeup = asyncio.Event()
        self._sio: socketio.AsyncClient | None = None
        self._inflight: dict[tuple, asyncio.Future] = {}  # replies awaited by _call
        self._chunks_out: dict[tuple[str, int], tuple[ChunkMeta, float]] = {}  # chunks awaiting a reply
        self._idle = asyncio.Event()
        self._window = asyncio.Semaphore(window)
        self._retry = False
        self._attempts: list = []
        self._refusals: list = []
        self._acked: list[tuple[str, int]] = []
        self._acked_bytes = 0
        self._removing: set[tuple[str, int]] = set()  # acked, being removed from the spool in the background
        self._flushing: asyncio.Future | None = None
        self._sent_once: set[tuple[str, int]] = set()
        self._finished: set[str] = set()
        self._lost = False
        self._limits_known = False
        self._until_empty = True
        self._synced: set[str] = set()
        self._call_ids = 0

    def emit(self, kind: str, **data) -> None:
        try:
            self.listener(kind, data)
        except Exception:  # a display problem must never stop an upload
            log.exception("listener failed")

    def notify(self) -> None:
        """Tell a following uploader that new chunks were spooled."""
        self.wakeup.set()

    def drain_now(self) -> None:
        """Switch a following uploader to draining: stop once nothing is left."""
        self._until_empty = True
        self.wakeup.set()

    # the main loop ------------------------------------------------------------
    async def run(self, sessions: list[str] | None = None, until_empty: bool = True,
                  stop: asyncio.Event | None = None, compact: bool = True) -> UploadStats:
        """Upload until the sessions' queues are empty (or, following, until ``stop``).

        ``compact``: give the space of the removed chunks back to the disk at the end
        (``Spool.compact``); a caller with more to do may run it itself, alongside."""
        self._until_empty = until_empty
        if self.server.lower().startswith("https:"):  # a CA variable naming no file is a setting to fix, not a retry
            from scribe_cli.config import check_ca_variables

            check_ca_variables()
        await self._retry_held()
        try:
            stats = await self._run(sessions, stop)
        finally:  # also when cancelled (a stop request): acknowledged chunks leave the spool
            await self._flush()
        if compact:
            await asyncio.to_thread(self.spool.compact)  # after a run that ended by itself only
        return stats

    async def _retry_held(self) -> None:
        """Chunks held because their card could not be read are tried again (the card may be back)."""
        await asyncio.to_thread(self.spool.retry_held)

    async def _run(self, sessions: list[str] | None, stop: asyncio.Event | None) -> UploadStats:
        backoff = Backoff()
        down_since: float | None = None
        while not (stop and stop.is_set()):
            work = self._work(sessions) if self._until_empty else None
            if work == []:
                break
            try:
                await self._connect()
            except AuthError:
                raise
            except ConnectionLost as exc:
                down_since = down_since or time.monotonic()
                if self.give_up_after is not None and time.monotonic() - down_since > self.give_up_after:
                    reason = str(exc)  # the info request's message already names the server
                    raise ServerUnreachable(reason if reason.startswith("cannot reach") else
                                            f"cannot reach the server at {self.server} ({reason})") from None
                delay = backoff.next()
                self.emit("waiting", retry_in=delay, reason=str(exc))
                await _sleep_or_stop(delay, stop)
                continue
            down_since = None
            progress_before = self.stats.acked + self.stats.skipped
            drained = False
            try:
                # (the sessions found before the first connection; after a reconnection, found again)
                drained = await self._serve(sessions, stop, backoff, work if self.stats.connects == 1 else None)
            except ConnectionLost as exc:
                self.emit("disconnected", reason=str(exc))
                if self.stats.acked + self.stats.skipped > progress_before:
                    backoff.reset()  # the link worked: a drop is worth an immediate retry
                await _sleep_or_stop(backoff.next(), stop)
            finally:
                await self._close()
            if drained:
                break
        return self.stats

    def _work(self, sessions: list[str] | None) -> list[str]:
        """Sessions with pending chunks or an unsent finish."""
        names = {name for name in self.spool.pending_sessions() if sessions is None or name in sessions}
        for name, info in self.spool.session_infos().items():  # no chunk listing on this path
            if (sessions is None or name in sessions) and info.get("finalSeq") is not None \
                    and not info.get("finishAcked") and name not in self._finished:
                names.add(name)
        return sorted(names)

    async def _serve(self, sessions, stop, backoff: Backoff, work: list[str] | None = None) -> bool:
        """Passes over the sessions with work (``work``: the first pass's, known already) until
        drained (True) or stopped."""
        while not (stop and stop.is_set()):
            self.wakeup.clear()
            if work is None:
                work = await asyncio.to_thread(self._work, sessions)
            retry_later = False
            for session in work:
                metas = await self._sync_state(session)
                acked = self.stats.acked
                refused = await self._pump(metas)
                retry_later |= refused
                await self._finish(session)
                if not refused or self.stats.acked > acked:
                    # a pass without transient refusals, or one that stored chunks (a busy server
                    # is draining, not down), earns a quick next one; refusals alone back off
                    backoff.reset()
            await self._flush(wait=self._until_empty)
            work = None
            if self._until_empty and not retry_later and not await asyncio.to_thread(self._work, sessions):
                return True
            if retry_later:
                await _sleep_or_stop(backoff.next(), stop)
            elif not self._until_empty:
                try:
                    await asyncio.wait_for(self.wakeup.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
        return False

    # connection -----------------------------------------------------------------
    async def _connect(self) -> None:
        await self._fetch_limits()
        sio = _Client(reconnection=False)
        refusal: dict = {}
        sio.on("connect_error", lambda *args: refusal.update(args=args))
        sio.on("disconnect", self._on_disconnect)
        connecting = asyncio.ensure_future(
            sio.connect(self.server, auth={"token": self.token}, transports=["websocket"],
                        wait_timeout=self.connect_timeout))
        dropped = asyncio.ensure_future(sio.dropped.wait())
        failure = ""
        try:
            await asyncio.wait({connecting, dropped}, return_when=asyncio.FIRST_COMPLETED)
            if not connecting.done():
                connecting.cancel()
                await sio.eio.disconnect(abort=True)
                failure = "connection dropped while connecting"
            else:
                connecting.result()
        except asyncio.CancelledError as exc:
            if _being_cancelled():  # a stop request: end the attempt and pass the cancellation on
                connecting.cancel()
                await _abandon(sio)
                raise
            failure = str(exc) or exc.__class__.__name__
        except (socketio.exceptions.ConnectionError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            failure = connect_failure(exc)
        finally:
            dropped.cancel()
        if failure:
            await close_http(sio)
            args = refusal.get("args") or [""]
            message = args[0].get("message", "") if isinstance(args[0], dict) else str(args[0])
            if message.startswith("unauthorized"):
                raise AuthError("the server refused the token")
            raise ConnectionLost(message or failure)
        self._sio, self._lost, self.connected = sio, False, True
        self._finished.clear()
        self._synced = set()
        self.stats.connects += 1
        self.emit("connected", server=self.server)

    async def _fetch_limits(self) -> None:
        """Learn the server's chunk limit; a failure is fine once it is known."""
        try:
            info = await _off_loop(Api(self.server, self.token, timeout=self.connect_timeout).info)
            self.max_chunk_bytes = int(info.get("maxChunkBytes", self.max_chunk_bytes))
            self.max_connection_bytes = int(info.get("maxConnectionBytes") or INFLIGHT_BYTES)
            self.max_in_flight = int(info.get("maxInFlight") or self.window_size)
            self.max_batch = max(1, min(proto.MAX_BATCH_CHUNKS, int(info.get("maxBatchChunks") or 1)))
            self._limits_known = True
        except NotScribeServer:
            raise  # not a connection to retry: another web server answers there
        except ScribeError as exc:
            if not self._limits_known:
                raise ConnectionLost(exc.message) from None

    def _on_disconnect(self, *args) -> None:
        self._lose("disconnected")

    def _lose(self, reason: str, counted: bool = True) -> None:
        if not self._lost:
            self._lost = True
            self.connected = False
            self.stats.disconnects += counted
        for future in self._inflight.values():
            if not future.done():
                future.set_exception(ConnectionLost(reason))
        for _ in range(len(self._chunks_out)):
            self._window.release()
        self._chunks_out.clear()
        self._idle.set()

    async def _close(self) -> None:
        sio, self._sio = self._sio, None
        self._lose("closed", counted=False)
        if sio is not None:
            grace = 0.2 if _being_cancelled() else 2.0  # a stop request does not wait for a stalled link
            try:
                await asyncio.wait_for(sio.disconnect(), grace)
            except (Exception, asyncio.TimeoutError):
                pass
            if sio.eio.state != "disconnected":
                await sio.eio.disconnect(abort=True)
            await close_http(sio)
        self._lose("closed", counted=False)
        self._inflight.clear()

    async def _call(self, event: str, data: dict) -> dict:
        """Emit with an ack; a disconnect fails the wait at once (``sio.call`` would sit out its timeout)."""
        if self._lost or self._sio is None:
            raise ConnectionLost("not connected")
        self._call_ids += 1
        key = ("\0call", self._call_ids)
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future

        def on_reply(*args):
            if not future.done():
                future.set_result(args[0] if args else None)

        try:
            await self._sio.emit(event, data, callback=on_reply)
            reply = await asyncio.wait_for(future, self.ack_timeout)
        except asyncio.TimeoutError:
            await self._declare_dead(f"no reply to {event} in {self.ack_timeout:.0f} s")
            raise ConnectionLost("reply timeout") from None
        except (socketio.exceptions.BadNamespaceError, socketio.exceptions.DisconnectedError) as exc:
            raise ConnectionLost(str(exc) or "disconnected") from None
        finally:
            self._inflight.pop(key, None)
        return reply if isinstance(reply, dict) else {"ok": False, "error": {"code": "internal", "message": "bad reply"}}

    async def _declare_dead(self, reason: str) -> None:
        """A half-dead link: drop it so the next connection starts clean."""
        self._lose(reason)
        if self._sio is not None:
            await self._sio.eio.disconnect(abort=True)

    # per session ----------------------------------------------------------------
    async def _sync_state(self, session: str) -> list[ChunkMeta]:
        """Drop from the spool what the server already holds with the same checksum.

        Asked once per session and connection; returns the chunks left to send.
        """
        await self._flush(wait=False)
        pending = await asyncio.to_thread(self.spool.pending, session)
        if session in self._synced:
            return pending
        self._synced.add(session)
        dropped: set[int] = set()
        for start in range(0, len(pending), 5000):
            batch = {m.seq: m for m in pending[start : start + 5000]}
            reply = await self._call(proto.SESSION_STATE, {"sessionId": session, "seqs": list(batch)})
            if not reply.get("ok"):
                if proto.is_transient(reply):
                    raise ConnectionLost(reply["error"]["message"])
                return pending  # not_found: the server holds nothing of it (yet)
            for seq, checksum in reply.get("held", []):
                meta = batch.get(seq)
                if meta is None:
                    continue
                dropped.add(seq)
                if checksum == meta.sha256:
                    self._acked.append((session, seq))
                    self.stats.skipped += 1
                    self.emit("skipped", session=session, seq=seq, size=meta.size)
                else:
                    await asyncio.to_thread(self.spool.mark_failed, session, seq,
                                            "conflict: the server holds other bytes for this seq")
                    self.stats.failed += 1
                    self.emit("failed", session=session, seq=seq, code="conflict",
                              message="the server holds other bytes for this seq")
        await self._flush()
        return [m for m in pending if m.seq not in dropped]

    async def _pump(self, metas: list[ChunkMeta]) -> bool:
        """Send ``metas`` (one session's pending chunks, in seq order); True when some must be retried later.

        Three things overlap: the next few chunks are read (and verified) from
        the spool, the current ones are sent, and acknowledged ones are removed
        from the spool, each in its own worker-thread hop.
        """
        largest = max((m.size for m in metas), default=1) or 1
        # over the server's per-connection budgets, chunks would be refused (too_many_in_flight) and backed off
        budget = max(1, min(INFLIGHT_BYTES, self.max_connection_bytes))
        window = max(1, min(self.window_size, self.max_in_flight, budget // largest))
        self._window = asyncio.Semaphore(window)
        read_batch = max(1, min(READ_BATCH, READ_AHEAD_BYTES // largest))
        # several chunks per event when the server takes batches, up to the whole window: since the
        # server makes a batch durable with one flush (syncfs), each event's fixed costs dominate
        # (46 KiB: the whole window of 16 measured 7% faster than half of it, with a fifth less
        # server CPU per chunk; a quarter 8% slower); larger windows in two events or more
        per_event = max(1, min(self.max_batch, window, min(BATCH_BYTES, self.max_chunk_bytes) // largest))
        if per_event >= window > 1 and window * largest > ONE_EVENT_WINDOW_BYTES:
            per_event = -(-window // 2)
        self._retry, self._attempts, self._refusals = False, [], []
        skip = set(self._acked) | self._removing
        metas = [m for m in metas if (m.session, m.seq) not in skip]
        batches = [metas[start : start + read_batch] for start in range(0, len(metas), read_batch)]
        watchdog = asyncio.create_task(self._watch_acks())
        reading: asyncio.Future | None = None
        try:
            if batches:
                reading = asyncio.ensure_future(asyncio.to_thread(self._read_batch, batches[0]))
            for index in range(len(batches)):
                batch = await reading
                reading = None
                if index + 1 < len(batches):
                    reading = asyncio.ensure_future(asyncio.to_thread(self._read_batch, batches[index + 1]))
                group: list[tuple[ChunkMeta, bytes]] = []
                for meta, audio in batch:
                    if self._retry:  # a transient refusal (server busy, storage down): end the pass, back off
                        break
                    if audio is None:
                        continue
                    if group and (len(group) >= per_event or self._window.locked()
                                  or sum(len(a) for _, a in group) + len(audio) > self.max_chunk_bytes):
                        await self._send_group(group)
                        group = []
                    await self._window.acquire()
                    if self._lost:
                        self._window.release()
                        for _ in group:
                            self._window.release()
                        raise ConnectionLost("disconnected while sending")
                    group.append((meta, audio))
                if group:
                    await self._send_group(group)
                    for _ in range(SEND_TURNS):
                        await asyncio.sleep(0)
                if len(self._acked) >= FLUSH_EVERY or self._acked_bytes >= FLUSH_BYTES:
                    await self._flush(wait=False)
                await self._record_outcomes()
                if self._retry:
                    break
            while self._chunks_out and not self._lost:
                self._idle.clear()
                await self._idle.wait()
        finally:
            watchdog.cancel()
            if reading is not None:
                with contextlib.suppress(Exception):  # a failed read is re-read next pass
                    await reading
            await self._record_outcomes()
        if self._lost:
            raise ConnectionLost("disconnected while sending")
        return self._retry

    def _read_batch(self, metas: list[ChunkMeta]) -> list[tuple[ChunkMeta, bytes | None]]:
        """Read and verify a few chunks in one worker-thread hop; refuse or quarantine bad ones."""
        out = []
        for meta in metas:
            if meta.size > self.max_chunk_bytes:
                self._refusals.append((meta, "too_large", f"{meta.size} bytes is over the server's limit of "
                                                          f"{self.max_chunk_bytes}"))
                continue
            try:
                out.append((meta, self.spool.read_audio(meta, verify=False)))  # the server verifies; see _refused
            except DamagedChunk as exc:
                self.stats.quarantined += 1
                self.emit("quarantined", session=meta.session, seq=meta.seq, reason=str(exc))
            except HeldChunk as exc:
                self._held(meta, exc)
        return out

    async def _send_group(self, group: list[tuple[ChunkMeta, bytes]]) -> None:
        """Send chunks whose window slots are taken: one ``audio-chunk`` event, or one
        ``audio-chunks`` event for several (their bytes as one attachment)."""
        keys = [(meta.session, meta.seq) for meta, _ in group]
        now = time.monotonic()
        for key, (meta, _) in zip(keys, group):
            self._chunks_out[key] = (meta, now)
        if len(group) == 1:
            meta, audio = group[0]
            event, payload = proto.AUDIO_CHUNK, {**_header(meta), "audio": audio}
            callback = lambda *args: self._on_reply(keys[0], args)  # noqa: E731
        else:
            event = proto.AUDIO_CHUNKS
            payload = {"chunks": [_header(meta) for meta, _ in group], "audio": b"".join(audio for _, audio in group)}
            callback = lambda *args: self._on_replies(keys, args)  # noqa: E731
        try:
            await self._sio.emit(event, payload, callback=callback)
        except (socketio.exceptions.BadNamespaceError, socketio.exceptions.DisconnectedError, AttributeError):
            for key in keys:
                if self._chunks_out.pop(key, None):
                    self._window.release()
            raise ConnectionLost("disconnected") from None
        self.stats.sent += len(keys)
        for key in keys:
            if key in self._sent_once:
                self.stats.resends += 1
            self._sent_once.add(key)

    def _on_replies(self, keys: list[tuple[str, int]], args: tuple) -> None:
        """An ``audio-chunks`` reply: one reply per chunk, in order; a reply for the whole
        event (an error) stands for each of its chunks."""
        reply = args[0] if args and isinstance(args[0], dict) else None
        replies = reply.get("replies") if reply is not None and reply.get("ok") else None
        if not isinstance(replies, list) or len(replies) != len(keys):
            replies = [reply if reply is not None and not reply.get("ok") else None] * len(keys)
        for key, each in zip(keys, replies):
            self._on_reply(key, (each,))

    def _on_reply(self, key: tuple[str, int], args: tuple) -> None:
        """A chunk's reply, on the event loop: account for it and free its window slot."""
        entry = self._chunks_out.pop(key, None)
        if entry is None:
            return  # the connection was declared lost meanwhile; the chunk stays pending
        meta = entry[0]
        self._window.release()
        if not self._chunks_out:
            self._idle.set()
        reply = args[0] if args and isinstance(args[0], dict) else None
        if reply is None:
            self._retry = True
        elif reply.get("ok"):
            self._acked.append(key)
            self._acked_bytes += meta.size
            self.stats.acked += 1
            self.stats.acked_bytes += meta.size
            self.stats.duplicates += bool(reply.get("duplicate"))
            self.emit("acked", session=meta.session, seq=meta.seq, size=meta.size,
                      duplicate=bool(reply.get("duplicate")))
        elif proto.is_transient(reply):
            self._retry = True
            self._attempts.append((meta, reply["error"]["code"]))
        else:
            self._refusals.append((meta, reply["error"]["code"], reply["error"]["message"]))

    async def _record_outcomes(self) -> None:
        attempts, self._attempts = self._attempts, []
        refusals, self._refusals = self._refusals, []
        for meta, code in attempts:
            await asyncio.to_thread(self.spool.record_attempt, meta.session, meta.seq, code)
        for meta, code, message in refusals:
            await self._refused(meta, code, message)

    async def _watch_acks(self) -> None:
        """Declare the link dead when the oldest chunk in flight waits past the ack timeout."""
        while True:
            await asyncio.sleep(min(1.0, self.ack_timeout / 4))
            if self._chunks_out:
                oldest = min(sent for _, sent in self._chunks_out.values())
                if time.monotonic() - oldest > self.ack_timeout:
                    await self._declare_dead(f"no ack in {self.ack_timeout:.0f} s")
                    return

    async def _refused(self, meta: ChunkMeta, code: str, message: str) -> None:
        if code in (proto.ErrorCode.CHECKSUM_MISMATCH.value, proto.ErrorCode.SIZE_MISMATCH.value) \
                and await self._damaged(meta):
            return
        await asyncio.to_thread(self.spool.mark_failed, meta.session, meta.seq, f"{code}: {message}")
        self.stats.failed += 1
        self.emit("failed", session=meta.session, seq=meta.seq, code=code, message=message)

    async def _damaged(self, meta: ChunkMeta) -> bool:
        """The server got other bytes than the spooled checksum: verify the spooled copy, quarantine it if damaged.

        Chunks are sent as read (their length checked, not their SHA-256): the
        server verifies every checksum, so a damaged copy is refused there and
        never stored, and it is hashed here only then.
        """
        try:
            await asyncio.to_thread(self.spool.read_audio, meta)
        except DamagedChunk as exc:
            self.stats.quarantined += 1
            self.emit("quarantined", session=meta.session, seq=meta.seq, reason=str(exc))
            return True
        except HeldChunk as exc:
            self._held(meta, exc)
            return True
        return False

    def _held(self, meta: ChunkMeta, exc: HeldChunk) -> None:
        """A chunk spooled by reference whose card is gone or changed: held as failed (by the spool)."""
        self.stats.failed += 1
        self.emit("failed", session=meta.session, seq=meta.seq, code="source_gone", message=str(exc))

    async def _finish(self, session: str) -> None:
        final = (await asyncio.to_thread(self.spool.session_info, session)).get("finalSeq")
        if final is None or session in self._finished:
            return
        reply = await self._call(proto.SESSION_FINISH, {"sessionId": session, "lastSeq": final})
        if reply.get("ok"):
            await asyncio.to_thread(self.spool.mark_finish_acked, session)
        if reply.get("ok") or not proto.is_transient(reply):
            self._finished.add(session)
        if not reply.get("ok") and not proto.is_transient(reply):
            self.emit("failed", session=session, seq=final, code=reply["error"]["code"], message=reply["error"]["message"])

    async def _flush(self, wait: bool = True) -> None:
        """Remove acknowledged chunks from the spool (the list is taken on the event loop,
        where replies append to it).

        With ``wait=False`` the removal runs in the background, one at a time, and its chunks
        are skipped meanwhile: another writer holding the spool's lock back to back (a watch
        spooling a card) then never stalls the sending.  A failed removal surfaces at the
        next flush.
        """
        if self._flushing is not None:
            if not wait and not self._flushing.done():
                return
            running, self._flushing = self._flushing, None
            await running
        acked, self._acked, self._acked_bytes = self._acked, [], 0
        if not acked:
            return
        if wait:
            await asyncio.to_thread(self.spool.remove_many, acked)
            return
        self._removing.update(acked)

        async def remove() -> None:
            try:
                await asyncio.to_thread(self.spool.remove_many, acked)
            finally:
                self._removing.difference_update(acked)

        self._flushing = asyncio.ensure_future(remove())


def _header(meta: ChunkMeta) -> dict:
    """A spooled chunk's ``audio-chunk`` fields, without its audio."""
    header = {"sessionId": meta.session, "sequence": meta.seq, "timestamp": meta.timestamp,
              "size": meta.size, "mimeType": meta.mime_type, "checksum": meta.sha256}
    if meta.duration_ms is not None:
        header["durationMs"] = meta.duration_ms
    if meta.file is not None:
        header["file"] = meta.file
    return header


async def _off_loop(call: Callable[[], T]) -> T:
    """``call()`` in a daemon thread of its own: unlike ``asyncio.to_thread``, a network call that
    hangs (a server that accepts but never answers) does not hold up ``asyncio.run``'s exit,
    which joins the default executor, after a stop request cancelled the wait."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(result=None, error: BaseException | None = None) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def run() -> None:
        try:
            result = call()
        except BaseException as exc:  # handed to the awaiting task
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result)

    threading.Thread(target=run, name="scribe-http", daemon=True).start()
    return await future


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return bool(task and task.cancelling())


async def _abandon(sio: socketio.AsyncClient) -> None:
    """Drop a half-open client without waiting for anything (the task is being cancelled)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(sio.eio.disconnect(abort=True), 1)
    await close_http(sio)


def connect_failure(exc: BaseException) -> str:
    """A few words for why a Socket.IO connection attempt failed (one line; a server that does
    not speak HTTP makes aiohttp raise a ClientResponseError quoting its bytes)."""
    if isinstance(exc, aiohttp.ClientResponseError):
        first = (str(exc.message).splitlines() or [""])[0].rstrip(": ")
        return f"the answer is not HTTP: {first}; is this a scribe-server?" if exc.status == 400 else \
            f"it answered {exc.status} {first}"
    return (str(exc).splitlines() or [""])[0][:120] or exc.__class__.__name__


async def close_http(sio: socketio.AsyncClient) -> None:
    """Close the aiohttp session a failed or dropped Engine.IO client leaves open."""
    http = getattr(sio.eio, "http", None)
    if http is not None and not http.closed:
        with contextlib.suppress(Exception):
            await http.close()


async def _sleep_or_stop(delay: float, stop: asyncio.Event | None) -> None:
    if stop is None:
        await asyncio.sleep(delay)
        return
    try:
        await asyncio.wait_for(stop.wait(), timeout=delay)
    except asyncio.TimeoutError:
        pass
