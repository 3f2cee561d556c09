"""Each resource's routes through a TestClient: the route table of docs/CONVENTIONS.md, thin
translation to the services, and responses that are the domain models."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from shipyard.blobs import hash_bytes
from shipyard.compute import jobs
from shipyard.compute.processes import process_alive
from shipyard.context import Context
from shipyard.domain.models import Job
from shipyard.store.tables import JobRow
from tests.conftest import wait_for
from tests.onnx_models import linear_model
from tests.server.conftest import TestClient

API = "/api/v1"
CONVENTIONS = Path(__file__).resolve().parents[2] / "docs" / "CONVENTIONS.md"


def _upload(client: TestClient, data: bytes) -> str:
    digest = hash_bytes(data)
    response = client.put(f"{API}/blobs/{digest}", content=data)
    assert response.status_code in (200, 201), response.text
    return digest


def _ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json() if response.content else None


def test_every_route_of_the_conventions_table_is_served(client: TestClient) -> None:
    table = CONVENTIONS.read_text().split("## REST API", 1)[1]
    documented = set()
    for methods, path in re.findall(r"`((?:[A-Z]+/?)+) (/[^`?]*)", table):
        for method in methods.split("/"):
            documented.add(
                (
                    method,
                    path
                    if path.startswith("/healthz")
                    or path in ("/metrics", "/", "/docs", "/openapi.json")
                    else f"{API}{path}",
                )
            )
    assert len(documented) >= 39, documented  # /docs and /openapi.json are checked below
    served = set()
    for route in client.app.routes:  # type: ignore[attr-defined]
        for method in getattr(route, "methods", None) or ():
            served.add((method, route.path))
    schema = client.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method in operations:
            served.add((method.upper(), path))
    served |= {("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json")}

    def shape(routes: set[tuple[str, str]]) -> set[tuple[str, str]]:
        return {(m, re.sub(r"\{[^}]*\}", "{}", p)) for m, p in routes}

    missing = shape(documented) - shape(served)
    assert not missing, f"routes in CONVENTIONS.md that the server lacks: {sorted(missing)}"
    assert client.get("/docs").status_code == 200
    assert client.get("/openapi.json").json()["info"]["title"] == "shipyard"


def test_runs(client: TestClient, ctx: Context) -> None:
    run = _ok(
        client.post(f"{API}/runs", json={"project": "p", "name": "r1", "params": {"lr": "0.1"}}),
        201,
    )
    assert run["status"] == "running" and run["project"] == "p"
    points = [
        {"key": "loss", "value": 1 / (s + 1), "step": s, "timestamp": 1000.0 + s} for s in range(5)
    ]
    stored = _ok(
        client.post(
            f"{API}/runs/{run['id']}/log-batch",
            json={"metrics": points, "tags": {"phase": "train"}},
        )
    )
    assert stored == {"stored": 5}
    history = _ok(client.get(f"{API}/runs/{run['id']}/metrics", params={"key": "loss"}))
    assert [p["step"] for p in history] == [0, 1, 2, 3, 4]
    assert history[-1]["value"] == pytest.approx(0.2)

    digest = _upload(client, b"checkpoint")
    artifact = _ok(
        client.post(
            f"{API}/runs/{run['id']}/artifacts",
            json={"path": "ckpt/last.bin", "digest": digest, "size": 10},
        ),
        201,
    )
    assert artifact == {"path": "ckpt/last.bin", "digest": digest, "size": 10}

    got = _ok(client.get(f"{API}/runs/{run['id']}"))
    assert got["metrics"] == {"loss": pytest.approx(0.2)}
    assert got["tags"] == {"phase": "train"} and got["artifacts"] == [artifact]
    listed = _ok(client.get(f"{API}/runs", params={"project": "p"}))
    assert [r["id"] for r in listed] == [run["id"]]
    everywhere = _ok(client.get(f"{API}/runs"))  # no project: every project, like the service
    assert run["id"] in [r["id"] for r in everywhere]

    finished = _ok(client.patch(f"{API}/runs/{run['id']}", json={"status": "finished"}))
    assert finished["status"] == "finished" and finished["finished_at"]
    refused = client.post(f"{API}/runs/{run['id']}/log-batch", json={"metrics": points})
    assert refused.status_code == 409
    assert len(_ok(client.get(f"{API}/runs/{run['id']}/metrics", params={"key": "loss"}))) == 5


def test_datasets(client: TestClient) -> None:
    files = {"a.txt": b"alpha", "sub/b.txt": b"beta"}
    entries = [{"path": p, "digest": _upload(client, d), "size": len(d)} for p, d in files.items()]
    v1 = _ok(
        client.post(
            f"{API}/datasets/ds/versions",
            json={"project": "p", "files": entries, "message": "first"},
        ),
        201,
    )
    assert v1["version"] == 1 and v1["file_count"] == 2 and v1["message"] == "first"

    entries[0] = {"path": "a.txt", "digest": _upload(client, b"ALPHA"), "size": 5}
    v2 = _ok(
        client.post(f"{API}/datasets/ds/versions", json={"project": "p", "files": entries}), 201
    )
    assert v2["version"] == 2

    datasets = _ok(client.get(f"{API}/datasets", params={"project": "p"}))
    assert [(d["name"], d["latest_version"]) for d in datasets] == [("ds", 2)]
    assert _ok(client.get(f"{API}/datasets/ds", params={"project": "p"}))["latest_version"] == 2
    versions = _ok(client.get(f"{API}/datasets/ds/versions", params={"project": "p"}))
    assert [v["version"] for v in versions] == [1, 2]
    for ref in ("1", "v1"):
        got = _ok(client.get(f"{API}/datasets/ds/versions/{ref}", params={"project": "p"}))
        assert got["id"] == v1["id"]
    latest = _ok(client.get(f"{API}/datasets/ds/versions/latest", params={"project": "p"}))
    assert latest["id"] == v2["id"]
    listed = _ok(client.get(f"{API}/datasets/ds/versions/1/files", params={"project": "p"}))
    assert [(f["path"], f["size"]) for f in listed] == [("a.txt", 5), ("sub/b.txt", 4)]

    bad_ref = client.get(f"{API}/datasets/ds/versions/zero", params={"project": "p"})
    assert bad_ref.status_code == 422 and bad_ref.json()["field"] == "version"
    missing_blob = client.post(
        f"{API}/datasets/ds/versions",
        json={
            "project": "p",
            "files": [{"path": "c.txt", "digest": hash_bytes(b"nope"), "size": 4}],
        },
    )
    assert missing_blob.status_code == 404
    assert len(_ok(client.get(f"{API}/datasets/ds/versions", params={"project": "p"}))) == 2
    # the default project is untouched
    assert client.get(f"{API}/datasets/ds").status_code == 404


def test_models_and_aliases(client: TestClient) -> None:
    model_bytes = linear_model(4, 2, input_name="input", output_name="logits").data
    digest = _upload(client, model_bytes)
    run = _ok(client.post(f"{API}/runs", json={"project": "p"}), 201)
    _ok(
        client.post(
            f"{API}/runs/{run['id']}/artifacts",
            json={"path": "model.onnx", "digest": digest, "size": len(model_bytes)},
        ),
        201,
    )
    v1 = _ok(
        client.post(
            f"{API}/models/m/versions",
            json={"project": "p", "digest": digest, "description": "by digest"},
        ),
        201,
    )
    v2 = _ok(
        client.post(
            f"{API}/models/m/versions",
            json={"project": "p", "run_id": run["id"], "artifact_path": "model.onnx"},
        ),
        201,
    )
    assert (v1["version"], v2["version"]) == (1, 2)
    assert v1["signature"]["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 4]}
    assert v2["source_run_id"] == run["id"]

    staging = _ok(
        client.put(f"{API}/models/m/aliases/staging", json={"project": "p", "version": 1})
    )
    assert staging["version"] == 1 and staging["aliases"] == ["staging"]
    _ok(client.put(f"{API}/models/m/aliases/staging", json={"project": "p", "version": "v2"}))
    _ok(client.put(f"{API}/models/m/aliases/production", json={"project": "p", "version": 1}))
    assert (
        _ok(client.get(f"{API}/models/m/versions/staging", params={"project": "p"}))["version"] == 2
    )
    assert _ok(client.get(f"{API}/models/m/versions/1", params={"project": "p"}))["aliases"] == [
        "production"
    ]
    model = _ok(client.get(f"{API}/models/m", params={"project": "p"}))
    assert model["latest_version"] == 2
    assert model["aliases"] == {"staging": 2, "production": 1}
    assert [m["name"] for m in _ok(client.get(f"{API}/models", params={"project": "p"}))] == ["m"]
    assert len(_ok(client.get(f"{API}/models/m/versions", params={"project": "p"}))) == 2

    assert (
        client.delete(f"{API}/models/m/aliases/staging", params={"project": "p"}).status_code == 204
    )
    gone = client.get(f"{API}/models/m/versions/staging", params={"project": "p"})
    assert gone.status_code == 404 and gone.json()["field"] == "ref"
    history = _ok(client.get(f"{API}/models/m/alias-history", params={"project": "p"}))
    assert [(e["alias"], e["version"], e["previous_version"]) for e in history] == [
        ("staging", 1, None),
        ("staging", 2, 1),
        ("production", 1, None),
        ("staging", None, 2),
    ]
    assert {e["actor"] for e in history} == {"local"}

    not_onnx = _upload(client, b"not a model at all")
    refused = client.post(f"{API}/models/m/versions", json={"project": "p", "digest": not_onnx})
    assert refused.status_code == 422
    pickled = client.post(
        f"{API}/models/m/versions", json={"project": "p", "digest": digest, "format": "pickle"}
    )
    assert pickled.status_code == 422 and pickled.json()["field"] == "format"
    assert len(_ok(client.get(f"{API}/models/m/versions", params={"project": "p"}))) == 2

    edges = _ok(client.get(f"{API}/lineage/run/{run['id']}"))
    assert [(e["relation"], e["target_kind"], e["target_id"]) for e in edges] == [
        ("output", "model_version", v2["id"])
    ]
    assert client.get(f"{API}/lineage/planet/{run['id']}").status_code == 422


def test_run_inputs_make_lineage(client: TestClient) -> None:
    entry = {"path": "x.txt", "digest": _upload(client, b"x"), "size": 1}
    version = _ok(client.post(f"{API}/datasets/ds/versions", json={"files": [entry]}), 201)
    run = _ok(client.post(f"{API}/runs", json={}), 201)
    response = client.post(f"{API}/runs/{run['id']}/inputs", json={"dataset": "ds", "version": 1})
    assert response.status_code == 204 and response.content == b""
    edges = _ok(client.get(f"{API}/lineage/dataset_version/{version['id']}"))
    assert [(e["source_id"], e["target_id"], e["relation"]) for e in edges] == [
        (version["id"], run["id"], "input")
    ]
    missing = client.post(f"{API}/runs/{run['id']}/inputs", json={"dataset": "ds", "version": 9})
    assert missing.status_code == 404
    assert len(_ok(client.get(f"{API}/lineage/run/{run['id']}"))) == 1


def test_audit_pages_through_events(client: TestClient) -> None:
    for _ in range(3):
        _ok(client.post(f"{API}/runs", json={}), 201)
    events = _ok(client.get(f"{API}/audit"))
    assert [e["action"] for e in events] == ["run.create"] * 3
    assert all(e["actor"] == "local" for e in events)
    page = _ok(client.get(f"{API}/audit", params={"after": events[0]["seq"], "limit": 1}))
    assert [e["seq"] for e in page] == [events[1]["seq"]]
    assert client.get(f"{API}/audit", params={"limit": 0}).status_code == 422


@pytest.fixture
def no_jobs_left(client: TestClient, ctx: Context) -> Iterator[None]:
    """Cancel what a test left running, and wait until every job supervisor has exited."""
    yield
    for job in client.get(f"{API}/jobs").json() or []:
        if job["status"] in ("queued", "running"):
            client.post(f"{API}/jobs/{job['id']}/cancel")
    with ctx.db.read() as s:
        supervisors = s.execute(select(JobRow.supervisor_pid, JobRow.supervisor_started)).all()
    for pid, started in supervisors:
        if pid is not None:
            wait_for(
                lambda p=pid, t=started: not process_alive(p, t),
                timeout=30,
                what="supervisor exit",
            )
    jobs.tick(ctx)  # reaps the exited supervisors this process started (the server's tick would)


def test_jobs(client: TestClient, no_jobs_left: None) -> None:
    spec = {
        "command": [sys.executable, "-c", "print('hello from the job \\u00e9')"],
        "name": "hello",
    }
    job = _ok(client.post(f"{API}/jobs", json={"project": "p", "spec": spec}), 201)
    assert job["name"] == "hello" and job["created_by"] == "local"

    def finished() -> dict[str, Any] | None:
        current = _ok(client.get(f"{API}/jobs/{job['id']}"))
        return current if current["status"] not in ("queued", "running") else None

    done = wait_for(finished, timeout=60, what="the job to finish")
    assert done["status"] == "succeeded", done
    logs = _ok(client.get(f"{API}/jobs/{job['id']}/logs", params={"offset": 0}))
    assert "hello from the job \u00e9" in logs["data"]
    assert logs["finished"] is True
    assert logs["offset"] == len(logs["data"].encode())
    tail = _ok(client.get(f"{API}/jobs/{job['id']}/logs", params={"offset": logs["offset"]}))
    assert tail == {"data": "", "offset": logs["offset"], "finished": True}

    assert [j["id"] for j in _ok(client.get(f"{API}/jobs", params={"project": "p"}))] == [job["id"]]
    assert _ok(client.get(f"{API}/jobs", params={"status": "queued"})) == []
    assert len(_ok(client.get(f"{API}/jobs", params={"status": "succeeded"}))) == 1
    Job.model_validate(done)

    cancel = client.post(f"{API}/jobs/{job['id']}/cancel")
    assert cancel.status_code == 409 and cancel.json()["code"] == "invalid_state"
    assert client.get(f"{API}/jobs/{job['id']}/logs", params={"offset": -1}).status_code == 422

    with_code = client.post(
        f"{API}/jobs", json={"project": "p", "spec": spec, "code_digest": hash_bytes(b"code")}
    )
    # a snapshot digest the server does not hold: refused, naming the field, nothing queued
    assert with_code.status_code == 404, with_code.json()
    assert with_code.json()["field"] == "code_digest"
    bad_spec = client.post(f"{API}/jobs", json={"project": "p", "spec": {"command": []}})
    assert bad_spec.status_code == 422 and bad_spec.json()["field"] == "spec.command"
    assert len(_ok(client.get(f"{API}/jobs", params={"project": "p"}))) == 1


def test_cancel_a_running_job(client: TestClient, no_jobs_left: None) -> None:
    spec = {
        "command": [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
    }
    job = _ok(client.post(f"{API}/jobs", json={"spec": spec}), 201)
    wait_for(
        lambda: "up" in client.get(f"{API}/jobs/{job['id']}/logs").json()["data"],
        timeout=60,
        what="the job to start",
    )
    _ok(client.post(f"{API}/jobs/{job['id']}/cancel"))
    done = wait_for(
        lambda: (j := client.get(f"{API}/jobs/{job['id']}").json())["status"] != "running" and j,
        timeout=60,
        what="the job to stop",
    )
    assert done["status"] == "cancelled"


@pytest.mark.slow
def test_deployments(client: TestClient) -> None:
    built = linear_model(4, 2, input_name="input", output_name="logits")
    model_bytes, w, b = built.data, built.weights, built.bias
    digest = _upload(client, model_bytes)
    _ok(client.post(f"{API}/models/m/versions", json={"digest": digest}), 201)
    _ok(client.put(f"{API}/models/m/aliases/production", json={"version": 1}))
    deployment = _ok(client.post(f"{API}/deployments", json={"name": "ep", "model": "m"}), 201)
    try:
        assert deployment["status"] == "running", deployment
        assert deployment["version"] == 1 and deployment["alias"] == "production"
        x = np.ones((1, 4), dtype=np.float32)
        answer = httpx.post(
            f"{deployment['url']}/v2/models/ep/infer",
            json={
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "FP32",
                        "shape": [1, 4],
                        "data": x.ravel().tolist(),
                    }
                ]
            },
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        got = np.array(answer.json()["outputs"][0]["data"], dtype=np.float32)
        np.testing.assert_allclose(got, (x @ w + b).ravel(), rtol=1e-5)
        assert [d["name"] for d in _ok(client.get(f"{API}/deployments"))] == ["ep"]
        assert _ok(client.get(f"{API}/deployments/ep"))["status"] == "running"
        duplicate = client.post(f"{API}/deployments", json={"name": "ep", "model": "m"})
        assert duplicate.status_code == 409
    finally:
        stopped = _ok(client.post(f"{API}/deployments/ep/stop"))
    assert stopped["status"] == "stopped"
    assert client.post(f"{API}/deployments/ep/stop").status_code == 409
    assert client.get(f"{API}/deployments/nope").status_code == 404
