"""The metadata store on a full disk (a real tmpfs): reads keep working, writes fail as a storage
fault with nothing changed, and once there is room again writes work again - also on the
connections a long-lived process already holds."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from shipyard.errors import StorageUnavailableError, storage_fault
from shipyard.store.engine import forget_database, open_database
from shipyard.store.tables import ProjectRow
from tests.conftest import wait_for
from tests.mounts import fill, tmpfs


def test_a_full_disk_leaves_the_database_readable_and_recovers(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", size_kb=2048) as disk:
        url = f"sqlite:///{disk / 'shipyard.db'}"
        db = open_database(url)
        with db.transaction() as s:
            s.add(ProjectRow(id="p1", name="before"))
        with db.read() as s:
            names = set(s.scalars(select(ProjectRow.name)))
        forget_database(url)  # the last connection closes: SQLite removes -wal and -shm
        filler = fill(disk)

        db = open_database(url)  # a new process on a full disk
        try:
            with db.read() as s:
                assert set(s.scalars(select(ProjectRow.name))) == names
            with pytest.raises(OperationalError) as caught, db.transaction() as s:
                s.add(ProjectRow(id="p2", name="refused"))
            fault = storage_fault(caught.value)
            assert isinstance(fault, StorageUnavailableError) and fault.http_status == 503
            assert "full" in fault.message

            filler.unlink()

            def write_works() -> bool:
                try:
                    with db.transaction() as s:
                        s.add(ProjectRow(id="p3", name="after"))
                except OperationalError:
                    return False
                return True

            wait_for(write_works, timeout=10, what="writes to work again on the same engine")
            with db.read() as s:
                assert set(s.scalars(select(ProjectRow.name))) == names | {"after"}
        finally:
            forget_database(url)
