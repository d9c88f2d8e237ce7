"""Hostile connections found by the second external test (/tmp/h2, defects D1-D7): each test runs
one attack against a real server on loopback, bounded in count and time, and checks the server
answers it with a clear refusal, stays usable for everyone else, and keeps its log short."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os

import pytest
import requests

from tests.test_hardening import RawSocketIO
from tests.wire import call, connected, payload, run


def tracebacks(server) -> int:
    return server.log_path.read_text().count("Traceback")


# D5: ?limit=0 -------------------------------------------------------------------------------

@pytest.mark.parametrize("query", ["?limit=0", "?after=0&limit=0", "?limit=00"])
def test_a_page_of_no_chunks_is_refused_as_invalid_payload(server, query):
    """GET /api/sessions/ID?limit=0 is 400 invalid_payload (a page needs at least one chunk to name
    its nextAfter), never a 500; limit=1 pages on."""
    async def go():
        async with connected(server.url, server.alice) as sio:
            for seq in range(3):
                assert (await call(sio, "audio-chunk", payload("p0", seq, b"%d" % seq)))["ok"]

    run(go())
    resp = server.get(f"/api/sessions/p0{query}", server.alice)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_payload", resp.text
    one = server.get("/api/sessions/p0?limit=1", server.alice).json()
    assert [c["sequence"] for c in one["chunks"]] == [0] and one["nextAfter"] == 0 and one["chunksTruncated"]
    assert tracebacks(server) == 0


# D3: packets that cannot be decoded ---------------------------------------------------------

PLACEHOLDER = '"audio":{"_placeholder":true,"num":%s}'
MALFORMED = {
    "placeholder out of range": ('51-1["audio-chunk",{"sessionId":"w","sequence":1,%s}]' % (PLACEHOLDER % 7), True),
    "placeholder num a string": ('51-1["audio-chunk",{"sessionId":"w","sequence":1,%s}]' % (PLACEHOLDER % '"0"'), True),
    "binary event of no attachments": ('50-1["audio-chunk",{"sessionId":"w","sequence":1,%s}]' % (PLACEHOLDER % 0),
                                       True),
    "attachment count of 5,000 digits": ('5' + "9" * 5000 + '-["audio-chunk",%s]' % PLACEHOLDER % 0, True),
    "JSON nested 100k deep": ("2" + "[" * 100_000 + "]" * 100_000, False),
    "ack id of 5,000 digits": ("2" + "9" * 5000 + '["session-state",{"sessionId":"w"}]', False),
    "invalid JSON": ('21["session-state",{"sessionId":', False),
    "unknown packet type": ('7["x"]', False),
    "a CONNECT_ERROR from the client": ('4{"message":"x"}', False),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_packet_closes_its_connection_and_wedges_nothing(server, name):
    """A packet python-socketio cannot decode (a placeholder naming no attachment, a binary event of
    none, JSON nested 100k deep, an ack id of 5,000 digits) closes that connection at once, with one
    log line and no traceback; the half-built binary packet is dropped and other clients carry on."""
    text, binary = MALFORMED[name]

    async def go():
        async with RawSocketIO(server.url) as raw, connected(server.url, server.alice) as other:
            assert (await raw.connect(server.alice)).startswith("40{")
            await raw.send("4" + text)  # "4": the Engine.IO message carrying the Socket.IO packet
            if binary:
                with contextlib.suppress(Exception):
                    await raw.ws.send_bytes(os.urandom(100))
            closed = await raw.closed_within(5)
            reply = await call(other, "session-state", {"sessionId": "w"}, timeout=10)
            return closed, reply

    closed, reply = run(go())
    assert closed, "the connection was closed, not left wedged"
    assert reply["error"]["code"] == "not_found", "the other connection is answered"
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
    assert tracebacks(server) == 0, server.log_path.read_text()[-3000:]
    assert "malformed packet" in server.log_path.read_text() or "binary attachments" in server.log_path.read_text()


def test_a_binary_packet_before_the_connect_closes_the_socket(server):
    """A binary event sent before the Socket.IO connect (python-socketio: "Unexpected binary packet")
    closes the socket, without a traceback."""
    async def go():
        async with RawSocketIO(server.url) as raw:
            await raw.send('451-["audio-chunk",{"_placeholder":true,"num":0}]')
            return await raw.closed_within(5)

    assert run(go())
    assert tracebacks(server) == 0


def test_the_packet_hooks_the_adapter_relies_on_are_as_read():
    """sio_adapter's StrictPacket overrides Packet.decode and add_attachment (public, given through
    the ``serializer`` option) and recognises python-socketio's out-of-place errors by their text."""
    import inspect

    import socketio

    from scribe_server.sio_adapter import _OUT_OF_PLACE, HardenedServer, MalformedPacket, StrictPacket

    assert HardenedServer().packet_class is StrictPacket
    assert list(inspect.signature(socketio.packet.Packet.decode).parameters) == ["self", "encoded_packet"]
    assert list(inspect.signature(socketio.packet.Packet.add_attachment).parameters) == ["self", "attachment"]
    source = inspect.getsource(socketio.AsyncServer._handle_eio_message)
    assert all(f"raise ValueError('{text}')" in source for text in _OUT_OF_PLACE)
    with pytest.raises(MalformedPacket):
        StrictPacket(encoded_packet="2" + "[" * 100_000)
    packet = StrictPacket(encoded_packet='51-["audio-chunk",{"_placeholder":true,"num":"0"}]')
    with pytest.raises(MalformedPacket):
        packet.add_attachment(b"x")


def test_the_next_connection_of_the_same_client_works_after_a_wedge_attempt(server):
    """After a binary event whose placeholder points at attachment 7 was refused, a new connection
    of the same token stores the chunk the valid way."""
    async def go():
        async with RawSocketIO(server.url) as raw:
            assert (await raw.connect(server.alice)).startswith("40{")
            await raw.send('451-1["audio-chunk",{"sessionId":"w","sequence":1,"audio":{"_placeholder":true,"num":7}}]')
            with contextlib.suppress(Exception):
                await raw.ws.send_bytes(b"x" * 100)
            assert await raw.closed_within(5)
        async with connected(server.url, server.alice) as sio:
            return await call(sio, "audio-chunk", payload("w", 1, b"x" * 100))

    assert run(go())["ok"] is True


# D4: the log grows no faster than one line per kind per 10 s -----------------------------------

def test_malformed_packets_log_one_line_per_ten_seconds_without_tracebacks(server):
    """200 connections each sending 20 packets with an over-long id: the log grows by a few lines,
    not two tracebacks per packet, and a valid client is still served."""
    before = server.log_path.stat().st_size

    async def one():
        with contextlib.suppress(Exception):
            async with RawSocketIO(server.url) as raw:
                assert (await raw.connect(server.alice)).startswith("40{")
                for _ in range(20):
                    await raw.send("42" + "9" * 200 + '["x"]')
                await raw.closed_within(5)

    async def go():
        for _ in range(10):
            await asyncio.gather(*(one() for _ in range(20)))
        async with connected(server.url, server.alice) as sio:
            return await call(sio, "session-state", {"sessionId": "x"})

    assert run(go())["error"]["code"] == "not_found", "a valid client is answered"
    grown = server.log_path.read_text()[before:]
    assert tracebacks(server) == 0
    assert len(grown.splitlines()) <= 6, grown[:3000]
    assert len(grown) < 2000


# D2: exports have their own pool and a per-token cap -----------------------------------------

async def upload_long_flac(url: str, token: str, chunks: int) -> None:
    """``chunks`` chunks of 20 minutes of FLAC silence into session "long" (each export decodes them all)."""
    from tests.test_hardening import _flac_silence

    long = _flac_silence(1200)
    async with connected(url, token) as sio:
        for seq in range(chunks):
            reply = await call(sio, "audio-chunk", payload("long", seq, long, mimeType="audio/flac",
                                                           durationMs=1_200_000))
            assert reply["ok"], reply

def test_one_tokens_exports_never_hold_up_another_tokens_login(server_factory):
    """Bob asks for 16 long FLAC exports at once: 2 run (--max-exports-per-token), 14 are answered
    429 too_many_in_flight at once, and meanwhile Alice logs in and lists her sessions promptly."""
    import time

    import aiohttp

    srv = server_factory()
    alice, bob = srv.token("alice"), srv.token("bob")
    srv.start()

    async def go():
        await upload_long_flac(srv.url, bob, 2)
        async with aiohttp.ClientSession() as http:
            async def export():
                async with http.get(srv.url + "/api/sessions/long/audio?format=flac",
                                    headers={"Authorization": f"Bearer {bob}"},
                                    timeout=aiohttp.ClientTimeout(total=300)) as resp:
                    body = await resp.read()
                    return resp.status, (json.loads(body)["error"]["code"] if resp.status != 200 else len(body))

            exports = [asyncio.create_task(export()) for _ in range(16)]
            await asyncio.sleep(1.5)  # the exports are decoding
            started = time.monotonic()
            async with connected(srv.url, alice) as sio:
                login = time.monotonic() - started
                state = await call(sio, "session-state", {"sessionId": "long"}, timeout=10)
            listed = requests.get(srv.url + "/api/sessions", headers={"Authorization": f"Bearer {alice}"},
                                  timeout=10)
            api = time.monotonic() - started
            return login, api, state, listed.status_code, await asyncio.gather(*exports)

    login, api, state, listed, exports = run(go())
    assert login < 2.0 and api < 3.0, (login, api)
    assert state["error"]["code"] == "not_found", "Alice does not see Bob's session"
    assert listed == 200
    refused = [e for e in exports if e[0] == 429]
    assert len(refused) == 14 and {code for _, code in refused} == {"too_many_in_flight"}, exports
    assert all(status == 200 and size > 1000 for status, size in exports if status != 429)
    assert tracebacks(srv) == 0


# D1: memory a client without a token can make the server hold -------------------------------

def test_websockets_without_a_token_cannot_make_the_server_hold_big_messages(server):
    """20 WebSockets that never authenticate each send 2 binary frames of 15 MiB (600 MiB offered):
    each is aborted after 16 KiB, the server's memory stays flat, and an authenticated client
    connects at once and still stores an 8 MiB chunk."""
    import time

    import aiohttp

    from tests.test_hardening import rss_kib

    base = rss_kib(server.proc.pid)
    blob = os.urandom(15 << 20)

    async def hostile(http):
        with contextlib.suppress(Exception):
            ws = await http.ws_connect(server.url.replace("http://", "ws://")
                                       + "/socket.io/?EIO=4&transport=websocket", max_msg_size=0)
            await ws.receive(timeout=10)
            for _ in range(2):
                await ws.send_bytes(blob)
            await asyncio.sleep(2)
            await ws.close()

    async def go():
        async with aiohttp.ClientSession() as http:
            attack = asyncio.gather(*(hostile(http) for _ in range(20)))
            await asyncio.sleep(0.5)
            started = time.monotonic()
            async with connected(server.url, server.alice) as sio:
                login = time.monotonic() - started
                reply = await call(sio, "audio-chunk", payload("big", 0, os.urandom(8 << 20)), timeout=60)
            await attack
        return login, reply

    login, reply = run(go())
    peak = rss_kib(server.proc.pid, "VmHWM") - base
    assert peak < 120 * 1024, f"peak grew by {peak // 1024} MiB"
    assert login < 2.0 and reply["ok"] is True, (login, reply)
    assert "before authenticating" in server.log_path.read_text()
    assert tracebacks(server) == 0


def test_a_websocket_authenticated_by_its_connect_may_send_full_size_messages(server):
    """The pre-authentication budget ends with the Socket.IO connect: a raw client that connected
    sends a 1 MiB text event and gets its (error) reply, not a closed socket."""
    async def go():
        async with RawSocketIO(server.url) as raw:
            assert (await raw.connect(server.alice)).startswith("40{")
            await raw.send('421["session-state",{"sessionId":"x","pad":"' + "y" * (1 << 20) + '"}]')
            return await raw.receive()

    reply = run(go())
    assert reply is not None and reply.startswith("431[")


# D7: one token cannot take every connection slot ------------------------------------------

def test_one_token_cannot_take_every_connection_slot(server_factory):
    """--max-connections 5 --max-connections-per-token 3: Bob's 4th connection is refused with
    too_many_in_flight while Alice still connects; at the server's limit the refusal is server_busy."""
    import socketio

    srv = server_factory(extra_args=("--max-connections", "5", "--max-connections-per-token", "3"))
    alice, bob, carol = srv.token("alice"), srv.token("bob"), srv.token("carol")
    srv.start()

    async def refusal(token):
        codes = []
        client = socketio.AsyncClient(reconnection=False)
        client.on("connect_error", lambda data: codes.append((data.get("data") or {}).get("code")
                                                             if isinstance(data, dict) else data))
        with contextlib.suppress(socketio.exceptions.ConnectionError):
            await client.connect(srv.url, auth={"token": token}, transports=["websocket"], wait_timeout=10)
            await client.disconnect()
            return "connected"
        return codes[0] if codes else "?"

    async def go():
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(3):
                await stack.enter_async_context(connected(srv.url, bob))
            over_token = await refusal(bob)
            for _ in range(2):
                await stack.enter_async_context(connected(srv.url, alice))
            over_server = await refusal(carol)
        return over_token, over_server

    assert run(go()) == ("too_many_in_flight", "server_busy")


def test_an_export_whose_client_left_keeps_its_place_until_its_thread_is_done(server_factory):
    """Bob starts 2 long exports and hangs up at once: they still count against his 2 until their
    threads finish (a third is 429 meanwhile), so hanging up and asking again piles up no work."""
    import time

    import aiohttp

    srv = server_factory()
    bob = srv.token("bob")
    srv.start()

    async def go():
        await upload_long_flac(srv.url, bob, 6)
        url, headers = srv.url + "/api/sessions/long/audio?format=flac", {"Authorization": f"Bearer {bob}"}
        async with aiohttp.ClientSession() as http:
            async def export():
                async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=300)) as resp:
                    await resp.read()
                    return resp.status

            left = [asyncio.create_task(export()) for _ in range(2)]
            await asyncio.sleep(0.5)
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)
            async with http.get(url, headers=headers) as resp:
                meanwhile = resp.status
            started = time.monotonic()
            while time.monotonic() - started < 120:
                async with http.get(url, headers=headers) as resp:
                    if resp.status == 200:
                        await resp.read()
                        return meanwhile, 200
                await asyncio.sleep(0.5)
            return meanwhile, None

    assert run(go()) == (429, 200)
    assert tracebacks(srv) == 0


def _ws_text_frame(text: str) -> bytes:
    """One masked WebSocket text frame, as a client sends it."""
    data, mask = text.encode(), os.urandom(4)
    size = len(data)
    header = bytes([0x81]) + (bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + size.to_bytes(2, "big"))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def test_a_client_that_sends_and_never_reads_is_closed_before_its_replies_pile_up(server):
    """A logged-in client asks for a large gap report again and again (50 bytes each, ~60 KB each
    reply) and never reads its socket: the server closes it once 256 replies wait, and its memory
    stays bounded (it grew by ~870 MiB in 25 s before)."""
    import socket
    import time

    from tests.test_hardening import rss_kib

    async def sparse():
        async with connected(server.url, server.alice) as sio:
            for seq in (0, 2**31 - 1):
                assert (await call(sio, "audio-chunk", payload("sparse", seq, b"a")))["ok"]

    run(sparse())
    base = rss_kib(server.proc.pid)
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    time.sleep(0.3)
    sock.sendall(_ws_text_frame("40" + json.dumps({"token": server.alice})))
    time.sleep(0.5)
    burst = _ws_text_frame('421["session-state",{"sessionId":"sparse"}]') * 50
    sock.setblocking(False)
    closed, peak, started = False, 0, time.monotonic()
    try:
        while time.monotonic() - started < 20 and not closed:
            try:
                sock.send(burst)
            except BlockingIOError:
                time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            peak = max(peak, rss_kib(server.proc.pid) - base)
            closed = closed or "does not read its replies" in server.log_path.read_text()
    finally:
        sock.close()
    assert closed, "the server kept queueing replies for a client that does not read"
    assert peak < 200 * 1024, f"the server grew by {peak // 1024} MiB"
    assert tracebacks(server) == 0
    run(sparse())  # and everyone else (this token too) goes on
