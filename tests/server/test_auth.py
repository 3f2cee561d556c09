"""Auth: with it on, nothing but /healthz answers without a valid bearer token, and the token's
actor is who the audit log says acted."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from shipyard.context import Context
from shipyard.errors import InvalidInputError
from shipyard.security.audit import list_events
from shipyard.server.app import create_app
from shipyard.server.auth import auth_enabled
from shipyard.settings import Settings
from tests.server.conftest import TestClient

API = "/api/v1"
DIGEST = "0" * 64


def _every_route(client: TestClient) -> list[tuple[str, str]]:
    """(method, concrete path) for every route the app serves, API and the rest."""
    schema = client.app.openapi()  # type: ignore[attr-defined]
    routes = [
        (method.upper(), re.sub(r"\{[^}]*\}", lambda m: DIGEST if "digest" in m[0] else "x", p))
        for p, operations in schema["paths"].items()
        for method in operations
        if p != "/healthz"
    ]
    routes += [
        ("GET", "/"),
        ("GET", "/ui/sections/runs"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/static/htmx.min.js"),
        ("GET", "/metrics"),
        ("GET", f"{API}/no-such-route"),
    ]
    return routes


def test_without_a_token_every_route_but_healthz_is_401(
    make_client: Callable[..., TestClient], ctx: Context, token: str
) -> None:
    client = make_client(auth=True)
    routes = _every_route(client)
    api_routes = [r for r in routes if r[1].startswith(API)]
    assert len(api_routes) >= 35
    with ctx.db.read() as s:
        events_before = list_events(s, limit=10_000)
    for method, path in routes:
        response = client.request(method, path, json={} if method in ("POST", "PUT") else None)
        assert response.status_code == 401, (method, path, response.text)
        if method != "HEAD":
            body = response.json()
            assert body["code"] == "unauthenticated"
            assert "Bearer" in body["message"]
        assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/healthz").status_code == 200
    with ctx.db.read() as s:
        after = list_events(s, limit=10_000)
    # nothing was done; the refusals themselves are audited (rate-limited)
    assert [e for e in after if e.action != "auth.fail"] == events_before
    assert {e.actor for e in after[len(events_before) :]} == {"anonymous"}


def test_wrong_or_malformed_tokens_are_401(
    make_client: Callable[..., TestClient], token: str
) -> None:
    for header in (
        "Bearer shp_wrong",
        f"Bearer {token}x",
        f"Basic {token}",
        "Bearer",
        token,
    ):
        client = make_client(auth=True)
        response = client.get(f"{API}/runs", headers={"Authorization": header})
        assert response.status_code == 401, header
        assert response.json()["code"] == "unauthenticated"
    wrong = make_client(auth=True).get(f"{API}/runs", headers={"Authorization": "Bearer nope"})
    assert "not valid" in wrong.json()["message"]


def test_with_a_token_routes_answer_and_audit_names_the_actor(
    make_client: Callable[..., TestClient], ctx: Context, token: str
) -> None:
    client = make_client(auth=True, token=token)
    run = client.post(f"{API}/projects/default/runs", json={"name": "mine"})
    assert run.status_code == 201
    assert client.get(f"{API}/projects/default/runs/{run.json()['id']}").status_code == 200
    for path in ("/", "/metrics", "/docs", "/openapi.json", "/static/htmx.min.js", "/healthz"):
        assert client.get(path).status_code == 200, path
    missing = client.put(f"{API}/projects/default/models/m/aliases/prod", json={"version": 1})
    assert missing.status_code == 404
    events = client.get(f"{API}/audit").json()
    assert [(e["action"], e["actor"]) for e in events] == [
        ("token.create", "tester"),
        ("run.create", "user:admin"),
    ]
    page = client.get("/").text
    assert "user:admin" in page


def test_auth_off_acts_as_local(client: TestClient) -> None:
    assert client.post(f"{API}/projects/default/runs", json={}).status_code == 201
    assert [e["actor"] for e in client.get(f"{API}/audit").json()] == ["local"]


def test_auth_switch_from_the_environment(
    settings: Settings, ctx: Context, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert auth_enabled(None, {}) is False
    assert auth_enabled(None, {"SHIPYARD_AUTH": "1"}) is True
    assert auth_enabled(None, {"SHIPYARD_AUTH": "off"}) is False
    assert auth_enabled(False, {"SHIPYARD_AUTH": "1"}) is False  # an explicit choice wins
    with pytest.raises(InvalidInputError) as raised:
        auth_enabled(None, {"SHIPYARD_AUTH": "maybe"})
    assert raised.value.field == "SHIPYARD_AUTH"

    monkeypatch.setenv("SHIPYARD_AUTH", "1")
    with TestClient(create_app(settings, scheduler=False)) as client:
        assert client.get(f"{API}/runs").status_code == 401
        ok = client.get(f"{API}/audit", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
