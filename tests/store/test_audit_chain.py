"""The hash-chained audit log (``security.audit``) on each backend: tampering is found."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from shipyard.security import audit
from shipyard.store import Database, open_database
from shipyard.store.engine import forget_database
from shipyard.store.tables import AuditEventRow
from tests.pg import create_database, drop_database


def write_events(db: Database, count: int) -> list[int]:
    for n in range(count):
        with db.transaction() as s:
            audit.record(
                s,
                actor="tester",
                action="test.write",
                resource=f"test/{n}",
                details={"n": n, "nested": {"ok": True, "x": [1.5, "é"]}},
            )
    with db.read() as s:
        return list(s.scalars(select(AuditEventRow.seq).order_by(AuditEventRow.seq)))


def test_an_empty_and_an_intact_chain_verify(db_url: str) -> None:
    db = open_database(db_url)
    with db.read() as s:
        assert audit.verify_chain(s) is None
    seqs = write_events(db, 5)
    with db.read() as s:
        assert audit.verify_chain(s) is None
        events = audit.list_events(s, after=seqs[1], limit=2)
    assert [e.seq for e in events] == seqs[2:4]
    assert events[0].prev_hash != audit.GENESIS and events[0].details["n"] == 2


def _edit_details(s: Session, seq: int) -> None:
    s.execute(update(AuditEventRow).where(AuditEventRow.seq == seq).values(details={"n": 99}))


def _edit_actor(s: Session, seq: int) -> None:
    s.execute(update(AuditEventRow).where(AuditEventRow.seq == seq).values(actor="mallory"))


def _delete(s: Session, seq: int) -> None:
    s.execute(delete(AuditEventRow).where(AuditEventRow.seq == seq))


def _rehash(s: Session, seq: int) -> None:
    """Alter an event and recompute its own hash: the next event's link still breaks."""
    row = s.get(AuditEventRow, seq)
    assert row is not None
    row.resource = "test/forged"
    row.hash = audit._hash(row.prev_hash, row.at, row.actor, row.action, row.resource, row.details)


@pytest.mark.parametrize(
    ("tamper", "first_broken"),
    [(_edit_details, 2), (_edit_actor, 2), (_delete, 3), (_rehash, 3)],
    ids=["details", "actor", "delete", "rehash"],
)
def test_a_tampered_event_is_found(
    db_url: str, tamper: Callable[[Session, int], None], first_broken: int
) -> None:
    db = open_database(db_url)
    seqs = write_events(db, 5)
    with db.transaction() as s:
        tamper(s, seqs[2])
    with db.read() as s:
        assert audit.verify_chain(s) == seqs[first_broken]


def test_chain_verifies_whatever_the_postgresql_session_time_zone(postgres_url: str) -> None:
    """PostgreSQL hands timestamps back in the session's TimeZone; the hash covers UTC."""
    url = create_database(postgres_url)
    elsewhere = url + "?options=-c%20timezone%3DAsia/Kolkata"
    try:
        write_events(open_database(url), 2)
        db = open_database(elsewhere)
        write_events(db, 2)
        with db.read() as s:
            assert audit.verify_chain(s) is None
            assert all(e.at.utcoffset().total_seconds() == 0 for e in audit.list_events(s))
        with open_database(url).read() as s:
            assert audit.verify_chain(s) is None
    finally:
        forget_database(elsewhere)
        forget_database(url)
        drop_database(url)
