"""API tokens: 256-bit random secrets, stored only as SHA-256 hashes.

A token's *name* is the identity that owns sessions.  Revoking a name and
creating it again rotates the secret while keeping access to its sessions.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

import sqlalchemy as sa

from scribe_server.store import db
from scribe_server.store.db import tokens

TOKEN_PREFIX = "scr_"
NAME_MAX = 64


class TokenError(Exception):
    """Raised when a token command cannot be carried out (bad name, duplicate, unknown)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's row id and its name (the owner of sessions)."""

    token_id: int
    name: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class TokenStore:
    def __init__(self, engine: sa.Engine):
        self.engine = engine

    def create(self, name: str) -> str:
        """Create a token for ``name`` and return the secret (shown only once)."""
        if not name or len(name) > NAME_MAX or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise TokenError("token names are 1-64 characters of letters, digits, '-', '_' and '.'")
        with self.engine.begin() as conn:
            active = conn.execute(
                sa.select(tokens.c.id).where(tokens.c.name == name, tokens.c.revoked_at.is_(None))
            ).first()
            if active is not None:
                raise TokenError(f"an active token named {name!r} exists; revoke it first")
            secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
            conn.execute(tokens.insert().values(name=name, token_hash=hash_token(secret), created_at=db.now()))
        return secret

    def revoke(self, name: str) -> int:
        """Revoke every active token of ``name``; return how many."""
        with self.engine.begin() as conn:
            result = conn.execute(
                tokens.update()
                .where(tokens.c.name == name, tokens.c.revoked_at.is_(None))
                .values(revoked_at=db.now())
            )
        if result.rowcount == 0:
            raise TokenError(f"no active token named {name!r}")
        return result.rowcount

    def list(self) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(tokens).order_by(tokens.c.created_at))
            return [
                {"name": r.name, "createdAt": r.created_at, "revokedAt": r.revoked_at, "active": r.revoked_at is None}
                for r in rows
            ]

    def authenticate(self, secret: object) -> Principal | None:
        """The principal of an active token, or None."""
        if not isinstance(secret, str) or not 8 <= len(secret) <= 256:
            return None
        digest = hash_token(secret)
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(tokens.c.id, tokens.c.name, tokens.c.token_hash).where(
                    tokens.c.token_hash == digest, tokens.c.revoked_at.is_(None)
                )
            ).first()
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            return None
        return Principal(row.id, row.name)

    def active_ids(self, ids: set[int]) -> set[int]:
        """Those of ``ids`` that are still active (for revoking open connections)."""
        if not ids:
            return set()
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(tokens.c.id).where(tokens.c.id.in_(ids), tokens.c.revoked_at.is_(None)))
            return {row.id for row in rows}
