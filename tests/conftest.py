"""Shared fixtures: a fresh embedded home per test, on a real SQLite file and a real blob folder."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from shipyard.context import Context, open_context
from shipyard.settings import Settings
from shipyard.store.engine import forget_database

T = TypeVar("T")


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


def wait_for(
    predicate: Callable[[], T],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
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


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server for the session (see tests/pg.py); yields its database URL.

    Skips where PostgreSQL is not installed, except in CI (CI=true), where that is a failure.
    """
    from tests.pg import PostgresServer, PostgresUnavailable

    server = PostgresServer(database="shipyard_test")
    try:
        server.start()
    except PostgresUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI needs PostgreSQL: {exc}", pytrace=False)
        pytest.skip(str(exc))
    try:
        yield server.url()
    finally:
        server.stop()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """A real ``python -m shipyard.server`` process on 127.0.0.1."""

    def __init__(
        self,
        home: Path,
        *,
        auth: bool = False,
        env: dict[str, str] | None = None,
        port: int | None = None,  # e.g. a restarted server where the last one listened
    ) -> None:
        import subprocess
        import sys

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home.parent / f"server-{self.port}.log"
        command = [
            sys.executable,
            "-m",
            "shipyard.server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        if auth:
            command.append("--auth")
        full_env = {**os.environ, "SHIPYARD_HOME": str(home), **(env or {})}
        full_env.pop("SHIPYARD_URL", None)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                command, env=full_env, stdout=log, stderr=subprocess.STDOUT
            )
        import httpx

        def ready() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"server exited early:\n{self.log.read_text()}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=60, what="server /healthz")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except Exception:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServer]:
    home = tmp_path / "server-home"
    home.mkdir()
    server = LiveServer(home)
    yield server
    server.stop()


# The suite runs on several pytest-xdist workers (``-n``, ``--dist loadgroup``: the Makefile).
# Tests that start a Ray cluster share one worker, one after another: two local Ray clusters at
# once would contend for the machine's two cores and memory, and their start-up timings are what
# those tests assert on.
_XDIST_GROUPS = {
    "tests/compute/executors/": "ray",
    "tests/data/test_transform_ray.py": "ray",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for prefix, group in _XDIST_GROUPS.items():
            if item.nodeid.startswith(prefix):
                item.add_marker(pytest.mark.xdist_group(group))
