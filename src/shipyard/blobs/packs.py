"""Pack files: many blobs in one file, written with one fsync instead of one file and one fsync
each (git's packs, restic's pack files).

A pack is ``MAGIC``, the entries' bytes back to back, then an index of fixed-size records
(raw digest, offset, length, kind) and a footer (index offset, entry count, ``INDEX_MAGIC``).
It is written to the store's ``tmp/`` folder, fsynced once, and renamed into ``packs/``, so a
pack is either absent or whole: a writer killed at any point leaves only a temp file that
readers ignore and ``sweep_temp`` removes. A pack is never changed after it is published; the
collector removes a pack, or copies its live entries into a new pack before removing it.

An entry is a blob (``KIND_BLOB``: its bytes) or the recipe of a chunked blob
(``KIND_CHUNKED``: the digests and lengths of the chunks whose concatenation is the blob, see
``blobs.chunking``). Entries are named by digest, so every read is verified like a loose blob's.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
import tempfile
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

MAGIC = b"SHYPACK1"
INDEX_MAGIC = b"SHYPIDX1"
ENTRY = struct.Struct("<32sQQB")
FOOTER = struct.Struct("<QQ8s")
KIND_BLOB = 0
KIND_CHUNKED = 1
PACK_DIR = "packs"
PACK_SUFFIX = ".pack"
PACK_MAX_BYTES = 64 * 1024 * 1024
"""A writer starts a new pack past this size: big enough that a commit of many small files
costs a handful of fsyncs, small enough that repacking one stays cheap and that a large file's
packs are synced one after another while the next one is being written."""


class PackFormatError(ValueError):
    """A file in ``packs/`` that is not a whole pack (it was not written by us, or was cut)."""


@dataclass(frozen=True)
class PackEntry:
    pack: str  # the pack's file name in packs/
    offset: int
    length: int
    kind: int


def read_index(path: Path) -> list[tuple[str, int, int, int]]:
    """The entries of the pack at ``path`` as ``(digest, offset, length, kind)``."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < len(MAGIC) + FOOTER.size:
            raise PackFormatError(f"{path} is too short to be a pack")
        fh.seek(size - FOOTER.size)
        index_at, count, magic = FOOTER.unpack(fh.read(FOOTER.size))
        if magic != INDEX_MAGIC or index_at + count * ENTRY.size != size - FOOTER.size:
            raise PackFormatError(f"{path} has no valid pack index")
        fh.seek(index_at)
        raw = fh.read(count * ENTRY.size)
    return [
        (digest.hex(), offset, length, kind)
        for digest, offset, length, kind in ENTRY.iter_unpack(raw)
    ]


class PackIndex:
    """Where each packed digest lives, for every pack in ``packs/``; loaded lazily and refreshed
    when the folder changes (another process published or removed a pack)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._entries: dict[str, PackEntry] = {}
        self._packs: dict[str, list[tuple[str, PackEntry]]] = {}  # pack name -> its entries
        self._seen_ns: int | None = None
        self._lock = threading.Lock()

    def get(self, digest: str) -> PackEntry | None:
        found = self._entries.get(digest)
        if found is None and self.refresh():
            found = self._entries.get(digest)
        return found

    def refresh(self, *, force: bool = False) -> bool:
        """Reload from ``packs/`` if it changed since the last look; True when it did."""
        try:
            stamp = os.stat(self.folder).st_mtime_ns
        except FileNotFoundError:
            stamp = 0
        if not force and stamp == self._seen_ns:
            return False
        with self._lock:
            names = set(self.pack_names())
            gone = set(self._packs) - names
            for name in gone:
                del self._packs[name]
            if gone:  # a digest may live in another pack too (a repack, a second writer)
                self._entries = {d: e for found in self._packs.values() for d, e in found}
            for name in sorted(names - set(self._packs)):
                try:
                    entries = read_index(self.folder / name)
                except (FileNotFoundError, PackFormatError):
                    continue  # removed meanwhile, or not a pack: readers ignore it
                self._add(name, entries)
            self._seen_ns = stamp
        return True

    def added(self, name: str, entries: Iterable[tuple[str, int, int, int]]) -> None:
        """A pack this process just published (no need to read its index back)."""
        with self._lock:
            self._add(name, list(entries))

    def pack_names(self) -> list[str]:
        try:
            return sorted(e for e in os.listdir(self.folder) if e.endswith(PACK_SUFFIX))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def packs(self) -> dict[str, list[tuple[str, PackEntry]]]:
        """Every pack and the entries it holds (a snapshot)."""
        self.refresh()
        with self._lock:
            return {name: list(entries) for name, entries in self._packs.items()}

    def _add(self, name: str, entries: list[tuple[str, int, int, int]]) -> None:
        found = [(d, PackEntry(name, off, length, kind)) for d, off, length, kind in entries]
        self._packs[name] = found
        self._entries.update(found)


class PackWriter:
    """Appends entries to a temp pack and publishes it (fsync once, rename) when it is full or
    on :meth:`close`. A full pack is synced and published by a background thread, in order,
    while the next one is written; :meth:`close` returns once all are published (and raises
    what publishing one raised). Not thread-safe: one writer per thread."""

    def __init__(self, *, root: Path, index: PackIndex, max_bytes: int = PACK_MAX_BYTES) -> None:
        self.root = root
        self.index = index
        self.max_bytes = max_bytes
        self.published: list[str] = []
        self._fh: IO[bytes] | None = None
        self._tmp: str | None = None
        self._entries: list[tuple[str, int, int, int]] = []
        self._names: set[str] = set()
        self._at = 0
        self._finisher: ThreadPoolExecutor | None = None
        self._finishing: list[Future[str]] = []

    def __contains__(self, digest: str) -> bool:
        return digest in self._names

    def add(self, digest: str, data: bytes | memoryview, *, kind: int = KIND_BLOB) -> None:
        if digest in self._names:
            return
        if self._fh is None:
            self._open()
        assert self._fh is not None
        self._fh.write(data)
        self._entries.append((digest, self._at, len(data), kind))
        self._names.add(digest)
        self._at += len(data)
        if self._at >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        """Hand the pack being written, if any, to the background thread that publishes it."""
        for done in [f for f in self._finishing if f.done()]:
            done.result()  # a pack that could not be published fails the writer now
        if self._fh is None:
            return
        fh, tmp, entries, end = self._fh, self._tmp, self._entries, self._at
        self._fh, self._tmp, self._entries = None, None, []
        assert tmp is not None
        if self._finisher is None:
            self._finisher = ThreadPoolExecutor(1, thread_name_prefix="shipyard-pack")
        self._finishing.append(self._finisher.submit(self._publish, fh, tmp, entries, end))

    def close(self) -> list[str]:
        """Publish everything written; the names of the packs published."""
        self.flush()
        try:
            for future in self._finishing:
                self.published.append(future.result())
        finally:
            self._shutdown()
        return self.published

    def abort(self) -> None:
        """Drop the unpublished pack (its temp file); packs already published stay (their
        blobs are unreferenced until a commit names them, and the collector reclaims them)."""
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = None
        self._entries = []
        for future in self._finishing:
            with contextlib.suppress(Exception):
                future.result()
        self._shutdown()

    def _publish(
        self, fh: IO[bytes], tmp: str, entries: list[tuple[str, int, int, int]], end: int
    ) -> str:
        folder = self.root / PACK_DIR
        name = f"{secrets.token_hex(16)}{PACK_SUFFIX}"
        try:
            try:
                index = b"".join(
                    ENTRY.pack(bytes.fromhex(d), at, n, kind) for d, at, n, kind in entries
                )
                fh.write(index)
                fh.write(FOOTER.pack(end, len(entries), INDEX_MAGIC))
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fh.close()
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, folder / name)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(folder)
        self.index.added(name, entries)
        return name

    def _shutdown(self) -> None:
        self._finishing = []
        if self._finisher is not None:
            self._finisher.shutdown(wait=True)
            self._finisher = None

    def _open(self) -> None:
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=tmp_dir, prefix="pack-")
        self._fh = os.fdopen(fd, "wb", buffering=1024 * 1024)
        self._fh.write(MAGIC)
        self._at = len(MAGIC)
        self._entries = []


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
