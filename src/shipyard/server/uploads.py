"""Receive a request body into a temporary file, hashing it on the way.

Blob uploads can be gigabytes: they are streamed to disk chunk by chunk (never held in memory),
hashed with BLAKE3 while they arrive, and only handed to the blob store once the hash matches
the digest the client named. The size bound is enforced by ``guards.BodyLimitMiddleware`` while
the chunks are read.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
import blake3
from fastapi import Request

_FLUSH_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Received:
    path: Path
    digest: str
    size: int


@asynccontextmanager
async def receive_to_temp(request: Request, *, folder: Path) -> AsyncIterator[Received]:
    """Stream the body into a temp file under ``folder``; the file is removed on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix="upload-")
    path = Path(name)
    try:
        hasher = blake3.blake3()
        size = 0
        pending: list[bytes] = []
        pending_bytes = 0
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                if not chunk:
                    continue
                hasher.update(chunk)
                size += len(chunk)
                pending.append(chunk)
                pending_bytes += len(chunk)
                if pending_bytes >= _FLUSH_BYTES:
                    await anyio.to_thread.run_sync(out.writelines, pending)
                    pending, pending_bytes = [], 0
            if pending:
                await anyio.to_thread.run_sync(out.writelines, pending)
        yield Received(path=path, digest=hasher.hexdigest(), size=size)
    finally:
        path.unlink(missing_ok=True)
