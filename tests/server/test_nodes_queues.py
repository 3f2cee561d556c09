"""The cluster over REST: ``/nodes`` and ``/queues`` (read by anyone signed in, queues written by
server admins), with bad inputs answered in the API's error shape and nothing stored."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from shipyard.client import Client, HttpBackend
from shipyard.client.local import LocalBackend
from shipyard.context import Context
from shipyard.domain.models import QuotaSpec
from shipyard.errors import InvalidInputError, NotFoundError
from shipyard.security import principals, tokens
from shipyard.server.app import create_app
from shipyard.settings import Settings
from tests.server.conftest import TestClient

API = "/api/v1"


@pytest.fixture
def settings(home: Path) -> Settings:
    return Settings(
        home=home, cpus=8, memory_mb=32_000, gpus=2, gpu_model="A100", gpu_memory_mb=40960
    )


def test_nodes_list_and_show(client: TestClient) -> None:
    here = socket.gethostname()

    listed = client.get(f"{API}/nodes")
    shown = client.get(f"{API}/nodes/{here}")

    assert listed.status_code == 200, listed.text
    [node] = listed.json()
    assert shown.status_code == 200 and shown.json() == node
    assert (node["id"], node["cpus"], node["memory_mb"], node["healthy"]) == (here, 8, 32000, True)
    assert node["gpu_source"] == "declared"
    assert [(g["index"], g["model"], g["memory_mb"]) for g in node["gpus"]] == [
        (0, "A100", 40960),
        (1, "A100", 40960),
    ]


def test_an_unknown_node_is_a_404_naming_the_nodes(client: TestClient) -> None:
    response = client.get(f"{API}/nodes/gpu-box-9")

    assert response.status_code == 404
    body = response.json()
    assert (body["code"], body["field"]) == ("not_found", "node_id")
    assert socket.gethostname() in body["message"]


def test_a_queue_is_set_read_listed_and_deleted(client: TestClient) -> None:
    body = {
        "nominal": {"gpus": 8, "memory_mb": 64000, "gpus_by_model": {"A100": 4}},
        "cohort": "lab",
        "borrowing_limit": {"gpus": 2},
        "weight": 2,
    }
    put = client.put(f"{API}/queues/vision", json=body)
    assert put.status_code == 200, put.text
    view = put.json()
    assert view["configured"] is True and view["cohort"] == "lab" and view["weight"] == 2
    assert view["nominal"] == {
        "gpus": 8.0,
        "cpus": None,
        "memory_mb": 64000,
        "gpus_by_model": {"A100": 4.0},
    }
    assert view["borrowing_limit"]["gpus"] == 2
    assert view["usage"] == {"gpus": 0.0, "cpus": 0.0, "memory_mb": 0}
    assert view["waiting"] == [] and view["running"] == []

    assert client.get(f"{API}/queues/vision").json() == view
    assert [q["name"] for q in client.get(f"{API}/queues").json()] == ["vision"]

    deleted = client.delete(f"{API}/queues/vision")
    assert deleted.status_code == 204 and deleted.content == b""
    gone = client.get(f"{API}/queues/vision")
    assert gone.status_code == 404 and gone.json()["field"] == "name"
    assert client.get(f"{API}/queues").json() == []
    again = client.delete(f"{API}/queues/vision")
    assert again.status_code == 404


BAD_BODIES: list[tuple[dict[str, object], str]] = [
    ({"nominal": {"gpus": -1}}, "nominal.gpus"),
    ({"nominal": {"memory_mb": -1}}, "nominal.memory_mb"),
    ({"borrowing_limit": {"cpus": -0.5}}, "borrowing_limit.cpus"),
    ({"nominal": {"gpus_by_model": {"A100": -4}}}, "nominal.gpus_by_model.A100"),
    ({"nominal": {"gpus_by_model": {" ": 4}}}, "nominal.gpus_by_model"),
    ({"weight": 0}, "weight"),
    ({"cohort": "../lab"}, "cohort"),
    ({"nominal": {"gpus": 1}, "project": "vision"}, "project"),  # bodies never name one
    ({"nominal": {"gpus": 1e12}}, "nominal.gpus"),
]


def test_bad_queue_bodies_are_422_naming_the_field_and_nothing_changes(
    client: TestClient,
) -> None:
    assert client.put(f"{API}/queues/vision", json={"nominal": {"gpus": 8}}).status_code == 200
    before = client.get(f"{API}/queues").json()

    for body, field in BAD_BODIES:
        response = client.put(f"{API}/queues/vision", json=body)

        assert response.status_code == 422, response.text
        assert response.json()["code"] == "invalid_input"
        assert response.json()["field"] == field, (body, response.json())
    bad_name = client.put(f"{API}/queues/bad..name", json={})
    assert bad_name.status_code == 422 and bad_name.json()["field"] == "name"
    assert client.get(f"{API}/queues").json() == before


def test_viewers_read_nodes_and_queues_and_only_server_admins_write(
    make_client: Callable[..., TestClient], ctx: Context
) -> None:
    principals.create_project(ctx, name="vision")
    principals.create_principal(ctx, name="bob")
    principals.set_member(ctx, project="vision", principal="bob", role="admin")
    _, bob = tokens.create_token(ctx, name="bob-token", principal="bob")
    _, admin = tokens.create_token(ctx, name="admin-token")  # of the server admin
    as_bob = make_client(auth=True, token=bob)
    as_admin = make_client(auth=True, token=admin)
    assert as_admin.put(f"{API}/queues/vision", json={"nominal": {"gpus": 8}}).status_code == 200

    for method, body in (("PUT", {"nominal": {"gpus": 80}}), ("DELETE", None)):
        response = as_bob.request(method, f"{API}/queues/vision", json=body)
        assert response.status_code == 403, response.text
        assert response.json()["code"] == "permission_denied"
        assert "server admins" in response.json()["message"]

    assert as_bob.get(f"{API}/nodes").status_code == 200
    view = as_bob.get(f"{API}/queues/vision")
    assert view.status_code == 200 and view.json()["nominal"]["gpus"] == 8  # unchanged
    assert make_client(auth=True).get(f"{API}/queues").status_code == 401  # no token


@pytest.mark.parametrize("way", ["embedded", "http"])
def test_the_sdk_reads_nodes_and_configures_queues_both_ways(
    way: str, ctx: Context, settings: Settings
) -> None:
    if way == "embedded":
        _sdk_scenario(Client(settings=settings, backend=LocalBackend(ctx)))
        return
    app = create_app(settings, auth=False, scheduler=False)
    with TestClient(app) as http:
        backend = HttpBackend("http://testserver", transport=http._transport)
        _sdk_scenario(Client(settings=settings, backend=backend))
        backend.close()


def _sdk_scenario(client: Client) -> None:
    view = client.queues.set(
        "vision", nominal={"gpus": 8, "gpus_by_model": {"A100": 4}}, cohort="lab", weight=2
    )
    assert view.nominal == QuotaSpec(gpus=8, gpus_by_model={"A100": 4})
    assert (view.cohort, view.weight, view.borrowing_limit) == ("lab", 2.0, QuotaSpec())
    assert [q.name for q in client.queues.list()] == ["vision"]
    assert client.queues.get("vision") == view
    [node] = client.nodes.list()
    assert node.id == socket.gethostname() and [g.model for g in node.gpus] == ["A100"] * 2
    assert client.nodes.get(node.id) == node

    with pytest.raises(InvalidInputError) as bad:
        client.queues.set("vision", nominal=QuotaSpec(gpus=-1))
    assert bad.value.field == "nominal.gpus"
    with pytest.raises(InvalidInputError) as weight:
        client.queues.set("vision", weight=0)
    assert weight.value.field == "weight"
    with pytest.raises(NotFoundError) as missing:
        client.nodes.get("gpu-box-9")
    assert missing.value.field == "node_id"
    assert client.queues.get("vision") == view  # unchanged

    client.queues.delete("vision")
    with pytest.raises(NotFoundError) as gone:
        client.queues.get("vision")
    assert gone.value.field == "name"
