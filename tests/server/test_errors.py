"""Error mapping: every failure is a JSON ``{code, message, field?, details?}`` with the right
status, names the problem, and leaves the store as it was."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.server.conftest import TestClient

API = "/api/v1"


def _run(client: TestClient) -> str:
    response = client.post(f"{API}/runs", json={"name": "base", "params": {"lr": "0.1"}})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _run_ids(client: TestClient) -> list[str]:
    response = client.get(f"{API}/runs", params={"project": "default"})
    assert response.status_code == 200, response.text
    return sorted(r["id"] for r in response.json())


def test_malformed_json_is_a_400_naming_the_position(client: TestClient) -> None:
    run_id = _run(client)
    response = client.post(
        f"{API}/runs", content=b'{"name": "x",', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid_input"
    assert "not valid JSON" in body["message"]
    assert "at character" in body["message"]
    assert body["field"] == "body"
    assert _run_ids(client) == [run_id]


def test_unknown_field_is_refused_by_name(client: TestClient) -> None:
    run_id = _run(client)
    response = client.post(f"{API}/runs", json={"name": "x", "paramz": {"a": "1"}})
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "invalid_input"
    assert body["field"] == "paramz"
    assert "paramz" in body["message"] and "unknown field" in body["message"]
    assert _run_ids(client) == [run_id]


def test_wrong_types_name_the_nested_field(client: TestClient) -> None:
    run_id = _run(client)
    response = client.post(
        f"{API}/runs/{run_id}/log-batch",
        json={"metrics": [{"key": "loss", "value": "not-a-number", "timestamp": 1.0}]},
    )
    assert response.status_code == 422
    body = response.json()
    assert body["field"] == "metrics.0.value"
    assert "metrics.0.value" in body["message"]
    assert body["details"]["errors"][0]["type"] == "float_parsing"
    history = client.get(f"{API}/runs/{run_id}/metrics", params={"key": "loss"})
    assert history.json() == []


def test_missing_body_and_bad_query_parameters(client: TestClient) -> None:
    _run(client)
    missing = client.post(f"{API}/runs")
    assert missing.status_code == 422
    assert "a JSON request body is required" in missing.json()["message"]

    bad_limit = client.get(f"{API}/runs", params={"limit": "lots"})
    assert bad_limit.status_code == 422
    assert "query parameter 'limit'" in bad_limit.json()["message"]
    assert bad_limit.json()["field"] == "limit"

    bad_status = client.get(f"{API}/jobs", params={"status": "sleeping"})
    assert bad_status.status_code == 422
    assert "status" in bad_status.json()["message"]


def test_service_errors_keep_their_code_status_and_field(client: TestClient) -> None:
    missing = client.get(f"{API}/runs/doesnotexist")
    assert missing.status_code == 404
    assert missing.json() == {
        "code": "not_found",
        "message": "run 'doesnotexist' does not exist",
        "field": "run_id",
    }
    run_id = _run(client)
    assert client.patch(f"{API}/runs/{run_id}", json={"status": "failed"}).status_code == 200
    again = client.patch(f"{API}/runs/{run_id}", json={"status": "finished"})
    assert again.status_code == 409
    assert again.json()["code"] == "invalid_state"
    assert client.get(f"{API}/runs/{run_id}").json()["status"] == "failed"

    bad_name = client.post(f"{API}/runs", json={"name": "has space"})
    assert bad_name.status_code == 422
    assert bad_name.json()["field"] == "name"
    assert _run_ids(client) == [run_id]


def test_unknown_routes_and_methods_answer_json(client: TestClient) -> None:
    nowhere = client.get(f"{API}/nowhere")
    assert nowhere.status_code == 404
    assert nowhere.json()["code"] == "not_found"
    assert "GET /api/v1/nowhere" in nowhere.json()["message"]

    wrong_method = client.delete(f"{API}/runs")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["code"] == "method_not_allowed"


def test_unexpected_errors_are_500_internal_without_details(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client()

    def explode() -> None:
        raise RuntimeError("secret detail: /etc/shadow password=hunter2")

    client.app.add_api_route("/boom", explode)  # type: ignore[attr-defined]
    response = client.get("/boom")
    assert response.status_code == 500
    body = response.json()
    assert body["code"] == "internal"
    assert "hunter2" not in response.text and "shadow" not in response.text
    error_id = body["details"]["error_id"]
    assert error_id in body["message"]
    assert any(error_id in r.getMessage() for r in caplog.records)


def test_oversized_body_is_413_and_stores_nothing(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_body_bytes=2000)
    run_id = _run(client)
    big = {"name": "big", "tags": {"blob": "x" * 5000}}
    response = client.post(f"{API}/runs", json=big)
    assert response.status_code == 413
    body = response.json()
    assert body["code"] == "payload_too_large"
    assert "larger than 2000 bytes" in body["message"]
    assert _run_ids(client) == [run_id]


def test_oversized_chunked_body_is_cut_off_while_read(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_body_bytes=2000)
    run_id = _run(client)
    payload = b'{"name": "big", "tags": {"blob": "' + b"x" * 5000 + b'"}}'

    def chunks():  # no Content-Length: the size is only known while reading
        for i in range(0, len(payload), 500):
            yield payload[i : i + 500]

    response = client.post(
        f"{API}/runs", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"
    assert _run_ids(client) == [run_id]
