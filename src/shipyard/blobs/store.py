"""A content-addressed blob store over fsspec.

Blobs are named by their BLAKE3 hex digest and laid out as ``ab/cd/abcd…``. Identical content is
stored once. Local writes are atomic (temp file in the same folder + fsync + rename, then fsync of
the folder), so a crash at any point leaves either no blob or a whole one; stray temp files are
ignored by readers and can be swept. Reads verify the hash, so a corrupted blob is reported as
:class:`IntegrityError` rather than handed to a model or a training job.

Faults of the disk under the store surface as clean errors, never as raw ``OSError``: a full disk
is :class:`StorageFullError` (507), a read-only or unwritable folder
:class:`StorageUnavailableError` (503); nothing half-written stays behind, and reads keep
working. Storing content that is already there refreshes the blob's modification time, so the
garbage collector's grace period (``maintenance.gc``) also covers a commit in flight that reuses
an old orphan.
"""

from __future__ import annotations

import contextlib
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

from shipyard.errors import (
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    storage_write_error,
)
from shipyard.wiring import blob_backend

CHUNK = 1024 * 1024
TMP_DIR = "tmp"
QUARANTINE_DIR = "quarantine"
_HEX = set("0123456789abcdef")
# fsspec protocols whose implementation ships in an extra of ours, and that extra's name.
_EXTRAS = {"s3": "s3", "s3a": "s3"}


@dataclass(frozen=True)
class PutResult:
    digest: str
    size: int
    created: bool  # False when the content was already stored


@dataclass(frozen=True)
class StoredBlob:
    """One blob as listed by :meth:`BlobStore.iter_blobs`; ``mtime`` is None when unknown."""

    digest: str
    size: int
    mtime: float | None


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


def check_stored(blobs: BlobStore, *, digest: str, size: int, path: str, field: str) -> None:
    """A manifest entry (``path`` -> ``digest`` of ``size`` bytes) names a blob that is stored,
    with that size; marks it in use again (the collector's grace period starts over).
    NotFoundError / InvalidInputError naming ``field`` otherwise."""
    if not blobs.exists(digest):
        raise NotFoundError(
            f"{field}.digest {digest} ({path!r}) is not in the blob store; upload the blob first",
            field=f"{field}.digest",
        )
    blobs.touch(digest)
    stored = blobs.size(digest)
    if stored != size:
        raise InvalidInputError(
            f"{field}.size is {size} but blob {digest} ({path!r}) holds {stored} bytes",
            field=f"{field}.size",
        )


class BlobStore:
    """Put, get and verify blobs. ``url`` is ``file:///abs/path`` or any fsspec URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, root = _filesystem(url)
        self.root = root.rstrip("/")
        self.is_local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )
        self._made_dirs: set[str] = set()
        self._lock = threading.Lock()
        if self.is_local:  # the server's blobs: its user's only (blob files are written 0600)
            _make_private(self.root)

    # --- writing -------------------------------------------------------------------------------

    def put_bytes(self, data: bytes) -> PutResult:
        digest = hash_bytes(data)
        if self._stored_intact(digest):
            self.touch(digest)
            return PutResult(digest, len(data), False)
        with self._writing():
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
            with self._writing():
                self.fs.put_file(str(path), self._path(digest))
            return PutResult(digest, size, True)
        # The source is opened first: a source we may not read is the caller's fault, not the
        # store's, and must not be reported as an unwritable store.
        with open(path, "rb") as src, self._writing():
            tmp_dir = Path(self.root) / TMP_DIR
            tmp_dir.mkdir(parents=True, exist_ok=True)
            hasher = blake3.blake3()
            size = 0
            fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix="put-")
            try:
                with os.fdopen(fd, "wb") as out:
                    while chunk := src.read(CHUNK):
                        hasher.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                digest = hasher.hexdigest()
                if self._stored_intact(digest):
                    self.touch(digest)
                    return PutResult(digest, size, False)
                self._publish(tmp, digest)
                return PutResult(digest, size, True)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def _atomic_local_write(self, digest: str, chunks: list[bytes]) -> None:
        tmp_dir = Path(self.root) / TMP_DIR
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
            with contextlib.suppress(FileNotFoundError):
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
        self._require(digest)
        with self._writing(where=str(dest.parent)):
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
                with contextlib.suppress(FileNotFoundError):
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
        return len(self.stale_temp(older_than_s=older_than_s, remove=True))

    def stale_temp(self, *, older_than_s: float, remove: bool = False) -> list[tuple[Path, int]]:
        """Temp files untouched for ``older_than_s`` seconds, as ``(path, size)``; with
        ``remove``, only those actually removed. A read-only store yields what it could not
        remove as nothing removed, never an error (sweeping is best effort)."""
        if not self.is_local:
            return []
        tmp_dir = Path(self.root) / TMP_DIR
        cutoff = time.time() - older_than_s
        found: list[tuple[Path, int]] = []
        try:
            entries = list(tmp_dir.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        for entry in entries:
            try:
                info = entry.lstat()
                if not entry.is_file() or info.st_mtime > cutoff:
                    continue
                if remove:
                    entry.unlink()
                found.append((entry, info.st_size))
            except FileNotFoundError:  # its writer finished (or another sweep ran) meanwhile
                continue
            except OSError:  # read-only or not ours: leave it, report nothing removed
                continue
        return found

    # --- maintenance (the garbage collector) ---------------------------------------------------

    def iter_blobs(self) -> Iterator[StoredBlob]:
        """Every stored blob (its file name is its digest); temp and quarantine files excluded."""
        if self.is_local:
            yield from self._iter_local()
            return
        for path, info in self.fs.find(self.root, detail=True).items():
            name = str(path).rstrip("/").rsplit("/", 1)[-1]
            if _is_digest(name) and str(path).endswith(f"/{name[:2]}/{name[2:4]}/{name}"):
                yield StoredBlob(name, int(info.get("size") or 0), _mtime(info))

    def touch(self, digest: str) -> None:
        """Refresh a stored blob's modification time (it is in use again: the collector's grace
        period starts over). Best effort: a store that cannot be written is left as it is."""
        if self.is_local:
            with contextlib.suppress(OSError):
                os.utime(self._path(check_digest(digest)))

    def remove(self, digest: str, *, unless_newer_than: float | None = None) -> bool:
        """Delete a blob; True when this call removed it (False: gone already, or kept).

        ``unless_newer_than`` (a timestamp): the blob is kept if it was modified after it, checked
        right before unlinking, so a blob that a writer just stored or refreshed is never taken.
        """
        path = self._path(check_digest(digest))
        with self._writing():
            if not self.is_local:
                if not self.fs.exists(path):
                    return False
                self.fs.rm_file(path)
                return True
            try:
                info = os.stat(path)
            except FileNotFoundError:
                return False
            if unless_newer_than is not None and info.st_mtime > unless_newer_than:
                return False
            try:
                os.unlink(path)
            except FileNotFoundError:
                return False
            return True

    def quarantine(self, digest: str) -> bool:
        """Move a corrupted blob aside (to ``quarantine/``, kept for inspection) so that it reads
        as missing and the next upload of its content stores it whole again. False when it
        could not be moved (gone already, a remote store, or a read-only one)."""
        if not self.is_local:
            return False
        target = Path(self.root) / QUARANTINE_DIR / f"{check_digest(digest)}.{time.time_ns()}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._path(digest), target)
        except OSError:
            return False
        return True

    def _iter_local(self) -> Iterator[StoredBlob]:
        root = Path(self.root)
        for first in _subdirs(root):
            for second in _subdirs(first):
                try:
                    entries = list(os.scandir(second))
                except FileNotFoundError:
                    continue
                for entry in entries:
                    name = entry.name
                    if not (
                        _is_digest(name) and name[:2] == first.name and name[2:4] == second.name
                    ):
                        continue
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    yield StoredBlob(name, info.st_size, info.st_mtime)

    @contextlib.contextmanager
    def _writing(self, *, where: str | None = None) -> Iterator[None]:
        """Turn a disk fault while writing into StorageFullError / StorageUnavailableError."""
        try:
            yield
        except OSError as exc:
            clean = storage_write_error(exc, where=where or f"the blob store at {self.url}")
            if clean is None:
                raise
            raise clean from exc

    def verify(self, digest: str) -> bool:
        """Whether the stored blob's content still hashes to ``digest`` (it must be stored)."""
        self._require(digest)
        if self.is_local:
            return hash_file(self._path(digest)) == digest
        hasher = blake3.blake3()
        with self.fs.open(self._path(digest), "rb") as fh:
            while chunk := fh.read(CHUNK):
                hasher.update(chunk)
        return bool(hasher.hexdigest() == digest)

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
    store: BlobStore = blob_backend(url)(url)  # the class for its scheme: shipyard.wiring
    return store


def check_blob_url(url: str) -> str:
    """Return ``url`` if a blob store can be opened on it here (its fsspec backend is installed),
    else raise :class:`InvalidInputError` naming what to install. Nothing is contacted."""
    _filesystem(url)
    return url


def _filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    protocol = url.split("://", 1)[0].lower() if "://" in url else "file"
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except ImportError as exc:
        extra = _EXTRAS.get(protocol)
        how = (
            f"pip install 'shipyard[{extra}]'"
            if extra
            else f"install the fsspec backend for {protocol}://"
        )
        raise InvalidInputError(
            f"the blob store {url!r} needs a package that is not installed ({exc}): {how}",
            field="blobs",
            protocol=protocol,
        ) from None
    except ValueError as exc:
        raise InvalidInputError(
            f"the blob store {url!r} cannot be opened: {exc}", field="blobs", protocol=protocol
        ) from None
    return fs, str(root)


def _is_digest(name: str) -> bool:
    return len(name) == 64 and set(name) <= _HEX


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(
            Path(e.path)
            for e in os.scandir(folder)
            if len(e.name) == 2 and set(e.name) <= _HEX and e.is_dir(follow_symlinks=False)
        )
    except (FileNotFoundError, NotADirectoryError):
        return []


def _mtime(info: dict[str, object]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        timestamp = getattr(value, "timestamp", None)
        if callable(timestamp):
            return float(timestamp())
    return None


def _corrupted(digest: str) -> IntegrityError:
    return IntegrityError(
        f"blob {digest} is corrupted: its content no longer matches its hash; "
        "restore it from a backup or commit the data again",
        field="digest",
        digest=digest,
    )


def _make_private(folder: str) -> None:
    """Drop group and other permissions from an existing local blob folder (owner bits kept)."""
    with contextlib.suppress(OSError):
        info = os.stat(folder)
        if info.st_uid == os.geteuid() and info.st_mode & 0o077:
            os.chmod(folder, info.st_mode & 0o700)
