"""registry.register_version with a blob digest *and* a run: the run must be of the same project,
and the digest one the project holds - naming a run must not open another project's blobs."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from shipyard.context import Context
from shipyard.domain.models import LineageEdge
from shipyard.domain.principals import Principal, PrincipalKind, Role
from shipyard.errors import NotFoundError
from shipyard.security import principals
from shipyard.security.blobrefs import note_upload
from shipyard.store.queries import edges_of
from shipyard.store.tables import BlobRefRow, ModelVersionRow
from shipyard.tracking import registry, runs
from tests.onnx_models import linear_model


def _editor(ctx: Context, *projects: str) -> Context:
    """A user who is editor of ``projects`` (no server admin)."""
    roles = dict.fromkeys(projects, Role.EDITOR)
    return ctx.as_principal(Principal(id="eve", name="eve", kind=PrincipalKind.USER, roles=roles))


def _stored(ctx: Context) -> tuple[int, int]:
    with ctx.db.read() as s:
        versions = s.scalar(select(func.count()).select_from(ModelVersionRow)) or 0
        refs = s.scalar(select(func.count()).select_from(BlobRefRow)) or 0
    return versions, refs


@pytest.fixture
def two_projects(ctx: Context) -> dict[str, str]:
    """``p`` and ``q``, each with a run and a model blob only it holds."""
    ids: dict[str, str] = {}
    for seed, project in enumerate(("p", "q")):
        principals.create_project(ctx, name=project)
        blob = ctx.blobs.put_bytes(linear_model(4, 2, seed=seed).data)
        note_upload(ctx, project=project, digest=blob.digest)
        ids[f"{project}_blob"] = blob.digest
        ids[f"{project}_run"] = runs.create_run(ctx, project=project, name="train").id
    return ids


def test_a_digest_with_a_run_of_another_project_is_a_missing_run(
    ctx: Context, two_projects: dict[str, str]
) -> None:
    ids = two_projects
    before = _stored(ctx)
    with pytest.raises(NotFoundError) as missing:
        registry.register_version(
            ctx, project="p", model="m", run_id="0" * 16, digest=ids["p_blob"]
        )
    for caller in (ctx, _editor(ctx, "p", "q")):  # server admin or a member of both
        with pytest.raises(NotFoundError) as other:
            registry.register_version(
                caller, project="p", model="m", run_id=ids["q_run"], digest=ids["p_blob"]
            )
        assert other.value.field == "run_id"
        assert other.value.message == missing.value.message.replace("0" * 16, ids["q_run"])
    assert _stored(ctx) == before
    assert edges_of_run(ctx, ids["q_run"]) == []
    with pytest.raises(NotFoundError):
        registry.get_model(ctx, project="p", model="m")


def test_naming_a_run_does_not_bring_in_another_projects_blob(
    ctx: Context, two_projects: dict[str, str]
) -> None:
    """eve edits p only; q's blob digest plus p's own run must not register (nor reference)."""
    ids = two_projects
    eve = _editor(ctx, "p")
    before = _stored(ctx)
    with pytest.raises(NotFoundError) as refused:
        registry.register_version(
            eve, project="p", model="m", run_id=ids["p_run"], digest=ids["q_blob"]
        )
    assert refused.value.field == "digest"
    assert "upload it first" in refused.value.message
    assert _stored(ctx) == before


def test_a_digest_with_a_run_of_the_same_project_registers_with_lineage(
    ctx: Context, two_projects: dict[str, str]
) -> None:
    ids = two_projects
    version = registry.register_version(
        _editor(ctx, "p"), project="p", model="m", run_id=ids["p_run"], digest=ids["p_blob"]
    )
    assert version.version == 1 and version.source_run_id == ids["p_run"]
    assert [e.target_id for e in edges_of_run(ctx, ids["p_run"])] == [version.id]
    # the run can also be found through runs' own by-id path, in its project
    assert runs.get_run(ctx, run_id=ids["p_run"], project="p").id == ids["p_run"]


def edges_of_run(ctx: Context, run_id: str) -> list[LineageEdge]:
    with ctx.db.read() as s:
        return [e for e in edges_of(s, kind="run", id=run_id) if e.target_kind == "model_version"]
