"""Confine user-supplied paths to a root.

Two checks, both required: the lexical one in ``domain.names`` (rejecting every encoding trick),
and here the real-path one: after resolving symlinks on disk, the target must still be inside the
root. A symlink placed inside the root that points out therefore fails here even though its name
is innocent.

Files read *from* a user's folder (a dataset commit) are also refused when they are hard links
(``st_nlink > 1``): a hard link is indistinguishable from the file it shares an inode with, which
may live anywhere on the same file system, so it could bring outside content in under an innocent
name. Refused rather than flagged: the error names the file and says to commit a copy.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from shipyard.domain.names import validate_relative_path
from shipyard.errors import UnsafePathError


def safe_join(root: str | Path, relative: str, *, field: str = "path") -> Path:
    """``root / relative``, guaranteed (after resolving symlinks) to stay under ``root``."""
    validate_relative_path(relative, field=field)
    real_root = Path(os.path.realpath(root))
    candidate = Path(os.path.realpath(real_root / relative))
    if candidate != real_root and not candidate.is_relative_to(real_root):
        raise UnsafePathError(
            f"{field} {relative!r} resolves outside its root (through a symlink?)", field=field
        )
    return candidate


def walk_files(root: str | Path, *, field: str = "path") -> Iterator[tuple[str, Path]]:
    """Every regular file under ``root`` as ``(relative posix path, real path)``, sorted.

    Symlinks are followed only while they stay inside ``root``; one that points out raises
    :class:`UnsafePathError` naming it, rather than silently reading outside files.
    """
    real_root = Path(os.path.realpath(root))
    for dirpath, dirnames, filenames in os.walk(real_root, followlinks=False):
        dirnames.sort()
        for name in list(dirnames):
            full = Path(dirpath) / name
            if full.is_symlink():
                rel = full.relative_to(real_root).as_posix()
                safe_join(real_root, rel, field=field)  # raises if it points out
                dirnames.remove(name)  # do not descend twice into a linked folder
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(real_root).as_posix()
            real = safe_join(real_root, rel, field=field)
            if real.is_file():
                check_not_hard_link(real, rel, field=field)
                yield rel, real


def safe_file(path: str | Path, *, field: str = "path") -> Path:
    """The real path of the single file ``path``, confined to the folder it is named in.

    A symlink is followed only while its target stays in that folder (one that points out raises
    :class:`UnsafePathError`), and a hard link is refused like in :func:`walk_files`.
    """
    path = Path(path)
    real = safe_join(path.parent, path.name, field=field)
    check_not_hard_link(real, path.name, field=field)
    return real


def check_not_hard_link(real: Path, shown: str, *, field: str = "path") -> None:
    """Raise :class:`UnsafePathError` if the regular file ``real`` has more than one name."""
    links = os.stat(real).st_nlink
    if links > 1:
        raise UnsafePathError(
            f"{field} {shown!r} is a hard link ({links} names share its content, which may live "
            "outside the folder); hard links are refused: commit a copy of the file instead "
            "(cp, not ln)",
            field=field,
        )
