"""``shipyard://`` against a real server process on 127.0.0.1: versions through the REST API,
bytes through the blob route with HTTP ``Range``, verified on the client."""

from __future__ import annotations

import io
import os
import tracemalloc
from pathlib import Path

import blake3
import fsspec
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shipyard.client import Client
from shipyard.data.fs import DatasetPathNotFoundError, HttpSource, ShipyardFileSystem
from shipyard.errors import IntegrityError
from shipyard.settings import Settings
from tests.conftest import LiveServer

P = "default"
BIG = 24 * 1024 * 1024 + 777


@pytest.fixture
def remote(tmp_path: Path, live_server: LiveServer) -> tuple[LiveServer, bytes]:
    """A server holding dataset ``ds`` v1 (a table, a CSV and a 24 MiB file), committed over
    HTTP by the SDK."""
    folder = tmp_path / "src"
    folder.mkdir()
    pq.write_table(
        pa.table({"id": np.arange(5000), "v": np.arange(5000) * 0.5}), folder / "t.parquet"
    )
    (folder / "labels.csv").write_text("id,label\n1,cat\n")
    big = np.random.default_rng(5).bytes(BIG)
    (folder / "big.bin").write_bytes(big)
    client = Client(settings=Settings(home=tmp_path / "client-home", url=live_server.url))
    client.datasets.commit(folder, name="ds")
    client.close()
    return live_server, big


def _blob_url(server: LiveServer, digest: str) -> str:
    return f"{server.url}/api/v1/projects/{P}/blobs/{digest}"


def test_pandas_and_pyarrow_read_through_the_server(
    remote: tuple[LiveServer, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = remote
    pd = pytest.importorskip("pandas")
    options = {"server": server.url}
    frame = pd.read_parquet(f"shipyard://{P}/ds@v1/t.parquet", storage_options=options)
    assert frame["id"].tolist() == list(range(5000))
    monkeypatch.setenv("SHIPYARD_URL", server.url)  # or from the SDK's settings
    with fsspec.open(f"shipyard://{P}/ds/labels.csv", "rt") as fh:
        assert fh.read() == "id,label\n1,cat\n"
    fs = ShipyardFileSystem()
    assert isinstance(fs.source, HttpSource)
    assert pq.read_table(f"{P}/ds@latest/t.parquet", filesystem=fs, columns=["v"]).num_rows == 5000
    assert fs.ls(f"{P}/ds@v1", detail=False) == [
        f"{P}/ds@v1/big.bin",
        f"{P}/ds@v1/labels.csv",
        f"{P}/ds@v1/t.parquet",
    ]
    with pytest.raises(DatasetPathNotFoundError, match="no version 2"):
        fs.info(f"{P}/ds@v2/t.parquet")


def test_the_blob_route_serves_byte_ranges(remote: tuple[LiveServer, bytes]) -> None:
    server, big = remote
    url = _blob_url(server, blake3.blake3(big).hexdigest())
    with httpx.Client() as http:
        part = http.get(url, headers={"Range": "bytes=1000-1999"})
        assert part.status_code == 206
        assert part.content == big[1000:2000]
        assert part.headers["content-range"] == f"bytes 1000-1999/{BIG}"
        assert http.get(url, headers={"Range": "bytes=-5"}).content == big[-5:]
        assert http.get(url, headers={"Range": f"bytes={BIG - 3}-"}).content == big[-3:]
        past = http.get(url, headers={"Range": f"bytes={BIG}-"})
        assert past.status_code == 416
        assert past.headers["content-range"] == f"bytes */{BIG}"
        assert past.json()["code"] == "range_not_satisfiable"
        for ignored in ("bytes=5-2", "bytes=0-1,4-5", "items=0-3", "bytes=x-"):
            with http.stream("GET", url, headers={"Range": ignored}) as whole:
                assert whole.status_code == 200, ignored
                assert whole.headers["content-length"] == str(BIG)
        assert http.head(url).headers["accept-ranges"] == "bytes"


def test_ranged_and_streamed_reads_over_http_stay_small(remote: tuple[LiveServer, bytes]) -> None:
    server, big = remote
    fs = ShipyardFileSystem(server=server.url)
    tracemalloc.start()
    try:
        with fs.open(f"{P}/ds@v1/big.bin", "rb", block_size=1024 * 1024) as fh:
            fh.seek(BIG // 3)
            middle = fh.read(50_000)
        hasher = blake3.blake3()
        with fs.open(f"{P}/ds@v1/big.bin", "rb", block_size=1024 * 1024) as fh:
            while chunk := fh.read(512 * 1024):
                hasher.update(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert middle == big[BIG // 3 : BIG // 3 + 50_000]
    assert hasher.hexdigest() == blake3.blake3(big).hexdigest()
    # a range in flight, the one before it and their copies: a few MiB, never the 24 MiB file
    assert peak < 8 * 1024 * 1024, peak


def test_sdk_open_against_the_server(remote: tuple[LiveServer, bytes], tmp_path: Path) -> None:
    server, big = remote
    client = Client(settings=Settings(home=tmp_path / "elsewhere", url=server.url))
    with client.datasets.open("ds", "big.bin", version="v1") as fh:
        fh.seek(-4, io.SEEK_END)
        assert fh.read() == big[-4:]
    with client.datasets.open("ds", "labels.csv") as fh:
        assert fh.read() == b"id,label\n1,cat\n"
    client.close()


def test_a_blob_corrupted_on_the_server_is_caught_by_the_reader(
    remote: tuple[LiveServer, bytes], tmp_path: Path
) -> None:
    server, _ = remote
    digest = blake3.blake3(b"id,label\n1,cat\n").hexdigest()
    # the server's store: the blob as the server's blob folder holds it (a loose file)
    blob = tmp_path / "server-home" / "blobs" / digest[:2] / digest[2:4] / digest
    os.chmod(blob, 0o600)
    blob.write_bytes(b"id,label\n1,dog\n")
    fs = ShipyardFileSystem(server=server.url)
    url = f"{P}/ds@v1/labels.csv"
    with pytest.raises(IntegrityError, match=r"labels\.csv is corrupted"), fs.open(url) as fh:
        fh.read()  # sequential: ranges hashed on the client
    with pytest.raises(IntegrityError, match=r"labels\.csv"), fs.open(url) as fh:
        fh.seek(9)  # a jump: the whole blob is fetched and checked once
        fh.read()
