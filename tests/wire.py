"""Small helpers for talking to a live server with real python-socketio clients."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path

import socketio


def payload(session: str, seq: int, audio: bytes, checksum: bool = True, **extra) -> dict:
    data = {"sessionId": session, "sequence": seq, "timestamp": 1700000000000 + seq, "size": len(audio),
            "mimeType": "audio/wav", "audio": audio}
    if checksum:
        data["checksum"] = hashlib.sha256(audio).hexdigest()
    data.update(extra)
    return data


@contextlib.asynccontextmanager
async def connected(url: str, token: str | None):
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(url, auth={"token": token} if token else None, transports=["websocket"], wait_timeout=10)
    try:
        yield sio
    finally:
        await sio.disconnect()


async def call(sio: socketio.AsyncClient, event: str, data, timeout: float = 30):
    return await sio.call(event, data, timeout=timeout)


def run(coro):
    return asyncio.run(coro)


def session_dir(data_dir: Path, session: str, owner: str = "alice") -> Path:
    """Where the server keeps an owner's session (``audio/@<owner>/<session>``)."""
    return data_dir / "audio" / f"@{owner}" / session


def stored_files(data_dir: Path, session: str, owner: str = "alice") -> list[Path]:
    directory = session_dir(data_dir, session, owner)
    return sorted(p for p in directory.iterdir() if not p.name.startswith(".")) if directory.exists() else []


def temp_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "audio").glob("*/*/.*.tmp"))
