"""A content-addressed blob store over fsspec.

Blobs are named by their BLAKE3 hex digest and laid out as ``ab/cd/abcd…``. Identical content is
stored once. Local writes are atomic (temp file in the same folder + fsync + rename, then fsync of
the folder), so a crash at any point leaves either no blob or a whole one; stray temp files are
ignored by readers and can be swept. Reads verify the hash, so a corrupted blob is reported as
:class:`IntegrityError` rather than handed to a model or a training job.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import blake3
import fsspec

from shipyard.errors import IntegrityError, InvalidInputError, NotFoundError

CHUNK = 1024 * 1024
_HEX = set("0123456789abcdef")


@dataclass(frozen=True)
class PutResult:
    digest: str
    size: int
    created: bool  # False when the content was already stored


def hash_bytes(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def hash_file(path: str | Path) -> str:
    hasher = blake3.blake3()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
        raise InvalidInputError(f"{digest!r} is not a BLAKE3 hex digest", field="digest")
    return digest


class BlobStore:
    """Put, get and verify blobs. ``url`` is ``file:///abs/path`` or any fsspec URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")
        self.is_local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )
        self._made_dirs: set[str] = set()
        self._lock = threading.Lock()

    # --- writing -------------------------------------------------------------------------------

    def put_bytes(self, data: bytes) -> PutResult:
        digest = hash_bytes(data)
        if self._stored_intact(digest):
            return PutResult(digest, len(data), False)
        if self.is_local:
            self._atomic_local_write(digest, [data])
        else:
            self.fs.pipe_file(self._path(digest), data)
        return PutResult(digest, len(data), True)

    def put_file(self, path: str | Path) -> PutResult:
        """Store a file's content, streaming: hashed and copied in one pass."""
        if not self.is_local:
            digest = hash_file(path)
            size = os.path.getsize(path)
            if self.exists(digest):
                return PutResult(digest, size, False)
            self.fs.put_file(str(path), self._path(digest))
            return PutResult(digest, size, True)
        tmp_dir = Path(self.root) / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        hasher = blake3.blake3()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix="put-")
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                while chunk := src.read(CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = hasher.hexdigest()
            if self._stored_intact(digest):
                return PutResult(digest, size, False)
            self._publish(tmp, digest)
            return PutResult(digest, size, True)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _atomic_local_write(self, digest: str, chunks: list[bytes]) -> None:
        tmp_dir = Path(self.root) / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix="put-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            self._publish(tmp, digest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _publish(self, tmp: str, digest: str) -> None:
        final = Path(self._path(digest))
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)  # atomic; a concurrent writer of the same content is harmless
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # --- reading -------------------------------------------------------------------------------

    def exists(self, digest: str) -> bool:
        return bool(self.fs.exists(self._path(check_digest(digest))))

    def size(self, digest: str) -> int:
        self._require(digest)
        return int(self.fs.size(self._path(digest)))

    def get_bytes(self, digest: str) -> bytes:
        """The blob's content, verified against its digest."""
        self._require(digest)
        data: bytes = self.fs.cat_file(self._path(digest))
        if hash_bytes(data) != digest:
            raise _corrupted(digest)
        return data

    def iter_chunks(self, digest: str) -> Iterator[bytes]:
        """Stream a blob; the hash is checked when the stream ends."""
        self._require(digest)
        hasher = blake3.blake3()
        with self.fs.open(self._path(digest), "rb") as fh:
            while chunk := fh.read(CHUNK):
                hasher.update(chunk)
                yield chunk
        if hasher.hexdigest() != digest:
            raise _corrupted(digest)

    def copy_to(self, digest: str, dest: str | Path) -> None:
        """Write a verified copy of a blob to ``dest`` atomically."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".shipyard-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in self.iter_chunks(digest):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def open(self, digest: str) -> IO[bytes]:
        """An unverified reader, for streaming consumers that verify the manifest themselves."""
        self._require(digest)
        handle: IO[bytes] = self.fs.open(self._path(digest), "rb")
        return handle

    def sweep_temp(self, *, older_than_s: float = 3600.0) -> int:
        """Remove temp files left by writers that crashed; returns how many were removed.

        Only files untouched for ``older_than_s`` seconds go: a younger one may belong to a
        writer that is still streaming (in another process), whose publish would then fail.
        """
        if not self.is_local:
            return 0
        tmp_dir = Path(self.root) / "tmp"
        if not tmp_dir.exists():
            return 0
        cutoff = time.time() - older_than_s
        count = 0
        for entry in tmp_dir.iterdir():
            try:
                if entry.is_file() and entry.stat().st_mtime <= cutoff:
                    entry.unlink()
                    count += 1
            except FileNotFoundError:  # its writer finished (or another sweep ran) meanwhile
                continue
        return count

    def _stored_intact(self, digest: str) -> bool:
        """Whether ``digest`` is stored whole. A local blob is re-hashed, so that putting the
        same content again repairs a corrupted one (what the IntegrityError tells users to do)."""
        if not self.exists(digest):
            return False
        return not self.is_local or hash_file(self._path(digest)) == digest

    def _require(self, digest: str) -> None:
        if not self.exists(digest):
            raise NotFoundError(
                f"blob {digest} is not in the store at {self.url}", field="digest", digest=digest
            )

    def _path(self, digest: str) -> str:
        return f"{self.root}/{digest[:2]}/{digest[2:4]}/{digest}"


def open_blobs(url: str) -> BlobStore:
    return BlobStore(url)


def _corrupted(digest: str) -> IntegrityError:
    return IntegrityError(
        f"blob {digest} is corrupted: its content no longer matches its hash; "
        "restore it from a backup or commit the data again",
        field="digest",
        digest=digest,
    )
