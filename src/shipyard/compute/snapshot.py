"""Code snapshots: a job runs the code as it was when it was submitted, not as it is now.

``snapshot_code`` packs a folder into a reproducible tar.gz (sorted names, zeroed times and owners,
so the same code gives the same bytes and the blob store keeps it once). ``extract_code`` unpacks
one into a job's folder and trusts nothing in it: every member name goes through the lexical check
and ``safe_join``, only regular files and folders are written (no links, devices or FIFOs), and the
total size is bounded, so a crafted archive can neither escape the folder nor fill the disk.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from shipyard.domain.names import validate_relative_path
from shipyard.errors import InvalidInputError, PayloadTooLargeError, UnsafePathError
from shipyard.security.paths import safe_join

CODE_BUDGET_BYTES = 50 * 1024 * 1024
MAX_MEMBERS = 100_000
# Folders that are environments, caches or history, never code the job needs.
SKIP_DIRS = frozenset(
    {".git", ".hg", ".svn", ".venv", "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
)
SKIP_SUFFIXES = (".pyc", ".pyo")


def snapshot_code(code_dir: str | Path, *, budget: int = CODE_BUDGET_BYTES) -> bytes:
    """A tar.gz of the regular files under ``code_dir`` (see ``SKIP_DIRS``), at most ``budget``.

    Symlinks are followed while they stay inside ``code_dir``; one that points out is refused
    (:class:`UnsafePathError`), as are file names that could not be extracted safely.
    """
    root = Path(code_dir)
    if not root.is_dir():
        raise InvalidInputError(
            f"code_dir {str(code_dir)!r} is not a folder; pass the folder that holds the code",
            field="code_dir",
        )
    files = _code_files(root)
    total = sum(size for _, _, size in files)
    if total > budget:
        biggest = max(files, key=lambda item: item[2])
        raise PayloadTooLargeError(
            f"code_dir {str(code_dir)!r} holds {_mb(total)} of files, more than the "
            f"{_mb(budget)} a code snapshot may hold (the largest is {biggest[0]!r}, "
            f"{_mb(biggest[2])}); commit data as a dataset and read it from the job instead",
            field="code_dir",
        )
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for rel, real, size in files:
            info = tarfile.TarInfo(rel)
            info.size = size
            info.mode = 0o755 if os.access(real, os.X_OK) else 0o644
            info.mtime = 0
            with open(real, "rb") as fh:
                tar.addfile(info, fh)
    return buffer.getvalue()


def extract_code(archive: bytes, dest: str | Path, *, budget: int = CODE_BUDGET_BYTES) -> int:
    """Unpack a code snapshot into ``dest`` (created if missing); return the number of files.

    Raises :class:`UnsafePathError` (field ``code``) for a member whose name could leave ``dest``
    or that is not a regular file or folder, and :class:`PayloadTooLargeError` past ``budget``.
    """
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    count = 0
    with _open(archive) as tar:
        for member in _checked_members(tar, budget):
            target = safe_join(root, member.name, field="code")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:  # pragma: no cover - regular files always have data
                continue
            mode = 0o755 if member.mode & 0o111 else 0o644
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(1024 * 1024):
                    out.write(chunk)
            os.chmod(target, mode)
            count += 1
    return count


def list_code(archive: bytes, *, budget: int = CODE_BUDGET_BYTES) -> list[str]:
    """The file names in a code snapshot, after the same checks as :func:`extract_code`.

    Lets a server vet an uploaded snapshot at submit time rather than fail the job later.
    """
    with _open(archive) as tar:
        return [m.name for m in _checked_members(tar, budget) if m.isfile()]


def _code_files(root: Path) -> list[tuple[str, Path, int]]:
    """``(relative posix path, real path, size)`` of every file to pack, sorted by path."""
    real_root = Path(os.path.realpath(root))
    found: list[tuple[str, Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(real_root, followlinks=False):
        here = Path(dirpath)
        kept: list[str] = []
        for name in sorted(dirnames):
            if name in SKIP_DIRS:
                continue
            full = here / name
            if full.is_symlink():
                # Checked (it must not point out) but not entered: its target is walked in place.
                safe_join(real_root, full.relative_to(real_root).as_posix(), field="code_dir")
                continue
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            if name.endswith(SKIP_SUFFIXES):
                continue
            rel = (here / name).relative_to(real_root).as_posix()
            real = safe_join(real_root, rel, field="code_dir")
            if real.is_file():
                found.append((rel, real, real.stat().st_size))
    found.sort(key=lambda item: item[0])
    return found


def _open(archive: bytes) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InvalidInputError(f"code snapshot is not a tar.gz: {exc}", field="code") from None


def _checked_members(tar: tarfile.TarFile, budget: int) -> Iterator[tarfile.TarInfo]:
    """Members with safe names, of safe kinds, within the budget; raises on the first bad one."""
    total = 0
    try:
        for index, member in enumerate(tar):
            if index >= MAX_MEMBERS:
                raise PayloadTooLargeError(
                    f"code snapshot has more than {MAX_MEMBERS} members", field="code"
                )
            validate_relative_path(member.name, field="code")
            if not (member.isfile() or member.isdir()):
                raise UnsafePathError(
                    f"code snapshot member {member.name!r} is a {_kind(member)}; only regular "
                    "files and folders are extracted",
                    field="code",
                )
            total += member.size if member.isfile() else 0
            if total > budget:
                raise PayloadTooLargeError(
                    f"code snapshot unpacks to more than {_mb(budget)}", field="code"
                )
            yield member
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InvalidInputError(f"code snapshot is damaged: {exc}", field="code") from None


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.isdev():
        return "device or FIFO"
    return "special file"


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"
