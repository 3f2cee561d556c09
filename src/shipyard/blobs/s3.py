"""The blob store on S3 (or any S3-compatible server), through s3fs (the ``shipyard[s3]`` extra).

Packs are not used on S3: every blob is a loose object ``root/ab/cd/abcd…`` (a pack's index lives
on a local disk; on S3 one object per blob costs one request and stays collectable alone).
Existence is checked in batches: the folders holding the wanted digests are listed, a few
requests for a whole manifest instead of one ``HEAD`` each. Uploads run in a thread pool; a
large blob is sent as a multipart upload, which S3 publishes only when it completes, so a
killed upload never leaves a visible partial blob and a rerun stores only what is missing.
The endpoint and credentials come from the usual AWS settings (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``~/.aws``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from shipyard.errors import NotFoundError, StorageUnavailableError

if TYPE_CHECKING:
    from shipyard.blobs.store import BlobStore, PutResult, SourceFile

S3_PROTOCOLS = ("s3", "s3a")
MULTIPART_PART_BYTES = 8 * 1024 * 1024
"""A blob of at least twice this size is uploaded as a multipart upload of parts this size."""
UPLOAD_WORKERS = 8
_KEYS_LISTED_ALONE = 2  # this many digests or fewer: each listed by its own key
_SHARDS_LISTED_ALONE = 32  # more shard folders than this wanted: list the whole store once


def is_s3(fs: object) -> bool:
    protocol = getattr(fs, "protocol", ())
    names = protocol if isinstance(protocol, tuple) else (protocol,)
    return any(name in S3_PROTOCOLS for name in names)


def list_sizes(store: BlobStore, digests: Sequence[str]) -> dict[str, int]:
    """The size of each of ``digests`` stored under ``store.root``, from a few listings: one per
    2-character shard folder that holds a wanted digest, or one of the whole store for many."""
    wanted = set(digests)
    if not wanted:
        return {}
    shards = sorted({d[:2] for d in wanted})
    if len(wanted) <= _KEYS_LISTED_ALONE:  # a key's own prefix: one short list request each
        prefixes = [store._path(d) for d in sorted(wanted)]
    elif len(shards) > _SHARDS_LISTED_ALONE:
        prefixes = [f"{store.root}/"]
    else:
        prefixes = [f"{store.root}/{shard}/" for shard in shards]
    found: dict[str, int] = {}
    with s3_errors(store.url):
        store.fs.invalidate_cache()  # listings cached by s3fs may predate other writers
        for prefix in prefixes:
            for key, size in _list_prefix(store, prefix):
                name = key.rsplit("/", 1)[-1]
                if name in wanted and key.endswith(f"/{name[:2]}/{name[2:4]}/{name}"):
                    found[name] = size
    return found


def _list_prefix(store: BlobStore, path: str) -> Iterator[tuple[str, int]]:
    """``(key, size)`` of every object whose key starts with ``path`` (``bucket/prefix``): list
    requests only (1000 keys each), never a ``HEAD``, even where nothing is stored."""
    bucket, prefix, _ = store.fs.split_path(path)
    token: str | None = None
    while True:
        extra = {"ContinuationToken": token} if token else {}
        page = store.fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, **extra)
        for item in page.get("Contents", []):
            yield str(item["Key"]), int(item["Size"])
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return


def put_files(
    store: BlobStore,
    files: Sequence[SourceFile],
    *,
    progress: Callable[[SourceFile], None] | None = None,
    workers: int | None = None,
) -> list[PutResult]:
    """Store many files as loose objects: hashed in a pool, one batched existence check, then
    the missing ones uploaded in parallel (large ones multipart). A file that changed while it
    was stored raises ``FileChangedError`` and its object is removed again."""
    from shipyard.blobs.store import PutResult, _check_unchanged, file_changed, hash_file

    with ThreadPoolExecutor(workers or UPLOAD_WORKERS) as pool:
        digests = list(pool.map(lambda f: hash_file(f.path), files))
        stored = list_sizes(store, digests)
        uploading: dict[str, SourceFile] = {}
        for source, digest in zip(files, digests, strict=True):
            if digest not in stored:
                uploading.setdefault(digest, source)

        def upload(item: tuple[str, SourceFile]) -> None:
            digest, source = item
            target = store._path(digest)
            with s3_errors(store.url):
                store.fs.put_file(str(source.path), target, chunksize=MULTIPART_PART_BYTES)
            try:
                _check_unchanged(source, os.stat(source.path))
            except Exception:
                with contextlib.suppress(Exception):
                    store.fs.rm_file(target)
                raise
            if progress is not None:
                progress(source)

        for _ in pool.map(upload, uploading.items()):
            pass
    results: list[PutResult] = []
    for source, digest in zip(files, digests, strict=True):
        created = uploading.get(digest) is source
        if not created and progress is not None:
            progress(source)
        if source.size != os.path.getsize(source.path):
            raise file_changed(source)
        results.append(PutResult(digest, source.size, created))
    return results


@contextlib.contextmanager
def s3_errors(url: str) -> Iterator[None]:
    """Turn s3fs / botocore faults into clean errors naming the problem and what to do."""
    try:
        yield
    except PermissionError as exc:
        raise StorageUnavailableError(
            f"the S3 blob store {url} refused the request ({exc}): check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws) and that they may read and "
            "write this bucket; nothing partial was stored, commit again once fixed",
            field="blobs",
        ) from exc
    except FileNotFoundError as exc:
        if "bucket" not in str(exc).lower():
            raise
        raise NotFoundError(
            f"the bucket of the S3 blob store {url} does not exist ({exc}): create it or fix "
            "the URL (--blobs / SHIPYARD_BLOBS)",
            field="blobs",
        ) from exc
    except OSError as exc:
        raise StorageUnavailableError(
            f"the S3 blob store {url} cannot be reached ({exc}): nothing partial was stored; "
            "check the endpoint (AWS_ENDPOINT_URL) and the network, then run the same command "
            "again: what is already stored is skipped",
            field="blobs",
        ) from exc
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in ("botocore", "aiobotocore", "aiohttp"):
            raise
        raise StorageUnavailableError(
            f"the S3 blob store {url} cannot be reached ({type(exc).__name__}: {exc}): nothing "
            "partial was stored; check the endpoint (AWS_ENDPOINT_URL) and the network, then "
            "run the same command again: what is already stored is skipped",
            field="blobs",
        ) from exc


def presign_get(store: BlobStore, digest: str, *, expires_s: int = 3600) -> str:
    """A URL that downloads blob ``digest`` straight from the bucket for ``expires_s`` seconds
    (the caller verifies the bytes against the digest, as every read does)."""
    with s3_errors(store.url):
        return str(store.fs.sign(store._path(digest), expiration=expires_s))


def presign_put(store: BlobStore, digest: str, *, expires_s: int = 3600) -> str:
    """A URL that uploads blob ``digest`` straight to the bucket (one ``PUT`` of its whole
    content) for ``expires_s`` seconds. The bucket cannot check the hash: the server must
    verify the stored object (``BlobStore.verify``) before it records anything naming it."""
    from fsspec.asyn import sync

    bucket, key, _ = store.fs.split_path(store._path(digest))
    with s3_errors(store.url):
        url = sync(
            store.fs.loop,
            store.fs.s3.generate_presigned_url,
            ClientMethod="put_object",
            Params={"Bucket": bucket, "Key": key},
            ExpiresIn=expires_s,
        )
    return str(url)
