"""A working folder against a dataset version: status (added, modified, removed) and an
incremental checkout (only what differs is written), both through the stat cache so that an
unchanged file is never read.

Both backends use these: the embedded one writes from the local blob store (reflink, hardlink or
copy, chosen like DVC's cache types), the HTTP one downloads the blobs it needs.

Local edits: a file of the folder that the checkout would overwrite, whose content is neither
the version's nor what shipyard last wrote or hashed there (the stat cache's record), holds
work that exists nowhere else; the checkout refuses to touch the folder unless ``force``, and
the error lists those files. Files of the folder that the version does not list are left alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import blake3

from shipyard.blobs.store import CHUNK, BlobStore
from shipyard.data.scan import ScannedFile, check_path, scan_folder
from shipyard.data.statcache import StatCache
from shipyard.domain.models import FileEntry
from shipyard.errors import ConflictError, IntegrityError, InvalidInputError
from shipyard.security.paths import safe_join

LinkMode = Literal["auto", "reflink", "hardlink", "copy"]
LINK_MODES = ("auto", "reflink", "hardlink", "copy")
_FICLONE = 0x40049409  # linux/fs.h: share a file's extents (btrfs, XFS, bcachefs)
_TASK_FILES = 128
_WORKERS = 4
_SHOWN_EDITS = 20


@dataclass(frozen=True)
class WorktreeStatus:
    """A folder against a version: paths ``added`` (not in the version), ``modified``,
    ``removed`` (in the version, not in the folder), and how many are ``unchanged``."""

    added: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0

    @property
    def clean(self) -> bool:
        return not (self.added or self.modified or self.removed)


@dataclass(frozen=True)
class CheckoutResult:
    """What a checkout did: files ``written`` (and how: ``linked`` of them by reflink or hard
    link), ``unchanged`` files it left as they were, and the ``overwritten`` local edits."""

    dest: Path
    written: int
    unchanged: int
    linked: int = 0
    overwritten: list[str] = field(default_factory=list)


Writer = Callable[[FileEntry, Path], bool]
"""Writes one entry's content to a path atomically; True when it linked rather than copied."""


def status(files: Sequence[FileEntry], folder: Path, *, cache: StatCache) -> WorktreeStatus:
    """``folder`` against ``files`` (a version's manifest). Reads only files the stat cache does
    not know with their current stamps, and only those whose size matches the version's."""
    return status_of({f.path: (f.digest, f.size) for f in files}, folder, cache=cache)


def status_of(
    wanted: dict[str, tuple[str, int]], folder: Path, *, cache: StatCache
) -> WorktreeStatus:
    """:func:`status` with the manifest as ``path -> (digest, size)``: no object per file, so
    a no-change status of a large folder is one ``scandir`` per folder, one ``stat`` and one
    dict lookup per file."""
    found = scan_folder(folder, field="path") if folder.exists() else []
    digests = _local_digests(
        folder, found, cache=cache, sizes={p: size for p, (_, size) in wanted.items()}
    )
    on_disk = {f.path for f in found}
    modified = [
        f.path for f in found if f.path in wanted and digests.get(f.path) != wanted[f.path][0]
    ]
    return WorktreeStatus(
        added=sorted(on_disk - wanted.keys()),
        modified=sorted(modified),
        removed=sorted(wanted.keys() - on_disk),
        unchanged=len(on_disk & wanted.keys()) - len(modified),
    )


def checkout(
    files: Sequence[FileEntry],
    dest: Path,
    *,
    cache: StatCache,
    write: Writer,
    force: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    write_many: Callable[[list[tuple[FileEntry, Path]]], None] | None = None,
) -> CheckoutResult:
    """Make ``dest`` hold ``files``: write each file that is missing or differs (with ``write``,
    or all at once with ``write_many`` when given: downloads, many to a request), leave the
    others alone. Refuses (409, listing them) when a file to overwrite holds local
    edits, unless ``force``. Paths are confined to ``dest`` before anything is written."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = Path(os.path.realpath(dest))
    targets = _targets(root, files)
    found = scan_folder(root, field="dest", allow_hard_links=True, symlinks=False)
    known = cache.load(root)
    present = {f.path: f for f in found}
    sizes = {e.path: e.size for e in files}
    digests = _local_digests(root, found, cache=cache, sizes=sizes, known=known)
    todo = [(e, t) for e, t in targets if digests.get(e.path) != e.digest]
    edits = sorted(
        e.path
        for e, _ in todo
        if e.path in present and not _ours(e.path, present[e.path], digests, cache, known)
    )
    if edits and not force:
        shown = ", ".join(edits[:_SHOWN_EDITS]) + (" ..." if len(edits) > _SHOWN_EDITS else "")
        raise ConflictError(
            f"{len(edits)} file(s) in {str(dest)!r} hold local edits that the checkout would "
            f"overwrite: {shown}; commit them first, or check out with --force to discard them",
            field="dest",
            files=edits,
        )
    total = sum(e.size for e, _ in todo)
    done = 0
    linked = 0
    hashed_at = time.time_ns()
    if write_many is not None:
        write_many(todo)
        if progress is not None and todo:
            progress(total, total, todo[-1][0].path)
    with ThreadPoolExecutor(_WORKERS) as pool:
        parts = (
            []
            if write_many is not None
            else [todo[k : k + _TASK_FILES] for k in range(0, len(todo), _TASK_FILES)]
        )
        written = pool.map(lambda p: [write(e, t) for e, t in p], parts)
        for part, links in zip(parts, written, strict=True):
            linked += sum(links)
            if progress is not None:
                done += sum(e.size for e, _ in part)
                progress(done, total, part[-1][0].path)
    rows = [(_stat_of(e.path, t), e.digest) for e, t in todo]
    cache.save(root, rows, hashed_at_ns=hashed_at)
    return CheckoutResult(
        dest=dest,
        written=len(todo),
        unchanged=len(targets) - len(todo),
        linked=linked,
        overwritten=edits,
    )


def local_writer(blobs: BlobStore, *, link: LinkMode = "auto") -> Writer:
    """A writer from a local blob store. ``auto`` tries a reflink (a copy-on-write clone that
    shares no mutable state with the store) and falls back to a copy, DVC's default; ``hardlink``
    links loose blobs after making them read-only (an edit of the checked-out file would
    otherwise change the stored blob), and copies packed or chunked ones; every byte copied is
    verified against its digest."""
    if link not in LINK_MODES:
        raise InvalidInputError(
            f"link {link!r} is not one of {', '.join(LINK_MODES)}", field="link"
        )
    reflinks = {"ok": link in ("auto", "reflink")}

    def write(entry: FileEntry, target: Path) -> bool:
        segments = blobs.segments(entry.digest) if blobs.is_local else []
        loose = len(segments) == 1 and segments[0][1] == 0 and segments[0][0].endswith(entry.digest)
        if loose and link == "hardlink":
            _hardlink(segments[0][0], entry.digest, target)
            return True
        if loose and reflinks["ok"]:
            if _reflink(segments[0][0], entry.digest, target):
                return True
            if link == "reflink":
                raise InvalidInputError(
                    f"the file system under {str(target.parent)!r} cannot reflink (copy-on-write "
                    "clone) files; use link='auto' or 'copy'",
                    field="link",
                )
            reflinks["ok"] = False  # not supported here: copy from now on
        _atomic_write(target, blobs.iter_chunks(entry.digest))
        return False

    return write


# --- helpers ------------------------------------------------------------------------------------


def _targets(root: Path, files: Sequence[FileEntry]) -> list[tuple[FileEntry, Path]]:
    """Each entry's path under ``root``; every folder confined once (a symlink in ``root`` that
    points out is refused), not every file."""
    checked: set[str] = set()
    out: list[tuple[FileEntry, Path]] = []
    for entry in files:
        check_path(entry.path, field="path")
        parent = entry.path.rpartition("/")[0]
        target = root / entry.path
        if (parent and parent not in checked) or target.is_symlink():
            safe_join(root, entry.path, field="path")  # confines its folder too
            checked.add(parent)
        out.append((entry, target))
    return out


def _local_digests(
    root: Path,
    found: list[ScannedFile],
    *,
    cache: StatCache,
    sizes: dict[str, int],
    known: dict[str, tuple[tuple[int, int, int, int], str, bool]] | None = None,
) -> dict[str, str]:
    """Digests of the files of ``found`` that ``sizes`` names with their size (others cannot be
    equal): from the cache, else hashed (in parallel) and recorded."""
    known = cache.load(root) if known is None else known
    digests: dict[str, str] = {}
    todo: list[ScannedFile] = []
    for f in found:
        if sizes.get(f.path) != f.size:
            continue
        hit = cache.lookup(known, f)
        if hit is not None:
            digests[f.path] = hit
        else:
            todo.append(f)
    if not todo:
        return digests
    hashed_at = time.time_ns()
    with ThreadPoolExecutor(_WORKERS) as pool:
        parts = [todo[k : k + _TASK_FILES] for k in range(0, len(todo), _TASK_FILES)]
        hashed = [d for ds in pool.map(lambda p: [_hash_file(f) for f in p], parts) for d in ds]
    rows = []
    for f, digest in zip(todo, hashed, strict=True):
        if digest is not None:
            digests[f.path] = digest
            rows.append((f, digest))
    cache.save(root, rows, hashed_at_ns=hashed_at)
    return digests


def _hash_file(f: ScannedFile) -> str | None:
    """The file's digest, or None when it changed while being read (it is then unknown)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if f.size > 8 * CHUNK else 1)
    try:
        with open(f.real, "rb") as fh:
            while block := fh.read(8 * CHUNK):
                hasher.update(block)
            after = os.fstat(fh.fileno())
    except FileNotFoundError:
        return None
    if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (f.size, f.mtime_ns, f.ctime_ns):
        return None
    return str(hasher.hexdigest())


def _ours(
    path: str,
    file: ScannedFile,
    digests: dict[str, str],
    cache: StatCache,
    known: dict[str, tuple[tuple[int, int, int, int], str, bool]],
) -> bool:
    """Whether the file at ``path`` holds content shipyard put or saw there (safe to replace)."""
    seen = cache.seen(known, path)
    if seen is None:
        return False
    current = digests.get(path)
    if current is None:  # a size the version does not have: hash it to compare with the record
        current = _hash_file(file)
    return current == seen


def _stat_of(rel: str, target: Path) -> ScannedFile:
    info = os.stat(target)
    return ScannedFile(
        rel, str(target), info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns
    )


def _atomic_write(target: Path, chunks: object) -> None:
    """Write ``chunks`` (an iterable of bytes, verified by its producer) to ``target`` through a
    temp file in its folder and a rename: a reader never sees a partial file, and a kill leaves
    at worst a hidden temp file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.shipyard-{os.getpid()}-{time.monotonic_ns()}"
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:  # type: ignore[attr-defined]
                out.write(chunk)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _reflink(blob: str, digest: str, target: Path) -> bool:
    """Clone ``blob`` to ``target`` (FICLONE) and verify it; False where reflinks are not
    supported on this file system."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.shipyard-{os.getpid()}-{time.monotonic_ns()}"
    try:
        with open(blob, "rb") as src, open(tmp, "wb") as out:
            try:
                fcntl.ioctl(out.fileno(), _FICLONE, src.fileno())
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL):
                    return False
                raise
        _verify_file(tmp, digest)
        os.replace(tmp, target)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _hardlink(blob: str, digest: str, target: Path) -> None:
    """Hard-link a loose blob, made read-only first (shared inode: the store's copy)."""
    info = os.stat(blob)
    if info.st_mode & 0o222:
        os.chmod(blob, info.st_mode & ~0o222)
    _verify_file(Path(blob), digest)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.shipyard-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.link(blob, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise InvalidInputError(
                f"{str(target.parent)!r} is on another file system than the blob store: hard "
                "links cannot cross it; use link='auto' or 'copy'",
                field="link",
            ) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _verify_file(path: Path, digest: str) -> None:
    hasher = blake3.blake3()
    with open(path, "rb") as fh:
        while block := fh.read(8 * CHUNK):
            hasher.update(block)
    if hasher.hexdigest() != digest:
        raise IntegrityError(
            f"blob {digest} is corrupted: its content no longer matches its hash; restore it "
            "from a backup or commit the data again",
            field="digest",
            digest=digest,
        )


__all__ = [
    "LINK_MODES",
    "CheckoutResult",
    "LinkMode",
    "WorktreeStatus",
    "checkout",
    "local_writer",
    "status",
]
