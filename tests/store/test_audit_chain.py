"""The keyed, anchored audit chain (``security.audit``) on each backend: tampering is found.

Each tamper below is what someone with write access to the database (but not to the key folder)
can do; before the chain was keyed and anchored, deleting the newest events, deleting all of them,
or editing one and recomputing the rest all passed ``verify_chain``.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from shipyard.domain.models import AuditVerification
from shipyard.errors import InvalidStateError
from shipyard.security import audit
from shipyard.store import Database, open_database
from shipyard.store.engine import forget_database
from shipyard.store.tables import AuditEventRow
from tests.pg import create_database, drop_database
from tests.store.test_concurrency import WORKERS, run_workers

WRONG_KEY = b"k" * 32


def key_file() -> Path:
    return Path(os.environ["SHIPYARD_AUDIT_KEY_FILE"])


def head_file() -> Path:
    return key_file().with_name("audit.head")


def write_events(db: Database, count: int, *, start: int = 0) -> list[int]:
    for n in range(start, start + count):
        with db.transaction() as s:
            audit.record(
                s,
                actor="tester",
                action="test.write",
                resource=f"test/{n}",
                details={"n": n, "nested": {"ok": True, "x": [1.5, "é"]}},
            )
    return seqs_of(db)


def seqs_of(db: Database) -> list[int]:
    with db.read() as s:
        return list(s.scalars(select(AuditEventRow.seq).order_by(AuditEventRow.seq)))


def report(db: Database, **kwargs: float) -> AuditVerification:
    with db.read() as s:
        return audit.verify(s, **kwargs)


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
    result = report(db)
    assert result.ok and result.events == 5 and result.head_seq == seqs[-1]
    assert result.legacy_through == 0


def test_the_key_lives_outside_the_database_owner_only(db_url: str) -> None:
    db = open_database(db_url)
    write_events(db, 2)
    key = json.loads(key_file().read_text())["key"]
    for path in (key_file(), head_file()):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(key_file().parent.stat().st_mode) == 0o700
    with db.read() as s:  # nowhere in the events (nor anywhere else: it is never written there)
        rows = s.scalars(select(AuditEventRow)).all()
    assert all(key not in json.dumps([r.details, r.hash, r.prev_hash]) for r in rows)
    if db.is_sqlite:
        assert key.encode() not in Path(db.engine.url.database or "").read_bytes()
    assert all(key not in value for value in os.environ.values())


def _edit_details(s: Session, seq: int) -> None:
    s.execute(update(AuditEventRow).where(AuditEventRow.seq == seq).values(details={"n": 99}))


def _edit_actor(s: Session, seq: int) -> None:
    s.execute(update(AuditEventRow).where(AuditEventRow.seq == seq).values(actor="mallory"))


def _delete(s: Session, seq: int) -> None:
    s.execute(delete(AuditEventRow).where(AuditEventRow.seq == seq))


def _delete_newest(s: Session, seq: int) -> None:
    s.execute(delete(AuditEventRow).where(AuditEventRow.seq > seq))


def _delete_all(s: Session, seq: int) -> None:
    s.execute(delete(AuditEventRow))


def _unkeyed(row: AuditEventRow) -> str:
    return audit._hash(row.prev_hash, row.at, row.actor, row.action, row.resource, row.details)


def _wrong_key(row: AuditEventRow) -> str:
    return audit._mac(
        WRONG_KEY, row.prev_hash, row.at, row.actor, row.action, row.resource, row.details
    )


def _forge_from(seq: int, s: Session, formula: Callable[[AuditEventRow], str]) -> None:
    """Edit event ``seq`` and recompute its hash and every later one's (the full forgery)."""
    rows = s.scalars(select(AuditEventRow).where(AuditEventRow.seq >= seq).order_by("seq")).all()
    prev = (
        s.scalar(
            select(AuditEventRow.hash)
            .where(AuditEventRow.seq < seq)
            .order_by(AuditEventRow.seq.desc())
            .limit(1)
        )
        or audit.GENESIS
    )
    # the hash column is unique: park the old values first
    for row in rows:
        row.hash = f"tmp{row.seq}"
    s.flush()
    for row in rows:
        if row.seq == seq:
            row.resource = "test/forged"
        row.prev_hash = prev
        row.hash = prev = formula(row)
    s.flush()


def _rehash_unkeyed(s: Session, seq: int) -> None:
    _forge_from(seq, s, _unkeyed)


def _rehash_wrong_key(s: Session, seq: int) -> None:
    _forge_from(seq, s, _wrong_key)


def _rehash_only_itself(s: Session, seq: int) -> None:
    row = s.get(AuditEventRow, seq)
    assert row is not None
    row.resource = "test/forged"
    row.hash = _unkeyed(row)


@pytest.mark.parametrize(
    ("tamper", "first_broken"),
    [
        (_edit_details, 2),
        (_edit_actor, 2),
        (_delete, 3),
        (_rehash_only_itself, 2),
        (_rehash_unkeyed, 2),
        (_rehash_wrong_key, 2),
        (_delete_newest, 3),
        (_delete_all, 0),
    ],
    ids=[
        "details",
        "actor",
        "delete",
        "rehash-itself",
        "rehash-rest-unkeyed",
        "rehash-rest-wrong-key",
        "delete-newest",
        "delete-all",
    ],
)
def test_a_tampered_event_is_found(
    db_url: str, tamper: Callable[[Session, int], None], first_broken: int
) -> None:
    db = open_database(db_url)
    seqs = write_events(db, 5)
    with db.transaction() as s:
        tamper(s, seqs[2])
    result = report(db)
    assert not result.ok and result.first_bad_seq == seqs[first_broken], result
    with db.read() as s:
        assert audit.verify_chain(s) == seqs[first_broken]


def test_truncation_stays_visible_while_new_events_arrive(db_url: str) -> None:
    """Appending after a truncation must not re-anchor the head over the gap (laundering)."""
    db = open_database(db_url)
    seqs = write_events(db, 5)
    with db.transaction() as s:
        _delete_newest(s, seqs[1])
    write_events(db, 6, start=10)  # enough to pass the old head's seq, whatever the numbering
    result = report(db)
    assert not result.ok and result.head_seq == seqs[-1], result


def test_a_missing_forged_or_rolled_back_head_is_found(db_url: str) -> None:
    db = open_database(db_url)
    seqs = write_events(db, 2)
    old_head = head_file().read_bytes()
    seqs = write_events(db, 3, start=2)
    assert report(db).ok

    head_file().write_bytes(old_head)  # rolled back: the events after it are not anchored
    assert report(db).ok  # within the grace a writer may still be between commit and head write
    result = report(db, lag_grace_s=0)
    assert not result.ok and result.first_bad_seq == seqs[2], result
    assert "rolled back" in (result.problem or "")

    forged = {"version": 1, "seq": seqs[-1] + 5, "hash": "0" * 64, "mac": "0" * 64}  # no key
    head_file().write_text(json.dumps(forged))
    result = report(db)
    assert not result.ok and "missing or not signed" in (result.problem or "")

    head_file().unlink()
    result = report(db)
    assert not result.ok and result.head_seq is None and "missing" in (result.problem or "")
    write_events(db, 1, start=9)  # a writer does not recreate a missing head: still found
    assert not head_file().exists() and not report(db).ok


def test_a_deleted_key_is_refused_not_replaced(db_url: str) -> None:
    db = open_database(db_url)
    write_events(db, 2)
    key_file().unlink()
    audit._anchors.clear()  # as a new process would start
    with pytest.raises(InvalidStateError, match=r"audit key .* is missing") as info:
        write_events(db, 1)
    assert info.value.field == "SHIPYARD_AUDIT_KEY_FILE"
    assert len(seqs_of(db)) == 2  # nothing stored


def test_events_from_before_the_key_verify_and_stay_pinned(db_url: str) -> None:
    """A home upgraded from the unkeyed chain: its old events keep their SHA-256 hashes."""
    db = open_database(db_url)
    _write_legacy(db, 3)
    write_events(db, 2, start=3)  # the first keyed append creates the key, pinning event 3
    seqs = seqs_of(db)
    result = report(db)
    assert result.ok and result.legacy_through == seqs[2] and result.events == 5, result
    assert json.loads(key_file().read_text())["legacy_through"] == seqs[2]

    with db.transaction() as s:  # a forged legacy event, the legacy rest recomputed unkeyed
        rows = s.scalars(select(AuditEventRow).where(AuditEventRow.seq <= seqs[2])).all()
        for row in rows:
            row.hash = f"tmp{row.seq}"
        s.flush()
        prev = audit.GENESIS
        for row in sorted(rows, key=lambda r: r.seq):
            row.details = {"n": 99} if row.seq == seqs[1] else row.details
            row.prev_hash = prev
            row.hash = prev = _unkeyed(row)
    result = report(db)
    assert not result.ok and result.first_bad_seq == seqs[2], result


def test_a_legacy_tail_deleted_before_any_keyed_event_is_found(db_url: str) -> None:
    db = open_database(db_url)
    _write_legacy(db, 3)
    assert report(db).ok  # verify creates the key, pinning the tail
    with db.transaction() as s:
        _delete_all(s, 0)
    result = report(db)
    assert not result.ok and result.first_bad_seq == 1, result


def test_concurrent_writers_keep_one_valid_chain_and_the_head_at_the_end(db_url: str) -> None:
    db = open_database(db_url)
    count = 60
    run_workers("audit", db_url, count=count)
    seqs = seqs_of(db)
    assert len(seqs) == WORKERS * count
    result = report(db, lag_grace_s=0)
    assert result.ok and result.head_seq == seqs[-1], result
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(AuditEventRow)) == WORKERS * count


def test_chain_verifies_whatever_the_postgresql_session_time_zone(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL hands timestamps back in the session's TimeZone; the hash covers UTC."""
    monkeypatch.setenv("SHIPYARD_AUDIT_KEY_FILE", str(tmp_path / "keys" / "audit.key"))
    url = create_database(postgres_url)
    elsewhere = url + "?options=-c%20timezone%3DAsia/Kolkata"
    try:
        write_events(open_database(url), 2)
        db = open_database(elsewhere)
        write_events(db, 2, start=2)
        with db.read() as s:
            assert audit.verify_chain(s) is None
            assert all(e.at.utcoffset().total_seconds() == 0 for e in audit.list_events(s))
        with open_database(url).read() as s:
            assert audit.verify_chain(s) is None
    finally:
        forget_database(elsewhere)
        forget_database(url)
        drop_database(url)


def test_a_database_without_a_configured_key_is_refused(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SHIPYARD_AUDIT_KEY_FILE", raising=False)
    url = create_database(postgres_url)
    try:
        db = open_database(url)
        with pytest.raises(InvalidStateError, match="no audit key configured"):
            write_events(db, 1)
        assert seqs_of(db) == []
    finally:
        forget_database(url)
        drop_database(url)


def test_a_sqlite_file_opened_directly_keeps_its_key_beside_it(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same place a Context on that home would use: ``<home>/keys/audit.key``."""
    monkeypatch.delenv("SHIPYARD_AUDIT_KEY_FILE", raising=False)
    db = open_database(sqlite_url)
    write_events(db, 2)
    assert (tmp_path / "keys" / "audit.key").is_file()
    assert (tmp_path / "keys" / "audit.head").is_file()
    assert report(db).ok
    shutil.rmtree(tmp_path / "keys")
    audit._anchors.clear()
    assert not report(db).ok  # a new key is made, and the events do not verify under it


def _write_legacy(db: Database, count: int) -> None:
    """Events as the unkeyed chain wrote them (before 0004): plain SHA-256, no key file."""
    with db.transaction() as s:
        prev = audit.GENESIS
        for n in range(count):
            row = AuditEventRow(
                at=audit.utcnow(),
                actor="old",
                action="test.legacy",
                resource=f"test/{n}",
                details={"n": n},
                prev_hash=prev,
                hash="",
            )
            row.hash = audit._hash(prev, row.at, row.actor, row.action, row.resource, row.details)
            prev = row.hash
            s.add(row)
            s.flush()
    assert not key_file().exists()


def test_a_torn_head_write_leaves_the_other_slot(db_url: str) -> None:
    """The head is two slots written in turn: spoiling the newest falls back to the older one."""
    db = open_database(db_url)
    seqs = write_events(db, 3)
    data = bytearray(head_file().read_bytes())
    newest = 0 if json.loads(data[:256])["seq"] == seqs[-1] else 1
    data[newest * 256 : newest * 256 + 40] = b"\0" * 40  # as if the write stopped half-way
    head_file().write_bytes(bytes(data))
    result = report(db)
    assert result.ok and result.head_seq == seqs[-2], result  # behind by one, within the grace
    seqs = write_events(db, 1, start=3)  # the next event re-anchors, over the spoilt slot
    result = report(db, lag_grace_s=0)
    assert result.ok and result.head_seq == seqs[-1], result
