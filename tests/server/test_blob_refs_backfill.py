"""Stores made before blobs had owners: the files of their dataset versions get project
references once, at server start, so the project's members can read them through the API."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import delete, select

from shipyard.context import Context
from shipyard.data import datasets
from shipyard.domain.principals import Principal, PrincipalKind, Role
from shipyard.errors import NotFoundError
from shipyard.security.blobrefs import authorize_blob
from shipyard.server.app import create_app
from shipyard.store.tables import BlobRefRow, LockRow
from tests.server.conftest import TestClient


def _old_store(ctx: Context, tmp_path: Path) -> tuple[str, list[str]]:
    """A dataset version whose file blobs have no owner, as a pre-0005 store has them."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_text("alpha")
    (source / "b.txt").write_text("beta")
    version = datasets.commit_directory(ctx, project="p", name="d", source=source)
    files = [f.digest for f in datasets.list_files(ctx, project="p", name="d", version=1)]
    with ctx.db.transaction() as s:
        s.execute(delete(BlobRefRow).where(BlobRefRow.digest.in_(files)))
        s.execute(delete(LockRow).where(LockRow.name == datasets.BACKFILL_MARK))
    return version.manifest_digest, files


def _viewer(ctx: Context) -> Context:
    return ctx.as_principal(
        Principal(id="v", name="viewer", kind=PrincipalKind.USER, roles={"p": Role.VIEWER})
    )


def test_the_backfill_gives_old_files_their_owner_once(ctx: Context, tmp_path: Path) -> None:
    _, files = _old_store(ctx, tmp_path)
    viewer = _viewer(ctx)
    with pytest.raises(NotFoundError):  # before: the project's own member cannot read its file
        authorize_blob(viewer, project="p", digest=files[0], need=Role.VIEWER)

    assert datasets.backfill_file_refs(ctx) == 2
    for digest in files:
        authorize_blob(viewer, project="p", digest=digest, need=Role.VIEWER)
    assert datasets.backfill_file_refs(ctx) == 0  # marked done: not read again
    with ctx.db.read() as s:
        assert s.get(LockRow, datasets.BACKFILL_MARK) is not None
        owners = set(s.scalars(select(BlobRefRow.digest).where(BlobRefRow.digest.in_(files))))
    assert owners == set(files)


def test_a_server_start_runs_the_backfill(ctx: Context, tmp_path: Path) -> None:
    _, files = _old_store(ctx, tmp_path)
    with TestClient(create_app(ctx.settings)) as client:
        assert client.get("/healthz").status_code == 200
    with ctx.db.read() as s:
        owners = set(s.scalars(select(BlobRefRow.digest).where(BlobRefRow.digest.in_(files))))
    assert owners == set(files)


def test_an_unreadable_manifest_is_skipped_and_the_rest_backfilled(
    ctx: Context, tmp_path: Path
) -> None:
    manifest, _ = _old_store(ctx, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "c.txt").write_text("gamma")
    datasets.commit_directory(ctx, project="p", name="e", source=other)
    e_files = [f.digest for f in datasets.list_files(ctx, project="p", name="e", version=1)]
    with ctx.db.transaction() as s:
        s.execute(delete(BlobRefRow).where(BlobRefRow.digest.in_(e_files)))
    ctx.blobs.remove(manifest)  # d's manifest is gone: d cannot be backfilled
    assert datasets.backfill_file_refs(ctx) == 1
    authorize_blob(_viewer(ctx), project="p", digest=e_files[0], need=Role.VIEWER)
