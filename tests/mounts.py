"""Real disk faults for tests: a tiny tmpfs that fills up, and folders made read-only by a mount.

Root cannot be stopped by ``chmod 0555``, so read-only is a read-only mount (a tmpfs remounted
``ro``, or a read-only bind mount). Mounting needs privileges: without them the test is skipped
with the reason. Every mount is unmounted when its ``with`` block ends.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({' '.join(args)}): {done.stderr.strip() or 'denied'}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)


@contextlib.contextmanager
def tmpfs(path: Path, *, size_kb: int) -> Iterator[Path]:
    """A fresh tmpfs of ``size_kb`` KiB mounted on ``path`` (created) for the block."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)


def remount_read_only(path: Path) -> None:
    """Make the tmpfs mounted on ``path`` read-only (it is unmounted by its ``tmpfs`` block)."""
    _mount("-o", "remount,ro", str(path))


@contextlib.contextmanager
def read_only_bind(path: Path) -> Iterator[Path]:
    """``path`` (an existing folder) seen through a read-only bind mount of itself."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,bind,ro", str(path))
        yield path
    finally:
        _umount(path)


def fill(folder: Path) -> Path:
    """Write a filler file into ``folder`` until its file system is full; returns the file."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 65536)
        except OSError:
            pass
    # Page-sized leftovers can still take a small write: fill them with single bytes.
    with contextlib.suppress(OSError), open(filler, "ab", buffering=0) as out:
        while True:
            out.write(b"\0")
    return filler
