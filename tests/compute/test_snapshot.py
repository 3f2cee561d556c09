"""Code snapshots: what goes in, and an extractor that trusts nothing."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from shipyard.compute.snapshot import extract_code, list_code, snapshot_code
from shipyard.errors import InvalidInputError, PayloadTooLargeError, UnsafePathError


def make_code(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "train.py").write_text("print('train')\n")
    (root / "pkg" / "util.py").write_text("X = 1\n")
    run = root / "run.sh"
    run.write_text("#!/bin/sh\necho hi\n")
    run.chmod(0o755)
    for skipped in (".git", ".venv/bin", "__pycache__", "pkg/__pycache__"):
        (root / skipped).mkdir(parents=True, exist_ok=True)
        (root / skipped / "junk").write_text("x")
    (root / "pkg" / "util.cpython-311.pyc").write_bytes(b"\0")
    return root


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def test_snapshot_holds_the_code_and_skips_environments_and_caches(tmp_path: Path) -> None:
    archive = snapshot_code(make_code(tmp_path / "code"))
    assert sorted(list_code(archive)) == ["pkg/util.py", "run.sh", "train.py"]


def test_snapshot_is_reproducible(tmp_path: Path) -> None:
    code = make_code(tmp_path / "code")
    first = snapshot_code(code)
    os.utime(code / "train.py", (1, 1))
    assert snapshot_code(code) == first


def test_round_trip_keeps_content_and_the_executable_bit(tmp_path: Path) -> None:
    archive = snapshot_code(make_code(tmp_path / "code"))
    dest = tmp_path / "out"
    assert extract_code(archive, dest) == 3
    assert (dest / "pkg" / "util.py").read_text() == "X = 1\n"
    assert os.access(dest / "run.sh", os.X_OK)
    assert not os.access(dest / "train.py", os.X_OK)
    assert not (dest / ".git").exists()


def test_snapshot_over_budget_is_refused_naming_the_largest_file(tmp_path: Path) -> None:
    code = make_code(tmp_path / "code")
    with open(code / "weights.bin", "wb") as fh:
        fh.truncate(2000)  # sparse: costs no disk
    with pytest.raises(PayloadTooLargeError) as err:
        snapshot_code(code, budget=1000)
    assert err.value.field == "code_dir"
    assert "weights.bin" in err.value.message


def test_snapshot_refuses_a_symlink_that_points_out(tmp_path: Path) -> None:
    code = make_code(tmp_path / "code")
    (tmp_path / "secret").write_text("s")
    (code / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(UnsafePathError):
        snapshot_code(code)


def test_snapshot_follows_a_symlink_inside_the_folder(tmp_path: Path) -> None:
    code = make_code(tmp_path / "code")
    (code / "alias.py").symlink_to(code / "train.py")
    dest = tmp_path / "out"
    extract_code(snapshot_code(code), dest)
    assert (dest / "alias.py").read_text() == "print('train')\n"
    assert not (dest / "alias.py").is_symlink()


def test_snapshot_of_a_missing_folder_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError) as err:
        snapshot_code(tmp_path / "nope")
    assert err.value.field == "code_dir"


@pytest.mark.parametrize(
    "bad",
    [
        member("../escape.txt"),
        member("a/../../escape.txt"),
        member("/etc/evil"),
        member("ok/..\\..\\evil"),
        member("link", tarfile.SYMTYPE, linkname="/etc/passwd"),
        member("hard", tarfile.LNKTYPE, linkname="train.py"),
        member("dev", tarfile.CHRTYPE, devmajor=1, devminor=3),
        member("fifo", tarfile.FIFOTYPE),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "backslash",
        "symlink",
        "hardlink",
        "device",
        "fifo",
    ],
)
def test_extractor_refuses_members_that_could_escape_or_are_not_plain(
    tmp_path: Path, bad: tarfile.TarInfo
) -> None:
    data = b"pwned" if bad.type == tarfile.REGTYPE else None
    archive = tar_gz([(member("fine.txt"), b"ok"), (bad, data)])
    dest = tmp_path / "root" / "code"
    with pytest.raises(UnsafePathError) as err:
        extract_code(archive, dest)
    assert err.value.field == "code"
    with pytest.raises(UnsafePathError):
        list_code(archive)
    # Nothing was written outside the destination.
    assert not (tmp_path / "root" / "escape.txt").exists()
    assert not (tmp_path / "escape.txt").exists()
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["code"]


def test_extractor_does_not_write_through_a_symlink_already_in_place(tmp_path: Path) -> None:
    dest = tmp_path / "code"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "sub").symlink_to(outside)
    with pytest.raises(UnsafePathError):
        extract_code(tar_gz([(member("sub/x.txt"), b"pwned")]), dest)
    assert not (outside / "x.txt").exists()


def test_extractor_bounds_the_unpacked_size(tmp_path: Path) -> None:
    archive = tar_gz([(member("a.bin"), b"\0" * 600), (member("b.bin"), b"\0" * 600)])
    with pytest.raises(PayloadTooLargeError):
        extract_code(archive, tmp_path / "out", budget=1000)


def test_extractor_refuses_what_is_not_a_tar_gz(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError) as err:
        extract_code(b"not an archive", tmp_path / "out")
    assert err.value.field == "code"
