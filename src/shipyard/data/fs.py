"""``shipyard://`` - dataset versions as a read-only fsspec file system.

``shipyard://PROJECT/DATASET@VERSION/PATH`` names one file of a dataset version (``@v3``, ``@3``,
``@latest``, or no ``@`` at all for the latest), so code that reads files through fsspec - pandas,
pyarrow, polars, DuckDB (``duckdb.register_filesystem``), ``fsspec.open`` - reads a version
directly, without a checkout::

    pd.read_parquet("shipyard://vision/faces@v3/train.parquet")
    with fsspec.open("shipyard://vision/faces/labels.csv") as fh: ...
    arrow_dataset("shipyard://vision/faces@v3/", format="parquet").to_table()

The protocol is registered with fsspec by the ``fsspec.specs`` entry point in pyproject.toml (so
it works after ``pip install shipyard`` without importing us) and again on import of this module.
Where the bytes come from follows the SDK's settings: the embedded home (``SHIPYARD_HOME``), or a
server when ``SHIPYARD_URL`` is set (``SHIPYARD_TOKEN`` authenticates); the ``server=`` (a URL),
``token=`` and ``home=`` storage options override them (``storage_options={"server": ...}``).

Reads stream: a file object fetches the byte ranges it is asked for (plus a read-ahead block)
from the blob store - straight from the store's files embedded, by HTTP ``Range`` requests
against a server - so a 1 GiB file is never held in memory unless the caller reads it whole.

Integrity: every blob's BLAKE3 digest is checked once per blob in a process. A sequential read
from the start hashes the bytes as they pass and checks the digest when it reaches the end,
before the last bytes are handed out, so a corrupted blob is never delivered whole (an
:class:`IntegrityError` naming the file is raised instead). A read that jumps (a Parquet reader
starts at the footer) first verifies the whole blob in one streaming pass, then serves ranges;
``verify="sequential"`` skips that pass and leaves ranged reads unverified. A digest verified
once is remembered for the life of the file system's source, so later opens (epochs) of the
same content are not hashed again.

The file system is read-only: a dataset version is immutable, and every write is refused with
:class:`ReadOnlyError` saying how to commit a new version instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import blake3
import fsspec
import httpx
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from shipyard.blobs.store import BlobStore, open_blobs
from shipyard.context import Context, open_context
from shipyard.data import datasets
from shipyard.domain.models import DatasetVersion, FileEntry
from shipyard.domain.names import validate_name, validate_relative_path
from shipyard.errors import (
    BackendError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    ShipyardError,
    UnsafePathError,
    error_from_dict,
)
from shipyard.settings import Settings

PROTOCOL = "shipyard"
BLOCK_SIZE = 4 * 1024 * 1024
"""Read-ahead per file object: big enough that sequential reads make few range requests."""
STREAM_CHUNK = 1024 * 1024
LATEST_TTL_S = 0.0
"""How long ``@latest`` (or a tag) keeps resolving to the version it last resolved to; by default
it is looked up on every call (one query), so a version committed a moment ago is seen at once.
A numbered version's file list is cached for good (versions are immutable)."""
API = "/api/v1"

Verify = Literal["once", "sequential"]

_NUMBERED = re.compile(r"^v?[0-9]{1,9}$")
_EMPTY_DIGEST = blake3.blake3(b"").hexdigest()


class DatasetPathNotFoundError(NotFoundError, FileNotFoundError):
    """A ``shipyard://`` path names no project, dataset, version or file. Also a
    ``FileNotFoundError``, which is what fsspec users (pandas, pyarrow) expect."""


class ReadOnlyError(InvalidInputError, PermissionError):
    """A write through ``shipyard://``: versions are immutable; commit a new one instead."""

    code = "read_only"


# --- locations ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """A parsed ``shipyard://`` path. ``ref`` is the version as written (None: the latest);
    ``path`` is inside the version ("" for its root)."""

    project: str
    dataset: str | None = None
    ref: str | None = None
    path: str = ""

    @property
    def root(self) -> str:
        """The version's root as the caller spelled it (``project/dataset@ref``)."""
        base = f"{self.project}/{self.dataset}"
        return f"{base}@{self.ref}" if self.ref is not None else base

    def child(self, path: str) -> str:
        return f"{self.root}/{path}" if path else self.root

    @property
    def url(self) -> str:
        if self.dataset is None:
            return f"{PROTOCOL}://{self.project}"
        return f"{PROTOCOL}://{self.child(self.path)}"


def parse_location(path: str) -> Location:
    """Parse ``[shipyard://]PROJECT[/DATASET[@VERSION][/PATH]]``; InvalidInputError (or
    UnsafePathError for ``..`` and the like) naming the bad part otherwise."""
    raw = path
    if raw.startswith(f"{PROTOCOL}://"):
        raw = raw[len(PROTOCOL) + 3 :]
    raw = raw.rstrip("/")
    if not raw:
        raise InvalidInputError(
            f"{path!r} names no project: use {PROTOCOL}://PROJECT/DATASET@VERSION/PATH",
            field="path",
        )
    parts = raw.split("/", 2)
    project = validate_name(parts[0], field="project")
    if len(parts) == 1:
        return Location(project)
    name, at, ref = parts[1].partition("@")
    validate_name(name, field="dataset")
    if at:
        if not ref:
            raise InvalidInputError(
                f"{path!r} has an empty version after '@': use @v3, @3 or @latest",
                field="version",
            )
        validate_name(ref, field="version")
    inner = parts[2] if len(parts) == 3 else ""
    if inner:
        try:
            validate_relative_path(inner, field="path")
        except UnsafePathError as exc:
            raise UnsafePathError(f"{path!r}: {exc.message}", field="path") from None
    return Location(project, name, ref if at else None, inner)


# --- a version's file tree ----------------------------------------------------------------------


@dataclass(frozen=True)
class VersionTree:
    """The files of one version, with the folders they imply."""

    version: DatasetVersion
    files: dict[str, FileEntry]
    folders: dict[str, list[str]]  # folder ("" = root) -> child paths, files and folders

    @classmethod
    def build(cls, version: DatasetVersion, entries: list[FileEntry]) -> VersionTree:
        files = {e.path: e for e in entries}
        folders: dict[str, set[str]] = {"": set()}
        for entry in entries:
            parts = entry.path.split("/")
            for depth in range(len(parts)):
                parent = "/".join(parts[:depth])
                folders.setdefault(parent, set()).add("/".join(parts[: depth + 1]))
        return cls(version, files, {k: sorted(v) for k, v in folders.items()})


# --- sources: where versions and bytes come from ------------------------------------------------


class RangeReader(ABC):
    """Reads byte ranges of one blob; holds whatever handle makes repeated reads cheap."""

    @abstractmethod
    def read(self, start: int, end: int) -> bytes: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the handle."""


class Source(ABC):
    """Resolves versions and reads blobs, embedded or over HTTP.

    Picklable (DataLoader workers get a copy) and fork-safe: connections are made lazily, per
    process. Resolved versions and verified digests are cached here.
    """

    def __init__(self, *, latest_ttl_s: float = LATEST_TTL_S) -> None:
        self.latest_ttl_s = latest_ttl_s
        self._init_caches()

    def _init_caches(self) -> None:
        self._lock = threading.Lock()
        self._trees: dict[tuple[str, str, int], VersionTree] = {}
        self._refs: dict[tuple[str, str, str], tuple[float, int]] = {}
        self._verified: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_lock", "_trees", "_refs", "_verified", *self._unpicklable()):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_caches()
        self._reset_connections()

    # --- versions

    def tree(self, project: str, dataset: str, ref: str | None) -> VersionTree:
        """The version ``ref`` (None: the latest) of a dataset; numbered versions are cached for
        good (they never change), ``latest`` and other refs for ``latest_ttl_s`` seconds."""
        key_ref = (ref or "latest").lower()
        number: int | None = None
        if _NUMBERED.fullmatch(key_ref):
            number = int(key_ref.lstrip("v"))
        else:
            cached = self._refs.get((project, dataset, key_ref))
            if cached is not None and time.monotonic() - cached[0] < self.latest_ttl_s:
                number = cached[1]
        if number is not None and (tree := self._trees.get((project, dataset, number))):
            return tree
        version = self._get_version(project, dataset, number if number is not None else key_ref)
        tree = self._trees.get((project, dataset, version.version))
        if tree is None:
            entries = self._list_files(project, dataset, version.version)
            tree = VersionTree.build(version, entries)
        with self._lock:
            self._trees[(project, dataset, version.version)] = tree
            if number is None:
                self._refs[(project, dataset, key_ref)] = (time.monotonic(), version.version)
        return tree

    def invalidate(self) -> None:
        """Forget resolved refs (``latest``) so the next lookup asks again."""
        with self._lock:
            self._refs.clear()

    # --- blobs

    def is_verified(self, digest: str) -> bool:
        return digest in self._verified

    def mark_verified(self, digest: str) -> None:
        self._verified.add(digest)

    def read_file(self, project: str, entry: FileEntry, *, root: str) -> bytes:
        """A whole file of the version at ``root`` (``project/dataset@v3``), verified unless
        its digest was verified before in this source. The hot path of the torch datasets: the
        file's URL is only spelled out for an error."""
        try:
            if entry.digest in self._verified:
                data = self._read_unverified(project, entry)
            else:
                data = self._read_verified(project, entry)
                self._verified.add(entry.digest)
        except (IntegrityError, NotFoundError) as exc:
            raise _blob_error(f"{PROTOCOL}://{root}/{entry.path}", entry, exc) from None
        if len(data) != entry.size:
            raise _short(f"{PROTOCOL}://{root}/{entry.path}", entry, len(data))
        return data

    def verify(self, project: str, entry: FileEntry, *, url: str) -> None:
        """Hash the whole blob in one streaming pass (once per digest)."""
        if self.is_verified(entry.digest):
            return
        with _blob_errors(url, entry):
            intact = self._check_blob(project, entry)
        if not intact:
            raise _corrupted(url, entry)
        self.mark_verified(entry.digest)

    @abstractmethod
    def open_range(self, project: str, entry: FileEntry) -> RangeReader: ...

    @abstractmethod
    def list_datasets(self, project: str) -> list[str]: ...

    @abstractmethod
    def _get_version(self, project: str, dataset: str, ref: int | str) -> DatasetVersion: ...

    @abstractmethod
    def _list_files(self, project: str, dataset: str, version: int) -> list[FileEntry]: ...

    @abstractmethod
    def _read_verified(self, project: str, entry: FileEntry) -> bytes: ...

    @abstractmethod
    def _read_unverified(self, project: str, entry: FileEntry) -> bytes: ...

    @abstractmethod
    def _check_blob(self, project: str, entry: FileEntry) -> bool:
        """Whether the whole blob still hashes to its digest (one streaming pass)."""

    def _unpicklable(self) -> tuple[str, ...]:
        return ()

    def _reset_connections(self) -> None:  # noqa: B027 - optional hook
        """Drop connections made by another process (after a fork or unpickling)."""


class LocalSource(Source):
    """The embedded home: versions through the data services, bytes through the blob store."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        ctx: Context | None = None,
        latest_ttl_s: float = LATEST_TTL_S,
    ) -> None:
        super().__init__(latest_ttl_s=latest_ttl_s)
        if settings is None and ctx is None:
            raise InvalidInputError("LocalSource needs settings or a context", field="settings")
        self.settings = settings or ctx.settings  # type: ignore[union-attr]
        self._ctx = ctx
        self._blobs: BlobStore | None = ctx.blobs if ctx is not None else None
        self._pid = os.getpid()

    def list_datasets(self, project: str) -> list[str]:
        return [d.name for d in datasets.list_datasets(self._context(), project=project)]

    def open_range(self, project: str, entry: FileEntry) -> RangeReader:
        return _LocalRangeReader(self._store(), entry.digest)

    def _get_version(self, project: str, dataset: str, ref: int | str) -> DatasetVersion:
        return datasets.get_version(self._context(), project=project, name=dataset, version=ref)

    def _list_files(self, project: str, dataset: str, version: int) -> list[FileEntry]:
        return datasets.list_files(self._context(), project=project, name=dataset, version=version)

    def _read_verified(self, project: str, entry: FileEntry) -> bytes:
        return self._store().get_bytes(entry.digest)

    def _read_unverified(self, project: str, entry: FileEntry) -> bytes:
        # The store's verified read is also its fastest whole-blob read (its unverified
        # ``open`` streams packed blobs through a buffered segment reader, 3x slower for a
        # 256 KiB blob), so embedded whole-file reads are hashed every time.
        return self._store().get_bytes(entry.digest)

    def _check_blob(self, project: str, entry: FileEntry) -> bool:
        size = 0
        for chunk in self._store().iter_chunks(entry.digest):  # raises IntegrityError if bad
            size += len(chunk)
        return size == entry.size

    def _context(self) -> Context:
        self._check_pid()
        if self._ctx is None:
            self._ctx = open_context(self.settings)
        return self._ctx

    def _store(self) -> BlobStore:
        self._check_pid()
        if self._blobs is None:
            # a DataLoader worker reads bytes only: the blob store, not the database
            self._blobs = open_blobs(self.settings.blob_url)
        return self._blobs

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's connections are not ours
            self._reset_connections()

    def _unpicklable(self) -> tuple[str, ...]:
        return ("_ctx", "_blobs")

    def _reset_connections(self) -> None:
        self._ctx = None
        self._blobs = None
        self._pid = os.getpid()


class _LocalRangeReader(RangeReader):
    def __init__(self, blobs: BlobStore, digest: str) -> None:
        self._blobs = blobs
        self._digest = digest
        self._fh: Any = None

    def read(self, start: int, end: int) -> bytes:
        if self._fh is None:
            self._fh = self._blobs.open(self._digest)
        self._fh.seek(start)
        parts: list[bytes] = []
        want = end - start
        while want > 0:
            part = self._fh.read(want)
            if not part:
                break
            parts.append(part)
            want -= len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class HttpSource(Source):
    """A shipyard server: versions through the REST API, bytes through the blob route (with
    HTTP ``Range`` for ranged reads)."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        http: httpx.Client | None = None,
        timeout: float = 120.0,
        latest_ttl_s: float = LATEST_TTL_S,
    ) -> None:
        super().__init__(latest_ttl_s=latest_ttl_s)
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._http = http
        self._pid = os.getpid()

    def list_datasets(self, project: str) -> list[str]:
        body = self._get_json(f"{API}/projects/{project}/datasets")
        return [str(d["name"]) for d in body]

    def open_range(self, project: str, entry: FileEntry) -> RangeReader:
        return _HttpRangeReader(self, self._blob_url(project, entry.digest))

    def _get_version(self, project: str, dataset: str, ref: int | str) -> DatasetVersion:
        ref_seg = validate_name(str(ref), field="version")
        body = self._get_json(f"{API}/projects/{project}/datasets/{dataset}/versions/{ref_seg}")
        return DatasetVersion.model_validate(body)

    def _list_files(self, project: str, dataset: str, version: int) -> list[FileEntry]:
        body = self._get_json(
            f"{API}/projects/{project}/datasets/{dataset}/versions/{version}/files"
        )
        return [FileEntry.model_validate(e) for e in body]

    def _read_verified(self, project: str, entry: FileEntry) -> bytes:
        data = self._read_unverified(project, entry)
        if blake3.blake3(data).hexdigest() != entry.digest:
            raise IntegrityError(f"blob {entry.digest} arrived corrupted", digest=entry.digest)
        return data

    def _read_unverified(self, project: str, entry: FileEntry) -> bytes:
        return b"".join(self._stream(project, entry))

    def _check_blob(self, project: str, entry: FileEntry) -> bool:
        hasher = blake3.blake3()
        size = 0
        for chunk in self._stream(project, entry):
            hasher.update(chunk)
            size += len(chunk)
        return size == entry.size and hasher.hexdigest() == entry.digest

    def _stream(self, project: str, entry: FileEntry) -> Iterator[bytes]:
        with self._send("GET", self._blob_url(project, entry.digest)) as response:
            yield from response.iter_bytes(STREAM_CHUNK)

    def client(self) -> httpx.Client:
        if self._pid != os.getpid():
            self._reset_connections()
        if self._http is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._http = httpx.Client(base_url=self.url, headers=headers, timeout=self.timeout)
        return self._http

    @contextlib.contextmanager
    def _send(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> Iterator[httpx.Response]:
        """A streamed response whose status is below 400; the server's error otherwise."""
        try:
            with self.client().stream(method, path, headers=headers) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _http_error(response)
                yield response
        except httpx.RemoteProtocolError as exc:
            # The server cuts a blob's body short when its digest check fails while sending it.
            raise IntegrityError(
                f"the server at {self.url} ended the transfer early ({exc}): the blob is "
                "corrupted or truncated there, or the connection broke; try again, and restore "
                "the server's store from a backup if it persists",
                field="digest",
            ) from None
        except httpx.TransportError as exc:
            raise BackendError(
                f"reading from the shipyard server at {self.url} failed ({exc}); is it running, "
                "and is SHIPYARD_URL right? Try again"
            ) from None

    def _get_json(self, path: str) -> Any:
        with self._send("GET", path) as response:
            response.read()
            return response.json()

    def _blob_url(self, project: str, digest: str) -> str:
        return f"{API}/projects/{project}/blobs/{digest}"

    def _unpicklable(self) -> tuple[str, ...]:
        return ("_http",)

    def _reset_connections(self) -> None:
        self._http = None
        self._pid = os.getpid()


class _HttpRangeReader(RangeReader):
    def __init__(self, source: HttpSource, path: str) -> None:
        self._source = source
        self._path = path

    def read(self, start: int, end: int) -> bytes:
        headers = {"Range": f"bytes={start}-{end - 1}"}
        with self._source._send("GET", self._path, headers=headers) as response:
            if response.status_code == 206:
                # not response.read(): that keeps the body on the response, which reference
                # cycles keep alive until the collector runs
                return b"".join(response.iter_bytes(STREAM_CHUNK))
            # A server without Range support sends the whole blob: keep only the range.
            return _slice_stream(response.iter_bytes(STREAM_CHUNK), start, end)


def _slice_stream(chunks: Iterator[bytes], start: int, end: int) -> bytes:
    kept: list[bytes] = []
    offset = 0
    for chunk in chunks:
        lo, hi = max(start - offset, 0), min(end - offset, len(chunk))
        if lo < hi:
            kept.append(chunk[lo:hi])
        offset += len(chunk)
        if offset >= end:
            break
    return b"".join(kept)


def _http_error(response: httpx.Response) -> ShipyardError:
    try:
        body = response.json()
    except ValueError:
        body = {"message": response.text[:500]}
    if not isinstance(body, dict):
        body = {"message": str(body)}
    return error_from_dict(body, status=response.status_code)


_SOURCES: dict[tuple[Any, ...], Source] = {}
_SOURCES_LOCK = threading.Lock()


def source_for(settings: Settings) -> Source:
    """The (shared, cached) source for ``settings``: a server when ``settings.url`` is set,
    else the embedded home. Shared so that resolved versions and verified digests are kept
    across the many file-system instances pandas and pyarrow create."""
    key = (settings.url, settings.token, str(settings.home), settings.db_url, settings.blobs_url)
    with _SOURCES_LOCK:
        found = _SOURCES.get(key)
        if found is None:
            found = _SOURCES[key] = (
                HttpSource(settings.url, token=settings.token)
                if settings.url
                else LocalSource(settings)
            )
        return found


# --- the file system ----------------------------------------------------------------------------


class ShipyardFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """Read-only fsspec file system over dataset versions (see the module docstring).

    ``source`` picks where versions come from explicitly; otherwise ``server``/``token`` (a
    server's URL; not ``url``, which fsspec's own functions take) or ``home`` (an embedded home),
    else the SDK's settings from the environment.
    """

    protocol = (PROTOCOL,)
    root_marker = ""
    # Instances are cheap (the source is shared); not caching them means a changed
    # SHIPYARD_HOME or SHIPYARD_URL is honoured by the next fsspec.open.
    cachable = False

    def __init__(
        self,
        *,
        source: Source | None = None,
        server: str | None = None,
        token: str | None = None,
        home: str | Path | None = None,
        verify: Verify = "once",
        block_size: int = BLOCK_SIZE,
        **storage_options: Any,
    ) -> None:
        super().__init__(**storage_options)
        if verify not in ("once", "sequential"):
            raise InvalidInputError(
                f"verify={verify!r} is not an option: use 'once' or 'sequential'", field="verify"
            )
        self.source = source or source_for(_settings(url=server, token=token, home=home))
        self.verify = verify
        self.blocksize = block_size

    # --- reading

    def resolve(self, path: str) -> tuple[Location, VersionTree]:
        """The location of ``path`` and its version's tree (DatasetPathNotFoundError when the
        dataset or version does not exist)."""
        loc = parse_location(path)
        if loc.dataset is None:
            raise InvalidInputError(
                f"{loc.url} names a project, not a dataset version: use "
                f"{PROTOCOL}://{loc.project}/DATASET@VERSION/PATH",
                field="path",
            )
        try:
            return loc, self.source.tree(loc.project, loc.dataset, loc.ref)
        except NotFoundError as exc:
            if isinstance(exc, DatasetPathNotFoundError):
                raise
            raise DatasetPathNotFoundError(
                f"{loc.url}: {exc.message}", field=exc.field or "path"
            ) from None

    def entry(self, path: str) -> tuple[Location, FileEntry]:
        """The manifest entry of the file at ``path``."""
        loc, tree = self.resolve(path)
        found = tree.files.get(loc.path)
        if found is None:
            what = "is a folder, not a file" if loc.path in tree.folders else "has no such file"
            raise DatasetPathNotFoundError(
                f"{loc.url}: dataset {loc.dataset!r} v{tree.version.version} {what}"
                f"{_sample(tree, loc.path)}",
                field="path",
            )
        return loc, found

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        loc = parse_location(path)
        if loc.dataset is None:
            try:
                names = self.source.list_datasets(loc.project)
            except NotFoundError as exc:
                raise DatasetPathNotFoundError(
                    f"{loc.url}: {exc.message}", field="project"
                ) from None
            infos = [_dir_info(f"{loc.project}/{n}") for n in names]
        else:
            loc, tree = self.resolve(path)
            if loc.path in tree.files:
                infos = [self._file_info(loc, tree.files[loc.path], tree)]
            elif loc.path in tree.folders:
                infos = [self._child_info(loc, tree, child) for child in tree.folders[loc.path]]
            else:
                raise DatasetPathNotFoundError(
                    f"{loc.url}: no such file or folder in dataset {loc.dataset!r} "
                    f"v{tree.version.version}{_sample(tree, loc.path)}",
                    field="path",
                )
        return infos if detail else [i["name"] for i in infos]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        loc = parse_location(path)
        if loc.dataset is None:
            self.ls(path)  # the project must exist
            return _dir_info(loc.project)
        loc, tree = self.resolve(path)
        if loc.path in tree.files:
            return self._file_info(loc, tree.files[loc.path], tree)
        if loc.path in tree.folders:
            info = _dir_info(loc.child(loc.path))
            if not loc.path:
                info.update(version=tree.version.version, files=tree.version.file_count)
            return info
        raise DatasetPathNotFoundError(
            f"{loc.url}: no such file or folder in dataset {loc.dataset!r} "
            f"v{tree.version.version}{_sample(tree, loc.path)}",
            field="path",
        )

    def find(
        self,
        path: str,
        maxdepth: int | None = None,
        withdirs: bool = False,
        detail: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Every file under ``path`` (and folder, with ``withdirs``), straight from the
        manifest rather than folder by folder."""
        loc = parse_location(path)
        if loc.dataset is None:
            return super().find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail)
        loc, tree = self.resolve(path)
        if loc.path in tree.files:
            infos = [self._file_info(loc, tree.files[loc.path], tree)]
        else:
            prefix = f"{loc.path}/" if loc.path else ""
            base_depth = loc.path.count("/") + 1 if loc.path else 0
            names: list[str] = [p for p in tree.files if p.startswith(prefix)]
            if withdirs:
                names += [p for p in tree.folders if p and p.startswith(prefix)]
            if maxdepth is not None:
                names = [p for p in names if p.count("/") + 1 - base_depth <= maxdepth]
            infos = [self._child_info(loc, tree, p) for p in sorted(names)]
        if detail:
            return {i["name"]: i for i in infos}
        return [i["name"] for i in infos]

    def ukey(self, path: str) -> str:
        return self.entry(path)[1].digest

    def checksum(self, path: str) -> int:
        return int(self.ukey(path)[:16], 16)

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        if start is None and end is None:
            loc, entry = self.entry(path)
            return self.source.read_file(loc.project, entry, root=loc.root)
        return bytes(super().cat_file(path, start=start, end=end, **kwargs))

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> ShipyardFile:
        if mode != "rb":
            raise _read_only(path, f"open it in mode {mode!r}")
        loc, entry = self.entry(path)
        return ShipyardFile(
            self,
            loc,
            entry,
            block_size=block_size or self.blocksize,
            cache_type=kwargs.get("cache_type", "readahead"),
            cache_options=cache_options,
        )

    # --- writing: refused

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        raise _read_only(path, "create a folder")

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        raise _read_only(path, "create a folder")

    def rmdir(self, path: str) -> None:
        raise _read_only(path, "remove a folder")

    def rm_file(self, path: str) -> None:
        raise _read_only(path, "remove a file")

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        raise _read_only(str(path), "remove files")

    def _rm(self, path: str) -> None:
        raise _read_only(path, "remove a file")

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        raise _read_only(path2, "copy into it")

    def mv(self, path1: Any, path2: Any, *args: Any, **kwargs: Any) -> None:
        raise _read_only(str(path1), "move files")

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        raise _read_only(path, "write a file")

    def put_file(self, lpath: str, rpath: str, *args: Any, **kwargs: Any) -> None:
        raise _read_only(rpath, "upload a file")

    def touch(self, path: str, truncate: bool = True, **kwargs: Any) -> None:
        raise _read_only(path, "touch a file")

    def invalidate_cache(self, path: str | None = None) -> None:
        self.source.invalidate()

    # --- helpers

    def _file_info(self, loc: Location, entry: FileEntry, tree: VersionTree) -> dict[str, Any]:
        return {
            "name": loc.child(entry.path),
            "size": entry.size,
            "type": "file",
            "digest": entry.digest,
            "version": tree.version.version,
        }

    def _child_info(self, loc: Location, tree: VersionTree, path: str) -> dict[str, Any]:
        entry = tree.files.get(path)
        if entry is not None:
            return self._file_info(loc, entry, tree)
        return _dir_info(loc.child(path))


class ShipyardFile(AbstractBufferedFile):  # type: ignore[misc]
    """One file of a version, read by ranges; verifies its blob as described in the module
    docstring."""

    def __init__(
        self,
        fs: ShipyardFileSystem,
        location: Location,
        entry: FileEntry,
        *,
        block_size: int,
        cache_type: str = "readahead",
        cache_options: dict[str, Any] | None = None,
    ) -> None:
        self.location = location
        self.entry = entry
        self._source = fs.source
        self._reader: RangeReader | None = None
        self._policy = fs.verify
        self._hasher: Any = None
        self._hashed = 0
        if entry.size == 0:
            if entry.digest != _EMPTY_DIGEST:
                raise _corrupted(location.url, entry)
        elif not self._source.is_verified(entry.digest):
            self._hasher = blake3.blake3()
        super().__init__(
            fs,
            location.child(location.path),
            mode="rb",
            block_size=block_size,
            cache_type=cache_type,
            cache_options=cache_options,
            size=entry.size,
        )

    @property
    def digest(self) -> str:
        return self.entry.digest

    def _fetch_range(self, start: int, end: int) -> bytes:
        end = min(end, self.size)
        if start >= end:
            return b""
        if self._hasher is not None and start > self._hashed:  # a jump: not a sequential read
            self._hasher = None
            if self._policy == "once":
                self._source.verify(self.location.project, self.entry, url=self.location.url)
        if self._reader is None:
            self._reader = self._source.open_range(self.location.project, self.entry)
        with _blob_errors(self.location.url, self.entry):
            data = self._reader.read(start, end)
        if len(data) != end - start:
            raise _short(self.location.url, self.entry, start + len(data))
        if self._hasher is not None:
            self._hash(start, end, data)
        return data

    def _hash(self, start: int, end: int, data: bytes) -> None:
        """Extend the running hash over the new bytes; check it at the end of the blob."""
        if start <= self._hashed < end:
            self._hasher.update(memoryview(data)[self._hashed - start :])
            self._hashed = end
        if self._hashed >= self.size:
            digest = self._hasher.hexdigest()
            self._hasher = None
            if digest != self.entry.digest:
                raise _corrupted(self.location.url, self.entry)
            self._source.mark_verified(self.entry.digest)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        super().close()

    def _upload_chunk(self, final: bool = False) -> bool:
        raise _read_only(self.path, "write to it")

    def _initiate_upload(self) -> None:
        raise _read_only(self.path, "write to it")


# --- conveniences -------------------------------------------------------------------------------


def open_file(
    source: Source,
    *,
    project: str,
    name: str,
    path: str,
    version: int | str | None = None,
    verify: Verify = "once",
) -> ShipyardFile:
    """One file of a dataset version as a binary, seekable file object (for the SDK)."""
    validate_name(project, field="project")
    validate_name(name, field="name")
    validate_relative_path(path, field="path")
    ref = None if version is None else str(version)
    at = f"@{ref}" if ref is not None else ""
    fs = ShipyardFileSystem(source=source, verify=verify)
    handle: ShipyardFile = fs.open(f"{project}/{name}{at}/{path}", "rb")
    return handle


def arrow_dataset(
    url: str,
    *,
    format: str = "parquet",
    fs: ShipyardFileSystem | None = None,
    **kwargs: Any,
) -> Any:
    """A ``pyarrow.dataset.Dataset`` over the tables of a version (or a folder of it): every
    file under ``url`` whose name ends in ``.{format}`` (``parquet``, ``csv``, ``feather``,
    ``ipc``, ``arrow``, ``json``). ``kwargs`` go to ``pyarrow.dataset.dataset``."""
    # pyarrow.dataset takes half a second to import: only for callers of this function, not
    # for every SDK import that reaches this module
    import pyarrow.dataset as pads
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs = fs or ShipyardFileSystem()
    suffixes = {"ipc": (".arrow", ".ipc", ".feather"), "feather": (".feather", ".arrow", ".ipc")}
    wanted = suffixes.get(format, (f".{format}",))
    found = [p for p in fs.find(url) if p.lower().endswith(wanted)]
    if not found:
        raise DatasetPathNotFoundError(
            f"{url}: no {format} files there; list them with fsspec "
            f"(ShipyardFileSystem().find({url!r}))",
            field="path",
        )
    return pads.dataset(found, filesystem=PyFileSystem(FSSpecHandler(fs)), format=format, **kwargs)


def register() -> None:
    """Register ``shipyard://`` with fsspec in this process (the entry point does it for
    installed packages; this covers a source checkout run without installing)."""
    fsspec.register_implementation(PROTOCOL, ShipyardFileSystem, clobber=True)


def _settings(*, url: str | None, token: str | None, home: str | Path | None) -> Settings:
    settings = Settings.from_env()
    if home is not None:
        settings = dataclasses.replace(settings, home=Path(home).expanduser().absolute(), url=None)
    if url is not None:
        settings = dataclasses.replace(settings, url=url, token=token or settings.token)
    elif token is not None:
        settings = dataclasses.replace(settings, token=token)
    return settings


def _dir_info(name: str) -> dict[str, Any]:
    return {"name": name, "size": 0, "type": "directory"}


def _sample(tree: VersionTree, path: str) -> str:
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    near = tree.folders.get(parent) or tree.folders[""]
    shown = ", ".join(near[:5]) + (", ..." if len(near) > 5 else "")
    return f"; it has: {shown}" if shown else ""


@contextlib.contextmanager
def _blob_errors(url: str, entry: FileEntry) -> Iterator[None]:
    """Name the file in the blob store's integrity and missing-blob errors."""
    try:
        yield
    except (IntegrityError, NotFoundError) as exc:
        raise _blob_error(url, entry, exc) from None


def _blob_error(url: str, entry: FileEntry, exc: IntegrityError | NotFoundError) -> ShipyardError:
    if isinstance(exc, DatasetPathNotFoundError):
        return exc
    if isinstance(exc, IntegrityError):
        return _corrupted(url, entry, exc.message)
    return IntegrityError(
        f"{url}: its content (blob {entry.digest}) is missing from the blob store "
        f"({exc.message}); restore the store from a backup or commit the data again",
        field="path",
        path=url,
        digest=entry.digest,
    )


def _corrupted(url: str, entry: FileEntry, why: str | None = None) -> IntegrityError:
    detail = f" ({why})" if why else ""
    return IntegrityError(
        f"{url} is corrupted in the blob store: blob {entry.digest} no longer matches its "
        f"digest{detail}; nothing more of it was delivered - restore the store from a backup "
        "or commit the data again",
        field="path",
        path=url,
        digest=entry.digest,
    )


def _short(url: str, entry: FileEntry, got: int) -> IntegrityError:
    return IntegrityError(
        f"{url}: blob {entry.digest} ended after {got} of {entry.size} bytes; the store "
        "holds a truncated copy - restore it from a backup or commit the data again",
        field="path",
        path=url,
        digest=entry.digest,
    )


def _read_only(path: str, what: str) -> ReadOnlyError:
    return ReadOnlyError(
        f"{PROTOCOL}://{str(path).removeprefix(f'{PROTOCOL}://')} is read-only: cannot {what} - "
        "dataset versions are immutable; commit a new version instead "
        "('shipyard data commit DIR --dataset NAME' or Client().datasets.commit(...))",
        field="path",
    )


register()

__all__ = [
    "PROTOCOL",
    "DatasetPathNotFoundError",
    "HttpSource",
    "LocalSource",
    "Location",
    "ReadOnlyError",
    "ShipyardFile",
    "ShipyardFileSystem",
    "Source",
    "arrow_dataset",
    "open_file",
    "parse_location",
    "register",
    "source_for",
]
