"""security.paths: user paths never leave their root, through encodings or through symlinks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shipyard.errors import UnsafePathError
from shipyard.security.paths import safe_file, safe_join, walk_files
from tests.domain.cases import SAFE_PATHS, UNSAFE_PATHS

FIELD = "files[0].path"


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """``root`` with a few files, and ``outside`` next to it holding a secret."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "a" / "b.parquet").write_bytes(b"PAR1")
    (root / "images" / "0001.png").write_bytes(b"\x89PNG")
    outside.mkdir()
    (outside / "secret.txt").write_text("top secret")
    return root, outside


def assert_unsafe(caught: pytest.ExceptionInfo[UnsafePathError], field: str = FIELD) -> None:
    assert type(caught.value) is UnsafePathError
    assert caught.value.field == field
    assert caught.value.message.startswith(f"{field} ")


# --- safe_join: the lexical battery --------------------------------------------------------------


@pytest.mark.parametrize("value", [v for _, v in UNSAFE_PATHS], ids=[i for i, _ in UNSAFE_PATHS])
def test_safe_join_rejects_the_traversal_battery(tree: tuple[Path, Path], value: str) -> None:
    root, _ = tree
    with pytest.raises(UnsafePathError) as caught:
        safe_join(root, value, field=FIELD)
    assert_unsafe(caught)


@pytest.mark.parametrize("value", SAFE_PATHS)
def test_safe_join_accepts_legit_paths_existing_or_not(tree: tuple[Path, Path], value: str) -> None:
    root, _ = tree
    assert safe_join(root, value, field=FIELD) == root.resolve() / value


# --- safe_join: symlinks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("link", "target", "request_path"),
    [
        ("leak.txt", "{outside}/secret.txt", "leak.txt"),
        ("leak-rel.txt", "../outside/secret.txt", "leak-rel.txt"),
        ("passwd", "/etc/passwd", "passwd"),
        ("dangling", "{outside}/not-yet", "dangling"),
        ("leakdir", "{outside}", "leakdir"),
        ("leakdir", "{outside}", "leakdir/secret.txt"),
        ("leakdir", "{outside}", "leakdir/new-file"),
        ("a/up", "..", "a/up/../outside/secret.txt"),  # lexically rejected anyway
        ("a/up", "../..", "a/up/outside/secret.txt"),
    ],
    ids=[
        "file",
        "relative-file",
        "absolute",
        "dangling",
        "dir",
        "through-dir",
        "new-through-dir",
        "dotdot",
        "grandparent",
    ],
)
def test_safe_join_rejects_symlinks_that_point_out(
    tree: tuple[Path, Path], link: str, target: str, request_path: str
) -> None:
    root, outside = tree
    (root / link).symlink_to(target.format(outside=outside))
    with pytest.raises(UnsafePathError) as caught:
        safe_join(root, request_path, field=FIELD)
    assert_unsafe(caught)


def test_safe_join_rejects_a_chain_of_links_that_ends_outside(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    (root / "hop2").symlink_to(outside / "secret.txt")
    (root / "hop1").symlink_to("hop2")
    with pytest.raises(UnsafePathError) as caught:
        safe_join(root, "hop1", field=FIELD)
    assert_unsafe(caught)
    assert "outside" in caught.value.message


def test_safe_join_allows_symlinks_that_stay_inside(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    (root / "alias.parquet").symlink_to("a/b.parquet")
    (root / "pics").symlink_to(root / "images")
    real = root.resolve()

    assert safe_join(root, "alias.parquet") == real / "a" / "b.parquet"
    assert safe_join(root, "pics/0001.png") == real / "images" / "0001.png"
    assert safe_join(root, "pics/new.png") == real / "images" / "new.png"


def test_safe_join_works_when_the_root_itself_is_a_symlink(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    via = root.parent / "via"
    via.symlink_to(root)
    assert safe_join(via, "a/b.parquet") == root.resolve() / "a" / "b.parquet"


# --- walk_files ----------------------------------------------------------------------------------


def test_walk_files_lists_every_file_sorted_with_its_real_path(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    (root / "images" / "0000.png").write_bytes(b"\x89PNG")
    assert list(walk_files(root)) == [
        ("a/b.parquet", root.resolve() / "a" / "b.parquet"),
        ("images/0000.png", root.resolve() / "images" / "0000.png"),
        ("images/0001.png", root.resolve() / "images" / "0001.png"),
    ]


def test_walk_files_follows_links_that_stay_inside_once(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    (root / "alias.parquet").symlink_to("a/b.parquet")
    (root / "pics").symlink_to("images", target_is_directory=True)
    listed = dict(walk_files(root))
    assert listed["alias.parquet"] == root.resolve() / "a" / "b.parquet"
    assert "images/0001.png" in listed
    assert not any(rel.startswith("pics/") for rel in listed)  # a linked folder is not walked twice


@pytest.mark.parametrize(
    ("link", "target", "is_dir"),
    [
        ("leak.txt", "{outside}/secret.txt", False),
        ("a/leak-rel.txt", "../../outside/secret.txt", False),
        ("passwd", "/etc/passwd", False),
        ("leakdir", "{outside}", True),
        ("images/etc", "/etc", True),
    ],
    ids=["file", "relative-file", "absolute-file", "dir", "absolute-dir"],
)
def test_walk_files_refuses_links_that_point_out_naming_them(
    tree: tuple[Path, Path], link: str, target: str, is_dir: bool
) -> None:
    root, outside = tree
    (root / link).symlink_to(target.format(outside=outside), target_is_directory=is_dir)
    with pytest.raises(UnsafePathError) as caught:
        list(walk_files(root, field=FIELD))
    assert_unsafe(caught)
    assert repr(link) in caught.value.message


ON_DISK_BAD_NAMES = [
    (case_id, value)
    for case_id, value in UNSAFE_PATHS
    if value
    and "/" not in value
    and "\x00" not in value
    and "\udcff" not in value
    and value not in (".", "..")
    and len(value) < 255
]


@pytest.mark.parametrize(
    "name", [v for _, v in ON_DISK_BAD_NAMES], ids=[i for i, _ in ON_DISK_BAD_NAMES]
)
def test_walk_files_refuses_files_whose_names_are_unsafe(
    tree: tuple[Path, Path], name: str
) -> None:
    root, _ = tree
    (root / name).write_bytes(b"x")
    with pytest.raises(UnsafePathError) as caught:
        list(walk_files(root, field=FIELD))
    assert_unsafe(caught)


def test_walk_files_refuses_a_file_name_that_is_not_utf8(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    with open(os.path.join(os.fsencode(root), b"bad-\xff.bin"), "wb") as fh:
        fh.write(b"x")
    with pytest.raises(UnsafePathError) as caught:
        list(walk_files(root, field=FIELD))
    assert_unsafe(caught)


def test_walk_files_skips_what_is_not_a_regular_file(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    os.mkfifo(root / "a" / "pipe")
    (root / "dangling").symlink_to(root / "nowhere")
    assert [rel for rel, _ in walk_files(root)] == ["a/b.parquet", "images/0001.png"]


# --- hard links and single files -----------------------------------------------------------------


def test_walk_files_refuses_a_hard_link_naming_it(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    os.link(outside / "secret.txt", root / "a" / "notes.txt")
    with pytest.raises(UnsafePathError) as caught:
        list(walk_files(root, field=FIELD))
    assert_unsafe(caught)
    assert "'a/notes.txt'" in caught.value.message and "hard link (2 names" in caught.value.message


def test_safe_file_confines_a_single_file_to_its_folder(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    assert safe_file(root / "a" / "b.parquet") == (root / "a" / "b.parquet").resolve()
    (root / "a" / "inside.lnk").symlink_to(root / "a" / "b.parquet")
    assert safe_file(root / "a" / "inside.lnk") == (root / "a" / "b.parquet").resolve()
    (root / "a" / "out.lnk").symlink_to(outside / "secret.txt")
    with pytest.raises(UnsafePathError) as caught:
        safe_file(root / "a" / "out.lnk", field=FIELD)
    assert_unsafe(caught)
    (root / "a" / "up.lnk").symlink_to(root / "images" / "0001.png")  # a sibling folder: out too
    with pytest.raises(UnsafePathError):
        safe_file(root / "a" / "up.lnk", field=FIELD)
    os.link(outside / "secret.txt", root / "a" / "hard.txt")
    with pytest.raises(UnsafePathError) as caught:
        safe_file(root / "a" / "hard.txt", field=FIELD)
    assert "hard link" in caught.value.message
