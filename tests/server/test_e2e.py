"""End to end against a real ``python -m shipyard.server`` on 127.0.0.1 with auth on: plain
HTTP, as any client would speak it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shipyard.blobs import hash_bytes
from shipyard.context import open_context
from shipyard.security.tokens import create_token
from shipyard.settings import Settings
from shipyard.store.engine import forget_database
from tests.conftest import LiveServer
from tests.onnx_models import linear_model

API = "/api/v1"
PE = f"{API}/projects/e2e"


@pytest.fixture
def server_and_token(tmp_path: Path) -> Iterator[tuple[LiveServer, str, Path]]:
    home = tmp_path / "server-home"
    home.mkdir()
    settings = Settings(home=home)
    ctx = open_context(settings, actor="admin")
    _, secret = create_token(ctx, name="ci-bot")  # a token of the server admin, "user:admin"
    forget_database(settings.database_url)
    server = LiveServer(home, auth=True)
    try:
        yield server, secret, home
    finally:
        server.stop()


@pytest.mark.slow
def test_lifecycle_over_a_real_socket(server_and_token: tuple[LiveServer, str, Path]) -> None:
    server, secret, home = server_and_token
    auth = {"Authorization": f"Bearer {secret}"}
    with (
        httpx.Client(base_url=server.url, timeout=30) as anon,
        httpx.Client(base_url=server.url, headers=auth, timeout=30) as http,
    ):
        # auth on: nothing without the token, everything with it
        assert anon.get("/healthz").status_code == 200
        for path in (f"{PE}/runs", f"{API}/audit", "/metrics", "/", "/docs"):
            assert anon.get(path).status_code == 401, path
            assert http.get(path).status_code in (200, 404), path
        wrong = anon.get(f"{PE}/runs", headers={"Authorization": "Bearer shp_nope"})
        assert wrong.status_code == 401 and wrong.json()["code"] == "unauthenticated"

        # a run, a batch of metrics, read back
        run = http.post(f"{PE}/runs", json={"name": "train", "params": {"lr": "0.01"}})
        assert run.status_code == 201, run.text
        run_id = run.json()["id"]
        points = [
            {"key": "loss", "value": 1.0 / (s + 1), "step": s, "timestamp": 10.0 + s}
            for s in range(20)
        ]
        logged = http.post(f"{PE}/runs/{run_id}/log-batch", json={"metrics": points})
        assert logged.json()["stored"] == 20
        history = http.get(f"{PE}/runs/{run_id}/metrics", params={"key": "loss"}).json()
        assert [p["value"] for p in history] == [p["value"] for p in points]
        assert http.get(f"{PE}/runs/{run_id}").json()["metrics"] == {"loss": 1.0 / 20}

        # upload a blob (streamed) and commit it as a dataset
        data = os.urandom(1024 * 1024 + 5)
        digest = hash_bytes(data)
        assert http.head(f"{PE}/blobs/{digest}").status_code == 404
        put = http.put(f"{PE}/blobs/{digest}", content=iter([data[:4096], data[4096:]]))
        assert put.status_code == 201, put.text
        assert http.get(f"{PE}/blobs/{digest}").content == data
        version = http.post(
            f"{PE}/datasets/pixels/versions",
            json={
                "files": [{"path": "raw/x.bin", "digest": digest, "size": len(data)}],
                "message": "raw",
            },
        )
        assert version.status_code == 201, version.text
        files = http.get(f"{PE}/datasets/pixels/versions/1/files")
        assert files.json() == [{"path": "raw/x.bin", "digest": digest, "size": len(data)}]

        # an ONNX model: upload, register by digest, alias it, move the alias
        model_bytes = linear_model(8, 3, input_name="input", output_name="logits").data
        model_digest = hash_bytes(model_bytes)
        assert http.put(f"{PE}/blobs/{model_digest}", content=model_bytes).status_code == 201
        for _ in range(2):
            registered = http.post(f"{PE}/models/clf/versions", json={"digest": model_digest})
            assert registered.status_code == 201, registered.text
        for version_number in (1, 2):
            moved = http.put(
                f"{PE}/models/clf/aliases/production",
                json={"version": version_number},
            )
            assert moved.status_code == 200, moved.text
        prod = http.get(f"{PE}/models/clf/versions/production")
        assert prod.json()["version"] == 2
        history = http.get(f"{PE}/models/clf/alias-history").json()
        assert [(e["version"], e["previous_version"], e["actor"]) for e in history] == [
            (1, None, "user:admin"),
            (2, 1, "user:admin"),
        ]

        # every change is audited under the token's actor
        events = http.get(f"{API}/audit", params={"limit": 1000}).json()
        assert events[0]["action"] == "token.create" and events[0]["actor"] == "admin"
        changes = [e for e in events[1:] if e["action"] != "auth.fail"]  # the refused calls
        assert {e["actor"] for e in changes} == {"user:admin"}
        assert [e["action"] for e in changes] == [
            "run.create",
            "blob.upload",
            "dataset.commit",
            "blob.upload",
            "model.register",
            "model.register",
            "model.alias.set",
            "model.alias.set",
        ]

        # bad inputs: 4xx JSON naming the problem, store unchanged
        bad = [
            http.post(
                f"{PE}/runs", content=b"{not json", headers={"Content-Type": "application/json"}
            ),
            http.post(f"{PE}/runs", json={"colour": "red"}),
            http.post(f"{PE}/runs/{run_id}/log-batch", json={"metrics": [{"key": "loss"}]}),
            http.get(f"{PE}/datasets/%2e%2e%2fetc"),
            http.get(f"{PE}/datasets/%252e%252e%252fetc"),
            http.post(
                f"{PE}/datasets/pixels/versions",
                json={
                    "files": [{"path": "%2e%2e%2fescape", "digest": digest, "size": len(data)}],
                },
            ),
            http.post(
                f"{PE}/runs/{run_id}/artifacts",
                json={"path": "../../etc/passwd", "digest": digest, "size": len(data)},
            ),
            http.put(f"{PE}/blobs/{hash_bytes(b'claimed')}", content=b"actual"),
            http.post(f"{PE}/runs", json={"tags": {"x": "y" * (65 << 20)}}),
        ]
        for response in bad:
            assert 400 <= response.status_code < 500, response.text
            body = response.json()
            assert body["code"] and body["message"]
        assert [r.status_code for r in bad] == [400, 422, 422, 400, 400, 400, 400, 400, 413]
        assert http.get(f"{API}/audit", params={"limit": 1000}).json() == events
        assert len(http.get(f"{PE}/runs").json()) == 1
        assert http.get(f"{PE}/runs/{run_id}").json()["artifacts"] == []
        assert len(http.get(f"{PE}/datasets/pixels/versions").json()) == 1
        assert http.head(f"{PE}/blobs/{hash_bytes(b'actual')}").status_code == 404

        # the page lists what was created; /metrics counts it
        page = http.get("/", params={"project": "e2e"}).text
        for name in ("pixels", "train", "clf", "production → v2", "user:admin"):
            assert name in page, name
        metrics = http.get("/metrics").text
        log_batch = "/api/v1/projects/{project}/runs/{run_id}/log-batch"
        assert f'code="200",method="POST",route="{log_batch}"' in metrics
        assert 'shipyard_jobs{state="running"}' in metrics
        assert "shipyard_models 1.0" in metrics

        # a blob that went bad on disk is never served whole
        stored = home / "blobs" / digest[:2] / digest[2:4] / digest
        stored.write_bytes(b"\0" + data[1:])
        with pytest.raises(httpx.HTTPError):
            http.get(f"{PE}/blobs/{digest}").read()
