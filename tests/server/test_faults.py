"""The API on a full disk and a read-only blob folder (real tmpfs mounts): 507 and 503 with the
one JSON error shape, reads still answered; and the uvicorn factory's bind check."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from shipyard.blobs import hash_bytes
from shipyard.errors import InvalidInputError
from shipyard.server.app import create_app
from shipyard.settings import Settings
from shipyard.store.engine import forget_database
from tests.conftest import wait_for
from tests.mounts import fill, remount_read_only, tmpfs
from tests.server.conftest import TestClient


def blob_url(app: FastAPI, digest: str) -> str:
    """The blob route as this app's OpenAPI spells it (project-scoped or not)."""
    for path in app.openapi()["paths"]:
        if path.endswith("/blobs/{digest}"):
            return str(path).replace("{project}", "default").replace("{digest}", digest)
    raise AssertionError("no blob route")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk", size_kb=4096) as mounted:
        yield mounted


def test_an_upload_to_a_full_disk_is_a_507_and_reads_still_work(disk: Path) -> None:
    settings = Settings(home=disk / "home")
    app = create_app(settings, scheduler=False)
    try:
        with TestClient(app) as client:
            old = b"stored while there was room"
            put = client.put(blob_url(app, hash_bytes(old)), content=old)
            assert put.status_code == 201, put.text
            fill(disk)

            data = os.urandom(256 * 1024)
            full = client.put(blob_url(app, hash_bytes(data)), content=data)
            assert full.status_code == 507, full.text
            body = full.json()
            assert body["code"] == "storage_full" and body["field"] == "storage"
            assert "no space left" in body["message"]

            got = client.get(blob_url(app, hash_bytes(old)))
            assert got.status_code == 200 and got.content == old
            assert client.get("/healthz").status_code == 200
    finally:
        forget_database(settings.database_url)


def test_an_upload_to_a_read_only_blob_folder_is_a_503(disk: Path, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", blobs_url=f"file://{disk / 'blobs'}")
    app = create_app(settings, scheduler=False)
    try:
        with TestClient(app) as client:
            old = b"stored while writable"
            assert client.put(blob_url(app, hash_bytes(old)), content=old).status_code == 201
            remount_read_only(disk)

            new = b"refused"
            refused = client.put(blob_url(app, hash_bytes(new)), content=new)
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "storage_unavailable"
            assert "read-only" in refused.json()["message"]
            assert client.get(blob_url(app, hash_bytes(old))).content == old
    finally:
        forget_database(settings.database_url)


# --- the bind check of the app factory ----------------------------------------------------------


def test_create_app_refuses_a_public_host_without_auth(settings: Settings) -> None:
    with pytest.raises(InvalidInputError) as caught:
        create_app(settings, auth=False, host="0.0.0.0", scheduler=False)
    assert caught.value.field == "host" and "without auth" in caught.value.message
    create_app(settings, auth=True, host="0.0.0.0", scheduler=False)  # auth on: allowed
    create_app(settings, auth=False, host="127.0.0.1", scheduler=False)


def test_without_auth_a_request_arriving_on_a_public_address_is_refused(
    settings: Settings,
) -> None:
    app = create_app(settings, auth=False, scheduler=False)
    with TestClient(app, base_url="http://10.1.2.3:8340") as public:
        refused = public.get("/healthz")
        assert refused.status_code == 403
        assert refused.json()["code"] == "permission_denied" and "10.1.2.3" in refused.text
    with TestClient(app, base_url="http://127.0.0.1:8340") as local:
        assert local.get("/healthz").status_code == 200
    with TestClient(app, base_url="http://[::1]:8340") as local6:
        assert local6.get("/healthz").status_code == 200
    with TestClient(
        create_app(settings, auth=True, scheduler=False), base_url="http://10.1.2.3"
    ) as c:
        assert c.get("/healthz").status_code == 200  # auth on: the token check decides


def _uvicorn(home: Path, host: str, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
    env["SHIPYARD_HOME"] = str(home)
    with open(log, "wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "shipyard.server.app:create_app",
                "--host",
                host,
                "--port",
                "0",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def test_uvicorn_factory_refuses_a_public_bind_without_auth(home: Path, tmp_path: Path) -> None:
    log = tmp_path / "uvicorn.log"
    proc = _uvicorn(home, "0.0.0.0", log)
    try:
        assert proc.wait(timeout=60) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "refusing to listen on '0.0.0.0' without auth" in text
    assert "Traceback" not in text and "Uvicorn running" not in text


def test_uvicorn_factory_serves_on_loopback(home: Path, tmp_path: Path) -> None:
    log = tmp_path / "uvicorn.log"
    proc = _uvicorn(home, "127.0.0.1", log)
    try:
        found = wait_for(
            lambda: (
                re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", log.read_text())
                or proc.poll() is not None
            ),
            timeout=60,
            what="uvicorn to start",
        )
        assert proc.poll() is None, log.read_text()
        assert isinstance(found, re.Match)
        port = int(found.group(1))
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --- a commit referencing a corrupted blob ------------------------------------------------------


def api_path(app: FastAPI, suffix: str, **values: str) -> str:
    for path in app.openapi()["paths"]:
        if path.endswith(suffix):
            for key, value in {"project": "default", **values}.items():
                path = path.replace(f"{{{key}}}", value)
            return str(path)
    raise AssertionError(f"no route ending in {suffix}")


def test_a_commit_referencing_a_corrupted_blob_is_a_409_naming_it(
    client: TestClient, settings: Settings
) -> None:
    app: FastAPI = client.app  # type: ignore[assignment]
    data = b"uploaded whole, then rotted on the server's disk"
    digest = hash_bytes(data)
    assert client.put(blob_url(app, digest), content=data).status_code == 201
    stored = settings.home / "blobs" / digest[:2] / digest[2:4] / digest
    stored.write_bytes(b"X" * len(data))
    commit = api_path(app, "/datasets/{name}/versions", name="ds")

    files = [{"path": "notes.txt", "digest": digest, "size": len(data)}]
    refused = client.post(commit, json={"files": files})

    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert body["field"] == "files[0].digest" and digest in body["message"]
    assert body["details"] == {"digest": digest, "path": "notes.txt"}
    # uploading the file again (the blob was moved aside) repairs it, and the retry commits
    assert client.put(blob_url(app, digest), content=data).status_code == 201
    assert client.post(commit, json={"files": files}).status_code == 201
