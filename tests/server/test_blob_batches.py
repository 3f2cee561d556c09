"""Many blobs per request: /blobs/missing, framed uploads (/blobs/batch) and downloads
(/blobs/fetch), and a remote commit and checkout built on them."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from shipyard.blobs import hash_bytes
from shipyard.client import Client
from shipyard.context import Context
from shipyard.settings import Settings
from tests.conftest import LiveServer
from tests.server.conftest import TestClient

API = "/api/v1"
PD = f"{API}/projects/default"
FRAME = struct.Struct(">32sQ")


def frames(*blobs: bytes, lie: int | None = None) -> bytes:
    out = b""
    for i, data in enumerate(blobs):
        digest = hash_bytes(b"not this" if i == lie else data)
        out += FRAME.pack(bytes.fromhex(digest), len(data)) + data
    return out


def test_missing_then_batch_upload_then_fetch(client: TestClient, ctx: Context) -> None:
    blobs = [os.urandom(100 + i) for i in range(40)]
    digests = [hash_bytes(b) for b in blobs]
    missing = client.post(f"{PD}/blobs/missing", json={"digests": digests})
    assert missing.status_code == 200 and sorted(missing.json()["missing"]) == sorted(digests)

    stored = client.post(f"{PD}/blobs/batch", content=frames(*blobs, blobs[0]))
    assert stored.status_code == 201, stored.text
    assert stored.json() == {"blobs": 41, "created": 40, "bytes": sum(map(len, blobs)) + 100}
    assert all(ctx.blobs.get_bytes(d) == b for d, b in zip(digests, blobs, strict=True))
    assert client.post(f"{PD}/blobs/missing", json={"digests": digests}).json() == {"missing": []}
    again = client.post(f"{PD}/blobs/batch", content=frames(*blobs[:20]))
    assert again.json()["created"] == 0

    wanted = [digests[3], digests[0], digests[3]]
    got = client.post(f"{PD}/blobs/fetch", json={"digests": wanted})
    assert got.status_code == 200
    body, at, seen = got.content, 0, []
    while at < len(body):
        raw, size = FRAME.unpack_from(body, at)
        seen.append((raw.hex(), body[at + FRAME.size : at + FRAME.size + size]))
        at += FRAME.size + size
    assert seen == [(d, blobs[digests.index(d)]) for d in wanted]


def test_a_lying_frame_fails_the_batch_and_stores_nothing_after_it(
    client: TestClient, ctx: Context
) -> None:
    blobs = [f"blob {i}".encode() for i in range(5)]
    response = client.post(f"{PD}/blobs/batch", content=frames(*blobs, lie=2))
    assert response.status_code == 400
    body = response.json()
    assert body["field"] == "body" and "hashes to" in body["message"]
    assert not any(ctx.blobs.exists(hash_bytes(b)) for b in blobs[2:])
    cut = client.post(f"{PD}/blobs/batch", content=frames(*blobs)[:-3])
    assert cut.status_code == 422 and "ends inside a frame" in cut.json()["message"]
    huge = FRAME.pack(bytes(32), 17 * 1024 * 1024)
    too_big = client.post(f"{PD}/blobs/batch", content=huge)
    assert too_big.status_code == 422 and "at most" in too_big.json()["message"]
    bad = client.post(f"{PD}/blobs/missing", json={"digests": ["../etc/passwd"]})
    assert bad.status_code == 422


def test_fetch_refuses_blobs_the_project_does_not_hold(client: TestClient, ctx: Context) -> None:
    other = ctx.blobs.put_bytes(b"stored, but never uploaded through this project").digest
    missing = client.post(f"{PD}/blobs/missing", json={"digests": [other]}).json()
    # an admin (the test client) holds every blob; a project member would be asked to upload
    assert missing["missing"] in ([], [other])
    absent = hash_bytes(b"never stored")
    response = client.post(f"{PD}/blobs/fetch", json={"digests": [absent]})
    assert response.status_code == 404


def test_commit_and_checkout_through_the_server_use_few_requests(
    tmp_path: Path, live_server: LiveServer
) -> None:
    data = tmp_path / "data"
    for i in range(300):
        (data / f"d{i % 7}").mkdir(parents=True, exist_ok=True)
        (data / f"d{i % 7}" / f"f{i}.bin").write_bytes(os.urandom(512) + bytes([i % 256]))
    big = os.urandom(9 * 1024 * 1024)  # above the batch bound: streamed on its own
    (data / "big.bin").write_bytes(big)
    client = Client(settings=Settings(home=tmp_path / "client", url=live_server.url))
    v1 = client.datasets.commit(data, name="many")
    assert v1.file_count == 301
    log = live_server.log.read_text()
    assert log.count("/blobs/batch") == 1 and log.count('"HEAD /api') == 1, log[-2000:]

    (data / "d0" / "f0.bin").write_bytes(b"changed")
    v2 = client.datasets.commit(data, name="many")
    assert v2.version == 2 and v2.new_bytes == len(b"changed")

    out = tmp_path / "out"
    result = client.datasets.checkout("many", out, 2)
    assert result.written == 301
    assert (out / "big.bin").read_bytes() == big and (out / "d0/f0.bin").read_bytes() == b"changed"
    fetches = live_server.log.read_text().count("/blobs/fetch")
    assert 1 <= fetches <= 2
    client.close()
