"""Checkpoints of a run (``tracking.checkpoints``): recorded content-addressed, listed, the
latest; kept by the garbage collector; refused whole on bad input; a job writes only its own."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from shipyard.context import Context
from shipyard.domain.checkpoints import CheckpointKind
from shipyard.domain.models import FileEntry, MetricPoint, RunStatus
from shipyard.errors import (
    InvalidInputError,
    InvalidStateError,
    NotFoundError,
    PermissionDeniedError,
    UnsafePathError,
)
from shipyard.maintenance.gc import collect_garbage, referenced_digests
from shipyard.security import principals, tokens
from shipyard.security.blobrefs import note_upload
from shipyard.store.tables import BlobRefRow
from shipyard.tracking import checkpoints, runs


def _blob(ctx: Context, project: str, data: bytes, path: str = "state.bin") -> FileEntry:
    stored = ctx.blobs.put_bytes(data)
    note_upload(ctx, project=project, digest=stored.digest)
    return FileEntry(path=path, digest=stored.digest, size=stored.size)


def test_record_list_latest_numbered_and_content_addressed(ctx: Context) -> None:
    run = runs.create_run(ctx, project="p")
    assert checkpoints.latest_checkpoint(ctx, run_id=run.id) is None
    files = [_blob(ctx, "p", b"weights", "model/w.bin"), _blob(ctx, "p", b"{}", "opt.json")]
    first = checkpoints.record_checkpoint(ctx, run_id=run.id, files=files, step=10, attempt=1)
    assert (first.number, first.kind, first.step, first.attempt) == (
        1,
        CheckpointKind.FOLDER,
        10,
        1,
    )
    assert [f.path for f in first.files] == ["model/w.bin", "opt.json"]  # sorted
    assert first.size == len(b"weights") + 2 and first.project == "p"
    same = checkpoints.record_checkpoint(
        ctx, run_id=run.id, files=list(reversed(files)), step=20, attempt=2
    )
    assert same.number == 2 and same.digest == first.digest  # same content, same address
    single = checkpoints.record_checkpoint(
        ctx, run_id=run.id, files=[_blob(ctx, "p", b"x", "ckpt.pt")], kind="file", step=30
    )
    latest = checkpoints.latest_checkpoint(ctx, run_id=run.id)
    assert latest == single and latest.kind is CheckpointKind.FILE and latest.step == 30
    listed = checkpoints.list_checkpoints(ctx, run_id=run.id)
    assert [(c.number, c.step, c.attempt) for c in listed] == [(1, 10, 1), (2, 20, 2), (3, 30, 1)]
    assert listed[0].files == first.files
    # the manifest is a stored blob: the checkpoint's content address is real
    assert ctx.blobs.exists(first.digest)


def test_gc_keeps_every_blob_of_a_checkpoint_and_the_project_references_them(
    ctx: Context,
) -> None:
    run = runs.create_run(ctx, project="p")
    files = [_blob(ctx, "p", b"a" * 10, "a"), _blob(ctx, "p", b"b" * 10, "d/b")]
    ckpt = checkpoints.record_checkpoint(ctx, run_id=run.id, files=files)
    wanted = {ckpt.digest, *(f.digest for f in files)}
    assert wanted <= referenced_digests(ctx)
    with ctx.db.read() as s:
        refs = set(s.scalars(select(BlobRefRow.digest)))
    assert wanted <= refs
    report = collect_garbage(ctx, grace_s=0)
    assert all(ctx.blobs.exists(d) for d in wanted), report


def test_bad_input_is_refused_whole_and_nothing_is_recorded(ctx: Context) -> None:
    run = runs.create_run(ctx, project="p")
    good = _blob(ctx, "p", b"good", "good.bin")
    missing = FileEntry(path="m.bin", digest="0" * 64, size=1)
    cases = [
        ({"files": []}, InvalidInputError, "files"),
        ({"files": [good], "kind": "zip"}, InvalidInputError, "kind"),
        ({"files": [good], "step": -1}, InvalidInputError, "step"),
        ({"files": [good], "attempt": 0}, InvalidInputError, "attempt"),
        ({"files": [good, _blob(ctx, "p", b"2", "b")], "kind": "file"}, InvalidInputError, "files"),
        ({"files": [good.model_copy(update={"path": "../out"})]}, UnsafePathError, None),
        ({"files": [good.model_copy(update={"path": "/etc/x"})]}, UnsafePathError, None),
        ({"files": [good, good]}, InvalidInputError, "files[1].path"),
        (
            {"files": [good, good.model_copy(update={"path": "good.bin/x"})]},
            InvalidInputError,
            "files[0].path",
        ),
        ({"files": [good.model_copy(update={"digest": "xyz"})]}, InvalidInputError, None),
        ({"files": [good.model_copy(update={"size": 3})]}, InvalidInputError, "files[0].size"),
        ({"files": [missing]}, NotFoundError, None),
    ]
    for kwargs, error, field in cases:
        with pytest.raises(error) as info:
            checkpoints.record_checkpoint(ctx, run_id=run.id, **kwargs)  # type: ignore[arg-type]
        if field is not None:
            assert info.value.field == field, (kwargs, info.value)
        else:
            assert info.value.field and info.value.field.startswith("files"), info.value
    with pytest.raises(NotFoundError) as unknown:
        checkpoints.record_checkpoint(ctx, run_id="nope", files=[good])
    assert unknown.value.field == "run_id"
    assert checkpoints.list_checkpoints(ctx, run_id=run.id) == []


def test_only_a_running_run_takes_checkpoints(ctx: Context) -> None:
    run = runs.create_run(ctx, project="p")
    good = _blob(ctx, "p", b"good")
    runs.finish_run(ctx, run_id=run.id, status=RunStatus.FINISHED)
    with pytest.raises(InvalidStateError, match="only a running run") as info:
        checkpoints.record_checkpoint(ctx, run_id=run.id, files=[good])
    assert info.value.field == "run_id"
    assert checkpoints.list_checkpoints(ctx, run_id=run.id) == []


def test_a_checkpoint_revives_a_crashed_run(ctx: Context) -> None:
    run = runs.create_run(ctx, project="p")
    runs.heartbeat(ctx, run_id=run.id)
    time.sleep(0.01)
    assert runs.mark_crashed_runs(ctx, grace_s=0.001) == [run.id]
    checkpoints.record_checkpoint(ctx, run_id=run.id, files=[_blob(ctx, "p", b"s")])
    assert runs.get_run(ctx, run_id=run.id).status == RunStatus.RUNNING


def test_a_blob_of_another_project_cannot_be_named(ctx: Context) -> None:
    principals.create_principal(ctx, name="eve")
    principals.create_project(ctx, name="mine")
    principals.create_project(ctx, name="theirs")
    principals.set_member(ctx, project="mine", principal="eve", role="editor")
    eve = ctx.as_principal(
        tokens.authenticate(
            ctx, secret=tokens.create_token(ctx, name="eve-token", principal="eve")[1]
        )
    )
    run = runs.create_run(eve, project="mine")
    theirs = _blob(ctx, "theirs", b"secret weights")
    with pytest.raises(NotFoundError) as info:
        checkpoints.record_checkpoint(eve, run_id=run.id, files=[theirs])
    assert info.value.field == "files"
    assert checkpoints.list_checkpoints(ctx, run_id=run.id) == []


def test_a_job_token_writes_checkpoints_of_its_own_run_only(ctx: Context) -> None:
    principals.create_project(ctx, name="alpha")
    principals.create_project(ctx, name="beta")
    own = runs.create_run(ctx, project="alpha")
    sibling = runs.create_run(ctx, project="alpha")
    elsewhere = runs.create_run(ctx, project="beta")
    secret = principals.issue_job_token(ctx, job_id="job1", project="alpha", run_id=own.id)
    job = ctx.as_principal(tokens.authenticate(ctx, secret=secret))
    stored = job.blobs.put_bytes(b"state")
    note_upload(job, project="alpha", digest=stored.digest)  # what PUT /blobs records
    entry = FileEntry(path="state.bin", digest=stored.digest, size=stored.size)
    saved = checkpoints.record_checkpoint(job, run_id=own.id, files=[entry], step=1)
    assert checkpoints.latest_checkpoint(job, run_id=own.id) == saved
    with pytest.raises(PermissionDeniedError):
        checkpoints.record_checkpoint(job, run_id=sibling.id, files=[entry])
    with pytest.raises(NotFoundError):
        checkpoints.record_checkpoint(job, run_id=elsewhere.id, files=[entry])
    with pytest.raises(NotFoundError):
        checkpoints.latest_checkpoint(job, run_id=elsewhere.id)
    assert checkpoints.list_checkpoints(ctx, run_id=sibling.id) == []


def test_last_steps_per_key(ctx: Context) -> None:
    run = runs.create_run(ctx, project="p")
    assert runs.last_steps(ctx, run_id=run.id) == {}
    now = time.time()
    points = [MetricPoint(key="loss", value=1.0, step=s, timestamp=now) for s in (0, 1, 7, 3)]
    points.append(MetricPoint(key="acc", value=0.5, step=2, timestamp=now))
    runs.log_batch(ctx, run_id=run.id, metrics=points)
    assert runs.last_steps(ctx, run_id=run.id) == {"loss": 7, "acc": 2}
    with pytest.raises(NotFoundError):
        runs.last_steps(ctx, run_id="nope")


def test_checkpoint_sources_refuse_empty_missing_and_escaping(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(InvalidInputError, match="contains no files") as info:
        checkpoints.checkpoint_sources(empty)
    assert info.value.field == "path"
    with pytest.raises(NotFoundError):
        checkpoints.checkpoint_sources(tmp_path / "nope")
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "ok.txt").write_text("ok")
    os.symlink(outside, folder / "link.txt")
    with pytest.raises(UnsafePathError):
        checkpoints.checkpoint_sources(folder)
    (folder / "link.txt").unlink()
    kind, found = checkpoints.checkpoint_sources(folder)
    assert kind is CheckpointKind.FOLDER and [rel for rel, _ in found] == ["ok.txt"]
    kind, found = checkpoints.checkpoint_sources(folder / "ok.txt")
    assert kind is CheckpointKind.FILE and [rel for rel, _ in found] == ["ok.txt"]
