"""The alembic migrations build exactly the ORM's schema; opening a database is idempotent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, inspect, select, text

from shipyard.errors import InvalidInputError
from shipyard.store import open_database
from shipyard.store.engine import _make_engine, forget_database
from shipyard.store.migrate import current_revision, head_revision, upgrade
from shipyard.store.tables import Base, LockRow, ProjectRow


def schema_diff(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, Base.metadata))


def test_migrations_produce_exactly_the_orm_metadata(db_url: str) -> None:
    db = open_database(db_url)

    assert current_revision(db.engine) == head_revision() is not None
    assert schema_diff(db.engine) == []
    tables = set(inspect(db.engine).get_table_names())
    assert tables == set(Base.metadata.tables) | {"alembic_version"}


def test_the_schema_comparison_sees_drift(db_url: str) -> None:
    """Guards the test above: a schema that differs from the ORM is reported."""
    db = open_database(db_url)
    with db.engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_jobs_status"))
        conn.execute(text("CREATE TABLE stray (id INTEGER PRIMARY KEY)"))

    kinds = {entry[0] for entry in schema_diff(db.engine)}

    assert kinds == {"add_index", "remove_table"}


def test_migrations_seed_the_lock_rows(db_url: str) -> None:
    db = open_database(db_url)
    with db.read() as s:
        assert {r.name for r in s.scalars(select(LockRow))} == {"scheduler", "audit", "deployments"}


def test_open_database_twice_is_idempotent(db_url: str) -> None:
    first = open_database(db_url)
    assert open_database(db_url) is first  # cached per URL and process
    with first.transaction() as s:
        s.add(ProjectRow(id="p1", name="alpha"))

    forget_database(db_url)  # as a new process would: a new engine, migrations checked again
    second = open_database(db_url)
    upgrade(second.engine)  # and once more by hand: nothing left to do

    assert second is not first
    assert current_revision(second.engine) == head_revision()
    with second.read() as s:
        assert s.scalars(select(ProjectRow.name).where(ProjectRow.id == "p1")).all() == ["alpha"]
        assert s.scalar(text("SELECT count(*) FROM alembic_version")) == 1
        assert s.scalar(select(func.count()).select_from(LockRow)) == 3
    assert schema_diff(second.engine) == []


def test_transaction_rolls_back_on_error(db_url: str) -> None:
    db = open_database(db_url)
    with pytest.raises(RuntimeError, match="boom"), db.transaction() as s:
        s.add(ProjectRow(id="p1", name="alpha"))
        s.flush()
        raise RuntimeError("boom")
    with db.read() as s:
        assert s.get(ProjectRow, "p1") is None


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(sqlite_url: str, tmp_path: Any) -> None:
    db = open_database(sqlite_url)
    with db.transaction() as s:
        s.add(ProjectRow(id="p1", name="alpha"))
    for transaction in (db.read, db.transaction):
        with transaction() as s:
            assert s.scalar(text("PRAGMA journal_mode")) == "wal"
            assert s.scalar(text("PRAGMA foreign_keys")) == 1
            assert s.scalar(text("PRAGMA busy_timeout")) == 60000
    assert (tmp_path / "shipyard.db-wal").exists()


def test_sqlite_enforces_foreign_keys(sqlite_url: str) -> None:
    from shipyard.store.tables import DatasetRow

    db = open_database(sqlite_url)
    with pytest.raises(Exception, match="FOREIGN KEY"), db.transaction() as s:
        s.add(DatasetRow(id="d1", project_id="no-such-project", name="faces"))
    with db.read() as s:
        assert s.scalars(select(DatasetRow)).all() == []


def test_postgresql_url_keeps_its_password_and_gets_the_psycopg_driver() -> None:
    engine = _make_engine("postgresql://shipyard:s3cret@127.0.0.1:5432/shipyard")
    try:
        assert engine.url.password == "s3cret"  # str(url) would have sent '***'
        assert engine.url.drivername == "postgresql+psycopg"
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u@localhost/db",
        "not a url",
        "sqlite+nosuch:///x.db",
        "postgresql+nosuch://h/db",
    ],
)
def test_unsupported_database_urls_are_rejected_naming_the_field(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidInputError) as caught:
        open_database(url)
    assert caught.value.field == "db"
    assert "database URL" in caught.value.message
    assert list(tmp_path.iterdir()) == []  # a refused URL creates no file


def test_errors_about_a_database_url_do_not_echo_its_password() -> None:
    with pytest.raises(InvalidInputError) as caught:
        open_database("mysql://shipyard:s3cret@localhost/db")
    assert "s3cret" not in caught.value.message
    assert caught.value.field == "db"
