"""Every route of the OpenAPI x every role x own/other project, against the allow/deny table.

Auth on, real tokens, real ids: two projects (``alpha``, the callers' own, and ``beta``) each hold
a blob, a dataset, a run with an artifact, a model with a ``production`` alias and a finished job.
Callers: a viewer, an editor and an admin of ``alpha``, a user who is a member of nothing, and
the principal of ``alpha``'s job. Nobody but the server admin is a member of ``beta``.

Allowed means the service let the call through: 2xx, or an error about the resource itself
(404 naming a field other than the project, 409, a 422 from the service). Denied means 403, or
the very 404 a missing project gets - which is also what a non-member sees for a project that
exists, so project names do not leak.
"""

from __future__ import annotations

import re
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from shipyard.compute import jobs
from shipyard.context import Context
from shipyard.data import datasets
from shipyard.domain.models import FileEntry, JobSpec
from shipyard.security import principals, rbac, tokens
from shipyard.security.blobrefs import note_upload
from shipyard.server.app import create_app
from shipyard.settings import Settings
from shipyard.tracking import registry, runs
from tests.onnx_models import linear_model
from tests.server.conftest import TestClient

API = "/api/v1"
OWN, OTHER = "alpha", "beta"
ROLES = ("viewer", "editor", "admin", "outsider", "job")
RUN_WRITES = ("/log-batch", "/heartbeat", "/artifacts", "/inputs", "/checkpoints")


@dataclass
class Fixture:
    client: TestClient
    secrets: dict[str, str]
    ids: dict[str, dict[str, str]]  # project -> what -> id
    spare_token: str


@pytest.fixture
def world(settings: Settings, ctx: Context) -> Iterator[Fixture]:
    ids: dict[str, dict[str, str]] = {}
    onnx = linear_model(4, 2).data
    for project in (OWN, OTHER):
        principals.create_project(ctx, name=project)
        data = f"content of {project}".encode()
        blob = ctx.blobs.put_bytes(data).digest
        model_blob = ctx.blobs.put_bytes(onnx).digest
        note_upload(ctx, project=project, digest=blob)
        note_upload(ctx, project=project, digest=model_blob)
        datasets.commit_files(
            ctx,
            project=project,
            name="ds",
            files=[FileEntry(path="data.txt", digest=blob, size=len(data))],
        )
        run = runs.create_run(ctx, project=project, name="train")
        runs.log_artifact(ctx, run_id=run.id, path="model.onnx", digest=model_blob, size=len(onnx))
        registry.register_version(
            ctx, project=project, model="m", run_id=run.id, artifact_path="model.onnx"
        )
        registry.set_alias(ctx, project=project, model="m", alias="production", version=1)
        job = jobs.submit_job(
            ctx, project=project, spec=JobSpec(command=[sys.executable, "-c", "pass"])
        )
        jobs.wait_job(ctx, job_id=job.id, timeout=60)
        ids[project] = {
            "blob": blob,
            "size": str(len(data)),
            "model_blob": model_blob,
            "run": run.id,
            "job": job.id,
        }
    secrets: dict[str, str] = {}
    for name in ("viewer", "editor", "admin", "outsider", "spare"):
        principals.create_principal(ctx, name=name)
    for name in ("viewer", "editor", "admin"):
        principals.set_member(ctx, project=OWN, principal=name, role=name)
    for name in ("viewer", "editor", "admin", "outsider"):
        secrets[name] = tokens.create_token(ctx, name=f"{name}-token", principal=name)[1]
    spare, _ = tokens.create_token(ctx, name="spare-token", principal="spare")
    secrets["job"] = principals.issue_job_token(
        ctx, job_id=ids[OWN]["job"], project=OWN, run_id=ids[OWN]["run"]
    )
    app = create_app(settings, auth=True, scheduler=False)
    with TestClient(app) as client:
        yield Fixture(client=client, secrets=secrets, ids=ids, spare_token=spare.id)


def _operations(client: TestClient) -> list[tuple[str, str]]:
    schema = client.app.openapi()  # type: ignore[attr-defined]
    return [
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        for method in operations
        if path.startswith(API)
    ]


def _fill(path: str, project: str, world: Fixture) -> str:
    ids = world.ids[project]
    values = {
        "project": project,
        "digest": ids["blob"],
        "run_id": ids["run"],
        "job_id": ids["job"],
        "version": "1",
        "ref": "1",
        "alias": "production",
        "tag": "walk",
        "kind": "run",
        "id": ids["run"],
        "principal": "spare",
        "token_id": world.spare_token,
        "node_id": socket.gethostname(),  # the local executor's one node
    }

    def value(match: re.Match[str]) -> str:
        key = match[1]
        if key == "name":
            if "/users/" in path:
                return "spare"
            if "/datasets/" in path:
                return "ds"
            if "/models/" in path:
                return "m"
            if "/queues/" in path:
                return OWN  # a project's own queue
            return "nope"  # deployments: none exists
        return values[key]

    return re.sub(r"\{([^}]*)\}", value, path)


def _body(method: str, path: str, project: str, world: Fixture) -> dict[str, Any]:
    ids = world.ids[project]
    if method == "PUT" and "/blobs/" in path:
        return {"content": f"content of {project}".encode()}
    if path.endswith("/metrics"):
        return {"params": {"key": "loss"}}
    bodies: dict[tuple[str, str], Any] = {
        ("POST", "/datasets/{name}/versions"): {
            "files": [{"path": "data.txt", "digest": ids["blob"], "size": int(ids["size"])}]
        },
        ("PUT", "/datasets/{name}/tags/{tag}"): {"version": 1},
        ("POST", "/blobs/missing"): {"digests": [ids["blob"]]},
        ("POST", "/blobs/fetch"): {"digests": [ids["blob"]]},
        ("POST", "/runs"): {"name": "walk"},
        ("PATCH", "/runs/{run_id}"): {"status": "finished"},
        ("POST", "/runs/{run_id}/log-batch"): {
            "metrics": [{"key": "loss", "value": 1.0, "step": 0, "timestamp": 0.0}]
        },
        ("POST", "/runs/{run_id}/artifacts"): {
            "path": "copy.txt",
            "digest": ids["blob"],
            "size": int(ids["size"]),
        },
        ("POST", "/runs/{run_id}/inputs"): {"dataset": "ds", "version": 1},
        ("POST", "/runs/{run_id}/checkpoints"): {
            "files": [{"path": "state.bin", "digest": ids["blob"], "size": int(ids["size"])}],
            "step": 1,
        },
        ("POST", "/models/{name}/versions"): {"digest": ids["model_blob"]},
        ("PUT", "/models/{name}/aliases/{alias}"): {"version": 1},
        ("POST", "/jobs"): {"spec": {"command": ["true"], "resources": {"gpus": 1024}}},
        ("POST", "/deployments"): {"name": "walk", "model": "nope"},
        ("PATCH", "/deployments/{name}"): {"replicas": {"min": 1, "max": 1}},
        ("POST", "/deployments/{name}/scale"): {"min": 1},
        ("PUT", "/members/{principal}"): {"role": "viewer"},
        ("POST", API + "/projects"): {"name": "gamma"},
        ("POST", API + "/users"): {"name": "newcomer"},
        ("POST", API + "/tokens"): {"name": "walk"},
        ("PUT", "/queues/{name}"): {"nominal": {"gpus": 1}},
    }
    for (m, suffix), body in bodies.items():
        if m == method and path.endswith(suffix):
            return {"json": body}
    return {}


def _expect_scoped(role: str, method: str, path: str, own: bool) -> str:
    """'allow', 'deny403' or 'hidden' (the missing-project 404) for a project-scoped route."""
    if not own or role == "outsider":
        return "hidden"
    write = method not in ("GET", "HEAD") and not path.endswith("/blobs/fetch")  # a read
    if not write or role == "admin":
        return "allow"
    if role == "viewer":
        return "deny403"
    if role == "editor":
        return "deny403" if "/members/" in path else "allow"
    # the job principal: its own run, model versions and blob uploads
    run_write = path.endswith("/runs/{run_id}") and method == "PATCH"
    run_write = run_write or any(path.endswith(s) for s in RUN_WRITES)
    if run_write or path.endswith("/models/{name}/versions") or "/blobs/" in path:
        return "allow"
    return "deny403"


UNSCOPED: dict[tuple[str, str], dict[str, int]] = {
    ("GET", "/api/v1/projects"): dict.fromkeys(ROLES, 200),
    ("POST", "/api/v1/projects"): dict.fromkeys(ROLES, 403),
    ("GET", "/api/v1/users"): dict.fromkeys(ROLES, 403),
    ("POST", "/api/v1/users"): dict.fromkeys(ROLES, 403),
    ("GET", "/api/v1/users/me"): dict.fromkeys(ROLES, 200),
    ("POST", "/api/v1/users/{name}/disable"): dict.fromkeys(ROLES, 403),
    ("GET", "/api/v1/audit"): dict.fromkeys(ROLES, 403),
    ("GET", "/api/v1/audit/verify"): dict.fromkeys(ROLES, 403),
    ("GET", "/api/v1/tokens"): dict.fromkeys(ROLES, 200),
    ("POST", "/api/v1/tokens"): {**dict.fromkeys(ROLES, 201), "job": 403},
    ("DELETE", "/api/v1/tokens/{token_id}"): dict.fromkeys(ROLES, 404),  # someone else's
    # the cluster: anyone signed in reads nodes and queues; only server admins configure queues
    ("GET", "/api/v1/nodes"): dict.fromkeys(ROLES, 200),
    ("GET", "/api/v1/nodes/{node_id}"): dict.fromkeys(ROLES, 200),
    ("GET", "/api/v1/queues"): dict.fromkeys(ROLES, 200),
    # alpha's own queue: a member of nothing sees it as missing (project names do not leak)
    ("GET", "/api/v1/queues/{name}"): {**dict.fromkeys(ROLES, 200), "outsider": 404},
    ("PUT", "/api/v1/queues/{name}"): dict.fromkeys(ROLES, 403),
    ("DELETE", "/api/v1/queues/{name}"): dict.fromkeys(ROLES, 403),
    # Prometheus service discovery: the server, and the replicas of the projects one may view
    ("GET", "/api/v1/prometheus/targets"): dict.fromkeys(ROLES, 200),
}


def _verdict(response: Any, project: str) -> str:
    status = response.status_code
    assert status not in (401, 500), response.text
    if status in (200, 201, 204):
        return "allow"
    body = response.json() if response.content else {}
    if status == 403:
        assert body["code"] == "permission_denied", body
        return "deny403"
    if status == 404 and body.get("field") == "project":
        assert body["message"] == f"project {project!r} does not exist"
        return "hidden"
    # an error the service raised about the resource, once the caller was let through
    assert status in (404, 409, 422), response.text
    assert "errors" not in (body.get("details") or {}), f"bad test body: {response.text}"
    return "allow"


def _walk(
    world: Fixture, roles: tuple[str, ...], operations: list[tuple[str, str]]
) -> list[tuple[object, ...]]:
    """Call each operation as each of ``roles`` (scoped ones in both projects); the calls whose
    outcome differs from the table, as (role, method, url, wanted, got, body)."""
    scoped = [op for op in operations if op[1].startswith(f"{API}/projects/{{project}}")]
    unscoped = [op for op in operations if op not in scoped]
    mismatches: list[tuple[object, ...]] = []
    for role in roles:
        headers = {"Authorization": f"Bearer {world.secrets[role]}"}
        for method, template in scoped:
            for project in (OWN, OTHER):
                url = _fill(template, project, world)
                response = world.client.request(
                    method, url, headers=headers, **_body(method, template, project, world)
                )
                if method == "HEAD" and response.status_code == 404:
                    # no body to tell which 404: the GET of the same URL tells
                    response = world.client.get(url, headers=headers)
                got = _verdict(response, project)
                want = _expect_scoped(role, method, template, own=project == OWN)
                if got != want:
                    mismatches.append((role, method, url, want, got, response.text[:200]))
        for method, template in unscoped:
            response = world.client.request(
                method,
                _fill(template, OWN, world),
                headers=headers,
                **_body(method, template, OWN, world),
            )
            want_status = UNSCOPED[(method, template)][role]
            if response.status_code != want_status:
                mismatches.append(
                    (role, method, template, want_status, response.status_code, response.text[:200])
                )
    return mismatches


@pytest.mark.slow
def test_every_route_every_role_own_and_other_project(world: Fixture) -> None:
    operations = _operations(world.client)
    scoped = [op for op in operations if op[1].startswith(f"{API}/projects/{{project}}")]
    assert len(scoped) >= 30
    unscoped = [op for op in operations if op not in scoped]
    assert set(unscoped) <= set(UNSCOPED), set(unscoped) - set(UNSCOPED)
    mismatches = _walk(world, ROLES, operations)
    assert mismatches == [], "\n".join(map(str, mismatches))


# a few routes of each plane, for the checks of the checker below
SAMPLE = {
    ("GET", f"{API}/projects/{{project}}/runs"),
    ("POST", f"{API}/projects/{{project}}/runs"),
    ("GET", f"{API}/projects/{{project}}/runs/{{run_id}}"),
    ("POST", f"{API}/projects/{{project}}/jobs/{{job_id}}/cancel"),
    ("PUT", f"{API}/projects/{{project}}/models/{{name}}/aliases/{{alias}}"),
    ("GET", f"{API}/projects/{{project}}/datasets/{{name}}"),
    ("GET", f"{API}/projects/{{project}}/blobs/{{digest}}"),
    ("PUT", f"{API}/projects/{{project}}/members/{{principal}}"),
    ("GET", f"{API}/projects/{{project}}/lineage/{{kind}}/{{id}}"),
}


def _no_op(*args: object, **kwargs: object) -> None:
    return None


@pytest.mark.parametrize("check", ["authorize", "authorize_resource"])
def test_the_walk_catches_a_service_that_lets_everyone_in(
    world: Fixture, monkeypatch: pytest.MonkeyPatch, check: str
) -> None:
    """The walk is not vacuous: with the check the services call replaced by one that allows
    everything - in every module that imported it by name - it reports violations."""
    real = getattr(rbac, check)
    patched = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("shipyard."):
            continue
        for attr, value in list(vars(module).items()):
            if value is real:
                monkeypatch.setattr(module, attr, _no_op)
                patched.append(f"{name}.{attr}")
    assert f"shipyard.security.rbac.{check}" in patched
    assert "shipyard.tracking.runs." + check in patched
    operations = [op for op in _operations(world.client) if op in SAMPLE]
    assert set(operations) == SAMPLE, SAMPLE - set(operations)
    mismatches = _walk(world, ("viewer", "outsider"), operations)
    found = {(role, method, url, want, got) for role, method, url, want, got, _ in mismatches}
    if check == "authorize":
        # a viewer writes, an outsider reads another project, a viewer sets members
        assert ("viewer", "POST", f"{API}/projects/{OWN}/runs", "deny403", "allow") in found
        assert ("outsider", "GET", f"{API}/projects/{OTHER}/runs", "hidden", "allow") in found
        member = f"{API}/projects/{OWN}/members/spare"
        assert ("viewer", "PUT", member, "deny403", "allow") in found
    else:
        # another project's records, found by id, are no longer hidden
        cancel = f"{API}/projects/{OTHER}/jobs/{world.ids[OTHER]['job']}/cancel"
        assert ("outsider", "POST", cancel, "hidden", "allow") in found
        run = f"{API}/projects/{OTHER}/runs/{world.ids[OTHER]['run']}"
        assert ("outsider", "GET", run, "hidden", "allow") in found


def test_a_non_member_cannot_tell_an_existing_project_from_a_missing_one(world: Fixture) -> None:
    headers = {"Authorization": f"Bearer {world.secrets['outsider']}"}
    for template in ("{p}", "{p}/runs", "{p}/models/m", f"{{p}}/jobs/{world.ids[OTHER]['job']}"):
        real = world.client.get(f"{API}/projects/" + template.format(p=OTHER), headers=headers)
        fake = world.client.get(f"{API}/projects/" + template.format(p="nosuch"), headers=headers)
        assert real.status_code == fake.status_code == 404
        assert real.json() == {
            **fake.json(),
            "message": fake.json()["message"].replace("nosuch", OTHER),
        }
    listed = world.client.get(f"{API}/projects", headers=headers).json()
    assert listed == []


def test_an_id_of_another_project_is_a_404_even_for_its_members(world: Fixture) -> None:
    """The editor of alpha asks alpha's routes for beta's job and run: they are not there."""
    headers = {"Authorization": f"Bearer {world.secrets['editor']}"}
    other_job, other_run = world.ids[OTHER]["job"], world.ids[OTHER]["run"]
    for method, path in (
        ("GET", f"/jobs/{other_job}"),
        ("POST", f"/jobs/{other_job}/cancel"),
        ("GET", f"/runs/{other_run}"),
        ("PATCH", f"/runs/{other_run}"),
        ("GET", f"/lineage/run/{other_run}"),
        ("GET", f"/blobs/{world.ids[OTHER]['blob']}"),
    ):
        response = world.client.request(
            method,
            f"{API}/projects/{OWN}{path}",
            headers=headers,
            json={"status": "finished"} if method == "PATCH" else None,
        )
        assert response.status_code == 404, (path, response.text)
        assert response.json()["field"] != "project"
        assert OTHER not in response.text
    listed = world.client.get(f"{API}/projects", headers=headers).json()
    assert [p["name"] for p in listed] == [OWN]
