"""Data-plane fixtures: ``ctx`` on SQLite, or on a fresh PostgreSQL database for the tests marked
``@BOTH_DATABASES`` (the ones whose outcome depends on the metadata store)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from shipyard.context import Context, open_context
from shipyard.settings import Settings
from shipyard.store.engine import forget_database
from tests.pg import create_database, drop_database

BOTH_DATABASES = pytest.mark.parametrize("ctx", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def ctx(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Context]:
    """The shared ``ctx`` (a real home and blob folder), its metadata on SQLite by default."""
    if getattr(request, "param", "sqlite") == "sqlite":
        context = open_context(settings, actor="tester")
        yield context
        forget_database(settings.database_url)
        return
    url = create_database(request.getfixturevalue("postgres_url"))
    context = open_context(dataclasses.replace(settings, db_url=url), actor="tester")
    yield context
    forget_database(url)
    drop_database(url)
