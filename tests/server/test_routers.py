"""Each resource's routes through a TestClient: the route table of docs/CONVENTIONS.md, thin
translation to the services, and responses that are the domain models."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from shipyard.blobs import hash_bytes
from shipyard.compute import admission, jobs
from shipyard.compute.processes import process_alive
from shipyard.context import Context
from shipyard.domain.models import Job, JobSpec
from shipyard.errors import InvalidStateError
from shipyard.serving import reconciler
from shipyard.store.tables import JobRow
from tests.conftest import wait_for
from tests.job_user import job_python
from tests.onnx_models import linear_model
from tests.server.conftest import TestClient

API = "/api/v1"
PD = f"{API}/projects/default"  # the default project
PP = f"{API}/projects/p"
CONVENTIONS = Path(__file__).resolve().parents[2] / "docs" / "CONVENTIONS.md"


def _upload(client: TestClient, data: bytes, project: str = "default") -> str:
    digest = hash_bytes(data)
    response = client.put(f"{API}/projects/{project}/blobs/{digest}", content=data)
    assert response.status_code in (200, 201), response.text
    return digest


def _ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json() if response.content else None


def test_every_route_of_the_conventions_table_is_served(client: TestClient) -> None:
    table = CONVENTIONS.read_text().split("## REST API", 1)[1].replace(" P/", " /projects/{p}/")
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
        client.post(f"{PP}/runs", json={"name": "r1", "params": {"lr": "0.1"}}),
        201,
    )
    assert run["status"] == "running" and run["project"] == "p"
    points = [
        {"key": "loss", "value": 1 / (s + 1), "step": s, "timestamp": 1000.0 + s} for s in range(5)
    ]
    stored = _ok(
        client.post(
            f"{PP}/runs/{run['id']}/log-batch",
            json={"metrics": points, "tags": {"phase": "train"}},
        )
    )
    assert stored["stored"] == 5
    history = _ok(client.get(f"{PP}/runs/{run['id']}/metrics", params={"key": "loss"}))
    assert [p["step"] for p in history] == [0, 1, 2, 3, 4]
    assert history[-1]["value"] == pytest.approx(0.2)

    digest = _upload(client, b"checkpoint", "p")
    artifact = _ok(
        client.post(
            f"{PP}/runs/{run['id']}/artifacts",
            json={"path": "ckpt/last.bin", "digest": digest, "size": 10},
        ),
        201,
    )
    assert artifact == {"path": "ckpt/last.bin", "digest": digest, "size": 10}

    got = _ok(client.get(f"{PP}/runs/{run['id']}"))
    assert got["metrics"] == {"loss": pytest.approx(0.2)}
    assert got["tags"] == {"phase": "train"} and got["artifacts"] == [artifact]
    listed = _ok(client.get(f"{PP}/runs"))
    assert [r["id"] for r in listed] == [run["id"]]
    assert _ok(client.get(f"{PD}/runs")) == []  # another project's runs are not listed

    finished = _ok(client.patch(f"{PP}/runs/{run['id']}", json={"status": "finished"}))
    assert finished["status"] == "finished" and finished["finished_at"]
    refused = client.post(f"{PP}/runs/{run['id']}/log-batch", json={"metrics": points})
    assert refused.status_code == 409
    assert len(_ok(client.get(f"{PP}/runs/{run['id']}/metrics", params={"key": "loss"}))) == 5


def test_datasets(client: TestClient) -> None:
    files = {"a.txt": b"alpha", "sub/b.txt": b"beta"}
    entries = [
        {"path": p, "digest": _upload(client, d, "p"), "size": len(d)} for p, d in files.items()
    ]
    v1 = _ok(
        client.post(
            f"{PP}/datasets/ds/versions",
            json={"files": entries, "message": "first"},
        ),
        201,
    )
    assert v1["version"] == 1 and v1["file_count"] == 2 and v1["message"] == "first"

    entries[0] = {"path": "a.txt", "digest": _upload(client, b"ALPHA", "p"), "size": 5}
    v2 = _ok(client.post(f"{PP}/datasets/ds/versions", json={"files": entries}), 201)
    assert v2["version"] == 2

    datasets = _ok(client.get(f"{PP}/datasets"))
    assert [(d["name"], d["latest_version"]) for d in datasets] == [("ds", 2)]
    assert _ok(client.get(f"{PP}/datasets/ds"))["latest_version"] == 2
    versions = _ok(client.get(f"{PP}/datasets/ds/versions"))
    assert [v["version"] for v in versions] == [1, 2]
    for ref in ("1", "v1"):
        got = _ok(client.get(f"{PP}/datasets/ds/versions/{ref}"))
        assert got["id"] == v1["id"]
    latest = _ok(client.get(f"{PP}/datasets/ds/versions/latest"))
    assert latest["id"] == v2["id"]
    listed = _ok(client.get(f"{PP}/datasets/ds/versions/1/files"))
    assert [(f["path"], f["size"]) for f in listed] == [("a.txt", 5), ("sub/b.txt", 4)]

    bad_ref = client.get(f"{PP}/datasets/ds/versions/v0")
    assert bad_ref.status_code == 422 and bad_ref.json()["field"] == "version"
    no_tag = client.get(f"{PP}/datasets/ds/versions/zero")  # a name: a tag, and there is none
    assert no_tag.status_code == 404 and "no version or tag 'zero'" in no_tag.json()["message"]
    missing_blob = client.post(
        f"{PP}/datasets/ds/versions",
        json={
            "files": [{"path": "c.txt", "digest": hash_bytes(b"nope"), "size": 4}],
        },
    )
    assert missing_blob.status_code == 404
    assert len(_ok(client.get(f"{PP}/datasets/ds/versions"))) == 2
    # the default project is untouched
    assert client.get(f"{PD}/datasets/ds").status_code == 404


def test_models_and_aliases(client: TestClient) -> None:
    model_bytes = linear_model(4, 2, input_name="input", output_name="logits").data
    digest = _upload(client, model_bytes, "p")
    run = _ok(client.post(f"{PP}/runs", json={}), 201)
    _ok(
        client.post(
            f"{PP}/runs/{run['id']}/artifacts",
            json={"path": "model.onnx", "digest": digest, "size": len(model_bytes)},
        ),
        201,
    )
    v1 = _ok(
        client.post(
            f"{PP}/models/m/versions",
            json={"digest": digest, "description": "by digest"},
        ),
        201,
    )
    v2 = _ok(
        client.post(
            f"{PP}/models/m/versions",
            json={"run_id": run["id"], "artifact_path": "model.onnx"},
        ),
        201,
    )
    assert (v1["version"], v2["version"]) == (1, 2)
    assert v1["signature"]["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 4]}
    assert v2["source_run_id"] == run["id"]

    staging = _ok(client.put(f"{PP}/models/m/aliases/staging", json={"version": 1}))
    assert staging["version"] == 1 and staging["aliases"] == ["staging"]
    _ok(client.put(f"{PP}/models/m/aliases/staging", json={"version": "v2"}))
    _ok(client.put(f"{PP}/models/m/aliases/production", json={"version": 1}))
    assert _ok(client.get(f"{PP}/models/m/versions/staging"))["version"] == 2
    assert _ok(client.get(f"{PP}/models/m/versions/1"))["aliases"] == ["production"]
    model = _ok(client.get(f"{PP}/models/m"))
    assert model["latest_version"] == 2
    assert model["aliases"] == {"staging": 2, "production": 1}
    assert [m["name"] for m in _ok(client.get(f"{PP}/models"))] == ["m"]
    assert len(_ok(client.get(f"{PP}/models/m/versions"))) == 2

    assert client.delete(f"{PP}/models/m/aliases/staging").status_code == 204
    gone = client.get(f"{PP}/models/m/versions/staging")
    assert gone.status_code == 404 and gone.json()["field"] == "ref"
    history = _ok(client.get(f"{PP}/models/m/alias-history"))
    assert [(e["alias"], e["version"], e["previous_version"]) for e in history] == [
        ("staging", 1, None),
        ("staging", 2, 1),
        ("production", 1, None),
        ("staging", None, 2),
    ]
    assert {e["actor"] for e in history} == {"local"}

    not_onnx = _upload(client, b"not a model at all", "p")
    refused = client.post(f"{PP}/models/m/versions", json={"digest": not_onnx})
    assert refused.status_code == 422
    pickled = client.post(f"{PP}/models/m/versions", json={"digest": digest, "format": "pickle"})
    assert pickled.status_code == 422 and pickled.json()["field"] == "format"
    assert len(_ok(client.get(f"{PP}/models/m/versions"))) == 2

    edges = _ok(client.get(f"{PP}/lineage/run/{run['id']}"))
    assert [(e["relation"], e["target_kind"], e["target_id"]) for e in edges] == [
        ("output", "model_version", v2["id"])
    ]
    assert client.get(f"{PP}/lineage/planet/{run['id']}").status_code == 422


def test_run_inputs_make_lineage(client: TestClient) -> None:
    entry = {"path": "x.txt", "digest": _upload(client, b"x"), "size": 1}
    version = _ok(client.post(f"{PD}/datasets/ds/versions", json={"files": [entry]}), 201)
    run = _ok(client.post(f"{PD}/runs", json={}), 201)
    response = client.post(f"{PD}/runs/{run['id']}/inputs", json={"dataset": "ds", "version": 1})
    assert response.status_code == 204 and response.content == b""
    edges = _ok(client.get(f"{PD}/lineage/dataset_version/{version['id']}"))
    assert [(e["source_id"], e["target_id"], e["relation"]) for e in edges] == [
        (version["id"], run["id"], "input")
    ]
    missing = client.post(f"{PD}/runs/{run['id']}/inputs", json={"dataset": "ds", "version": 9})
    assert missing.status_code == 404
    assert len(_ok(client.get(f"{PD}/lineage/run/{run['id']}"))) == 1


def test_audit_pages_through_events(client: TestClient) -> None:
    for _ in range(3):
        _ok(client.post(f"{PD}/runs", json={}), 201)
    events = _ok(client.get(f"{API}/audit"))
    assert [e["action"] for e in events] == ["run.create"] * 3
    assert all(e["actor"] == "local" for e in events)
    page = _ok(client.get(f"{API}/audit", params={"after": events[0]["seq"], "limit": 1}))
    assert [e["seq"] for e in page] == [events[1]["seq"]]
    assert client.get(f"{API}/audit", params={"limit": 0}).status_code == 422


def test_by_id_routes_of_another_project_are_404(client: TestClient, ctx: Context) -> None:
    """Item 9 (paths): an id is found only under its own project; another project's id answers
    exactly like a missing one (and changes nothing)."""
    digest = _upload(client, b"x", "p")
    run = _ok(client.post(f"{PP}/runs", json={}), 201)
    _ok(client.post(f"{PP}/datasets/ds/versions", json={"files": [_entry("x", digest)]}), 201)
    job_id = jobs.submit_job(ctx, project="p", spec=JobSpec(command=["true"])).id
    try:
        point = {"key": "k", "value": 1.0, "step": 0, "timestamp": 1.0}
        other = f"{API}/projects/q"
        _ok(client.post(f"{other}/runs", json={}), 201)  # project q exists, and is not p
        for method, path, body in [
            ("GET", f"/runs/{run['id']}", None),
            ("PATCH", f"/runs/{run['id']}", {"status": "killed"}),
            ("POST", f"/runs/{run['id']}/log-batch", {"metrics": [point]}),
            ("GET", f"/runs/{run['id']}/metrics?key=k", None),
            ("POST", f"/runs/{run['id']}/artifacts", _entry("a", digest)),
            ("GET", f"/jobs/{job_id}", None),
            ("POST", f"/jobs/{job_id}/cancel", None),
            ("GET", f"/jobs/{job_id}/logs", None),
            ("GET", f"/lineage/run/{run['id']}", None),
            ("GET", "/datasets/ds/versions/1", None),
        ]:
            got = client.request(method, f"{other}{path}", json=body)
            assert got.status_code == 404, (method, path, got.text)
            if run["id"] in path and method == "GET":  # the same answer as an id nobody has
                missing = client.get(f"{other}{path.replace(run['id'], 'f' * 16)}")
                assert got.json()["message"].replace(run["id"], "ID") == missing.json()[
                    "message"
                ].replace("f" * 16, "ID")
        assert _ok(client.get(f"{PP}/runs/{run['id']}"))["status"] == "running"
        assert _ok(client.get(f"{PP}/jobs/{job_id}"))["status"] != "cancelled"
        assert _ok(client.get(f"{PP}/runs/{run['id']}"))["artifacts"] == []
    finally:
        with contextlib.suppress(InvalidStateError):  # `true` may have finished already
            jobs.cancel_job(ctx, job_id=job_id)


def _entry(path: str, digest: str) -> dict[str, Any]:
    return {"path": path, "digest": digest, "size": 1}


@pytest.fixture
def no_jobs_left(client: TestClient, ctx: Context) -> Iterator[None]:
    """Cancel what a test left running, and wait until every job supervisor has exited."""
    yield
    for prefix in (PD, PP):
        listed = client.get(f"{prefix}/jobs")
        for job in listed.json() if listed.status_code == 200 else []:
            if job["status"] in ("queued", "running"):
                client.post(f"{prefix}/jobs/{job['id']}/cancel")
    with ctx.db.read() as s:
        supervisors = [
            ((ref or {}).get("supervisor_pid"), (ref or {}).get("supervisor_started"))
            for ref in s.scalars(select(JobRow.executor_ref))
        ]
    for pid, started in supervisors:
        if pid is not None:
            wait_for(
                lambda p=pid, t=started: not process_alive(p, t),
                timeout=30,
                what="supervisor exit",
            )
    admission.step(ctx)  # reaps the exited supervisors this process started (as a server)


def test_jobs(client: TestClient, no_jobs_left: None) -> None:
    spec = {
        "command": [job_python()[0], "-c", "print('hello from the job \\u00e9')"],
        "name": "hello",
    }
    job = _ok(client.post(f"{PP}/jobs", json={"spec": spec}), 201)
    assert job["name"] == "hello" and job["created_by"] == "local"

    def finished() -> dict[str, Any] | None:
        current = _ok(client.get(f"{PP}/jobs/{job['id']}"))
        return current if current["status"] not in ("queued", "running") else None

    done = wait_for(finished, timeout=60, what="the job to finish")
    assert done["status"] == "succeeded", done
    logs = _ok(client.get(f"{PP}/jobs/{job['id']}/logs", params={"offset": 0}))
    assert "hello from the job \u00e9" in logs["data"]
    assert logs["finished"] is True
    assert logs["offset"] == len(logs["data"].encode())
    tail = _ok(client.get(f"{PP}/jobs/{job['id']}/logs", params={"offset": logs["offset"]}))
    assert tail == {"data": "", "offset": logs["offset"], "finished": True}

    assert [j["id"] for j in _ok(client.get(f"{PP}/jobs"))] == [job["id"]]
    assert _ok(client.get(f"{PP}/jobs", params={"status": "queued"})) == []
    assert len(_ok(client.get(f"{PP}/jobs", params={"status": "succeeded"}))) == 1
    Job.model_validate(done)

    cancel = client.post(f"{PP}/jobs/{job['id']}/cancel")
    assert cancel.status_code == 409 and cancel.json()["code"] == "invalid_state"
    assert client.get(f"{PP}/jobs/{job['id']}/logs", params={"offset": -1}).status_code == 422

    with_code = client.post(f"{PP}/jobs", json={"spec": spec, "code_digest": hash_bytes(b"code")})
    # a snapshot digest the server does not hold: refused, naming the field, nothing queued
    assert with_code.status_code == 404, with_code.json()
    assert with_code.json()["field"] == "code_digest"
    bad_spec = client.post(f"{PP}/jobs", json={"spec": {"command": []}})
    assert bad_spec.status_code == 422 and bad_spec.json()["field"] == "spec.command"
    assert len(_ok(client.get(f"{PP}/jobs"))) == 1


def test_cancel_a_running_job(client: TestClient, no_jobs_left: None) -> None:
    spec = {
        "command": [job_python()[0], "-c", "import time; print('up', flush=True); time.sleep(60)"]
    }
    job = _ok(client.post(f"{PD}/jobs", json={"spec": spec}), 201)
    wait_for(
        lambda: "up" in client.get(f"{PD}/jobs/{job['id']}/logs").json()["data"],
        timeout=60,
        what="the job to start",
    )
    _ok(client.post(f"{PD}/jobs/{job['id']}/cancel"))
    done = wait_for(
        lambda: (j := client.get(f"{PD}/jobs/{job['id']}").json())["status"] != "running" and j,
        timeout=60,
        what="the job to stop",
    )
    assert done["status"] == "cancelled"


@pytest.mark.slow
def test_deployments(client: TestClient) -> None:
    built = linear_model(4, 2, input_name="input", output_name="logits")
    model_bytes, w, b = built.data, built.weights, built.bias
    digest = _upload(client, model_bytes)
    _ok(client.post(f"{PD}/models/m/versions", json={"digest": digest}), 201)
    _ok(client.put(f"{PD}/models/m/aliases/production", json={"version": 1}))
    deployment = _ok(client.post(f"{PD}/deployments", json={"name": "ep", "model": "m"}), 201)
    try:
        # a write records the desired state and returns at once; the reconciler (a server's
        # background loop, off in this app) starts it
        assert deployment["status"] == "starting", deployment
        settled = reconciler.settle(client.app.state.ctx, project="default", name="ep", timeout=60)
        assert settled.status.value == "running", settled.message
        deployment = _ok(client.get(f"{PD}/deployments/ep"))
        assert deployment["version"] == 1 and deployment["alias"] == "production"
        x = np.ones((1, 4), dtype=np.float32)
        # the deployment's URL is the server's front door (the gateway), not a replica's
        server_url = client.app.state.ctx.settings.server_url
        assert deployment["url"] == server_url.rstrip("/"), deployment
        answer = client.post(
            "/v2/models/ep/infer",
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
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-shipyard-model-version"] == "1"
        got = np.array(answer.json()["outputs"][0]["data"], dtype=np.float32)
        np.testing.assert_allclose(got, (x @ w + b).ravel(), rtol=1e-5)
        assert [d["name"] for d in _ok(client.get(f"{PD}/deployments"))] == ["ep"]
        assert _ok(client.get(f"{PD}/deployments/ep"))["status"] == "running"
        duplicate = client.post(f"{PD}/deployments", json={"name": "ep", "model": "m"})
        assert duplicate.status_code == 409
    finally:
        stopped = _ok(client.post(f"{PD}/deployments/ep/stop"))
    assert stopped["status"] == "stopped"
    assert client.post(f"{PD}/deployments/ep/stop").status_code == 409
    assert client.get(f"{PD}/deployments/nope").status_code == 404
