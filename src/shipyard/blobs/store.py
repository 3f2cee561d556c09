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

A local store also keeps blobs in *packs* (``blobs.packs``: many small blobs in one file, one
fsync for all of them) and stores large files *chunked* (``blobs.chunking``: a recipe of
content-defined chunks, so an edited region costs only its chunks). Both are internal: every read
(``exists``, ``size``, ``get_bytes``, ``open``, ``iter_chunks``, ``copy_to``, ``verify``) takes a
digest and works the same whether its blob is loose, packed or chunked, and is verified the same.
:meth:`BlobStore.put_files` is the batch writer that uses them (a dataset commit);
``put_bytes`` and ``put_file`` keep writing one loose blob.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import blake3
import fsspec

from shipyard.blobs import s3
from shipyard.blobs.chunking import CHUNKED_MIN_BYTES, chunk_spans, parse_recipe, recipe_bytes
from shipyard.blobs.packs import (
    KIND_BLOB,
    KIND_CHUNKED,
    PACK_DIR,
    PackEntry,
    PackIndex,
    PackWriter,
)
from shipyard.errors import (
    ConflictError,
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
PACKED_MAX_BYTES = 1024 * 1024
"""``put_files`` packs files smaller than this; larger ones (up to ``CHUNKED_MIN_BYTES``) are
stored loose, the rest chunked."""
PACK_MIN_FILES = 16
"""``put_files`` packs only when at least this many small files are new: for a handful, loose
blobs cost about the same and each can be collected on its own."""
_BATCH_BYTES = 64 * 1024 * 1024  # small files read ahead per batch (bounds the memory held)
_BATCH_FILES = 4096
_TASK_FILES = 128  # files one pool task reads (a task per file costs more than reading one)
_BLOCK_BYTES = 64 * 1024 * 1024  # a chunked file is read in blocks of this size


@dataclass(frozen=True)
class PutResult:
    digest: str
    size: int
    created: bool  # False when the content was already stored


@dataclass(frozen=True)
class StoredBlob:
    """One blob as listed by :meth:`BlobStore.iter_blobs`; ``mtime`` is None when unknown.
    ``pack`` names the pack holding it (None: a loose blob); ``size`` is the bytes it takes
    there (a chunked blob's recipe; its chunks are listed as blobs of their own)."""

    digest: str
    size: int
    mtime: float | None
    pack: str | None = None
    chunked: bool = False


@dataclass(frozen=True)
class SourceFile:
    """A file to store with :meth:`BlobStore.put_files`, with what ``stat`` said of it when it
    was listed: a file whose size, mtime or ctime differ after it was read changed while being
    stored, and is refused (``FileChangedError``)."""

    path: str | Path
    size: int
    mtime_ns: int
    ctime_ns: int
    shown: str = ""  # the name an error shows (its path in the dataset)


class FileChangedError(ConflictError):
    """A source file changed while it was being read: what was read is neither its old nor its
    new content, and is not recorded."""


def file_changed(source: SourceFile) -> FileChangedError:
    shown = source.shown or str(source.path)
    return FileChangedError(
        f"{shown!r} changed while it was being committed (its size or modification time moved "
        "while it was read): nothing was committed; commit again once it is no longer being "
        "written",
        field="source",
        path=shown,
    )


def hash_bytes(data: bytes | memoryview) -> str:
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
        self.packs = PackIndex(Path(self.root) / PACK_DIR) if self.is_local else None
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

    def put_files(
        self,
        files: Sequence[SourceFile],
        *,
        progress: Callable[[SourceFile], None] | None = None,
        workers: int | None = None,
    ) -> list[PutResult]:
        """Store many files; one result each, in order. Content already stored is not written
        again. On a local store small files are read and hashed by a thread pool and written
        into packs (one fsync per pack), and large ones are chunked (``blobs.chunking``); else,
        and for a handful of files, each is a loose blob. ``progress(file)`` after each one.

        A file whose size, mtime or ctime moved while it was read raises
        :class:`FileChangedError`; blobs stored before that stay unreferenced (``shipyard gc``
        reclaims them), never half-written.
        """
        if s3.is_s3(self.fs):  # loose objects, uploaded in parallel: blobs.s3
            return s3.put_files(self, files, progress=progress, workers=workers)
        results: list[PutResult | None] = [None] * len(files)
        small = [i for i, f in enumerate(files) if f.size < PACKED_MAX_BYTES]
        if self.packs is None or len(small) < PACK_MIN_FILES:
            small = []
        writer = PackWriter(root=Path(self.root), index=self.packs) if self.packs else None
        reused: list[str] = []
        try:
            with self._writing(), ThreadPoolExecutor(workers or _workers()) as pool:
                if small and writer is not None:
                    self._put_small(files, small, writer, pool, results, reused, progress)
                for i, source in enumerate(files):
                    if results[i] is not None:
                        continue
                    if writer is not None and source.size >= CHUNKED_MIN_BYTES:
                        results[i] = self._put_chunked(source, writer, pool)
                    else:
                        results[i] = self.put_file(source.path)
                        _check_unchanged(source, os.stat(source.path))
                    if progress is not None:
                        progress(source)
                if writer is not None:
                    writer.close()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        self.touch_many(reused)
        return [r for r in results if r is not None]

    def _put_small(
        self,
        files: Sequence[SourceFile],
        todo: list[int],
        writer: PackWriter,
        pool: ThreadPoolExecutor,
        results: list[PutResult | None],
        reused: list[str],
        progress: Callable[[SourceFile], None] | None,
    ) -> None:
        def read(part: list[int]) -> list[tuple[str, bytes, bool]]:
            found = [_read_hashed(files[i]) for i in part]
            return [(digest, data, self.exists(digest)) for digest, data in found]

        for batch in _batches(files, todo):
            parts = [batch[k : k + _TASK_FILES] for k in range(0, len(batch), _TASK_FILES)]
            done = [row for rows in pool.map(read, parts) for row in rows]
            for i, (digest, data, stored) in zip(batch, done, strict=True):
                created = digest not in writer and not stored
                if created:
                    writer.add(digest, data)
                elif digest not in writer:
                    reused.append(digest)
                results[i] = PutResult(digest, len(data), created)
                if progress is not None:
                    progress(files[i])

    def _put_chunked(
        self, source: SourceFile, writer: PackWriter, pool: ThreadPoolExecutor
    ) -> PutResult:
        """Store a large file as content-defined chunks plus a recipe under its whole digest.
        Read in blocks (never mapped: a file truncated meanwhile is an error, not a SIGBUS); the
        whole-file hash runs in ``pool`` beside the chunking."""
        whole = blake3.blake3(max_threads=blake3.blake3.AUTO)
        chunks: list[tuple[str, int]] = []
        created = 0
        with open(source.path, "rb") as fh:
            pending = b""
            while True:
                block = fh.read(_BLOCK_BYTES)
                hashing = pool.submit(whole.update, block) if block else None
                data = pending + block if pending else block
                spans = list(chunk_spans(memoryview(data))) if data else []
                last = len(spans) if not block else len(spans) - 1
                for offset, length in spans[:last]:
                    part = memoryview(data)[offset : offset + length]
                    digest = hash_bytes(part)
                    chunks.append((digest, length))
                    if digest not in writer and not self.exists(digest):
                        writer.add(digest, part)
                        created += length
                pending = data[spans[last][0] :] if 0 <= last < len(spans) else b""
                if hashing is not None:
                    hashing.result()
                if not block:
                    break
            after = os.fstat(fh.fileno())
        _check_unchanged(source, after)
        if sum(n for _, n in chunks) != source.size:
            raise file_changed(source)
        digest = whole.hexdigest()
        if self.exists(digest):
            self.touch(digest)
            return PutResult(digest, source.size, False)
        writer.add(digest, recipe_bytes(chunks), kind=KIND_CHUNKED)
        return PutResult(digest, source.size, True)

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
        check_digest(digest)
        if self.packs is not None:  # a dict look-up first: most blobs of a big store are packed
            return self.packs.get(digest) is not None or os.path.exists(self._path(digest))
        if s3.is_s3(self.fs):
            return digest in s3.list_sizes(self, [digest])
        return bool(self.fs.exists(self._path(digest)))

    def sizes(self, digests: Sequence[str]) -> dict[str, int]:
        """The size of each of ``digests`` that is stored (the others are absent): one look
        each, for checking a manifest of many files; on S3 a few listings for all of them."""
        if s3.is_s3(self.fs):
            return s3.list_sizes(self, [check_digest(d) for d in digests])
        found: dict[str, int] = {}
        for digest in digests:
            if digest in found:
                continue
            check_digest(digest)
            packed = self.packs.get(digest) if self.packs is not None else None
            where: PackEntry | str | None = packed
            if packed is None or packed.kind != KIND_BLOB:
                where = self._locate(digest)  # loose, chunked, or missing
            if where is None:
                continue
            found[digest] = self._size_at(digest, where)
        return found

    def size(self, digest: str) -> int:
        return self._size_at(digest, self._where(digest))

    def get_bytes(self, digest: str) -> bytes:
        """The blob's content, verified against its digest."""
        where = self._where(digest)
        if isinstance(where, PackEntry):
            data = b"".join(self._iter_located(digest, where))
        else:
            data = self.fs.cat_file(self._path(digest))
        if hash_bytes(data) != digest:
            raise _corrupted(digest)
        return data

    def iter_chunks(self, digest: str) -> Iterator[bytes]:
        """Stream a blob; the hash is checked when the stream ends."""
        where = self._where(digest)
        hasher = blake3.blake3()
        for chunk in self._iter_located(digest, where):
            hasher.update(chunk)
            yield chunk
        if hasher.hexdigest() != digest:
            raise _corrupted(digest)

    def segments(self, digest: str) -> list[tuple[str, int, int]]:
        """Where a local blob's bytes lie, as ``(file, offset, length)`` in order: one loose file,
        a slice of a pack, or the chunks of a chunked blob. For readers that copy or map the bytes
        themselves (and verify them against ``digest``)."""
        where = self._where(digest)
        if not isinstance(where, PackEntry):
            return [(self._path(digest), 0, self._size_at(digest, where))]
        if where.kind == KIND_BLOB:
            return [(self._pack_path(where.pack), where.offset, where.length)]
        out: list[tuple[str, int, int]] = []
        for chunk, _ in self._recipe(digest, where):
            out.extend(self.segments(chunk))
        return out

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
        """An unverified, seekable reader, for streaming consumers that verify the manifest
        themselves."""
        where = self._where(digest)
        if isinstance(where, PackEntry):
            return io.BufferedReader(_SegmentReader(self.segments(digest)), buffer_size=CHUNK)
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

    def put_blobs(self, blobs: Sequence[tuple[str, bytes]]) -> list[PutResult]:
        """Store many blobs already in memory, each ``(digest, content)`` with the digest checked
        by the caller (an upload verified as it arrived); one result each, in order. Content
        already stored is not written again; on a local store the small ones go into packs (one
        fsync per pack), the others are loose blobs."""
        results: list[PutResult] = []
        small = [d for d, data in blobs if len(data) < PACKED_MAX_BYTES]
        writer = (
            PackWriter(root=Path(self.root), index=self.packs)
            if self.packs is not None and len(small) >= PACK_MIN_FILES
            else None
        )
        stored = self.sizes([d for d, _ in blobs])
        try:
            with self._writing():
                for digest, data in blobs:
                    if digest in stored or (writer is not None and digest in writer):
                        results.append(PutResult(digest, len(data), False))
                    elif writer is not None and len(data) < PACKED_MAX_BYTES:
                        writer.add(digest, data)
                        results.append(PutResult(digest, len(data), True))
                    else:
                        results.append(self.put_bytes(data))
                if writer is not None:
                    writer.close()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        self.touch_many([r.digest for r in results if not r.created])
        return results

    def touch(self, digest: str) -> None:
        """Refresh a stored blob's modification time (it is in use again: the collector's grace
        period starts over); for a packed or chunked blob, that of each pack holding its bytes.
        Best effort: a store that cannot be written is left as it is."""
        self.touch_many([digest])

    def touch_many(self, digests: Sequence[str]) -> None:
        """:meth:`touch` for many digests, each file (loose blob or pack) touched once."""
        if not self.is_local:
            return
        files: set[str] = set()
        for digest in digests:
            check_digest(digest)
            packed = self.packs.get(digest) if self.packs is not None else None
            if packed is not None and packed.kind == KIND_BLOB:
                files.add(self._pack_path(packed.pack))
                continue
            where = self._locate(digest)
            if isinstance(where, PackEntry):
                with contextlib.suppress(OSError, NotFoundError, IntegrityError):
                    files.update(path for path, _, _ in self.segments(digest))
                files.add(self._pack_path(where.pack))
            elif where is not None:
                files.add(self._path(digest))
        for path in files:
            with contextlib.suppress(OSError):
                os.utime(path)

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

    def chunks_of(self, digests: Iterable[str]) -> set[str]:
        """The chunk digests of those of ``digests`` that are stored chunked (for the collector:
        a chunk is in use while a chunked blob in use names it)."""
        found: set[str] = set()
        if self.packs is None:
            return found
        for digest in digests:
            entry = self.packs.get(digest) if _is_digest(digest) else None
            if entry is not None and entry.kind == KIND_CHUNKED:
                with contextlib.suppress(OSError, IntegrityError):
                    found.update(chunk for chunk, _ in self._recipe(digest, entry))
        return found

    def remove_pack(self, name: str, *, keep: set[str], unless_newer_than: float) -> bool:
        """Reclaim a pack: removed when it holds none of ``keep``, else its entries in ``keep``
        are copied into a new pack (published first) and then it is removed. Nothing happens
        when the pack was modified after ``unless_newer_than`` (a writer refreshed one of its
        blobs since it was listed), checked right before the unlink; True when it was removed."""
        assert self.packs is not None
        path = self._pack_path(name)
        live = [(d, e) for d, e in self.packs.packs().get(name, []) if d in keep]
        with self._writing():
            try:
                if os.stat(path).st_mtime > unless_newer_than:
                    return False
            except FileNotFoundError:
                return False
            if live:
                writer = PackWriter(root=Path(self.root), index=self.packs)
                try:
                    for digest, entry in live:
                        data = b"".join(_read_span(path, entry.offset, entry.length))
                        if entry.kind == KIND_BLOB and hash_bytes(data) != digest:
                            raise _corrupted(digest)  # never copy rot into a fresh pack
                        writer.add(digest, data, kind=entry.kind)
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
            try:
                if os.stat(path).st_mtime > unless_newer_than:
                    return False
                os.unlink(path)
            except FileNotFoundError:
                return False
        self.packs.refresh(force=True)
        return True

    def quarantine(self, digest: str) -> bool:
        """Move a corrupted blob aside (to ``quarantine/``, kept for inspection) so that it reads
        as missing and the next upload of its content stores it whole again. False when it
        could not be moved (gone already, a remote store, or a read-only one)."""
        if not self.is_local or not os.path.exists(self._path(check_digest(digest))):
            return False  # a remote store, or a packed blob (its pack holds other blobs too)
        target = Path(self.root) / QUARANTINE_DIR / f"{check_digest(digest)}.{time.time_ns()}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._path(digest), target)
        except OSError:
            return False
        return True

    def _iter_local(self) -> Iterator[StoredBlob]:
        yield from self._iter_loose()
        assert self.packs is not None
        for name, entries in self.packs.packs().items():
            try:
                mtime = os.stat(self._pack_path(name)).st_mtime
            except FileNotFoundError:
                continue
            for digest, entry in entries:
                chunked = entry.kind == KIND_CHUNKED
                yield StoredBlob(digest, entry.length, mtime, name, chunked=chunked)

    def _iter_loose(self) -> Iterator[StoredBlob]:
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
        where = self._where(digest)
        if where == "loose" and self.is_local:
            return hash_file(self._path(digest)) == digest
        hasher = blake3.blake3()
        try:
            for chunk in self._iter_located(digest, where):
                hasher.update(chunk)
        except IntegrityError:  # a chunk of a chunked blob is corrupted
            return False
        return bool(hasher.hexdigest() == digest)

    def _stored_intact(self, digest: str) -> bool:
        """Whether ``digest`` is stored whole. A local blob is re-hashed, so that putting the
        same content again repairs a corrupted one (what the IntegrityError tells users to do):
        a loose copy is written, and a loose copy is always read before a packed one."""
        if not self.exists(digest):
            return False
        if not self.is_local:
            return True
        if os.path.exists(self._path(digest)):
            return hash_file(self._path(digest)) == digest
        return self.verify(digest)

    def _require(self, digest: str) -> None:
        self._where(digest)

    def _locate(self, digest: str) -> PackEntry | str | None:
        """``"loose"``, the pack entry holding ``digest``, or None when it is not stored."""
        if self.packs is None and s3.is_s3(self.fs):
            return "loose" if digest in s3.list_sizes(self, [digest]) else None
        if self.packs is None:
            return "loose" if self.fs.exists(self._path(digest)) else None
        if os.path.exists(self._path(digest)):
            return "loose"
        return self.packs.get(digest)

    def _where(self, digest: str) -> PackEntry | str:
        where = self._locate(check_digest(digest))
        if where is None:
            raise NotFoundError(
                f"blob {digest} is not in the store at {self.url}", field="digest", digest=digest
            )
        return where

    def _size_at(self, digest: str, where: PackEntry | str) -> int:
        if not isinstance(where, PackEntry):
            return int(self.fs.size(self._path(digest)))
        if where.kind == KIND_BLOB:
            return where.length
        return sum(length for _, length in self._recipe(digest, where))

    def _recipe(self, digest: str, entry: PackEntry) -> list[tuple[str, int]]:
        with open(self._pack_path(entry.pack), "rb") as fh:
            fh.seek(entry.offset)
            data = fh.read(entry.length)
        try:
            return parse_recipe(data)
        except ValueError:
            raise _corrupted(digest) from None

    def _iter_located(self, digest: str, where: PackEntry | str) -> Iterator[bytes]:
        """The stored bytes of ``digest``; a chunked blob's chunks are each verified."""
        if not isinstance(where, PackEntry):
            with self.fs.open(self._path(digest), "rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk
            return
        if where.kind == KIND_BLOB:
            yield from _read_span(self._pack_path(where.pack), where.offset, where.length)
            return
        for chunk, length in self._recipe(digest, where):
            data = self.get_bytes(chunk)
            if len(data) != length:
                raise _corrupted(digest)
            yield data

    def _path(self, digest: str) -> str:
        return f"{self.root}/{digest[:2]}/{digest[2:4]}/{digest}"

    def _pack_path(self, name: str) -> str:
        return f"{self.root}/{PACK_DIR}/{name}"


class _SegmentReader(io.RawIOBase):
    """A seekable reader over byte ranges of files (a packed or chunked blob), opening each file
    only while it is read."""

    def __init__(self, segments: list[tuple[str, int, int]]) -> None:
        self._segments = segments
        self._starts: list[int] = []
        at = 0
        for _, _, length in segments:
            self._starts.append(at)
            at += length
        self._size = at
        self._pos = 0
        self._open: tuple[str, IO[bytes]] | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._pos >= self._size:
            return 0
        index = bisect.bisect_right(self._starts, self._pos) - 1
        path, offset, length = self._segments[index]
        within = self._pos - self._starts[index]
        want = min(len(buffer), length - within)
        handle = self._handle(path)
        handle.seek(offset + within)
        data = handle.read(want)
        if len(data) != want:
            raise OSError(f"{path} ends before the blob does")
        memoryview(buffer)[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None
        super().close()

    def _handle(self, path: str) -> IO[bytes]:
        if self._open is None or self._open[0] != path:
            if self._open is not None:
                self._open[1].close()
            self._open = (path, open(path, "rb"))  # noqa: SIM115 - closed by close()
        return self._open[1]


def _read_span(path: str, offset: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        fh.seek(offset)
        left = length
        while left > 0:
            data = fh.read(min(CHUNK, left))
            if not data:
                raise OSError(f"{path} ends inside a blob")
            left -= len(data)
            yield data


def _read_hashed(source: SourceFile) -> tuple[str, bytes]:
    with open(source.path, "rb") as fh:
        data = fh.read()
        after = os.fstat(fh.fileno())
    _check_unchanged(source, after)
    if len(data) != source.size:
        raise file_changed(source)
    return hash_bytes(data), data


def _check_unchanged(source: SourceFile, after: os.stat_result) -> None:
    if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
        source.size,
        source.mtime_ns,
        source.ctime_ns,
    ):
        raise file_changed(source)


def _batches(files: Sequence[SourceFile], todo: list[int]) -> Iterator[list[int]]:
    batch: list[int] = []
    held = 0
    for i in todo:
        batch.append(i)
        held += files[i].size
        if held >= _BATCH_BYTES or len(batch) >= _BATCH_FILES:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def _workers() -> int:
    return min(4, os.cpu_count() or 1)  # reading small files is GIL-bound past the cores


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
        options = {"skip_instance_cache": True} if protocol in s3.S3_PROTOCOLS else {}
        fs, root = fsspec.core.url_to_fs(url, **options)
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
