"""The replica process driven by the clients people use: ``tritonclient.http`` (binary tensors,
its default) and ``tritonclient.grpc`` against one real ``python -m shipyard.serving.replica``
serving HTTP and gRPC from the same model and batcher; answers compared with ONNX Runtime run
directly."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from shipyard.blobs.store import BlobStore
from shipyard.serving.replica import GRPC_LISTENING, main
from tests.conftest import wait_for
from tests.onnx_models import LinearModel, linear_model, typed_model

REPLICA = [sys.executable, "-m", "shipyard.serving.replica"]
GRPC_LIMIT = 64 * 1024  # --grpc-max-message-bytes: 256 bytes a row in, so 256 rows are over it
_GRPC_LINE = re.compile(re.escape(GRPC_LISTENING) + r"(\S+):(\d+)")


@dataclass
class Replica:
    url: str  # http://127.0.0.1:PORT
    grpc: str  # 127.0.0.1:PORT
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def http_address(self) -> str:
        return self.url.removeprefix("http://")


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> BlobStore:
    return BlobStore(f"file://{tmp_path_factory.mktemp('clients') / 'blobs'}")


def _start(blobs: BlobStore, data: bytes, log: Path, *extra: str) -> Replica:
    """A replica on an inherited socket, with gRPC on a free port it reports in its log."""
    digest = blobs.put_bytes(data).digest
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    args = ["--blobs", blobs.url, "--digest", digest, "--fd", str(sock.fileno()), *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*REPLICA, *args, "--grpc-port", "0"],
            pass_fds=[sock.fileno()],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    sock.close()

    def ready() -> str | None:
        assert proc.poll() is None, log.read_text()
        match = _GRPC_LINE.search(log.read_text())
        try:
            up = httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return None
        return f"{match.group(1)}:{match.group(2)}" if up and match else None

    try:
        grpc = wait_for(ready, timeout=60, what="the replica to be ready on HTTP and gRPC")
    except BaseException:
        _stop(proc)
        raise
    assert grpc is not None
    return Replica(url=url, grpc=grpc, proc=proc, log=log)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("the replica did not exit on SIGTERM")


@pytest.fixture(scope="module")
def linear() -> LinearModel:
    return linear_model(seed=11)  # x: FP32 [n, 64] -> y: FP32 [n, 10]


@pytest.fixture(scope="module")
def replica(
    blobs: BlobStore, linear: LinearModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    log = tmp_path_factory.mktemp("logs") / "replica.log"
    started = _start(
        blobs,
        linear.data,
        log,
        "--name", "web", "--version", "3", "--deployment", "web", "--model-name", "digits",
        "--max-batch-size", "32", "--max-wait-ms", "20",
        "--grpc-max-message-bytes", str(GRPC_LIMIT),
    )  # fmt: skip
    yield started
    _stop(started.proc)


@pytest.fixture(scope="module")
def typed(blobs: BlobStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    log = tmp_path_factory.mktemp("logs") / "typed.log"
    started = _start(blobs, typed_model(), log, "--name", "typed", "--version", "1")
    yield started
    _stop(started.proc)


@pytest.fixture
def http(replica: Replica) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(replica.http_address)
    yield client
    client.close()


@pytest.fixture
def grpc(replica: Replica) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(replica.grpc) as client:
        yield client


def _x(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)


def _http_input(x: np.ndarray, *, binary: bool = True) -> httpclient.InferInput:
    item = httpclient.InferInput("x", list(x.shape), "FP32")
    item.set_data_from_numpy(x, binary_data=binary)
    return item


def _grpc_input(x: np.ndarray) -> grpcclient.InferInput:
    item = grpcclient.InferInput("x", list(x.shape), "FP32")
    item.set_data_from_numpy(x)
    return item


def _ort(data: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What ONNX Runtime itself answers, run directly."""
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _refused(call: Any, *args: Any, **kwargs: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return caught.value


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


LABELS = (("deployment", "web"), ("model", "digits"), ("version", "3"))


def _requests(url: str, code: str) -> float:
    key = ("shipyard_serving_requests_total", tuple(sorted((*LABELS, ("code", code)))))
    return _samples(url).get(key, 0.0)


# --- HTTP: tritonclient.http, binary tensors -----------------------------------------------------


def test_http_binary_infer_matches_onnxruntime(
    http: httpclient.InferenceServerClient, linear: LinearModel
) -> None:
    x = _x(5, seed=1)
    result = http.infer(
        "web",
        [_http_input(x)],
        outputs=[httpclient.InferRequestedOutput("y", binary_data=True)],
        request_id="bin-1",
    )
    np.testing.assert_array_equal(result.as_numpy("y"), _ort(linear.data, {"x": x})["y"])
    response = result.get_response()
    assert response["id"] == "bin-1" and response["model_version"] == "3"
    assert response["outputs"][0]["parameters"] == {"binary_data_size": 5 * 10 * 4}
    assert "data" not in response["outputs"][0]


def test_http_binary_response_carries_the_header_length(replica: Replica) -> None:
    x = _x(2, seed=2)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [_http_input(x)], outputs=[httpclient.InferRequestedOutput("y", binary_data=True)]
    )
    response = httpx.post(
        f"{replica.url}/v2/models/web/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(json_size)},
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    assert response.headers["content-type"] == "application/octet-stream"
    header = json.loads(response.content[:length])
    assert header["outputs"][0]["shape"] == [2, 10]
    assert len(response.content) - length == 2 * 10 * 4
    y = np.frombuffer(response.content[length:], dtype="<f4").reshape(2, 10)
    np.testing.assert_array_equal(y, linear_model(seed=11).reference(x))


def test_http_mixes_binary_and_json_either_way(
    http: httpclient.InferenceServerClient, linear: LinearModel
) -> None:
    x = _x(3, seed=3)
    expected = _ort(linear.data, {"x": x})["y"]
    # binary in, JSON out
    result = http.infer(
        "web", [_http_input(x)], outputs=[httpclient.InferRequestedOutput("y", binary_data=False)]
    )
    np.testing.assert_allclose(result.as_numpy("y"), expected, rtol=1e-6)
    assert "data" in result.get_response()["outputs"][0]
    # JSON in (a plain JSON body, no header), binary out
    result = http.infer(
        "web",
        [_http_input(x, binary=False)],
        outputs=[httpclient.InferRequestedOutput("y", binary_data=True)],
    )
    np.testing.assert_array_equal(result.as_numpy("y"), expected)
    assert "parameters" in result.get_response()["outputs"][0]
    # JSON both ways: the plain protocol, as before
    result = http.infer(
        "web",
        [_http_input(x, binary=False)],
        outputs=[httpclient.InferRequestedOutput("y", binary_data=False)],
    )
    np.testing.assert_allclose(result.as_numpy("y"), expected, rtol=1e-6)


def test_http_binary_tensors_of_other_datatypes(typed: Replica) -> None:
    ids = np.arange(12, dtype=np.int64).reshape(4, 3) - 5
    mask = np.array([[True, False, True]] * 4)
    ids32 = np.array([7, -8, 2**31 - 1, -(2**31)], dtype=np.int32)
    inputs = []
    tensors = {"ids": (ids, "INT64"), "mask": (mask, "BOOL"), "ids32": (ids32, "INT32")}
    for name, (array, datatype) in tensors.items():
        item = httpclient.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array, binary_data=True)
        inputs.append(item)
    client = httpclient.InferenceServerClient(typed.url.removeprefix("http://"))
    try:
        result = client.infer(
            "typed",
            inputs,
            outputs=[
                httpclient.InferRequestedOutput(n, binary_data=True)
                for n in ("ids_out", "flipped", "small")
            ],
        )
    finally:
        client.close()
    expected = _ort(typed_model(), {"ids": ids, "mask": mask, "ids32": ids32})
    for name, want in expected.items():
        got = result.as_numpy(name)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want)


def test_http_binary_size_mismatch_is_400_naming_the_tensor(
    http: httpclient.InferenceServerClient, replica: Replica
) -> None:
    before = _requests(replica.url, "400")
    item = _http_input(_x(2))
    item.set_shape([3, 64])  # the bytes of 2 rows, declared as 3
    error = _refused(http.infer, "web", [item])
    assert error.status() == "400"
    assert "input 'x' has 512 bytes of binary data, but shape [3, 64] of FP32 needs 768" in (
        error.message()
    )

    # a binary_data_size past the end of the body
    header = {
        "inputs": [
            {"name": "x", "shape": [1, 64], "datatype": "FP32"}
            | {"parameters": {"binary_data_size": 4096}}
        ]
    }
    head = json.dumps(header).encode()
    infer = f"{replica.url}/v2/models/web/infer"
    response = httpx.post(
        infer,
        content=head + b"\0" * 256,
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert response.status_code == 400
    assert (
        "input 'x' declares binary_data_size 4096, but only 256 bytes" in (response.json()["error"])
    )
    # a header length that is not a number, refused before the body is read
    response = httpx.post(infer, content=head, headers={"Inference-Header-Content-Length": "lots"})
    assert response.status_code == 400
    assert (
        "Inference-Header-Content-Length header must be a non-negative whole number"
        in (response.json()["error"])
    )
    assert _requests(replica.url, "400") - before == 3
    assert httpx.get(f"{replica.url}/v2/health/ready").status_code == 200


def test_http_triton_extensions(
    http: httpclient.InferenceServerClient, replica: Replica, linear: LinearModel
) -> None:
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready("web", "3")
    meta = http.get_server_metadata()
    assert {"binary_tensor_data", "model_configuration", "model_repository", "statistics"} <= set(
        meta["extensions"]
    )
    model = http.get_model_metadata("web")
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]

    config = http.get_model_config("web")
    assert config["name"] == "web" and config["max_batch_size"] == 32
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("x", "TYPE_FP32", [64])
    ]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 20_000
    assert http.get_model_config("web", "3") == config
    assert _refused(http.get_model_config, "other").status() == "404"

    assert http.get_model_repository_index() == [{"name": "web", "version": "3", "state": "READY"}]
    ready = httpx.post(f"{replica.url}/v2/repository/index", json={"ready": True})
    assert ready.json() == [{"name": "web", "version": "3", "state": "READY"}]
    bad = httpx.post(f"{replica.url}/v2/repository/index", json={"ready": "yes"})
    assert bad.status_code == 400 and "ready" in bad.json()["error"]
    load = _refused(http.load_model, "other")
    assert "serves 'web' version 3 only" in load.message()

    # statistics: count what this test sends, over HTTP (binary) and gRPC alike
    def inference_count() -> int:
        (stats,) = http.get_inference_statistics("web")["model_stats"]
        return int(stats["inference_count"])

    before = inference_count()
    http.infer("web", [_http_input(_x(4))])
    with grpcclient.InferenceServerClient(replica.grpc) as grpc:
        grpc.infer("web", [_grpc_input(_x(2))])
    assert inference_count() - before == 6
    everything = http.get_inference_statistics()
    (stats,) = everything["model_stats"]
    assert (stats["name"], stats["version"]) == ("web", "3")
    assert stats["execution_count"] >= 1 and stats["batch_stats"]
    assert stats["inference_stats"]["success"]["count"] >= 2
    assert http.get_inference_statistics("web", "3")["model_stats"][0]["name"] == "web"
    assert _refused(http.get_inference_statistics, "nope").status() == "404"


# --- gRPC: tritonclient.grpc ---------------------------------------------------------------------


def test_grpc_health_and_metadata(grpc: grpcclient.InferenceServerClient) -> None:
    assert grpc.is_server_live() and grpc.is_server_ready()
    assert grpc.is_model_ready("web") and grpc.is_model_ready("web", "3")
    meta = grpc.get_model_metadata("web")
    assert meta.name == "web" and list(meta.versions) == ["3"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 64])]
    assert [(t.name, list(t.shape)) for t in meta.outputs] == [("y", [-1, 10])]
    error = _refused(grpc.get_model_metadata, "nope")
    assert error.status() == "StatusCode.NOT_FOUND"


def test_grpc_config_index_and_statistics(grpc: grpcclient.InferenceServerClient) -> None:
    config = grpc.get_model_config("web").config
    assert config.name == "web" and config.max_batch_size == 32
    assert list(config.input[0].dims) == [64]
    assert config.dynamic_batching.max_queue_delay_microseconds == 20_000

    index = grpc.get_model_repository_index(as_json=True)
    assert index["models"] == [{"name": "web", "version": "3", "state": "READY"}]

    def count() -> int:
        (stats,) = grpc.get_inference_statistics("web", as_json=True)["model_stats"]
        return int(stats.get("inference_count", 0))

    before = count()
    grpc.infer("web", [_grpc_input(_x(3))])
    assert count() - before == 3


def test_grpc_infer_matches_onnxruntime(
    grpc: grpcclient.InferenceServerClient, linear: LinearModel, replica: Replica
) -> None:
    before = _requests(replica.url, "200")
    x = _x(7, seed=5)
    result = grpc.infer("web", [_grpc_input(x)], request_id="g-1")
    np.testing.assert_array_equal(result.as_numpy("y"), _ort(linear.data, {"x": x})["y"])
    assert result.get_response().id == "g-1"
    # counted in the replica's own metrics, as an HTTP request would be
    assert _requests(replica.url, "200") - before == 1


def test_grpc_and_http_requests_share_the_batcher(replica: Replica, linear: LinearModel) -> None:
    """Sent together, gRPC and HTTP requests go through the replica's one batcher: its batch
    histogram counts the rows of both, in fewer model calls than requests."""
    rows = [_x(1, seed=100 + i) for i in range(16)]

    def batch_calls() -> tuple[float, float]:
        samples = _samples(replica.url)
        count = samples[("shipyard_serving_batch_size_count", LABELS)]
        total = samples[("shipyard_serving_batch_size_sum", LABELS)]
        return count, total

    async def send_all() -> list[np.ndarray]:
        async with httpx.AsyncClient(timeout=30) as client:
            grpc = grpc_aio.InferenceServerClient(replica.grpc)
            try:

                async def over_http(x: np.ndarray) -> np.ndarray:
                    x_json = {"name": "x", "shape": [1, 64], "datatype": "FP32"}
                    payload = {"inputs": [x_json | {"data": x.ravel().tolist()}]}
                    response = await client.post(f"{replica.url}/v2/models/web/infer", json=payload)
                    assert response.status_code == 200, response.text
                    return np.asarray(response.json()["outputs"][0]["data"], np.float32)

                async def over_grpc(x: np.ndarray) -> np.ndarray:
                    item = grpc_aio.InferInput("x", [1, 64], "FP32")
                    item.set_data_from_numpy(x)
                    result = await grpc.infer("web", [item])
                    return np.asarray(result.as_numpy("y")).ravel()

                return await asyncio.gather(
                    *((over_http if i % 2 else over_grpc)(x) for i, x in enumerate(rows))
                )
            finally:
                await grpc.close()

    calls_before, rows_before = batch_calls()
    answers = asyncio.run(send_all())
    for x, y in zip(rows, answers, strict=True):
        np.testing.assert_allclose(y, linear.reference(x).ravel(), rtol=1e-5, atol=1e-6)
    calls, total = batch_calls()
    assert total - rows_before == 16
    assert calls - calls_before < 16, "every request ran alone: nothing was batched"


def test_grpc_message_over_the_limit_is_refused(
    grpc: grpcclient.InferenceServerClient, linear: LinearModel
) -> None:
    error = _refused(grpc.infer, "web", [_grpc_input(_x(300))])  # 76.8 kB > 64 kB
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED", error
    # the replica still serves, over both protocols
    x = _x(1)
    np.testing.assert_array_equal(
        grpc.infer("web", [_grpc_input(x)]).as_numpy("y"), linear.reference(x)
    )


def test_grpc_bad_input_is_invalid_argument_naming_it(
    grpc: grpcclient.InferenceServerClient,
) -> None:
    item = grpcclient.InferInput("x", [1, 63], "FP32")
    item.set_data_from_numpy(np.zeros((1, 63), np.float32))
    error = _refused(grpc.infer, "web", [item])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'x' has shape [1, 63] but the model expects [-1, 64]" in error.message()


# --- metrics labels ------------------------------------------------------------------------------


def test_metrics_carry_deployment_model_version_and_in_flight(
    http: httpclient.InferenceServerClient, replica: Replica
) -> None:
    http.infer("web", [_http_input(_x(1))])
    samples = _samples(replica.url)
    assert samples[("shipyard_serving_requests_total", tuple(sorted((*LABELS, ("code", "200")))))]
    assert samples[("shipyard_serving_model_ready", LABELS)] == 1
    assert samples[("shipyard_serving_in_flight_requests", LABELS)] == 0  # all answered


# --- flags ---------------------------------------------------------------------------------------


def test_bad_grpc_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--blobs", "file:///nowhere", "--digest", "ab" * 32, "--version", "1", "--name", "m"]
    assert main([*base, "--grpc-port", "0", "--grpc-host", "0.0.0.0"]) == 2
    assert "--grpc-host '0.0.0.0' is not a loopback address" in capsys.readouterr().err
    assert main([*base, "--grpc-port", "70000"]) == 2
    assert "--grpc-port must be between 0" in capsys.readouterr().err
    assert main([*base, "--grpc-port", "0", "--grpc-max-message-bytes", "big"]) == 2
    assert "--grpc-max-message-bytes: size 'big' is not valid" in capsys.readouterr().err
    assert main([*base, "--model-name", "../x"]) == 2
    assert "--model-name '../x' is not a valid name" in capsys.readouterr().err


def test_a_grpc_port_in_use_ends_the_replica_with_a_clear_message(
    blobs: BlobStore, linear: LinearModel
) -> None:
    digest = blobs.put_bytes(linear.data).digest
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        args = ["--blobs", blobs.url, "--digest", digest, "--name", "m", "--version", "1"]
        proc = subprocess.run(
            [*REPLICA, *args, "--port", "0", "--grpc-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"cannot bind the gRPC server to 127.0.0.1:{port}" in proc.stderr
    assert "serving on http" not in proc.stdout
