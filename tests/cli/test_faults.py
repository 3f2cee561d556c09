"""The CLI on a full disk, a read-only blob folder and bad input: one ``error [...]`` line and
exit 1, never a traceback; and read-only commands keep working on a full disk."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mounts import fill, read_only_bind, tmpfs

HOURS_AGO = time.time() - 3 * 3600


def shipyard(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "SHIPYARD_HOME": str(home), "COLUMNS": "200"}
    for key in ("SHIPYARD_URL", "SHIPYARD_DB", "SHIPYARD_BLOBS"):
        full.pop(key, None)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "shipyard.cli", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def assert_one_error_line(out: subprocess.CompletedProcess[str], field: str, *needles: str) -> None:
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith(f"error [{field}]:"), out.stderr
    text = " ".join(line.strip() for line in lines)  # rich wraps long lines
    for needle in needles:
        assert needle in text, text


def test_a_full_disk_is_one_error_line_and_reads_still_work(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "t.csv").write_text("a,b\n1,2\n3,4\n")
    (second / "big.bin").write_bytes(os.urandom(1024 * 1024))
    with tmpfs(tmp_path / "disk", size_kb=6144) as disk:
        home = disk / "home"
        assert shipyard(home, "data", "commit", str(first), "-d", "ds").returncode == 0
        filler = fill(disk)
        assert filler.exists()

        failed = shipyard(home, "data", "commit", str(second), "-d", "ds")
        # the first write to fail names the fault: the blob folder ("no space left") or the
        # database, which a full disk leaves open for reading only
        assert_one_error_line(failed, "storage", "nothing was stored")
        assert "no space left" in failed.stderr or "disk is full" in failed.stderr

        for args in (
            ["data", "list"],
            ["data", "show", "ds@1"],
            ["runs", "list"],
            ["models", "list"],
            ["jobs", "list"],
            ["deployments", "list"],
        ):
            out = shipyard(home, *args)
            assert out.returncode == 0, (args, out.stderr)
        shown = shipyard(home, "data", "show", "ds")
        assert "t.csv" in shown.stdout and "v1" in shown.stdout

        (disk / "filler").unlink()  # room again: writes work again, nothing was damaged
        again = shipyard(home, "data", "commit", str(second), "-d", "ds")
        assert again.returncode == 0, again.stderr
        assert "dataset ds v2" in again.stdout


def test_a_read_only_blob_folder_is_one_error_line(home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.txt").write_text("one")
    assert shipyard(home, "data", "commit", str(folder), "-d", "ds").returncode == 0
    (folder / "b.txt").write_text("two")
    with read_only_bind(home / "blobs"):
        failed = shipyard(home, "data", "commit", str(folder), "-d", "ds")
        assert_one_error_line(failed, "storage", "read-only")
        listed = shipyard(home, "data", "show", "ds")
        assert listed.returncode == 0 and "a.txt" in listed.stdout and "b.txt" not in listed.stdout


def test_gc_reports_then_reclaims_orphans(home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "kept.txt").write_text("referenced")
    assert shipyard(home, "data", "commit", str(folder), "-d", "ds").returncode == 0
    orphan_dir = home / "blobs" / "ab" / "cd"
    orphan_dir.mkdir(parents=True, exist_ok=True)
    # a stored blob nobody references (its name is its BLAKE3 digest)
    from shipyard.blobs import hash_bytes

    content = b"x" * 1234
    digest = hash_bytes(content)
    orphan = home / "blobs" / digest[:2] / digest[2:4] / digest
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(content)
    os.utime(orphan, (HOURS_AGO, HOURS_AGO))

    dry = shipyard(home, "gc", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would remove 1 unreferenced blobs (1234 bytes)" in dry.stdout
    assert orphan.exists()

    young = shipyard(home, "gc", "--grace", "4h")
    assert young.returncode == 0 and "removed 0 unreferenced blobs" in young.stdout
    assert orphan.exists()

    done = shipyard(home, "gc")
    assert done.returncode == 0, done.stderr
    assert "removed 1 unreferenced blobs (1234 bytes)" in done.stdout
    assert not orphan.exists()
    assert "kept.txt" in shipyard(home, "data", "show", "ds").stdout

    assert_one_error_line(shipyard(home, "gc", "--grace", "soon"), "grace", "not a duration")
    remote = shipyard(home, "gc", env={"SHIPYARD_URL": "http://127.0.0.1:9"})
    assert_one_error_line(remote, "SHIPYARD_URL", "server host")


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ("not json", "not valid JSON"),
        ("[[1, 2", "not valid JSON"),
        ("[]", "non-empty list of rows"),
        ('"a string"', "non-empty list of rows"),
        ("[[1, 2], [3]]", "equal length"),
        ("[[]]", "equal length"),
        ('[[{"a": 1}]]', "numbers, strings"),
    ],
)
def test_predict_with_bad_data_is_one_error_line(home: Path, data: str, needle: str) -> None:
    out = shipyard(home, "predict", "ep", "--data", data)
    assert_one_error_line(out, "data", needle)


def test_predict_with_a_bad_file_is_one_error_line(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "rows.json"
    bad.write_text("{oops")
    assert_one_error_line(shipyard(home, "predict", "ep", "--file", str(bad)), "file", "JSON")
    missing = shipyard(home, "predict", "ep", "--file", str(tmp_path / "nope.json"))
    assert_one_error_line(missing, "file", "cannot be read")


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_s3_blobs_without_s3fs_is_one_error_line_naming_the_extra(home: Path) -> None:
    served = shipyard(home, "server", "--blobs", "s3://bucket/prefix")
    assert_one_error_line(served, "blobs", "pip install 'shipyard[s3]'")
    listed = shipyard(home, "data", "list", env={"SHIPYARD_BLOBS": "s3://bucket/prefix"})
    assert_one_error_line(listed, "blobs", "pip install 'shipyard[s3]'")
