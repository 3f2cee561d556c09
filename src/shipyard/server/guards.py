"""ASGI guards that run before any route: request-path hygiene and request-size bounds.

Both reject early and cheaply, before a route reads a byte of the body, and both answer with the
API's JSON error shape.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shipyard.errors import PayloadTooLargeError, UnsafePathError
from shipyard.server.deps import API_PREFIX
from shipyard.server.errors import error_response

MiB = 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 64 * MiB
DEFAULT_MAX_BLOB_BYTES = 16 * 1024 * MiB
# PUT /api/v1/projects/{project}/blobs/{digest}: the one route whose body may be a blob.
BLOB_ROUTE_RE = re.compile(rf"^{re.escape(API_PREFIX)}/projects/[^/]+/blobs/[^/]+$")

# Encoded separators and NUL in the raw path: the router would see a different path than a
# proxy or a log does, which is how traversal fixes get bypassed.
_RAW_FORBIDDEN = (b"%2f", b"%5c", b"%00")


class PathGuardMiddleware:
    """Refuse request paths with dot segments, encoded separators or leftover encodings.

    Names and ids in URLs are plain slugs (``domain.names``), so nothing legitimate is lost; a
    path like ``/api/v1/datasets/%2e%2e%2fetc`` (``../etc`` once decoded) or a double-encoded
    ``%252e%252e%252f`` gets a 400 ``unsafe_path`` naming the problem instead of reaching a route.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = _path_problem(scope)
            if problem is not None:
                error = UnsafePathError(
                    f"the request path {scope['path']!r} is not allowed: {problem}", field="path"
                )
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _path_problem(scope: Scope) -> str | None:
    path: str = scope["path"]
    raw: bytes = (scope.get("raw_path") or path.encode()).lower()
    if any(token in raw for token in _RAW_FORBIDDEN):
        return "it contains a percent-encoded '/', '\\' or NUL"
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "it contains a control character"
    if "\\" in path:
        return "it contains a backslash"
    if "%" in path:
        return "it contains a double percent-encoding"
    if any(segment in (".", "..") for segment in path.split("/")):
        return "it contains a '.' or '..' segment (possibly percent-encoded)"
    return None


class BodyLimitMiddleware:
    """Bound request bodies: ``max_body_bytes`` for API calls, ``max_blob_bytes`` for blob uploads.

    A declared ``Content-Length`` over the bound is refused with 413 before the body is read; a
    body without one (chunked) is counted while it is read and fails with 413 the moment it
    crosses the bound, so the server never buffers or stores more than the bound.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_blob_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_blob_bytes = max_blob_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_blob = scope["method"] == "PUT" and bool(BLOB_ROUTE_RE.match(scope["path"]))
        limit = self.max_blob_bytes if is_blob else self.max_body_bytes
        what = "a blob upload" if is_blob else "an API request body (upload files as blobs)"

        def too_large() -> PayloadTooLargeError:
            return PayloadTooLargeError(
                f"the request body is larger than {_size(limit)}, the server's limit for {what}",
                field="body",
                limit=limit,
            )

        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await error_response(too_large(), headers={"Connection": "close"})(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large()
            return message

        await self.app(scope, counting_receive, send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n} bytes"
