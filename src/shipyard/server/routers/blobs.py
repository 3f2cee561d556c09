"""Blobs: content-addressed bytes (``HEAD``/``GET``/``PUT /projects/{project}/blobs/{digest}``).

Uploads are verified: the body is streamed to a temp file while being hashed, and stored only
when its BLAKE3 digest equals the one in the URL; otherwise nothing is stored and the caller gets
a 400 naming both digests. Downloads stream the stored blob; the store re-checks its hash as it
streams, and the last chunk is held back until that check passed, so a blob whose content went
bad is never delivered whole: the response is cut short of its Content-Length.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from shipyard.blobs.store import check_digest
from shipyard.domain.principals import Role
from shipyard.schemas import DIGEST_RULE, ErrorBody, Size
from shipyard.security import audit
from shipyard.security.blobrefs import authorize_blob, note_upload
from shipyard.server.deps import PROJECT_PREFIX, Ctx, ProjectPath
from shipyard.server.errors import DigestMismatchError
from shipyard.server.uploads import receive_to_temp

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
    return Response(headers={"Content-Length": str(size), "ETag": f'"{digest}"'})


@router.get(
    "/{digest}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def get_blob(project: ProjectPath, digest: DigestPath, ctx: Ctx) -> StreamingResponse:
    authorize_blob(ctx, project=project, digest=digest, need=Role.VIEWER)
    size = ctx.blobs.size(digest)  # a clean 404 before the response starts
    return StreamingResponse(
        _one_chunk_late(ctx.blobs.iter_chunks(digest)),
        media_type="application/octet-stream",
        headers={"Content-Length": str(size), "ETag": f'"{digest}"'},
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
