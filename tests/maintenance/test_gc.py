"""maintenance.gc on a real home: orphans of a killed commit are reclaimed, every referenced blob
is kept (dataset manifests and files, run artifacts, model versions, job code snapshots), and a
fresh orphan - a commit in flight - is kept through the grace period."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from shipyard.blobs import hash_bytes
from shipyard.context import Context, new_id
from shipyard.data import datasets
from shipyard.errors import IntegrityError, InvalidInputError, NotFoundError
from shipyard.maintenance.gc import collect_garbage, referenced_digests
from shipyard.security import audit
from shipyard.store.queries import project_id
from shipyard.store.tables import Base, JobRow, ModelRow, ModelVersionRow, RunArtifactRow, RunRow

P = "default"
HOURS_AGO = time.time() - 3 * 3600


def age(ctx: Context, *digests: str, when: float = HOURS_AGO) -> None:
    for digest in digests:
        os.utime(ctx.blobs._path(digest), (when, when))


def age_everything(ctx: Context) -> None:
    age(ctx, *(b.digest for b in ctx.blobs.iter_blobs()))


def stored(ctx: Context) -> set[str]:
    return {b.digest for b in ctx.blobs.iter_blobs()}


_KILLED_COMMIT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from shipyard.context import open_context
    from shipyard.data.datasets import commit_directory
    from shipyard.settings import Settings

    seen = []
    def progress(done, total, path):
        seen.append(path)
        if len(seen) == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-commit, for real

    ctx = open_context(Settings.from_env())
    commit_directory(ctx, project="default", name="big", source=Path(sys.argv[1]),
                     progress=progress)
    """
)


def test_orphans_of_a_killed_commit_are_reclaimed_and_referenced_blobs_kept(
    ctx: Context, home: Path, tmp_path: Path
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    (small / "t.csv").write_text("a,b\n1,2\n")
    (small / "shared.bin").write_bytes(b"shared by both folders")
    v1 = datasets.commit_directory(ctx, project=P, name="big", source=small)
    kept_before = stored(ctx)

    big = tmp_path / "big"
    big.mkdir()
    (big / "shared.bin").write_bytes(b"shared by both folders")
    for i in range(8):
        (big / f"part-{i}.bin").write_bytes(os.urandom(10_000 + i))
    env = {**os.environ, "SHIPYARD_HOME": str(home)}
    for key in ("SHIPYARD_URL", "SHIPYARD_DB", "SHIPYARD_BLOBS"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_COMMIT, str(big), "6"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    orphans = stored(ctx) - kept_before
    assert len(orphans) == 6  # part-0 .. part-5 stored (sorted first), then killed
    tmp = Path(ctx.blobs.root) / "tmp"
    stale_temp = tmp / "put-left-by-a-killed-writer"
    stale_temp.write_bytes(b"partial" * 100)
    os.utime(stale_temp, (HOURS_AGO, HOURS_AGO))
    age_everything(ctx)

    dry = collect_garbage(ctx, dry_run=True)
    assert dry.dry_run and dry.swept == 6
    assert dry.swept_bytes == sum(ctx.blobs.size(d) for d in orphans)
    assert dry.temp_files == 1 and dry.temp_bytes == 700
    assert stored(ctx) == kept_before | orphans and stale_temp.exists()  # nothing deleted

    report = collect_garbage(ctx)
    assert (report.swept, report.swept_bytes) == (dry.swept, dry.swept_bytes)
    assert report.scanned == len(kept_before) + 6 and report.kept_recent == 0
    assert stored(ctx) == kept_before and not stale_temp.exists()
    # the committed version is whole: manifest and every file read back verified
    files = datasets.list_files(ctx, project=P, name="big", version=v1.version)
    assert {f.path for f in files} == {"t.csv", "shared.bin"}
    for f in files:
        ctx.blobs.get_bytes(f.digest)
    with ctx.db.read() as s:
        [event] = [e for e in audit.list_events(s, limit=1000) if e.action == "blobs.gc"]
        assert event.details["swept"] == 6 and audit.verify_chain(s) is None

    assert collect_garbage(ctx).swept == 0  # nothing left to take
    # the killed commit can simply be run again
    v2 = datasets.commit_directory(ctx, project=P, name="big", source=big)
    assert v2.version == 2 and v2.file_count == 9


def test_a_fresh_orphan_is_kept_through_the_grace_period(ctx: Context) -> None:
    fresh = ctx.blobs.put_bytes(b"uploaded a moment ago by a commit still in flight").digest
    old = ctx.blobs.put_bytes(b"left by a commit that died yesterday").digest
    age(ctx, old)

    report = collect_garbage(ctx)  # default grace: one hour

    assert ctx.blobs.exists(fresh) and not ctx.blobs.exists(old)
    assert report.swept == 1 and report.kept_recent == 1
    assert report.kept_recent_bytes == ctx.blobs.size(fresh)
    # a commit that reuses an old orphan refreshes it, so it is kept too
    again = ctx.blobs.put_bytes(b"left by a commit that died yesterday").digest
    assert collect_garbage(ctx).swept == 0 and ctx.blobs.exists(again)
    # with no grace at all, the (still unreferenced) blobs go
    assert collect_garbage(ctx, grace_s=0).swept == 2


def test_every_kind_of_reference_is_kept(ctx: Context, tmp_path: Path) -> None:
    artifact = ctx.blobs.put_bytes(b"a run artifact").digest
    model = ctx.blobs.put_bytes(b"an onnx model").digest
    code = ctx.blobs.put_bytes(b"a job code snapshot").digest
    orphan = ctx.blobs.put_bytes(b"nobody's").digest
    with ctx.db.transaction() as s:
        pid = project_id(s, P, create=True)
        run_id, model_id = new_id(), new_id()
        s.add(RunRow(id=run_id, project_id=pid, name="r", status="finished"))
        s.flush()
        s.add(RunArtifactRow(run_id=run_id, path="out/a.bin", digest=artifact, size=14))
        s.add(ModelRow(id=model_id, project_id=pid, name="m"))
        s.flush()
        s.add(
            ModelVersionRow(
                id=new_id(),
                model_id=model_id,
                version=1,
                format="onnx",
                artifact_digest=model,
                artifact_size=13,
                signature={},
            )
        )
        s.add(
            JobRow(
                id=new_id(),
                project_id=pid,
                name="j",
                spec={},
                status="succeeded",
                cpus=1.0,
                memory_mb=64,
                gpus=0,
                code_digest=code,
                created_by="tester",
                queue="default",
            )
        )
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_text("dataset file")
    version = datasets.commit_directory(ctx, project=P, name="ds", source=tmp_path / "d")
    age_everything(ctx)

    marked = referenced_digests(ctx)
    assert {artifact, model, code, version.manifest_digest, hash_bytes(b"dataset file")} <= marked
    report = collect_garbage(ctx)
    assert report.swept == 1 and not ctx.blobs.exists(orphan)
    assert stored(ctx) == {artifact, model, code, version.manifest_digest} | {
        hash_bytes(b"dataset file")
    }


def test_an_unreadable_manifest_stops_the_collection_before_anything_is_deleted(
    ctx: Context, tmp_path: Path
) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_text("dataset file")
    version = datasets.commit_directory(ctx, project=P, name="ds", source=tmp_path / "d")
    orphan = ctx.blobs.put_bytes(b"an orphan").digest
    Path(ctx.blobs._path(version.manifest_digest)).write_bytes(b"not parquet any more")
    age_everything(ctx)
    before = stored(ctx)

    with pytest.raises(IntegrityError) as caught:
        collect_garbage(ctx)
    assert version.manifest_digest in caught.value.message
    assert "before deleting anything" in caught.value.message
    assert stored(ctx) == before and ctx.blobs.exists(orphan)

    os.unlink(ctx.blobs._path(version.manifest_digest))
    with pytest.raises(NotFoundError):
        collect_garbage(ctx)
    assert ctx.blobs.exists(orphan)


@pytest.mark.parametrize("grace", [-1, float("nan")])
def test_a_bad_grace_period_is_refused(ctx: Context, grace: float) -> None:
    orphan = ctx.blobs.put_bytes(b"an orphan").digest
    age(ctx, orphan)
    with pytest.raises(InvalidInputError) as caught:
        collect_garbage(ctx, grace_s=grace)
    assert caught.value.field == "grace"
    assert ctx.blobs.exists(orphan)


def test_a_project_claim_does_not_keep_a_blob_and_goes_with_it(ctx: Context) -> None:
    claims = Base.metadata.tables.get("blob_refs")
    if claims is None:
        pytest.skip("this schema has no blob_refs table")
    orphan = ctx.blobs.put_bytes(b"uploaded, never committed").digest
    kept = ctx.blobs.put_bytes(b"uploaded just now").digest
    age(ctx, orphan)
    with ctx.db.transaction() as s:
        pid = project_id(s, P, create=True)
        for digest in (orphan, kept):
            s.execute(insert(claims).values(project_id=pid, digest=digest))

    assert collect_garbage(ctx).swept == 1
    assert not ctx.blobs.exists(orphan) and ctx.blobs.exists(kept)
    with ctx.db.read() as s:
        assert set(s.scalars(select(claims.c.digest))) == {kept}
