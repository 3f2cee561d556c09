"""security.tokens: a token authenticates, is stored only as a hash, and bad ones are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from shipyard.context import Context
from shipyard.errors import AuthenticationError, InvalidInputError
from shipyard.security import audit
from shipyard.security.tokens import (
    TOKEN_PREFIX,
    authenticate,
    create_token,
    hash_token,
    list_tokens,
)
from shipyard.store.tables import AuditEventRow, TokenRow


def database_bytes(home: Path) -> bytes:
    """Everything SQLite has on disk for the home: the main file, its WAL and shared memory."""
    files = sorted(home.glob("shipyard.db*"))
    assert home / "shipyard.db" in files
    return b"".join(f.read_bytes() for f in files)


def test_a_created_token_authenticates(ctx: Context) -> None:
    token, secret = create_token(ctx, name="ci")

    assert secret.startswith(TOKEN_PREFIX) and len(secret) > 40
    assert token.name == "ci" and secret.startswith(token.prefix)
    assert authenticate(ctx, secret=secret).actor == "user:admin"  # the local admin's token
    assert [t.id for t in list_tokens(ctx)] == [token.id]


def test_tokens_are_different_every_time(ctx: Context) -> None:
    _, first = create_token(ctx, name="a")
    _, second = create_token(ctx, name="a")
    assert first != second
    assert authenticate(ctx, secret=first) == authenticate(ctx, secret=second)


def test_the_secret_is_stored_only_as_its_hash(ctx: Context, home: Path) -> None:
    token, secret = create_token(ctx, name="ci")

    with ctx.db.read() as s:
        row = s.scalars(select(TokenRow)).one()
        stored = [str(v) for v in s.execute(text("SELECT * FROM tokens")).one()]
        events = audit.list_events(s)
    assert row.token_hash == hash_token(secret) != secret
    assert not any(secret in value or secret[len(token.prefix) :] in value for value in stored)
    assert all(secret not in repr(e.model_dump()) for e in events)

    raw = database_bytes(home)
    assert row.token_hash.encode() in raw  # the scan does see the table's contents
    assert secret.encode() not in raw
    assert secret[len(token.prefix) :].encode() not in raw  # nor the part the prefix hides


@pytest.mark.parametrize(
    "presented",
    [
        "",
        None,
        "shp_",
        "shp_wrong",
        "{secret}x",
        "{secret_short}",
        "{secret_upper}",
        "{hash}",
        "{prefix}",
        " {secret}",
    ],
    ids=[
        "empty",
        "none",
        "bare-prefix",
        "wrong",
        "longer",
        "shorter",
        "case",
        "stored-hash",
        "visible-prefix",
        "leading-space",
    ],
)
def test_a_wrong_or_missing_token_is_refused(ctx: Context, presented: str | None) -> None:
    token, secret = create_token(ctx, name="ci")
    if presented is not None:
        presented = presented.format(
            secret=secret,
            secret_short=secret[:-1],
            secret_upper=secret.upper(),
            hash=hash_token(secret),
            prefix=token.prefix,
        )
    with pytest.raises(AuthenticationError) as caught:
        authenticate(ctx, secret=presented)
    assert caught.value.field == "token"
    assert "token" in caught.value.message
    assert caught.value.http_status == 401


@pytest.mark.parametrize("name", ["", "../x", "a b", "a/b", "x" * 129, "tok."])
def test_a_bad_token_name_is_rejected_and_nothing_is_stored(ctx: Context, name: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        create_token(ctx, name=name)
    assert caught.value.field == "name" and caught.value.message.startswith("name ")
    with ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(TokenRow)) == 0
        assert s.scalar(select(func.count()).select_from(AuditEventRow)) == 0


def test_creating_a_token_is_audited(ctx: Context) -> None:
    token, _ = create_token(ctx, name="ci")
    with ctx.db.read() as s:
        events = audit.list_events(s)
        assert audit.verify_chain(s) is None
    assert [(e.actor, e.action, e.resource, e.details) for e in events] == [
        ("tester", "token.create", f"token/{token.id}", {"name": "ci", "principal": "admin"})
    ]
