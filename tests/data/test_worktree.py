"""Commits through the stat cache, ``status``, incremental ``checkout`` (link modes, local edits),
the collector on packs, and the data CLI - on a real home."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shipyard.blobs.chunking import CHUNKED_MIN_BYTES
from shipyard.blobs.store import FileChangedError, SourceFile
from shipyard.context import Context
from shipyard.data import datasets
from shipyard.data.scan import scan_folder
from shipyard.domain.models import FileEntry
from shipyard.errors import ConflictError, InvalidInputError
from shipyard.maintenance.gc import collect_garbage

P = "default"
HOURS_AGO = time.time() - 3 * 3600


def make_folder(folder: Path, count: int = 40, *, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = folder / f"part-{i % 4}" / f"f{i:03d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.bytes(200 + i))
    return folder


def test_a_change_right_after_a_commit_is_seen_by_the_next_one(
    ctx: Context, tmp_path: Path
) -> None:
    folder = make_folder(tmp_path / "d")
    first = datasets.commit_directory(ctx, project=P, name="ds", source=folder)
    target = folder / "part-1" / "f001.bin"
    stamp = target.stat()
    target.write_bytes(b"X" * stamp.st_size)  # same size, within the same instant
    os.utime(target, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # even the same mtime
    second = datasets.commit_directory(ctx, project=P, name="ds", source=folder)
    assert second.version == 2 and second.new_bytes == stamp.st_size
    changed = {f.path: f for f in datasets.list_files(ctx, project=P, name="ds", version=2)}
    assert ctx.blobs.get_bytes(changed["part-1/f001.bin"].digest) == b"X" * stamp.st_size
    # nothing changed: the same version comes back, and nothing is written
    assert datasets.commit_directory(ctx, project=P, name="ds", source=folder) == second
    assert first.file_count == second.file_count == 40


def test_a_file_changing_during_a_commit_fails_it_and_records_nothing(
    ctx: Context, tmp_path: Path
) -> None:
    folder = make_folder(tmp_path / "d", count=4)
    victim = folder / "part-3" / "f003.bin"

    def progress(done: int, total: int, path: str) -> None:
        if path == "part-0/f000.bin":
            with open(victim, "ab") as fh:  # another program appends while we commit
                fh.write(b"appended")

    with pytest.raises(FileChangedError) as err:
        datasets.commit_directory(ctx, project=P, name="ds", source=folder, progress=progress)
    assert err.value.http_status == 409 and "part-3/f003.bin" in err.value.message
    assert datasets.list_datasets(ctx, project=P) == []
    assert datasets.commit_directory(ctx, project=P, name="ds", source=folder).version == 1


def test_status_lists_added_modified_and_removed(ctx: Context, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "d")
    datasets.commit_directory(ctx, project=P, name="ds", source=folder)
    clean = datasets.status(ctx, project=P, name="ds", source=folder)
    assert clean.clean and clean.unchanged == 40

    (folder / "part-0" / "f000.bin").write_bytes(b"edited")
    (folder / "part-2" / "f002.bin").unlink()
    (folder / "new.txt").write_text("new file")
    st = datasets.status(ctx, project=P, name="ds", source=folder)
    assert (st.added, st.modified, st.removed) == (
        ["new.txt"],
        ["part-0/f000.bin"],
        ["part-2/f002.bin"],
    )
    assert st.unchanged == 38 and not st.clean
    gone = datasets.status(ctx, project=P, name="ds", source=tmp_path / "missing")
    assert len(gone.removed) == 40


def test_status_trusts_the_stat_cache_and_reads_no_unchanged_file(
    ctx: Context, tmp_path: Path
) -> None:
    # Proof without counting calls: the cache row of one unchanged file is made to name other
    # content. A status that read the file would find it equal to the version; one that trusts
    # the row (stamps unchanged, not racy) reports it modified. New stamps make it read again.
    folder = make_folder(tmp_path / "d")
    time.sleep(0.3)  # past RACY_S: the commit's rows are trusted
    datasets.commit_directory(ctx, project=P, name="ds", source=folder)
    one = folder / "part-0" / "f000.bin"
    db = sqlite3.connect(datasets.stat_cache(ctx).path)
    with db:
        changed = db.execute(
            "UPDATE files SET digest = ? WHERE path = ?", ("0" * 64, "part-0/f000.bin")
        ).rowcount
    db.close()
    assert changed == 1
    st = datasets.status(ctx, project=P, name="ds", source=folder)
    assert st.modified == ["part-0/f000.bin"] and st.unchanged == 39

    os.utime(one, (HOURS_AGO, HOURS_AGO))  # same content, new stamps: hashed again
    assert datasets.status(ctx, project=P, name="ds", source=folder).clean


def test_checkout_writes_only_what_differs_and_refuses_local_edits(
    ctx: Context, tmp_path: Path
) -> None:
    folder = make_folder(tmp_path / "d")
    datasets.commit_directory(ctx, project=P, name="ds", source=folder)
    (folder / "part-0" / "f000.bin").write_bytes(b"version two")
    datasets.commit_directory(ctx, project=P, name="ds", source=folder)

    out = tmp_path / "out"
    first = datasets.checkout_version(ctx, project=P, name="ds", version=1, dest=out)
    assert (first.written, first.unchanged) == (40, 0)
    untouched = (out / "part-1" / "f001.bin").stat()
    again = datasets.checkout_version(ctx, project=P, name="ds", version=1, dest=out)
    assert (again.written, again.unchanged) == (0, 40)
    two = datasets.checkout_version(ctx, project=P, name="ds", version=2, dest=out)
    assert (two.written, two.unchanged) == (1, 39)
    assert (out / "part-0" / "f000.bin").read_bytes() == b"version two"
    after = (out / "part-1" / "f001.bin").stat()
    assert (after.st_ino, after.st_mtime_ns) == (untouched.st_ino, untouched.st_mtime_ns)

    (out / "part-0" / "f000.bin").write_bytes(b"my local edit")  # not committed anywhere
    (out / "mine.txt").write_text("not in any version: left alone")
    with pytest.raises(ConflictError) as err:
        datasets.checkout(ctx, project=P, name="ds", version=1, dest=out)
    assert err.value.field == "dest" and "part-0/f000.bin" in err.value.message
    assert (out / "part-0" / "f000.bin").read_bytes() == b"my local edit"  # nothing written
    forced = datasets.checkout_version(ctx, project=P, name="ds", version=1, dest=out, force=True)
    assert forced.overwritten == ["part-0/f000.bin"] and forced.written == 1
    assert (out / "mine.txt").read_text() == "not in any version: left alone"
    v1 = {f.path: f.digest for f in datasets.list_files(ctx, project=P, name="ds", version=1)}
    assert ctx.blobs.get_bytes(v1["part-0/f000.bin"]) == (out / "part-0" / "f000.bin").read_bytes()


def test_hardlink_checkout_links_loose_blobs_read_only_and_copies_packed_ones(
    ctx: Context, tmp_path: Path
) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "mid.bin").write_bytes(np.random.default_rng(2).bytes(2 * 1024 * 1024))  # loose
    make_folder(folder / "small")  # packed
    datasets.commit_directory(ctx, project=P, name="ds", source=folder)
    out = tmp_path / "out"
    result = datasets.checkout_version(
        ctx, project=P, name="ds", version=1, dest=out, link="hardlink"
    )
    assert result.written == 41 and result.linked == 1
    linked = (out / "mid.bin").stat()
    assert linked.st_nlink == 2 and not linked.st_mode & 0o222  # shared, and read-only
    assert (out / "small" / "part-0" / "f000.bin").stat().st_nlink == 1  # copied out of a pack
    assert (out / "mid.bin").read_bytes() == (folder / "mid.bin").read_bytes()
    with pytest.raises(InvalidInputError) as err:
        datasets.checkout(
            ctx,
            project=P,
            name="ds",
            version=1,
            dest=out,
            link="symlink",  # type: ignore[arg-type]
        )
    assert err.value.field == "link"


def test_gc_removes_garbage_packs_rewrites_mostly_garbage_ones_and_keeps_chunks(
    ctx: Context, tmp_path: Path
) -> None:
    folder = tmp_path / "d"
    make_folder(folder / "small", count=40)
    (folder / "big.bin").write_bytes(np.random.default_rng(3).bytes(CHUNKED_MIN_BYTES + 99))
    version = datasets.commit_directory(ctx, project=P, name="ds", source=folder)
    files = datasets.list_files(ctx, project=P, name="ds", version=1)
    orphans = make_folder(tmp_path / "orphans", count=30, seed=9)  # stored, never committed
    scanned = scan_folder(orphans)
    ctx.blobs.put_files([SourceFile(f.real, f.size, f.mtime_ns, f.ctime_ns) for f in scanned])
    # a second dataset keeps only 3 of 30 files of another pack
    mostly = make_folder(tmp_path / "mostly", count=30, seed=11)
    scanned = scan_folder(mostly)
    puts = ctx.blobs.put_files(
        [SourceFile(f.real, f.size, f.mtime_ns, f.ctime_ns) for f in scanned]
    )
    kept = [
        FileEntry(path=f.path, digest=p.digest, size=p.size)
        for f, p in zip(scanned[:3], puts[:3], strict=True)
    ]
    datasets.commit_files(ctx, project=P, name="few", files=kept)
    for pack in (Path(ctx.blobs.root) / "packs").iterdir():
        os.utime(pack, (HOURS_AGO, HOURS_AGO))
    for blob in Path(ctx.blobs.root).glob("??/??/*"):
        os.utime(blob, (HOURS_AGO, HOURS_AGO))

    report = collect_garbage(ctx)
    assert report.swept == 30 + 27 and report.packs_removed == 2 and report.packs_rewritten == 1
    for entry in [*files, *kept]:
        assert ctx.blobs.get_bytes(entry.digest)  # verified reads, chunked ones included
    assert collect_garbage(ctx).swept == 0
    out = datasets.checkout(ctx, project=P, name="ds", version=version.version, dest=tmp_path / "o")
    assert (out / "big.bin").read_bytes() == (folder / "big.bin").read_bytes()


def shipyard(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHIPYARD_HOME": str(home), "COLUMNS": "200"}
    env.pop("SHIPYARD_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "shipyard.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_the_data_cli_status_versions_diff_checkout(home: Path, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "d", count=8)
    pq.write_table(pa.table({"a": [1, 2, 3]}), folder / "t.parquet")
    assert shipyard(home, "data", "commit", str(folder), "--dataset", "ds").returncode == 0
    clean = shipyard(home, "data", "status", str(folder), "--dataset", "ds")
    assert clean.returncode == 0
    assert "clean: 0 added, 0 modified, 0 removed, 9 unchanged" in clean.stdout
    pq.write_table(pa.table({"a": [1, 2, 3, 4], "b": ["w", "x", "y", "z"]}), folder / "t.parquet")
    (folder / "extra.txt").write_text("x")
    dirty = shipyard(home, "data", "status", str(folder), "--dataset", "ds")
    assert dirty.returncode == 1 and "added     extra.txt" in dirty.stdout
    assert "modified  t.parquet" in dirty.stdout
    assert shipyard(home, "data", "commit", str(folder), "--dataset", "ds").returncode == 0
    versions = shipyard(home, "data", "versions", "ds")
    assert "v1" in versions.stdout and "v2" in versions.stdout
    diff = shipyard(home, "data", "diff", "ds@1", "ds@2")
    assert diff.returncode == 0, diff.stderr
    assert "added     extra.txt" in diff.stdout and "t.parquet: rows 3 -> 4, +b" in diff.stdout
    out = tmp_path / "out"
    first = shipyard(home, "data", "checkout", "ds@1", str(out))
    assert first.returncode == 0 and "9 files written, 0 unchanged" in first.stdout
    (out / "part-0" / "f000.bin").write_bytes(b"local edit")
    refused = shipyard(home, "data", "checkout", "ds@2", str(out))
    assert refused.returncode == 1 and "part-0/f000.bin" in refused.stderr
    forced = shipyard(home, "data", "checkout", "ds@2", str(out), "--force")
    assert forced.returncode == 0 and "1 local edits overwritten" in forced.stdout
