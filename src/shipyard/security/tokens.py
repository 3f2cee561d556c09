"""API tokens: shown once at creation, stored only as a SHA-256 hash.

Tokens are 256 random bits, so a fast hash is enough (no password stretching needed); the stored
prefix lets a user tell tokens apart without revealing them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select

from shipyard.context import Context, new_id
from shipyard.domain.models import Token
from shipyard.domain.names import validate_name
from shipyard.errors import AuthenticationError
from shipyard.security import audit
from shipyard.store.tables import TokenRow, aware, utcnow

TOKEN_PREFIX = "shp_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(ctx: Context, *, name: str) -> tuple[Token, str]:
    """Create a token; returns its record and the secret, which is never stored or shown again."""
    validate_name(name, field="name")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = TokenRow(id=new_id(), name=name, prefix=secret[:10], token_hash=hash_token(secret))
    with ctx.db.transaction() as s:
        s.add(row)
        audit.record(s, actor=ctx.actor, action="token.create", resource=f"token/{row.id}",
                     details={"name": name})
        s.flush()
        token = _to_domain(row)
    return token, secret


def authenticate(ctx: Context, *, secret: str | None) -> str:
    """Return the actor name for a presented token, or raise :class:`AuthenticationError`."""
    if not secret:
        raise AuthenticationError(
            "this server requires an API token: pass 'Authorization: Bearer <token>' "
            "(create one with 'shipyard token create NAME' on the server host)",
            field="token",
        )
    digest = hash_token(secret)
    with ctx.db.read() as s:
        row = s.scalar(select(TokenRow).where(TokenRow.token_hash == digest))
        # compare_digest keeps the final comparison constant-time
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            raise AuthenticationError(
                "the API token is not valid (revoked or mistyped?)", field="token"
            )
        return f"token:{row.name}"


def list_tokens(ctx: Context) -> list[Token]:
    with ctx.db.read() as s:
        return [_to_domain(r) for r in s.scalars(select(TokenRow).order_by(TokenRow.created_at))]


def _to_domain(row: TokenRow) -> Token:
    return Token(id=row.id, name=row.name, prefix=row.prefix,
                 created_at=aware(row.created_at) or utcnow(), last_used_at=aware(row.last_used_at))
