"""Store fixtures: ``db_url`` runs a test once on SQLite and once on a fresh PostgreSQL database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard.store.engine import forget_database
from tests.pg import create_database, drop_database


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database (not yet migrated), forgotten and removed after the test.

    Its audit key and head anchor go to ``tmp_path/keys`` (worker processes inherit the variable).
    """
    request.getfixturevalue("monkeypatch").setenv(
        "SHIPYARD_AUDIT_KEY_FILE", str(tmp_path / "keys" / "audit.key")
    )
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'shipyard.db'}"
        yield url
        forget_database(url)
        return
    url = create_database(request.getfixturevalue("postgres_url"))
    yield url
    forget_database(url)
    drop_database(url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'shipyard.db'}"
    yield url
    forget_database(url)
