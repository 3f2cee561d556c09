"""Fixtures for the server tests: an app on the test's home, and an in-process client for it."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI

from shipyard.context import Context
from shipyard.security.tokens import create_token
from shipyard.server.app import create_app
from shipyard.settings import Settings

with warnings.catch_warnings():
    # Starlette asks for the httpx2 package for its TestClient; plain httpx works the same here.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient


@pytest.fixture
def make_client(settings: Settings, ctx: Context) -> Iterator[Callable[..., TestClient]]:
    """Build a TestClient on a fresh app over the test's home (``ctx`` sees the same store)."""
    clients: list[TestClient] = []

    def make(*, auth: bool = False, token: str | None = None, **options: object) -> TestClient:
        app = create_app(settings, auth=auth, scheduler=False, **options)  # type: ignore[arg-type]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = TestClient(app, headers=headers)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture
def app(client: TestClient) -> FastAPI:
    return client.app  # type: ignore[return-value]


@pytest.fixture
def token(ctx: Context) -> str:
    """The secret of a fresh API token named ``alice``, of the server admin ``admin``."""
    _, secret = create_token(ctx, name="alice")
    return secret


__all__ = ["TestClient"]
