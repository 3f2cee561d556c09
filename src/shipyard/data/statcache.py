"""The stat cache: ``(inode, size, mtime_ns, ctime_ns)`` of a file -> the BLAKE3 digest of its
content, as git's index and DVC's state database keep, so that a file that did not change is
never read again by a commit, a status or a checkout.

It is a small SQLite file in the home (``cache/stat.sqlite``), not a Parquet file beside the
blobs: a commit that changes one file of 200,000 updates one row instead of rewriting the table,
several processes may use it at once (SQLite's locking), and it is the local machine's view of
its own files - not content, so it never travels with the blob store to a server or a bucket.
Rows are keyed by the folder's real path and the file's relative path.

A row is only trusted when all four fields match and the file's mtime and ctime were at least
``RACY_S`` (``COARSE_RACY_S`` where the stamps are whole seconds: a coarse file system) before
the row was recorded: a file modified again within the file system's timestamp granularity after
being hashed could otherwise keep the same stamps with new content (git's "racy" entries); such
a row is hashed again next time, then trusted. The kernel sets ctime on every change, even one
that forges mtime. A racy row still tells what content shipyard last saw there (``seen``).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from shipyard.data.scan import ScannedFile

RACY_S = 0.1
COARSE_RACY_S = 2.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    root TEXT NOT NULL, path TEXT NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, digest TEXT NOT NULL,
    recorded_ns INTEGER NOT NULL, PRIMARY KEY (root, path)
) WITHOUT ROWID
"""

Stamp = tuple[int, int, int, int]
Known = dict[str, tuple[Stamp, str, bool]]
"""What the cache holds for a folder: path -> (stamp, digest, trusted: not racy)."""


def stamp(file: ScannedFile) -> Stamp:
    return (file.ino, file.size, file.mtime_ns, file.ctime_ns)


class StatCache:
    """The cache at ``path``; every failure to use it (a read-only home, a damaged file) makes
    it a cache that knows nothing, never an error: it only saves work."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, root: Path) -> Known:
        """What the cache knows of the files under the folder ``root``, by relative path."""
        try:
            with contextlib.closing(self._connect()) as db:
                rows = db.execute(
                    "SELECT path, ino, size, mtime_ns, ctime_ns, digest, recorded_ns FROM files "
                    "WHERE root = ?",
                    (str(root),),
                ).fetchall()
        except (sqlite3.Error, OSError):
            return {}
        return {
            path: ((ino, size, m, c), digest, _settled(m, c, recorded))
            for path, ino, size, m, c, digest, recorded in rows
        }

    def lookup(self, known: Known, file: ScannedFile) -> str | None:
        """The digest of ``file`` if the cache holds it with the same stamps (and not racy)."""
        hit = known.get(file.path)
        if hit is not None and hit[2] and hit[0] == stamp(file):
            return hit[1]
        return None

    def seen(self, known: Known, path: str) -> str | None:
        """The digest shipyard last recorded at ``path`` (whatever its stamps are now)."""
        hit = known.get(path)
        return hit[1] if hit is not None else None

    def save(
        self,
        root: Path,
        rows: Iterable[tuple[ScannedFile, str]],
        *,
        hashed_at_ns: int,
        gone: Iterable[str] = (),
    ) -> None:
        """Record digests of files hashed at (or after) ``hashed_at_ns``, whose stamps were taken
        before they were read; forget the paths ``gone``."""
        fresh = [
            (str(root), f.path, f.ino, f.size, f.mtime_ns, f.ctime_ns, digest, hashed_at_ns)
            for f, digest in rows
        ]
        dropped = [(str(root), path) for path in gone]
        if not fresh and not dropped:
            return
        try:
            with contextlib.closing(self._connect()) as db, db:
                db.executemany(
                    "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)", fresh
                )
                db.executemany("DELETE FROM files WHERE root = ? AND path = ?", dropped)
        except (sqlite3.Error, OSError):
            return

    def _connect(self) -> sqlite3.Connection:
        """The cache database; one of an older layout is started afresh (it is only a cache)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        columns = [row[1] for row in db.execute("PRAGMA table_info(files)")]
        if columns and "recorded_ns" not in columns:
            db.execute("DROP TABLE files")
        db.execute(_SCHEMA)
        return db


def _settled(mtime_ns: int, ctime_ns: int, recorded_ns: int) -> bool:
    """Whether a row's stamps are far enough before its recording to be trusted."""
    coarse = mtime_ns % 1_000_000_000 == 0 and ctime_ns % 1_000_000_000 == 0
    margin = int((COARSE_RACY_S if coarse else RACY_S) * 1e9)
    return max(mtime_ns, ctime_ns) < recorded_ns - margin
