"""The replica as a real process: ``python -m shipyard.serving.replica`` on an inherited socket."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shipyard.blobs.store import BlobStore
from shipyard.serving.replica import main
from tests.conftest import wait_for
from tests.onnx_models import LinearModel, linear_model

REPLICA = [sys.executable, "-m", "shipyard.serving.replica"]


@dataclass
class Replica:
    url: str
    model: LinearModel
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/digits/infer"


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> BlobStore:
    return BlobStore(f"file://{tmp_path_factory.mktemp('replica') / 'blobs'}")


@pytest.fixture(scope="module")
def replica(blobs: BlobStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    model = linear_model(seed=3)
    digest = blobs.put_bytes(model.data).digest
    log = tmp_path_factory.mktemp("logs") / "replica.log"
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    args = [
        "--blobs", blobs.url, "--digest", digest, "--name", "digits", "--version", "7",
        "--fd", str(sock.fileno()), "--max-batch-size", "64", "--max-wait-ms", "100",
        "--max-body-bytes", "256KB",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*REPLICA, *args], pass_fds=[sock.fileno()], stdout=out, stderr=subprocess.STDOUT
        )
    sock.close()
    try:

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=60, what="the replica to be ready")
        yield Replica(url=url, model=model, proc=proc, log=log)
    finally:
        proc.terminate()  # SIGTERM: uvicorn shuts down gracefully
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("the replica did not exit on SIGTERM")


def _payload(x: np.ndarray, *, nested: bool = False) -> dict[str, object]:
    data = x.tolist() if nested else x.ravel().tolist()
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": data}]}


def _output(body: dict[str, object]) -> np.ndarray:
    [out] = body["outputs"]  # type: ignore[misc]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _batch_metrics(url: str) -> tuple[float, float]:
    """(model calls, rows) from the batch size histogram."""
    count = total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "shipyard_serving_batch_size_count":
                count = sample.value
            elif sample.name == "shipyard_serving_batch_size_sum":
                total = sample.value
    return count, total


def test_metadata_and_inference_over_http(replica: Replica) -> None:
    meta = httpx.get(f"{replica.url}/v2/models/digits").json()
    assert meta["versions"] == ["7"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    for nested in (False, True):
        response = httpx.post(replica.infer_url, json=_payload(x, nested=nested))
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(_output(response.json()), replica.model.reference(x))
    assert "loaded 'digits' version 7" in replica.log.read_text()


def test_concurrent_requests_are_batched(replica: Replica) -> None:
    calls_before, rows_before = _batch_metrics(replica.url)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((1, 64)).astype(np.float32) for _ in range(32)]

    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            return await asyncio.gather(
                *(client.post(replica.infer_url, json=_payload(x)) for x in xs)
            )

    responses = asyncio.run(send_all())
    for x, response in zip(xs, responses, strict=True):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(
            _output(response.json()), replica.model.reference(x), rtol=1e-5, atol=1e-6
        )
    calls, rows = _batch_metrics(replica.url)
    assert rows - rows_before == 32
    assert calls - calls_before < 32, "every request ran alone: nothing was batched"


def test_bad_requests_over_http(replica: Replica) -> None:
    response = httpx.post(
        replica.infer_url, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]

    x = np.zeros((1, 63), dtype=np.float32)
    response = httpx.post(replica.infer_url, json=_payload(x))
    assert response.status_code == 400
    assert "dimension 1 is 63, expected 64" in response.json()["error"]

    response = httpx.post(f"{replica.url}/v2/models/nope/infer", json=_payload(x))
    assert response.status_code == 404

    big = json.dumps(_payload(np.zeros((1000, 64), dtype=np.float32))).encode()  # 320 kB
    response = httpx.post(replica.infer_url, content=big)
    assert response.status_code == 413 and "at most 262144 bytes" in response.json()["error"]

    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length to check up front
        for start in range(0, len(big), 16384):
            yield big[start : start + 16384]

    response = httpx.post(replica.infer_url, content=chunks())
    assert response.status_code == 413 and "larger than 262144 bytes" in response.json()["error"]

    # the replica still serves after all that
    assert httpx.get(f"{replica.url}/v2/health/ready").status_code == 200


def test_metrics_endpoint_exposes_the_counters(replica: Replica) -> None:
    # one answered request of its own: under pytest-xdist this module's tests share no order
    x = np.zeros((1, 64), dtype=np.float32)
    assert httpx.post(replica.infer_url, json=_payload(x)).status_code == 200
    text = httpx.get(f"{replica.url}/metrics").text
    assert 'shipyard_serving_requests_total{code="200",model="digits",version="7"}' in text
    for name in (
        "shipyard_serving_request_duration_seconds_bucket",
        "shipyard_serving_batch_size_bucket",
        "shipyard_serving_inference_duration_seconds_count",
        "shipyard_serving_model_ready",
    ):
        assert name in text


def _start_replica(blobs: BlobStore, digest: str) -> subprocess.Popen[str]:
    args = ["--blobs", blobs.url, "--digest", digest, "--name", "digits", "--version", "1"]
    return subprocess.Popen(
        [*REPLICA, *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_missing_corrupted_or_non_onnx_blobs_exit_with_a_clear_message(blobs: BlobStore) -> None:
    data = linear_model(seed=9).data
    corrupt = blobs.put_bytes(data).digest
    Path(blobs.root, corrupt[:2], corrupt[2:4], corrupt).write_bytes(data[: len(data) // 2])
    pickle = blobs.put_bytes(b"\x80\x04K\x01.").digest
    cases = {
        "ab" * 32: "is not in the store",
        corrupt: "is corrupted",
        pickle: "not a valid ONNX file",
    }
    procs = {digest: _start_replica(blobs, digest) for digest in cases}  # in parallel
    for digest, phrase in cases.items():
        stdout, stderr = procs[digest].communicate(timeout=60)
        assert procs[digest].returncode == 1, stderr
        assert f"cannot load model 'digits' version 1 (blob {digest}" in stderr
        assert phrase in stderr
        assert "Uvicorn running" not in stdout + stderr  # it never served


def test_bad_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--blobs", "file:///nowhere", "--digest", "ab" * 32, "--version", "1"]
    assert main([*base, "--name", "digits", "--host", "0.0.0.0"]) == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert main([*base, "--name", "../x"]) == 2
    assert "--name '../x' is not a valid name" in capsys.readouterr().err
    assert main([*base, "--name", "digits", "--max-body-bytes", "huge"]) == 2
    assert "size 'huge' is not valid" in capsys.readouterr().err
