"""The one place that reaches into python-socketio's private API.

python-socketio offers no public hook for what the server must decide before
any handler runs, so ``HardenedServer`` overrides four private methods of
``socketio.AsyncServer`` (read in python-socketio 5.11 - 5.18; the upper bound
is pinned in pyproject.toml and ``tests/test_hardening.py`` exercises each):

* ``_handle_eio_connect``: starts the handshake deadline - an Engine.IO socket
  that has not completed an authenticated Socket.IO connect within
  ``handshake_timeout`` seconds is closed (an idle Engine.IO socket otherwise
  answers pings forever).
* ``_handle_eio_message``: refuses a binary packet that announces other than
  the one attachment an event can carry (the audio), and any binary ack, by
  closing the connection *before* python-socketio starts buffering frames;
  and closes a connection whose packet cannot be decoded (bad JSON, JSON
  nested past the recursion limit, an ack id of 100+ digits, a placeholder
  that names no attachment, a binary packet before the connect).
  python-socketio raises those out of this method, leaving a half-built
  binary packet in ``_binary_packet`` (every later packet of the connection
  was then taken for its attachment: the connection wedged) and logging two
  tracebacks per packet; here the partial packet is dropped and one line per
  10 s is logged (``RateLimitedLog``).  ``StrictPacket`` (the public
  ``serializer`` hook) turns every decoding failure into ``MalformedPacket``.
* ``_handle_eio_message`` also closes a connection that keeps sending while
  more than ``MAX_QUEUED_PACKETS`` replies wait for it in Engine.IO's send
  queue (``socket.queue``, an ``asyncio.Queue``): it does not read them.
* ``_handle_event``: events named ``connect``, ``disconnect`` (reserved:
  the server's lifecycle handlers) or not a string never reach a handler.
* ``_handle_event_internal``: records whether the client asked for an ack
  (``ACK_REQUESTED``), which the seed's browser client does not.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any, Callable

import socketio

from scribe_server.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

#: True while a handler runs for an event that asked for a Socket.IO ack.
ACK_REQUESTED: contextvars.ContextVar[bool] = contextvars.ContextVar("ack_requested", default=False)


class MalformedPacket(ValueError):
    """Raised when a client's Socket.IO packet cannot be decoded or its attachments do not fit it."""


class StrictPacket(socketio.packet.Packet):
    """python-socketio's packet, with every decoding failure raised as ``MalformedPacket``."""

    def decode(self, encoded_packet):
        try:
            return super().decode(encoded_packet)
        except Exception as exc:  # ValueError, JSONDecodeError, RecursionError (JSON nested too deep)
            raise MalformedPacket(_reason(exc)) from None

    def add_attachment(self, attachment):
        try:
            return super().add_attachment(attachment)
        except Exception as exc:  # IndexError/TypeError: a placeholder's "num" names no attachment
            raise MalformedPacket(_reason(exc)) from None


def _reason(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {str(exc)[:80]}"


#: Packets queued for a client (replies it has not read yet) past which a new request of its closes
#: the connection: a client that sends and never reads would otherwise make the server hold every
#: reply (a 50-byte session-state can ask for a 60 KB one).  A well-behaved uploader has at most its
#: window's replies (<= 64) waiting.
MAX_QUEUED_PACKETS = 256

#: Event names a client may never send: they name the server's own lifecycle handlers.
RESERVED_EVENTS = frozenset({"connect", "disconnect", "connect_error", "message"})
#: Binary attachments one event may carry (``audio-chunk``'s audio).
MAX_ATTACHMENTS = 1
_BINARY_EVENT, _BINARY_ACK = "5", "6"
#: How a binary event may announce its attachments ("1-"; never 0, nor digits enough to slow ``int()``).
_ATTACHMENT_COUNTS = frozenset(str(n) for n in range(1, MAX_ATTACHMENTS + 1))
#: What python-socketio's ``_handle_eio_message`` raises for a packet that decodes but is out of place.
_OUT_OF_PLACE = frozenset({"Unexpected binary packet", "Unexpected CONNECT_ERROR packet.", "Unknown packet type."})


class HardenedServer(socketio.AsyncServer):
    """An AsyncServer that drops reserved events, caps attachments and enforces
    a handshake deadline (see the module docstring)."""

    def __init__(self, *args: Any, handshake_timeout: float = 10.0,
                 is_authenticated: Callable[[str], bool] | None = None, **kwargs: Any):
        super().__init__(*args, serializer=StrictPacket, **kwargs)
        self.handshake_timeout = handshake_timeout
        self.is_authenticated = is_authenticated or (lambda sid: True)
        self.refusals = RateLimitedLog(log)

    async def _handle_eio_connect(self, eio_sid, environ):
        await super()._handle_eio_connect(eio_sid, environ)
        asyncio.get_running_loop().call_later(
            self.handshake_timeout, lambda: asyncio.ensure_future(self._check_handshake(eio_sid)))

    async def _check_handshake(self, eio_sid: str) -> None:
        if eio_sid not in self.eio.sockets:
            return
        sid = self.manager.sid_from_eio_sid(eio_sid, "/")
        if sid is None or not self.is_authenticated(sid):
            self.refusals(logging.INFO, "handshake", "closed a connection that did not authenticate within %.0f s",
                          self.handshake_timeout)
            await self.eio.disconnect(eio_sid)

    async def _handle_eio_message(self, eio_sid, data):
        sock = self.eio.sockets.get(eio_sid)
        if sock is not None and sock.queue.qsize() > MAX_QUEUED_PACKETS:
            self.refusals(logging.WARNING, "not-reading", "closed a connection that does not read its replies "
                          "(%d packets waiting for it)", sock.queue.qsize())
            await self.eio.disconnect(eio_sid)
            return
        if eio_sid not in self._binary_packet and not isinstance(data, str):
            return  # a binary frame no event announced (e.g. the rest of a refused one): nothing to decode
        if eio_sid not in self._binary_packet and isinstance(data, str) and data[:1] in (_BINARY_EVENT, _BINARY_ACK):
            dash = data.find("-")
            count = data[1:dash] if dash > 1 else ""
            if data[:1] == _BINARY_ACK or count not in _ATTACHMENT_COUNTS:
                self.refusals(logging.WARNING, "attachments",
                              "closed a connection that announced %s binary attachments", count[:12] or "?")
                await self.eio.disconnect(eio_sid)
                return
        try:
            await super()._handle_eio_message(eio_sid, data)
        except ValueError as exc:
            if not isinstance(exc, MalformedPacket) and str(exc) not in _OUT_OF_PLACE:
                raise  # a fault of the server's own: logged with its traceback
            self._binary_packet.pop(eio_sid, None)
            self.refusals(logging.WARNING, "malformed", "closed a connection that sent a malformed packet (%s)",
                          str(exc)[:120])
            await self.eio.disconnect(eio_sid)

    async def _handle_event(self, eio_sid, namespace, id, data):
        if not isinstance(data, list) or not data or not isinstance(data[0], str) or data[0] in RESERVED_EVENTS:
            name = data[0] if isinstance(data, list) and data and isinstance(data[0], str) else "?"
            self.refusals(logging.WARNING, "reserved", "ignored an event named %r from a client", name[:40])
            return
        await super()._handle_event(eio_sid, namespace, id, data)

    async def _handle_event_internal(self, server, sid, eio_sid, data, namespace, id):
        token = ACK_REQUESTED.set(id is not None)
        try:
            return await super()._handle_event_internal(server, sid, eio_sid, data, namespace, id)
        finally:
            ACK_REQUESTED.reset(token)
