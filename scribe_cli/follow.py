"""Following a session live: ``chunk-stored`` events from whichever node stored them.

The follower joins the session's room (``session-follow``) and receives a
``chunk-stored`` event per newly stored chunk; with several nodes the events
travel through Redis.  It refreshes the gap report every second, and ends
when the session is complete (unless asked to follow forever).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Callable


import scribe_protocol as proto
from scribe_cli import sio as sio_clients
from scribe_cli.config import Settings
from scribe_cli.errors import AuthError, NotFound, ScribeError, ServerUnreachable
from scribe_cli.sio import socketio
import aiohttp  # (after socketio, which imports it: see scribe_cli/sio.py)

Listener = Callable[[str, dict], None]


@dataclass
class FollowState:
    session: str
    stored: set[int] = field(default_factory=set)
    report: dict = field(default_factory=dict)
    connected: bool = False
    events: int = 0

    def to_json(self) -> dict:
        return {"session": self.session, "events": self.events, "report": self.report}


async def follow(settings: Settings, session: str, listener: Listener, state: FollowState,
                 until_complete: bool = True, give_up_after: float = 0.0, stop: asyncio.Event | None = None) -> None:
    """Follow ``session`` until it is complete (or ``stop``)."""
    token = settings.require_token()
    sio = sio_clients.AsyncClient(reconnection=True, reconnection_delay=0.5, reconnection_delay_max=5)
    refusal: dict = {}

    @sio.on("connect_error")
    def _refused(data=None):
        refusal["data"] = data

    @sio.on(proto.CHUNK_STORED)
    def _stored(data):
        if isinstance(data, dict) and data.get("sessionId") == session:
            state.stored.add(data["sequence"])
            state.events += 1
            listener("stored", data)

    @sio.on("disconnect")
    def _gone(*args):
        state.connected = False
        listener("disconnected", {})

    try:
        await sio.connect(settings.server, auth={"token": token}, transports=["websocket"], wait_timeout=10)
    except (socketio.exceptions.ConnectionError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        # (aiohttp.ClientError: a server that answers, but not HTTP - "Bad status line")
        from scribe_cli.upload import close_http, connect_failure

        await close_http(sio)  # else aiohttp warns "Unclosed client session"
        message = (refusal.get("data") or {}).get("message", "") if isinstance(refusal.get("data"), dict) else ""
        if message.startswith("unauthorized"):
            raise AuthError("the server refused the token") from None
        raise ServerUnreachable(f"cannot reach the server at {settings.server} ({connect_failure(exc)})") from None
    try:
        await _loop(sio, session, listener, state, until_complete, give_up_after, stop)
    finally:  # also when cancelled by a stop request: leave the room and close the connection
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(sio.disconnect(), 2)


async def _loop(sio, session, listener, state, until_complete, give_up_after, stop) -> None:
    joined = False
    waited = 0.0
    while not (stop and stop.is_set()):
        try:
            if not joined or not state.connected:
                reply = await sio.call(proto.SESSION_FOLLOW, {"sessionId": session}, timeout=10)
                if not reply.get("ok"):
                    if reply["error"]["code"] == "not_found" and waited >= give_up_after:
                        raise NotFound(f"the server has no session {session} for this token",
                                       "check the session id (scribe sessions) and the token, or --wait SECONDS "
                                       "for a session that has not started yet")
                    if reply["error"]["code"] != "not_found":
                        raise ScribeError(f"cannot follow {session}: {reply['error']['message']}",
                                          "check the session id (scribe sessions) and the token")
                    listener("waiting", {"reason": "the session does not exist yet"})
                    waited += 1.0
                    await asyncio.sleep(1.0)
                    continue
                joined, state.connected = True, True
                listener("following", {"session": session})
            reply = await sio.call(proto.SESSION_STATE, {"sessionId": session}, timeout=10)
            if reply.get("ok"):
                state.report = {k: v for k, v in reply.items() if k not in ("ok", "held")}
                listener("state", state.report)
                if until_complete and reply.get("complete"):
                    return
        except (socketio.exceptions.TimeoutError, socketio.exceptions.BadNamespaceError,
                socketio.exceptions.DisconnectedError):
            joined = False
        await asyncio.sleep(1.0)
