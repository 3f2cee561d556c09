"""Several real processes writing one database at once: no "database is locked", no lost update,
and an audit chain that still verifies (which needs ``store.engine.lock`` to serialise writers)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from shipyard.security import audit
from shipyard.store import open_database
from shipyard.store.migrate import current_revision, head_revision
from shipyard.store.tables import AuditEventRow, LockRow
from tests.store import workers

WORKERS = 4
WRITES = 200


def run_workers(mode: str, url: str, *, count: int, processes: int = WORKERS) -> None:
    """Start ``processes`` workers, release them together once all are ready, wait for all."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(workers.__file__)), mode, url, str(i), str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", (
                proc.communicate(timeout=60)
            )
        for proc in procs:  # the barrier: every worker is waiting on its stdin now
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [proc.communicate(timeout=240) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (out, err) in zip(procs, results, strict=True):
        assert "database is locked" not in err
        assert proc.returncode == 0, err
        assert out.strip() == "done", (out, err)


@pytest.mark.slow
def test_concurrent_audit_writers_keep_one_valid_chain(db_url: str) -> None:
    db = open_database(db_url)

    run_workers("audit", db_url, count=WRITES)

    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(AuditEventRow)) == WORKERS * WRITES
        assert audit.verify_chain(s) is None
        events = audit.list_events(s, limit=WORKERS * WRITES)
    # one chain, in seq order, each event linked to the one before it
    assert [e.prev_hash for e in events[1:]] == [e.hash for e in events[:-1]]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    for worker in range(WORKERS):  # each worker's own events kept their order
        ns = [e.details["n"] for e in events if e.actor == f"worker-{worker}"]
        assert ns == list(range(WRITES))


@pytest.mark.slow
def test_lock_serialises_read_modify_write_on_new_lock_names(db_url: str) -> None:
    """Every write takes a lock nobody has used yet, so the workers also race to create it."""
    db = open_database(db_url)
    count = 50

    run_workers("tally", db_url, count=count)

    with db.read() as s:
        for n in range(count):
            tally = s.get(LockRow, f"{workers.TALLY_ROW}-{n}")
            assert tally is not None and tally.acquired_at == WORKERS, n  # no update lost
            assert s.get(LockRow, f"{workers.TALLY_LOCK}-{n}") is not None


@pytest.mark.slow
def test_processes_opening_a_new_database_at_once_migrate_it_once(db_url: str) -> None:
    run_workers("open", db_url, count=0)

    db = open_database(db_url)
    assert current_revision(db.engine) == head_revision()
    with db.read() as s:
        assert {r.name for r in s.scalars(select(LockRow))} == {"scheduler", "audit", "deployments"}
