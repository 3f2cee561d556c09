"""Path traversal, in URL paths and in JSON bodies, in every encoding: refused with a 4xx naming
the problem, and nothing is written."""

from __future__ import annotations

import pytest

from shipyard.blobs import hash_bytes
from tests.server.conftest import TestClient

API = "/api/v1"
PD = f"{API}/projects/default"

URL_TRAVERSALS = [
    "%2e%2e%2fetc",
    "%2E%2E%2Fetc",
    "..%2fetc",
    "%2e%2e",
    "%252e%252e%252fetc",
    "%252e%252e",
    "..%5cetc",
    "%2e%2e%5cetc",
    "etc%00",
]

BODY_TRAVERSALS = [
    "../etc/passwd",
    "a/../../etc/passwd",
    "%2e%2e%2fetc/passwd",
    "%252e%252e%252fetc/passwd",
    "..\\etc\\passwd",
    "/etc/passwd",
    "file:///etc/passwd",
    "\uff0e\uff0e/etc/passwd",  # fullwidth dots
    "a/./b",
    "a//b",
    "a/b\x00",
]


@pytest.mark.parametrize("segment", URL_TRAVERSALS)
@pytest.mark.parametrize(
    "template",
    [
        "/api/v1/projects/default/datasets/{}",
        "/api/v1/projects/default/datasets/{}/versions",
        "/api/v1/projects/default/datasets/ds/versions/{}/files",
        "/api/v1/projects/default/runs/{}",
        "/api/v1/projects/default/models/{}/versions",
        "/api/v1/projects/default/blobs/{}",
        "/static/{}",
    ],
)
def test_encoded_traversal_in_the_url_path_is_refused(
    client: TestClient, template: str, segment: str
) -> None:
    response = client.get(template.format(segment))
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == "unsafe_path"
    assert body["field"] == "path"
    assert "is not allowed" in body["message"]


def test_a_stray_percent_in_a_name_is_refused(client: TestClient) -> None:
    # "%25" decodes to a bare "%": a leftover encoding that no name can contain.
    response = client.get(f"{PD}/datasets/a%25b")
    assert response.status_code == 400
    assert response.json()["code"] == "unsafe_path"


@pytest.mark.parametrize("path", BODY_TRAVERSALS)
def test_traversal_in_dataset_file_paths_is_refused(client: TestClient, path: str) -> None:
    data = b"content"
    digest = hash_bytes(data)
    assert client.put(f"{PD}/blobs/{digest}", content=data).status_code == 201
    body = {"files": [{"path": path, "digest": digest, "size": len(data)}], "message": "m"}
    response = client.post(f"{PD}/datasets/ds/versions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["code"] == "unsafe_path"
    assert error["field"] == "files[0].path"
    assert "is not allowed" in error["message"]
    # nothing was committed
    assert client.get(f"{PD}/datasets/ds").status_code == 404
    listed = client.get(f"{PD}/datasets")
    assert listed.status_code == 404 or listed.json() == []


@pytest.mark.parametrize("path", BODY_TRAVERSALS)
def test_traversal_in_artifact_paths_is_refused(client: TestClient, path: str) -> None:
    run_id = client.post(f"{PD}/runs", json={}).json()["id"]
    data = b"weights"
    digest = hash_bytes(data)
    assert client.put(f"{PD}/blobs/{digest}", content=data).status_code == 201
    response = client.post(
        f"{PD}/runs/{run_id}/artifacts", json={"path": path, "digest": digest, "size": len(data)}
    )
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "unsafe_path"
    assert response.json()["field"] == "path"
    assert client.get(f"{PD}/runs/{run_id}").json()["artifacts"] == []


def test_traversal_in_model_artifact_path_is_refused(client: TestClient) -> None:
    run_id = client.post(f"{PD}/runs", json={}).json()["id"]
    response = client.post(
        f"{PD}/models/m/versions",
        json={"run_id": run_id, "artifact_path": "%2e%2e%2fmodel.onnx"},
    )
    assert response.status_code == 400
    assert response.json()["field"] == "artifact_path"
    assert client.get(f"{PD}/models/m").status_code == 404
