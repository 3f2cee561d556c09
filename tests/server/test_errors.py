"""Error mapping: every failure is a JSON ``{code, message, field?, details?}`` with the right
status, names the problem, and leaves the store as it was."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.server.conftest import TestClient

API = "/api/v1"
PD = f"{API}/projects/default"


def _run(client: TestClient) -> str:
    response = client.post(f"{PD}/runs", json={"name": "base", "params": {"lr": "0.1"}})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _run_ids(client: TestClient) -> list[str]:
    response = client.get(f"{PD}/runs")
    assert response.status_code == 200, response.text
    return sorted(r["id"] for r in response.json())


def test_malformed_json_is_a_400_naming_the_position(client: TestClient) -> None:
    run_id = _run(client)
    response = client.post(
        f"{PD}/runs", content=b'{"name": "x",', headers={"Content-Type": "application/json"}
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
    response = client.post(f"{PD}/runs", json={"name": "x", "paramz": {"a": "1"}})
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "invalid_input"
    assert body["field"] == "paramz"
    assert "paramz" in body["message"] and "unknown field" in body["message"]
    assert _run_ids(client) == [run_id]


def test_wrong_types_name_the_nested_field(client: TestClient) -> None:
    run_id = _run(client)
    response = client.post(
        f"{PD}/runs/{run_id}/log-batch",
        json={"metrics": [{"key": "loss", "value": 1.0, "timestamp": "yesterday"}]},
    )
    assert response.status_code == 422
    body = response.json()
    assert body["field"] == "metrics.0.timestamp"
    assert "metrics.0.timestamp" in body["message"]
    assert body["details"]["errors"][0]["type"] == "float_parsing"
    history = client.get(f"{PD}/runs/{run_id}/metrics", params={"key": "loss"})
    assert history.json() == []


def test_missing_body_and_bad_query_parameters(client: TestClient) -> None:
    _run(client)
    missing = client.post(f"{PD}/runs")
    assert missing.status_code == 422
    assert "a JSON request body is required" in missing.json()["message"]

    bad_limit = client.get(f"{PD}/runs", params={"limit": "lots"})
    assert bad_limit.status_code == 422
    assert "query parameter 'limit'" in bad_limit.json()["message"]
    assert bad_limit.json()["field"] == "limit"

    bad_status = client.get(f"{PD}/jobs", params={"status": "sleeping"})
    assert bad_status.status_code == 422
    assert "status" in bad_status.json()["message"]


def test_service_errors_keep_their_code_status_and_field(client: TestClient) -> None:
    missing = client.get(f"{PD}/runs/doesnotexist")
    assert missing.status_code == 404
    assert missing.json() == {
        "code": "not_found",
        "message": "run 'doesnotexist' does not exist",
        "field": "run_id",
    }
    run_id = _run(client)
    assert client.patch(f"{PD}/runs/{run_id}", json={"status": "failed"}).status_code == 200
    again = client.patch(f"{PD}/runs/{run_id}", json={"status": "finished"})
    assert again.status_code == 409
    assert again.json()["code"] == "invalid_state"
    assert client.get(f"{PD}/runs/{run_id}").json()["status"] == "failed"

    bad_name = client.post(f"{PD}/runs", json={"name": "has space"})
    assert bad_name.status_code == 422
    assert bad_name.json()["field"] == "name"
    assert _run_ids(client) == [run_id]


def test_unknown_routes_and_methods_answer_json(client: TestClient) -> None:
    nowhere = client.get(f"{API}/nowhere")
    assert nowhere.status_code == 404
    assert nowhere.json()["code"] == "not_found"
    assert "GET /api/v1/nowhere" in nowhere.json()["message"]

    wrong_method = client.delete(f"{PD}/runs")
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
    response = client.post(f"{PD}/runs", json=big)
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
        f"{PD}/runs", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"
    assert _run_ids(client) == [run_id]


# --- item 13: integers are bounded in the schema, before they reach the store -----------------

INT64_MAX = 2**63 - 1


def test_every_integer_a_request_can_carry_is_bounded_in_the_openapi(client: TestClient) -> None:
    """Every integer a request can carry - query, path, body, nested - has a minimum and a
    maximum within 64 bits, so nothing larger ever reaches SQLite (which answered 500)."""
    spec = client.get("/openapi.json").json()
    unbounded: list[str] = []

    def walk(schema: object, where: str, seen: frozenset[str]) -> None:
        if isinstance(schema, list):
            for i, item in enumerate(schema):
                walk(item, f"{where}[{i}]", seen)
            return
        if not isinstance(schema, dict):
            return
        ref = schema.get("$ref")
        if isinstance(ref, str):
            name = ref.rsplit("/", 1)[-1]
            if name not in seen:
                walk(spec["components"]["schemas"][name], f"{where}->{name}", seen | {name})
            return
        if schema.get("type") == "integer":
            low, high = schema.get("minimum"), schema.get("maximum")
            if low is None or high is None or low < -(2**63) or high > INT64_MAX:
                unbounded.append(f"{where} (minimum {low}, maximum {high})")
        for key, value in schema.items():
            if key in ("properties", "patternProperties"):
                for prop, sub in value.items():
                    walk(sub, f"{where}.{prop}", seen)
            elif isinstance(value, (dict, list)):
                walk(value, where, seen)

    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            label = f"{method.upper()} {path}"
            for parameter in operation.get("parameters", []):
                walk(parameter.get("schema"), f"{label} {parameter['name']}", frozenset())
            for media in operation.get("requestBody", {}).get("content", {}).values():
                walk(media.get("schema"), f"{label} body", frozenset())
    assert not unbounded, "unbounded integers:\n" + "\n".join(unbounded)


def test_names_paths_and_digests_carry_their_rules_in_the_openapi(client: TestClient) -> None:
    from shipyard.domain.names import NAME_PATTERN, PATH_PATTERN

    spec = client.get("/openapi.json").json()
    commit = spec["paths"]["/api/v1/projects/{project}/datasets/{name}/versions"]["post"]
    for parameter in commit["parameters"]:
        assert parameter["schema"]["pattern"] == NAME_PATTERN
        assert parameter["schema"]["maxLength"] == 128
    new_file = spec["components"]["schemas"]["NewFile"]["properties"]
    assert new_file["path"]["pattern"] == PATH_PATTERN and new_file["path"]["maxLength"] == 1024
    assert new_file["digest"]["pattern"] == "^[0-9a-f]{64}$"
    assert new_file["size"]["maximum"] == INT64_MAX


@pytest.mark.parametrize(
    "name",
    ["a", "A.b-c_d", "1", "x" * 128, "a.b.c", "0.1", "v1", "a-", "a_"],
)
def test_the_name_pattern_accepts_every_valid_name(name: str) -> None:
    import re

    from shipyard.domain.names import NAME_MAX_LEN, NAME_PATTERN, validate_name

    assert validate_name(name) == name
    assert re.fullmatch(NAME_PATTERN, name) and len(name) <= NAME_MAX_LEN


@pytest.mark.parametrize(
    "name", ["", ".a", "-a", "a..b", "a.", "a b", "a/b", "é", "x" * 129, "a\x00", "a%2e"]
)
def test_the_name_pattern_refuses_every_invalid_name(name: str) -> None:
    import re

    from shipyard.domain.names import NAME_MAX_LEN, NAME_PATTERN, validate_name
    from shipyard.errors import InvalidInputError

    with pytest.raises(InvalidInputError):
        validate_name(name)
    assert not (re.fullmatch(NAME_PATTERN, name) and len(name) <= NAME_MAX_LEN)


def test_integers_beyond_64_bits_are_a_4xx_naming_the_field(client: TestClient) -> None:
    """The places that answered 500 (the value reached SQLite): each is now a 4xx that names
    the field, and nothing was stored."""
    from shipyard.blobs import hash_bytes
    from tests.onnx_models import linear_model

    big = 2**63
    model = linear_model(4, 2).data
    digest = hash_bytes(model)
    assert client.put(f"{PD}/blobs/{digest}", content=model).status_code == 201
    run_id = _run(client)
    entry = {"path": "m.onnx", "digest": digest, "size": len(model)}
    assert client.post(f"{PD}/datasets/ds/versions", json={"files": [entry]}).status_code == 201
    assert client.post(f"{PD}/models/m/versions", json={"digest": digest}).status_code == 201
    assert client.put(f"{PD}/models/m/aliases/prod", json={"version": 1}).status_code == 200
    point = {"key": "loss", "value": 1.0, "timestamp": 1.0}
    cases: list[tuple[str, str, object, str]] = [
        ("GET", f"{API}/audit?after={big}", None, "after"),
        ("POST", f"{PD}/runs/{run_id}/log-batch", {"metrics": [{**point, "step": big}]}, "step"),
        ("PUT", f"{PD}/models/m/aliases/prod", {"version": big}, "version"),
        ("PUT", f"{PD}/models/m/aliases/prod", {"version": str(big)}, "ref"),
        ("GET", f"{PD}/models/m/versions/{big}", None, "ref"),
        ("GET", f"{PD}/models/m/versions/v{big}", None, "ref"),
        ("GET", f"{PD}/jobs/{run_id}/logs?offset={big}", None, "offset"),
        ("POST", f"{PD}/runs/{run_id}/inputs", {"dataset": "ds", "version": big}, "version"),
        ("POST", f"{PD}/runs/{run_id}/artifacts", {**entry, "size": big}, "size"),
        ("POST", f"{PD}/datasets/ds/versions", {"files": [{**entry, "size": big}]}, "size"),
        ("GET", f"{PD}/datasets/ds/versions/{big}", None, "version"),
        ("GET", f"{PD}/runs?limit={big}", None, "limit"),
        ("POST", f"{PD}/deployments", {"name": "e", "model": "m", "ref": str(big)}, "ref"),
        (
            "POST",
            f"{PD}/jobs",
            {"spec": {"command": ["true"], "resources": {"memory_mb": big}}},
            "memory_mb",
        ),
    ]
    for method, url, body, field in cases:
        response = client.request(method, url, json=body)
        assert 400 <= response.status_code < 500, (method, url, response.text)
        assert response.json()["field"].split(".")[-1] == field, (method, url, response.text)
    run = client.get(f"{PD}/runs/{run_id}").json()
    assert run["metrics"] == {} and run["artifacts"] == []
    model_now = client.get(f"{PD}/models/m").json()
    assert model_now["aliases"] == {"prod": 1} and model_now["latest_version"] == 1
    assert [v["version"] for v in client.get(f"{PD}/datasets/ds/versions").json()] == [1]
    assert client.get(f"{PD}/jobs").json() == []
    assert client.get(f"{PD}/deployments").json() == []
