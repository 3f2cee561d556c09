"""The blob store on S3: a real S3-compatible server (moto's, over HTTP on 127.0.0.1, with
authentication on), reached through s3fs as in production."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shipyard.blobs import BlobStore, hash_bytes
from shipyard.blobs.store import SourceFile, open_blobs
from shipyard.errors import IntegrityError, NotFoundError, StorageUnavailableError
from tests.blobs.conftest import BUCKET, MotoServer, Proxy, free_port, start_moto

URL = f"s3://{BUCKET}/blobs"


def source(path: Path) -> SourceFile:
    info = os.stat(path)
    return SourceFile(path, info.st_size, info.st_mtime_ns, info.st_ctime_ns, shown=path.name)


def make_files(folder: Path, count: int, *, size: int = 100) -> list[SourceFile]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        path = folder / f"f{i:04d}.bin"
        path.write_bytes(f"{i}:".encode() + os.urandom(size))
        out.append(source(path))
    return out


def objects(server: MotoServer) -> dict[str, int]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def test_put_files_then_reads_are_verified_and_packs_are_not_used(
    moto_server: MotoServer, tmp_path: Path
) -> None:
    store = open_blobs(URL)
    files = make_files(tmp_path / "src", 40)
    results = store.put_files(files)
    assert all(r.created for r in results) and len(results) == 40
    keys = objects(moto_server)
    assert len(keys) == 40  # loose objects, no packs on S3
    assert all(k.startswith("blobs/") and k.count("/") == 3 for k in keys)
    for f, r in zip(files, results, strict=True):
        assert store.get_bytes(r.digest) == Path(f.path).read_bytes()
    assert store.sizes([r.digest for r in results]) == {r.digest: r.size for r in results}
    again = store.put_files(files)  # a rerun stores nothing
    assert not any(r.created for r in again)

    # a corrupted object is reported, not handed out
    victim = results[0].digest
    key = f"blobs/{victim[:2]}/{victim[2:4]}/{victim}"
    moto_server.client().put_object(Bucket=BUCKET, Key=key, Body=b"rot")
    with pytest.raises(IntegrityError, match="corrupted"):
        store.get_bytes(victim)
    with pytest.raises(IntegrityError):
        b"".join(store.iter_chunks(victim))


def test_sizes_lists_shards_instead_of_one_request_per_blob(
    moto_server: MotoServer, tmp_path: Path
) -> None:
    store = open_blobs(URL)
    results = store.put_files(make_files(tmp_path / "src", 200))
    missing = [hash_bytes(f"absent{i}".encode()) for i in range(50)]
    calls: list[str] = []
    real = store.fs._call_s3

    async def counting(method: str, *args: object, **kwargs: object) -> object:
        calls.append(method)
        return await real(method, *args, **kwargs)

    store.fs._call_s3 = counting
    found = store.sizes([r.digest for r in results] + missing)
    assert found == {r.digest: r.size for r in results}
    assert "head_object" not in calls
    assert len(calls) <= 5, calls  # one listing of the store (a page per 1000 keys)
    calls.clear()
    few = [results[0].digest, missing[0]]
    assert store.sizes(few) == {results[0].digest: results[0].size}
    assert len(calls) <= 2 * len({d[:2] for d in few}), calls
    assert "head_object" not in calls


def test_a_large_blob_is_a_multipart_upload(moto_server: MotoServer, tmp_path: Path) -> None:
    from shipyard.blobs import s3

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2 * s3.MULTIPART_PART_BYTES + 12345))
    store = open_blobs(URL)
    seen: list[str] = []
    real = store.fs._call_s3

    async def counting(method: str, *args: object, **kwargs: object) -> object:
        seen.append(method)
        return await real(method, *args, **kwargs)

    store.fs._call_s3 = counting
    [result] = store.put_files([source(big)])
    assert "create_multipart_upload" in seen and seen.count("upload_part") >= 2
    assert store.get_bytes(result.digest) == big.read_bytes()


def test_wrong_credentials_are_a_clear_error(
    moto_server: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    store = open_blobs(URL)
    with pytest.raises(StorageUnavailableError, match="credentials"):
        store.put_files(make_files(tmp_path / "src", 3))
    with pytest.raises(StorageUnavailableError, match="credentials"):
        store.exists(hash_bytes(b"x"))
    assert objects(moto_server) == {}


def test_a_missing_bucket_is_a_clear_error(moto_server: MotoServer, tmp_path: Path) -> None:
    store = open_blobs("s3://no-such-bucket/blobs")
    with pytest.raises(NotFoundError, match=r"bucket .*does not exist.*create it"):
        store.put_files(make_files(tmp_path / "src", 3))
    with pytest.raises(NotFoundError, match="does not exist"):
        store.sizes([hash_bytes(b"x")])


def test_a_server_killed_mid_upload_fails_cleanly_and_a_rerun_stores_only_the_rest(
    moto_server: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shipyard.blobs import s3

    proxy = Proxy(moto_server.port)  # the server as the client sees it: killed, then back
    proxy.up()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    files = make_files(tmp_path / "src", 30, size=2000)
    big = tmp_path / "src" / "big.bin"
    big.write_bytes(os.urandom(4 * s3.MULTIPART_PART_BYTES))
    files.append(source(big))
    done: list[SourceFile] = []

    def progress(f: SourceFile) -> None:
        done.append(f)
        if len(done) == 10:
            proxy.down()

    try:
        with pytest.raises(StorageUnavailableError, match=r"cannot be reached.*again"):
            open_blobs(URL).put_files(files, progress=progress, workers=4)
        stored = objects(moto_server)
        assert 10 <= len(stored) < len(files)
        for key, size in stored.items():  # only whole blobs are visible
            digest = key.rsplit("/", 1)[-1]
            body = moto_server.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
            assert hash_bytes(body) == digest and len(body) == size
        proxy.up()
        results = open_blobs(URL).put_files(files)
        created = [r for r in results if r.created]
        assert len(created) == len(files) - len(stored)  # only what was missing
        assert len(objects(moto_server)) == len(files)
        assert open_blobs(URL).get_bytes(results[-1].digest) == big.read_bytes()
    finally:
        proxy.down()


def test_client_commit_read_checkout_on_s3(
    moto_server: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shipyard.client.client import Client
    from shipyard.settings import Settings

    home = tmp_path / "home"
    home.mkdir()
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("alpha\n")
    (data / "sub" / "b.bin").write_bytes(os.urandom(5000))
    with Client(settings=Settings(home=home, blobs_url=URL)) as client:
        version = client.datasets.commit(data, name="ds", message="on s3")
        assert objects(moto_server)  # the blobs went to the bucket
        assert not (home / "blobs").exists() or not any((home / "blobs").rglob("*/*/*"))
        out = tmp_path / "out"
        client.datasets.checkout("ds", out)
        assert (out / "a.txt").read_text() == "alpha\n"
        assert (out / "sub" / "b.bin").read_bytes() == (data / "sub" / "b.bin").read_bytes()
        with client.datasets.open("ds", "a.txt") as fh:
            assert fh.read() == b"alpha\n"
        assert version is not None

        from shipyard.maintenance.gc import collect_garbage

        orphan = make_files(tmp_path / "orphan", 1)
        [extra] = open_blobs(URL).put_files(orphan)
        before = objects(moto_server)
        collect_garbage(client.backend.ctx, grace_s=0)  # type: ignore[attr-defined]
        after = objects(moto_server)
        assert len(after) == len(before) - 1
        assert not open_blobs(URL).exists(extra.digest)
        out2 = tmp_path / "out2"
        client.datasets.checkout("ds", out2)  # what the version uses is kept
        assert (out2 / "a.txt").read_text() == "alpha\n"


def test_check_blob_url_accepts_s3() -> None:
    from shipyard.blobs.store import check_blob_url

    pytest.importorskip("s3fs", reason="s3fs is not installed: pip install 'shipyard[s3]'")
    assert check_blob_url(URL) == URL
    assert isinstance(BlobStore(URL), BlobStore)


def test_presigned_urls_move_a_blob_without_credentials(
    moto_server: MotoServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    import urllib.request

    from shipyard.blobs import s3

    open_server = MotoServer(  # without authentication: see start_moto
        "", free_port(), moto_server.key, moto_server.secret, None, tmp_path / "open.log"
    )
    open_server.proc = start_moto(open_server.port, open_server.log, auth=False)
    request.addfinalizer(open_server.stop)
    open_server.endpoint = f"http://127.0.0.1:{open_server.port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", open_server.endpoint)
    open_server.client().create_bucket(Bucket=BUCKET)
    store = open_blobs(URL)
    data = os.urandom(3000)
    digest = hash_bytes(data)
    put = urllib.request.Request(
        s3.presign_put(store, digest),
        data=data,
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(put, timeout=10) as reply:
        assert reply.status == 200
    assert store.get_bytes(digest) == data and store.verify(digest)
    with urllib.request.urlopen(s3.presign_get(store, digest), timeout=10) as reply:
        assert reply.read() == data
    assert objects(moto_server) == {}  # it went to the open server's bucket only
