"""List a working folder fast: one ``scandir`` per folder and one ``stat`` per file, with the
same confinement rules as ``security.paths.walk_files`` (symlinks followed only while they stay
inside the folder, linked folders not descended, hard links refused, every name checked).

Each file comes with the ``stat`` fields the stat cache keys on (``data.statcache``), so that a
commit or a status of an unchanged folder reads no file at all.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from shipyard.domain.names import MAX_PATH_LEN, validate_relative_path
from shipyard.errors import InvalidInputError, NotFoundError
from shipyard.security.paths import check_not_hard_link, safe_file, safe_join

# Plain ASCII names that ``validate_relative_path`` always accepts (no segment ends with '.', so
# none is '.' or '..'); anything else goes through the full check, which names the reason.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_.\-]*[A-Za-z0-9_\-](?:/[A-Za-z0-9_.\-]*[A-Za-z0-9_\-])*")


def check_path(path: str, *, field: str) -> str:
    """``validate_relative_path``, with a fast path for plain names (a folder of 200,000 files
    spends most of its listing in the full Unicode checks otherwise)."""
    if len(path) <= MAX_PATH_LEN and _PLAIN_PATH.fullmatch(path):
        return path
    return validate_relative_path(path, field=field)


@dataclass(frozen=True)
class ScannedFile:
    path: str  # relative, '/'-separated
    real: str  # where it is read (a str: 200,000 Path objects cost a second)
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


def scan_source(source: Path, *, field: str = "source") -> list[ScannedFile]:
    """The files a commit of ``source`` (a folder, or a single file: its base name) takes,
    sorted by path; refused as ``walk_files`` refuses them."""
    if not source.exists():
        raise NotFoundError(f"{field} {str(source)!r} does not exist", field=field)
    if source.is_file():
        validate_relative_path(source.name, field=field)
        real = safe_file(source, field=field)
        return [_scanned(source.name, real, os.stat(real))]
    found = scan_folder(source, field=field)
    if not found:
        raise InvalidInputError(f"{field} {str(source)!r} contains no files", field=field)
    return found


def scan_folder(
    root: Path, *, field: str = "source", allow_hard_links: bool = False, symlinks: bool = True
) -> list[ScannedFile]:
    """Every regular file under ``root`` (which may be missing: no files), sorted by path.
    For a checkout's destination, ``allow_hard_links`` (shipyard may have linked its files) and
    not ``symlinks`` (they are skipped: the checkout confines what it writes itself)."""
    real_root = Path(os.path.realpath(root))
    found: list[ScannedFile] = []
    todo: list[tuple[str, str]] = [(str(real_root), "")]
    while todo:
        folder, prefix = todo.pop()
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            rel = prefix + entry.name
            if entry.is_symlink():
                if not symlinks:
                    continue
                real = safe_join(real_root, rel, field=field)  # raises if it points out
                if real.is_file():
                    if not allow_hard_links:
                        check_not_hard_link(real, rel, field=field)
                    found.append(_scanned(rel, real, os.stat(real)))
            elif entry.is_dir(follow_symlinks=False):
                todo.append((entry.path, rel + "/"))
            else:
                info = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode):
                    continue
                check_path(rel, field=field)
                if info.st_nlink > 1 and not allow_hard_links:
                    check_not_hard_link(Path(entry.path), rel, field=field)
                found.append(_scanned(rel, entry.path, info))
    found.sort(key=lambda f: f.path)
    return found


def _scanned(rel: str, real: str | Path, info: os.stat_result) -> ScannedFile:
    return ScannedFile(
        rel, str(real), info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns
    )
