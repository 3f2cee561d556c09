"""Shared fixtures: a fresh embedded home per test, on a real SQLite file and a real blob folder."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

from shipyard.context import Context, open_context
from shipyard.settings import Settings
from shipyard.store.engine import forget_database


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def settings(home: Path) -> Settings:
    return Settings(home=home)


@pytest.fixture
def ctx(settings: Settings) -> Iterator[Context]:
    context = open_context(settings, actor="tester")
    yield context
    forget_database(settings.database_url)


@pytest.fixture
def home_env(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point SHIPYARD_HOME at the test's home for code that reads the environment."""
    monkeypatch.setenv("SHIPYARD_HOME", str(home))
    monkeypatch.delenv("SHIPYARD_URL", raising=False)
    monkeypatch.delenv("SHIPYARD_TOKEN", raising=False)
    return home


def wait_for(predicate: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.05,
                what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


os.environ.setdefault("SHIPYARD_TEST", "1")
