"""Moving versions: tags (NAME@TAG), soft delete and restore, gc reclaiming a deleted version,
and pulling part of a version -- embedded and through a real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from shipyard.client import Client
from shipyard.context import Context
from shipyard.data import datasets
from shipyard.domain.models import AuditEvent
from shipyard.errors import ConflictError, InvalidInputError, NotFoundError
from shipyard.maintenance.gc import collect_garbage
from shipyard.security import audit
from shipyard.settings import Settings
from tests.conftest import LiveServer
from tests.data.conftest import BOTH_DATABASES

P = "default"


def folder(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def commit(ctx: Context, root: Path, files: dict[str, bytes]) -> int:
    for old in sorted(root.rglob("*"), reverse=True) if root.exists() else []:
        if old.is_file():
            old.unlink()
    folder(root, files)
    return datasets.commit_directory(ctx, project=P, name="ds", source=root).version


@BOTH_DATABASES
def test_a_tag_names_a_version_and_moves_only_with_force(ctx: Context, tmp_path: Path) -> None:
    v1 = commit(ctx, tmp_path / "d", {"a.txt": b"one"})
    v2 = commit(ctx, tmp_path / "d", {"a.txt": b"two"})

    tagged = datasets.tag_version(ctx, project=P, name="ds", version=v1, tag="golden")
    assert (tagged.version, tagged.tags) == (v1, ["golden"])
    got = datasets.get_version(ctx, project=P, name="ds", version="golden")
    assert got.version == v1 and got.tags == ["golden"]
    [entry] = datasets.list_files(ctx, project=P, name="ds", version="golden")
    assert ctx.blobs.get_bytes(entry.digest) == b"one"

    with pytest.raises(ConflictError, match=r"tag 'golden' of dataset 'ds' is on version 1"):
        datasets.tag_version(ctx, project=P, name="ds", version=v2, tag="golden")
    assert datasets.get_version(ctx, project=P, name="ds", version="golden").version == v1
    datasets.tag_version(ctx, project=P, name="ds", version=v2, tag="golden", force=True)
    assert datasets.get_version(ctx, project=P, name="ds", version="golden").version == v2
    listed = {v.version: v.tags for v in datasets.list_versions(ctx, project=P, name="ds")}
    assert listed == {v1: [], v2: ["golden"]}

    for bad in ("v3", "7", "latest"):
        with pytest.raises(InvalidInputError, match="reads as a version reference") as caught:
            datasets.tag_version(ctx, project=P, name="ds", version=v1, tag=bad)
        assert caught.value.field == "tag"
    with pytest.raises(InvalidInputError):
        datasets.tag_version(ctx, project=P, name="ds", version=v1, tag="../up")
    with pytest.raises(NotFoundError, match="no version or tag 'silver'"):
        datasets.get_version(ctx, project=P, name="ds", version="silver")

    datasets.untag(ctx, project=P, name="ds", tag="golden")
    with pytest.raises(NotFoundError):
        datasets.get_version(ctx, project=P, name="ds", version="golden")
    with pytest.raises(NotFoundError, match="has no tag 'golden'"):
        datasets.untag(ctx, project=P, name="ds", tag="golden")


@BOTH_DATABASES
def test_a_deleted_version_is_hidden_restorable_and_its_number_never_reused(
    ctx: Context, tmp_path: Path
) -> None:
    commit(ctx, tmp_path / "d", {"a.txt": b"one"})
    commit(ctx, tmp_path / "d", {"a.txt": b"two"})
    datasets.tag_version(ctx, project=P, name="ds", version=2, tag="best")

    deleted = datasets.delete_version(ctx, project=P, name="ds", version="best")
    assert deleted.version == 2 and deleted.deleted_at is not None
    assert [v.version for v in datasets.list_versions(ctx, project=P, name="ds")] == [1]
    every = datasets.list_versions(ctx, project=P, name="ds", include_deleted=True)
    assert [(v.version, v.deleted_at is not None) for v in every] == [(1, False), (2, True)]
    with pytest.raises(NotFoundError, match=r"restore it with `shipyard data restore ds@2`"):
        datasets.list_files(ctx, project=P, name="ds", version=2)
    assert datasets.get_version(ctx, project=P, name="ds").version == 1  # latest: the live one
    assert datasets.get_dataset(ctx, project=P, name="ds").latest_version == 1
    with pytest.raises(ConflictError, match="already deleted"):
        datasets.delete_version(ctx, project=P, name="ds", version=2)
    with pytest.raises(InvalidInputError, match="name the version to delete"):
        datasets.delete_version(ctx, project=P, name="ds", version="latest")

    # the next commit is based on v1 and numbered past the deleted v2
    assert commit(ctx, tmp_path / "d", {"a.txt": b"three"}) == 3
    restored = datasets.restore_version(ctx, project=P, name="ds", version=2)
    assert restored.deleted_at is None and restored.tags == ["best"]
    [entry] = datasets.list_files(ctx, project=P, name="ds", version="best")
    assert ctx.blobs.get_bytes(entry.digest) == b"two"
    with pytest.raises(ConflictError, match="is not deleted"):
        datasets.restore_version(ctx, project=P, name="ds", version=2)
    kinds = [e.action for e in datasets_audit(ctx)]
    assert kinds.count("dataset.delete") == 1 and kinds.count("dataset.restore") == 1


def datasets_audit(ctx: Context) -> list[AuditEvent]:
    events = audit.list_audit_events(ctx, limit=1000)
    return [e for e in events if e.action.startswith("dataset.")]


def test_gc_reclaims_what_only_a_deleted_version_held(ctx: Context, tmp_path: Path) -> None:
    shared, only_v2 = b"kept by v1 and v2" * 100, b"held by v2 alone" * 100
    commit(ctx, tmp_path / "d", {"shared.bin": shared})
    commit(ctx, tmp_path / "d", {"shared.bin": shared, "extra.bin": only_v2})
    files = {f.path: f.digest for f in datasets.list_files(ctx, project=P, name="ds", version=2)}
    manifest = datasets.get_version(ctx, project=P, name="ds", version=2).manifest_digest
    datasets.delete_version(ctx, project=P, name="ds", version=2)

    dry = collect_garbage(ctx, grace_s=0, dry_run=True)
    assert dry.versions_reclaimed == 1 and dry.swept >= 2  # extra.bin and v2's manifest
    assert ctx.blobs.exists(files["extra.bin"])  # a dry run removes nothing
    datasets.restore_version(ctx, project=P, name="ds", version=2)  # still restorable
    datasets.delete_version(ctx, project=P, name="ds", version=2)

    report = collect_garbage(ctx, grace_s=0)
    assert report.versions_reclaimed == 1
    assert not ctx.blobs.exists(files["extra.bin"]) and not ctx.blobs.exists(manifest)
    assert ctx.blobs.exists(files["shared.bin"])  # v1 still holds it
    [kept] = datasets.list_files(ctx, project=P, name="ds", version=1)
    assert ctx.blobs.get_bytes(kept.digest) == shared
    with pytest.raises(NotFoundError, match="garbage-collected; it cannot be restored"):
        datasets.restore_version(ctx, project=P, name="ds", version=2)
    with pytest.raises(NotFoundError, match="garbage-collected"):
        datasets.get_version(ctx, project=P, name="ds", version=2)
    assert collect_garbage(ctx, grace_s=0).versions_reclaimed == 0
    assert commit(ctx, tmp_path / "d", {"new.bin": b"n"}) == 3  # number 2 stays taken


def test_pull_writes_only_the_included_files(ctx: Context, tmp_path: Path) -> None:
    commit(
        ctx,
        tmp_path / "d",
        {"images/a.png": b"A", "images/sub/b.png": b"B", "labels.csv": b"id\n1\n", "x.txt": b"x"},
    )
    client = Client(settings=ctx.settings)
    out = tmp_path / "out"
    result = client.datasets.pull("ds", out, include=["images/**", "*.csv"])
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["images/a.png", "images/sub/b.png", "labels.csv"]
    assert result.written == 3 and (out / "images/sub/b.png").read_bytes() == b"B"
    with pytest.raises(NotFoundError, match=r"--include 'videos/\*\*' matches no file"):
        client.datasets.pull("ds", tmp_path / "none", include=["images/**", "videos/**"])
    assert not (tmp_path / "none").exists()
    with pytest.raises(InvalidInputError, match="give a glob"):
        client.datasets.pull("ds", out, include=["!images/**"])
    client.close()


def test_tags_delete_restore_and_pull_through_the_server(
    tmp_path: Path, live_server: LiveServer
) -> None:
    client = Client(settings=Settings(home=tmp_path / "client", url=live_server.url))
    root = folder(tmp_path / "d", {"keep/a.txt": b"a", "drop/b.txt": b"b"})
    client.datasets.commit(root, name="ds")
    (root / "keep/a.txt").write_bytes(b"a2")
    client.datasets.commit(root, name="ds")

    assert client.datasets.tag("ds", 1, "first").tags == ["first"]
    assert client.datasets.get("ds", "first").version == 1
    with pytest.raises(ConflictError, match="move it with --force"):
        client.datasets.tag("ds", 2, "first")
    assert client.datasets.tag("ds", 2, "first", force=True).version == 2

    out = tmp_path / "out"
    client.datasets.pull("ds", out, "first", include=["keep/**"])
    assert [p.name for p in out.rglob("*") if p.is_file()] == ["a.txt"]
    assert (out / "keep/a.txt").read_bytes() == b"a2"

    assert client.datasets.delete("ds", 2).deleted_at is not None
    assert [v.version for v in client.datasets.versions("ds")] == [1]
    assert [v.version for v in client.datasets.versions("ds", include_deleted=True)] == [1, 2]
    with pytest.raises(NotFoundError, match="restore it with"):
        client.datasets.get("ds", "first")
    assert client.datasets.restore("ds", "first").version == 2
    client.datasets.untag("ds", "first")
    with pytest.raises(NotFoundError):
        client.datasets.get("ds", "first")
    client.close()
