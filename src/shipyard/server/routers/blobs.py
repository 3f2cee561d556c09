"""Blobs: content-addressed bytes (``HEAD``/``GET``/``PUT /projects/{project}/blobs/{digest}``).

Uploads are verified: the body is streamed to a temp file while being hashed, and stored only
when its BLAKE3 digest equals the one in the URL; otherwise nothing is stored and the caller gets
a 400 naming both digests. Downloads stream the stored blob; the store re-checks its hash as it
streams, and the last chunk is held back until that check passed, so a blob whose content went
bad is never delivered whole: the response is cut short of its Content-Length.

A ``Range: bytes=START-END`` request (one range; ``START-`` and ``-SUFFIX`` too) gets a 206 with
just those bytes, streamed from the store, so ``shipyard://`` readers (a Parquet reader reading a
footer and a few columns) never fetch a whole file. A range cannot be checked against the
digest; the reader verifies the blob (``shipyard.data.fs``). A malformed or multi-range header is
ignored (the whole blob, 200, as RFC 9110 allows); a range past the end is a 416.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Header, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from shipyard.blobs.store import CHUNK, BlobStore, check_digest, hash_bytes
from shipyard.context import Context
from shipyard.domain.principals import Role
from shipyard.errors import InvalidInputError, NotFoundError
from shipyard.schemas import DIGEST_RULE, ErrorBody, Size
from shipyard.security import audit
from shipyard.security.blobrefs import (
    add_refs,
    authorize_blob,
    missing_refs,
    note_upload,
    require_refs,
)
from shipyard.security.rbac import authorize
from shipyard.server.deps import PROJECT_PREFIX, Ctx, ProjectPath
from shipyard.server.errors import DigestMismatchError
from shipyard.server.uploads import receive_to_temp
from shipyard.store.queries import project_id

router = APIRouter(
    prefix=f"{PROJECT_PREFIX}/blobs",
    tags=["blobs"],
)

UPLOADS_DIR = "uploads"

_RAW_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


_RANGE_RE = re.compile(r"^bytes=([0-9]{0,19})-([0-9]{0,19})$")

# The digest rule is published in the OpenAPI; ``check_digest`` (in the store) enforces it.
DigestPath = Annotated[str, Path(description="The blob's digest.", json_schema_extra=DIGEST_RULE)]


class BlobInfo(BaseModel):
    digest: str
    size: Size
    created: bool


@router.head("/{digest}", responses={404: {"description": "Not stored"}})
def head_blob(project: ProjectPath, digest: DigestPath, ctx: Ctx) -> Response:
    authorize_blob(ctx, project=project, digest=digest, need=Role.VIEWER)
    size = ctx.blobs.size(digest)
    return Response(
        headers={"Content-Length": str(size), "ETag": f'"{digest}"', "Accept-Ranges": "bytes"}
    )


@router.get(
    "/{digest}",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "The requested range", "content": {"application/octet-stream": {}}},
        416: {"model": ErrorBody, "description": "The range starts past the end of the blob"},
    },
)
def get_blob(
    project: ProjectPath,
    digest: DigestPath,
    ctx: Ctx,
    range_: Annotated[
        str | None,
        Header(alias="Range", description="One byte range: bytes=START-END, START- or -SUFFIX."),
    ] = None,
) -> Response:
    authorize_blob(ctx, project=project, digest=digest, need=Role.VIEWER)
    size = ctx.blobs.size(digest)  # a clean 404 before the response starts
    headers = {"ETag": f'"{digest}"', "Accept-Ranges": "bytes"}
    span = _byte_range(range_, size)
    if span is None:
        return StreamingResponse(
            _one_chunk_late(ctx.blobs.iter_chunks(digest)),
            media_type="application/octet-stream",
            headers={**headers, "Content-Length": str(size)},
        )
    start, end = span
    if start >= end:
        return JSONResponse(
            {
                "code": "range_not_satisfiable",
                "message": f"the range {range_!r} starts past the end of the blob ({size} bytes)",
                "field": "Range",
            },
            status_code=416,
            headers={**headers, "Content-Range": f"bytes */{size}"},
        )
    return StreamingResponse(
        _read_range(ctx.blobs, digest, start, end),
        status_code=206,
        media_type="application/octet-stream",
        headers={
            **headers,
            "Content-Length": str(end - start),
            "Content-Range": f"bytes {start}-{end - 1}/{size}",
        },
    )


@router.put(
    "/{digest}",
    openapi_extra=_RAW_BODY,
    status_code=201,
    responses={
        200: {"model": BlobInfo, "description": "Already stored"},
        413: {"model": ErrorBody},
    },
)
async def put_blob(
    project: ProjectPath, digest: DigestPath, request: Request, response: Response, ctx: Ctx
) -> BlobInfo:
    check_digest(digest)
    await run_in_threadpool(authorize_blob, ctx, project=project, digest=digest, need=Role.EDITOR)
    async with receive_to_temp(request, folder=ctx.settings.home / UPLOADS_DIR) as got:
        if got.digest != digest:
            raise DigestMismatchError(
                f"the uploaded content hashes to {got.digest}, not to the digest in the URL "
                f"({digest}); nothing was stored - check the file and upload it again",
                field="digest",
                expected=digest,
                actual=got.digest,
            )
        put = await run_in_threadpool(ctx.blobs.put_file, got.path)
    await run_in_threadpool(note_upload, ctx, project=project, digest=put.digest)
    await run_in_threadpool(
        audit.record_event,
        ctx,
        action="blob.upload",
        resource=f"project/{project}/blob/{put.digest}",
        details={"size": put.size, "created": put.created},
    )
    if not put.created:
        response.status_code = 200
    return BlobInfo(digest=put.digest, size=put.size, created=put.created)


def _one_chunk_late(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Send each chunk only once the next one is read: the store checks the hash when its stream
    ends, so the last chunk goes out only after that check passed, and a bad blob is never sent
    whole (the response is aborted short of its Content-Length)."""
    previous: bytes | None = None
    for chunk in chunks:
        if previous is not None:
            yield previous
        previous = chunk
    if previous is not None:
        yield previous


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive; start >= end when unsatisfiable) of a single-range
    ``Range`` header, or None to send the whole blob (no header, or one we do not serve)."""
    match = _RANGE_RE.fullmatch(header.strip()) if header else None
    if match is None or (not match[1] and not match[2]):
        return None
    if not match[1]:  # the last N bytes
        suffix = int(match[2])
        return (max(size - suffix, 0), size) if suffix else (size, size)
    start = int(match[1])
    end = int(match[2]) + 1 if match[2] else None
    if end is not None and end <= start:
        return None  # invalid (last before first): ignored, as RFC 9110 says
    if start >= size:
        return (size, size)
    return (start, size if end is None else min(end, size))


def _read_range(blobs: BlobStore, digest: str, start: int, end: int) -> Iterator[bytes]:
    """Bytes ``start`` to ``end`` of a blob, streamed in chunks (unverified: see the module)."""
    with blobs.open(digest) as fh:
        fh.seek(start)
        left = end - start
        while left > 0:
            chunk = fh.read(min(CHUNK, left))
            if not chunk:
                return  # a truncated blob: the response ends short of its Content-Length
            left -= len(chunk)
            yield chunk


# --- many blobs at once: what is missing, uploads and downloads in frames ------------------------

FRAME_HEADER = struct.Struct(">32sQ")  # the raw 32-byte digest, then the content's size
BATCH_MAX_BLOB_BYTES = 16 * 1024 * 1024  # larger blobs go one by one (PUT/GET, streamed)
BATCH_MAX_DIGESTS = 100_000
_FRAMES_TO_STORE = 32 * 1024 * 1024  # received bytes handed to the store at a time


class DigestList(BaseModel):
    digests: list[Annotated[str, Field(json_schema_extra=DIGEST_RULE)]] = Field(
        max_length=BATCH_MAX_DIGESTS
    )


class MissingBlobs(BaseModel):
    missing: list[str]


class BatchStored(BaseModel):
    blobs: int
    created: int
    bytes: int


@router.post("/missing")
def missing_blobs(project: ProjectPath, body: DigestList, ctx: Ctx) -> MissingBlobs:
    """Of ``digests``, those to upload before a commit may name them: not stored, or stored but
    not yet held by this project (uploading proves the caller has the content). One request for
    a whole manifest instead of one ``HEAD`` per file."""
    for digest in body.digests:
        check_digest(digest)
    authorize(ctx, project=project, need=Role.EDITOR, uploads_blob=True)
    stored = ctx.blobs.sizes(body.digests)
    unheld = missing_refs(ctx, project=project, digests=stored)
    return MissingBlobs(missing=sorted({d for d in body.digests if d not in stored} | unheld))


@router.post(
    "/batch",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "Frames: a blob's 32-byte digest, its size as an 8-byte "
                    "big-endian integer, then its content; repeated.",
                }
            },
        }
    },
    status_code=201,
    responses={400: {"model": ErrorBody}, 413: {"model": ErrorBody}},
)
async def put_blobs(project: ProjectPath, request: Request, ctx: Ctx) -> BatchStored:
    """Upload many (small) blobs in one request body of frames. Each blob is hashed as it
    arrives and stored only if its hash is the digest its frame names; one that is not fails the
    request (400, naming both digests) before the blobs after it are stored -- those before it
    are stored, held by the project, and skipped by a retry's ``/missing``."""
    await run_in_threadpool(authorize, ctx, project=project, need=Role.EDITOR, uploads_blob=True)
    parser = _FrameParser()
    pending: list[tuple[str, bytes]] = []
    pending_bytes = 0
    total = _Batch()
    async for chunk in request.stream():
        for digest, data in parser.feed(chunk):
            pending.append((digest, data))
            pending_bytes += len(data)
        if pending_bytes >= _FRAMES_TO_STORE:
            await run_in_threadpool(_store_frames, ctx, project, pending, total)
            pending, pending_bytes = [], 0
    parser.finish()
    if pending:
        await run_in_threadpool(_store_frames, ctx, project, pending, total)
    await run_in_threadpool(
        audit.record_event,
        ctx,
        action="blob.upload_batch",
        resource=f"project/{project}/blobs",
        details={"blobs": total.blobs, "created": total.created, "bytes": total.bytes},
    )
    return BatchStored(blobs=total.blobs, created=total.created, bytes=total.bytes)


@router.post(
    "/fetch",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def fetch_blobs(project: ProjectPath, body: DigestList, ctx: Ctx) -> Response:
    """Download many blobs (each at most 16 MiB) in one response of frames, in the order asked
    (the same frames as ``/batch``; the client checks each digest). Every digest must be one the
    project holds: the first that is not is a 404 before anything is sent."""
    for digest in body.digests:
        check_digest(digest)
    authorize(ctx, project=project, need=Role.VIEWER)
    require_refs(ctx, project=project, digests=body.digests, field="digests")
    sizes = ctx.blobs.sizes(body.digests)
    for digest in body.digests:
        if digest not in sizes:
            raise NotFoundError(f"blob {digest} is not in the store", field="digests")
        if sizes[digest] > BATCH_MAX_BLOB_BYTES:
            raise InvalidInputError(
                f"blob {digest} is {sizes[digest]} bytes, above the {BATCH_MAX_BLOB_BYTES} a "
                "batch carries; GET it on its own",
                field="digests",
            )

    def frames() -> Iterator[bytes]:
        for digest in body.digests:
            data = ctx.blobs.get_bytes(digest)  # verified
            yield FRAME_HEADER.pack(bytes.fromhex(digest), len(data)) + data

    return StreamingResponse(
        frames(),
        media_type="application/octet-stream",
        headers={"Content-Length": str(sum(FRAME_HEADER.size + sizes[d] for d in body.digests))},
    )


@dataclass
class _Batch:
    blobs: int = 0
    created: int = 0
    bytes: int = 0


def _store_frames(
    ctx: Context, project: str, frames: list[tuple[str, bytes]], total: _Batch
) -> None:
    """Verify and store received frames; the project then holds them."""
    for digest, data in frames:
        got = hash_bytes(data)
        if got != digest:
            raise DigestMismatchError(
                f"a frame's content hashes to {got}, not to the digest it names ({digest}); "
                "it and the frames after it were not stored - check the file and upload again",
                field="body",
                expected=digest,
                actual=got,
            )
    results = ctx.blobs.put_blobs(frames)
    with ctx.db.transaction() as s:
        add_refs(s, project_pk=project_id(s, project, create=True), digests=[d for d, _ in frames])
    total.blobs += len(results)
    total.created += sum(r.created for r in results)
    total.bytes += sum(r.size for r in results)


class _FrameParser:
    """Split a byte stream into ``(digest, content)`` frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        self._buffer += chunk
        out: list[tuple[str, bytes]] = []
        at = 0
        view = memoryview(self._buffer)
        while len(self._buffer) - at >= FRAME_HEADER.size:
            raw, size = FRAME_HEADER.unpack_from(view, at)
            if size > BATCH_MAX_BLOB_BYTES:
                view.release()
                raise InvalidInputError(
                    f"a frame of {size} bytes: a batch carries blobs of at most "
                    f"{BATCH_MAX_BLOB_BYTES} bytes; PUT larger ones on their own",
                    field="body",
                )
            end = at + FRAME_HEADER.size + size
            if end > len(self._buffer):
                break
            out.append((raw.hex(), bytes(view[at + FRAME_HEADER.size : end])))
            at = end
        view.release()
        del self._buffer[:at]
        return out

    def finish(self) -> None:
        if self._buffer:
            raise InvalidInputError(
                f"the body ends inside a frame ({len(self._buffer)} bytes left over); send "
                "whole frames: 32-byte digest, 8-byte size, content",
                field="body",
            )
