"""The replica app in-process (FastAPI TestClient): protocol, validation, metrics, readiness."""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shipyard.errors import InvalidInputError
from shipyard.serving.protocol import json_depth, parse_json
from shipyard.serving.replica import create_app, parse_size
from shipyard.serving.runtime import OnnxModel, load_model
from tests.conftest import wait_for
from tests.onnx_models import (
    LinearModel,
    linear_model,
    total_sum_model,
    two_input_model,
    typed_model,
)

with warnings.catch_warnings():
    # starlette's TestClient warns that it prefers httpx2, which this environment does not have.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

INFER = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def model() -> LinearModel:
    return linear_model()


@pytest.fixture
def client(model: LinearModel) -> Iterator[TestClient]:
    app = create_app(
        name="digits", version=3, model=load_model(model.data), max_wait_ms=1, max_body_bytes=64_000
    )
    with TestClient(app) as test_client:
        yield test_client


def _x(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)


def _request(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return {"inputs": [tensor], **extra}


def _metric(client: TestClient, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# --- metadata and health ----------------------------------------------------------------------


def test_server_and_model_metadata(client: TestClient) -> None:
    server = client.get("/v2").json()
    assert server["name"] == "shipyard" and server["version"]
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2/models/digits").json()
    assert meta == {
        "name": "digits",
        "versions": ["3"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}],
    }
    assert client.get("/v2/models/digits/versions/3").json() == meta
    assert client.get("/v2/models/digits/ready").status_code == 200
    assert client.get("/v2/models/digits/versions/3/ready").status_code == 200


def test_unknown_model_or_version_is_404_with_a_message(client: TestClient) -> None:
    for path in ("/v2/models/other", "/v2/models/other/ready", "/v2/models/digits/versions/9"):
        response = client.get(path)
        assert response.status_code == 404, path
    response = client.post("/v2/models/other/infer", json=_request(_x(1)))
    assert response.status_code == 404
    assert "'other' is not served here" in response.json()["error"]
    response = client.post("/v2/models/digits/versions/2/infer", json=_request(_x(1)))
    assert response.status_code == 404 and "version '2'" in response.json()["error"]
    assert client.get("/v2/nothing").json() == {"error": "Not Found"}


# --- inference ----------------------------------------------------------------------------------


def test_infer_with_flat_data_equals_onnxruntime(client: TestClient, model: LinearModel) -> None:
    x = _x(4)
    response = client.post(INFER, json=_request(x, id="req-1"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "digits" and body["model_version"] == "3"
    assert body["id"] == "req-1"
    [out] = body["outputs"]
    assert out["name"] == "y" and out["datatype"] == "FP32" and out["shape"] == [4, 10]
    y = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_array_equal(y, model.reference(x))


def test_infer_with_nested_data_and_the_versioned_route(
    client: TestClient, model: LinearModel
) -> None:
    x = _x(2, seed=5)
    payload = {"inputs": [{"name": "x", "shape": [2, 64], "datatype": "FP32", "data": x.tolist()}]}
    response = client.post("/v2/models/digits/versions/3/infer", json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"]  # one is made up when the request has none
    y = np.asarray(body["outputs"][0]["data"], dtype=np.float32).reshape(2, 10)
    np.testing.assert_array_equal(y, model.reference(x))


def test_requested_outputs_are_checked(client: TestClient) -> None:
    ok = client.post(INFER, json=_request(_x(1), outputs=[{"name": "y"}]))
    assert [o["name"] for o in ok.json()["outputs"]] == ["y"]
    bad = client.post(INFER, json=_request(_x(1), outputs=[{"name": "probabilities"}]))
    assert bad.status_code == 400
    assert "unknown output 'probabilities'" in bad.json()["error"]


def _tensor(**overrides: Any) -> dict[str, Any]:
    tensor: dict[str, Any] = {"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}
    tensor.update(overrides)
    return tensor


BAD_PAYLOADS = {
    "not an object": ([1, 2, 3], "must be a JSON object"),
    "no inputs": ({"id": "a"}, "'inputs' must be a non-empty list"),
    "id not a string": ({"id": 7, "inputs": [_tensor()]}, "'id' must be a string"),
    "unknown input": ({"inputs": [_tensor(name="pixels")]}, "unknown input 'pixels'"),
    "input without name": ({"inputs": [{"shape": [1, 64]}]}, "has no 'name'"),
    "wrong datatype": ({"inputs": [_tensor(datatype="FP64")]}, "'x' has datatype FP64 but"),
    "unknown datatype": ({"inputs": [_tensor(datatype="FLOAT")]}, "'FLOAT' is not an Open"),
    "63 features": (
        {"inputs": [_tensor(shape=[1, 63], data=[0.5] * 63)]},
        "'x' has shape [1, 63] but the model expects [-1, 64]: dimension 1 is 63, expected 64",
    ),
    "wrong rank": ({"inputs": [_tensor(shape=[64])]}, "'x' has shape [64] (rank 1)"),
    "negative dim": ({"inputs": [_tensor(shape=[-1, 64])]}, "non-negative integers"),
    "data too short": ({"inputs": [_tensor(data=[0.5] * 60)]}, "data has 60 values but shape"),
    "data too long": ({"inputs": [_tensor(shape=[1, 64], data=[0.5] * 128)]}, "data has 128"),
    "strings": ({"inputs": [_tensor(data=["a"] * 64)]}, "'x': 'data' must contain only numbers"),
    "nulls": ({"inputs": [_tensor(data=[None] * 64)]}, "'x': 'data' must contain only numbers"),
    "booleans": ({"inputs": [_tensor(data=[True] * 64)]}, "needs numbers, not true/false"),
    "ragged": ({"inputs": [_tensor(data=[[0.5] * 64, [0.5]])]}, "'x': 'data' is ragged"),
    "no data": ({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32"}]}, "no 'data'"),
    "twice": ({"inputs": [_tensor(), _tensor()]}, "'x' is given twice"),
    "binary extension": (
        {"inputs": [_tensor(parameters={"binary_data_size": 256})]},
        "binary tensor data extension",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PAYLOADS))
def test_bad_payloads_get_400_naming_the_problem(client: TestClient, case: str) -> None:
    payload, phrase = BAD_PAYLOADS[case]
    response = client.post(INFER, json=payload)
    assert response.status_code == 400, response.text
    assert phrase in response.json()["error"]


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post(
        INFER, content=b'{"inputs": [', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]


def test_deeply_nested_json_is_400_naming_the_depth_not_a_500(client: TestClient) -> None:
    # 60 KB of brackets exhausted the JSON decoder's recursion: RecursionError, HTTP 500
    started = time.perf_counter()
    response = client.post(
        INFER, content=b"[" * 60_000, headers={"content-type": "application/json"}
    )
    elapsed = time.perf_counter() - started
    assert response.status_code == 400, response.text
    assert "nests JSON arrays/objects 60000 levels deep; at most 64" in response.json()["error"]
    assert elapsed < 5  # generous: it is refused by a linear scan, before parsing

    deep = "[" * 100 + "1" + "]" * 100  # well-formed, inside a tensor, still too deep
    body = '{"inputs":[{"name":"x","shape":[1,64],"datatype":"FP32","data":' + deep + "}]}"
    response = client.post(INFER, content=body.encode())
    assert response.status_code == 400 and "103 levels deep" in response.json()["error"]
    assert _metric(client, "shipyard_serving_requests_total", code="500") == 0
    # the replica still serves, and nested (rank-2) data is fine
    response = client.post(INFER, json={"inputs": [_tensor(data=_x(1).tolist())]})
    assert response.status_code == 200, response.text


def test_parse_json_ignores_brackets_inside_strings_and_refuses_deep_nesting() -> None:
    brackets = "[{" * 5000
    assert parse_json(json.dumps({"data": [brackets, 'a"\\[', "\n[[["]}).encode()) == {
        "data": [brackets, 'a"\\[', "\n[[["]
    }
    assert parse_json(b"[" * 64 + b"]" * 64) is not None  # the limit itself is accepted
    assert json_depth(b'{"a": [[1], [2, [3]]]}', limit=1) == 4
    with pytest.raises(InvalidInputError, match="65 levels deep") as info:
        parse_json(b"[" * 65 + b"]" * 65)
    assert info.value.field == "body"
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        parse_json(b'{"a": "\xff\xfe"')


def test_a_binary_extension_request_with_a_bad_json_header_is_400(client: TestClient) -> None:
    # the binary extension is served (tests/serving/test_replica_clients.py drives it with
    # tritonclient); its JSON header is checked like any request's
    response = client.post(
        INFER, content=b'{"inputs":[]}\x00\x01', headers={"Inference-Header-Content-Length": "13"}
    )
    assert response.status_code == 400
    assert "'inputs' must be a non-empty list" in response.json()["error"]


def test_a_body_over_the_limit_is_413(client: TestClient) -> None:
    big = _request(_x(200))  # ~ 250 kB of JSON against a 64 kB limit
    response = client.post(INFER, json=big)
    assert response.status_code == 413
    assert "at most 64000 bytes" in response.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        payload = json.dumps(big).encode()
        for start in range(0, len(payload), 8192):
            yield payload[start : start + 8192]

    response = client.post(INFER, content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "larger than 64000 bytes" in response.json()["error"]


def test_metrics_count_requests_by_status_and_batches(client: TestClient) -> None:
    client.post(INFER, json=_request(_x(3)))
    client.post(INFER, json=_request(_x(2)))
    client.post(INFER, json={"inputs": [_tensor(datatype="INT64")]})
    labels = {"model": "digits", "version": "3"}
    assert _metric(client, "shipyard_serving_requests_total", code="200", **labels) == 2
    assert _metric(client, "shipyard_serving_requests_total", code="400", **labels) == 1
    assert _metric(client, "shipyard_serving_request_duration_seconds_count", **labels) == 3
    assert _metric(client, "shipyard_serving_batch_size_sum", **labels) == 5  # rows
    assert _metric(client, "shipyard_serving_inference_duration_seconds_count", **labels) >= 1
    assert _metric(client, "shipyard_serving_model_ready", **labels) == 1


# --- other models -----------------------------------------------------------------------------


def test_two_inputs_missing_one_is_named() -> None:
    app = create_app(name="pair", version=1, model=load_model(two_input_model()))
    a = {"name": "a", "shape": [1, 3], "datatype": "FP64", "data": [1, 2, 3]}
    with TestClient(app) as client:
        response = client.post("/v2/models/pair/infer", json={"inputs": [a]})
        assert response.status_code == 400
        assert "input 'b' is missing" in response.json()["error"]
        b = {**a, "name": "b", "data": [0.5, 0.5, 0.5]}
        response = client.post("/v2/models/pair/infer", json={"inputs": [b, a]})
        outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
        assert outputs == {"sum": [1.5, 2.5, 3.5], "diff": [0.5, 1.5, 2.5]}


def test_integer_and_boolean_inputs() -> None:
    app = create_app(name="typed", version=1, model=load_model(typed_model()))

    def payload(ids: Any, mask: Any, ids32: Any = (1,)) -> dict[str, Any]:
        return {
            "inputs": [
                {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": ids},
                {"name": "mask", "shape": [1, 3], "datatype": "BOOL", "data": mask},
                {"name": "ids32", "shape": [1], "datatype": "INT32", "data": list(ids32)},
            ]
        }

    with TestClient(app) as client:
        ok = client.post(
            "/v2/models/typed/infer", json=payload([1, 2**40, -3], [True, False, True])
        )
        assert ok.status_code == 200, ok.text
        outputs = {o["name"]: o for o in ok.json()["outputs"]}
        assert outputs["ids_out"]["data"] == [1, 2**40, -3]
        assert outputs["ids_out"]["datatype"] == "INT64"
        assert outputs["flipped"]["data"] == [False, True, False]
        assert outputs["flipped"]["datatype"] == "BOOL"
        integral = client.post("/v2/models/typed/infer", json=payload([1.0, 2.0, 3.0], [True] * 3))
        assert integral.status_code == 200

        cases = [
            (payload([1.5, 2, 3], [True] * 3), "'ids': datatype INT64 needs integers"),
            (payload([1, 2, 3], [1, 0, 1]), "'mask': datatype BOOL needs true/false"),
            (payload([1, 2, 3], [True] * 3, ids32=[2**31]), "'ids32': a value is outside"),
            # orjson reads an integer beyond 64 bits as a float: refused as out of range
            (payload([1, 2, 2**70], [True] * 3), "'ids': a value is outside the range of INT64"),
            (payload([1, 2, "3"], [True] * 3), "'ids': 'data' must contain only numbers"),
        ]
        for body, phrase in cases:
            response = client.post("/v2/models/typed/infer", json=body)
            assert response.status_code == 400, body
            assert phrase in response.json()["error"]


def test_a_model_whose_output_has_no_batch_dimension_is_still_right() -> None:
    app = create_app(name="total", version=1, model=load_model(total_sum_model()), max_wait_ms=1)
    with TestClient(app) as client:
        x = [[1, 2, 3, 4], [5, 6, 7, 8]]
        body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x}]}
        response = client.post("/v2/models/total/infer", json=body)
        assert response.json()["outputs"][0]["data"] == [36.0]


def test_fixed_batch_dimension_turns_batching_off() -> None:
    fixed = linear_model(batch=1)
    app = create_app(name="fixed", version=1, model=load_model(fixed.data))
    with TestClient(app) as client:
        assert app.state.replica.batcher.max_batch_size == 1
        ok = client.post("/v2/models/fixed/infer", json=_request(_x(1)))
        assert ok.status_code == 200
        two = client.post("/v2/models/fixed/infer", json=_request(_x(2)))
        assert two.status_code == 400
        assert "dimension 0 is 2, expected 1" in two.json()["error"]


def test_ready_only_once_the_model_is_loaded(model: LinearModel) -> None:
    release = threading.Event()

    def loader() -> OnnxModel:
        release.wait(10)
        return load_model(model.data)

    app = create_app(name="digits", version=1, loader=loader)
    with TestClient(app) as client:
        assert client.get("/v2/health/live").status_code == 200
        response = client.get("/v2/health/ready")
        assert response.status_code == 400 and response.json()["ready"] is False
        assert client.get("/v2/models/digits/ready").status_code == 400
        assert client.post("/v2/models/digits/infer", json=_request(_x(1))).status_code == 503
        release.set()
        wait_for(lambda: client.get("/v2/health/ready").status_code == 200, what="ready")
        assert client.post("/v2/models/digits/infer", json=_request(_x(1))).status_code == 200


def test_a_failed_load_is_reported_by_ready() -> None:
    def loader() -> OnnxModel:
        return load_model(b"not onnx")

    app = create_app(name="digits", version=1, loader=loader)
    with TestClient(app) as client:

        def failed() -> str | None:
            error = client.get("/v2/health/ready").json().get("error", "")
            return error if error.startswith("the model failed to load") else None

        assert "not a valid ONNX file" in wait_for(failed, what="the load failure")
        assert client.get("/v2/health/ready").status_code == 400


def test_parse_size() -> None:
    assert parse_size("8MB") == 8 * 1024 * 1024
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size("1048576") == 1048576
    with pytest.raises(InvalidInputError, match="not valid"):
        parse_size("lots")


# --- the fast path (issue 8) ---------------------------------------------------------------------


def test_metrics_carry_the_deployment_label_and_the_process_metrics(model: LinearModel) -> None:
    app = create_app(name="digits", version=2, model=load_model(model.data), deployment="web")
    with TestClient(app) as client:
        assert client.post(INFER, json=_request(_x(1))).status_code == 200
        response = client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        labels = {"model": "digits", "version": "2", "deployment": "web"}
        assert _metric(client, "shipyard_serving_requests_total", code="200", **labels) == 1
        assert _metric(client, "shipyard_serving_batch_size_count", **labels) == 1
        assert _metric(client, "shipyard_serving_queued_rows", **labels) == 0
        families = {f.name for f in text_string_to_metric_families(response.text)}
        assert {"process_cpu_seconds", "process_resident_memory_bytes"} <= families


def test_nan_and_infinity_pass_through_both_ways(client: TestClient, model: LinearModel) -> None:
    x = _x(1)
    x[0, :3] = [np.nan, np.inf, -np.inf]
    body = json.dumps(_request(x), allow_nan=True)  # NaN, Infinity: not strict JSON
    response = client.post(INFER, content=body.encode())
    assert response.status_code == 200, response.text
    assert "NaN" in response.text  # written back as Python's json writes it
    y = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32)
    np.testing.assert_array_equal(y, model.reference(x).ravel())  # NaN == NaN here


def test_a_large_body_is_decoded_off_the_event_loop_and_answered(
    model: LinearModel,
) -> None:
    app = create_app(name="digits", version=1, model=load_model(model.data))
    x = _x(300)  # ~ 400 kB of JSON: decoded in a thread
    with TestClient(app) as client:
        response = client.post(INFER, json=_request(x))
        assert response.status_code == 200, response.text
        y = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(300, 10)
        np.testing.assert_allclose(y, model.reference(x), rtol=1e-5, atol=1e-5)
        bad = client.post(INFER, content=b" " * 70_000 + b"{")
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
