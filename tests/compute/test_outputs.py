"""Declared outputs become artifacts of the job's run; the rest is accounted for."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from shipyard.compute.outputs import MAX_LISTED, collect_outputs, upload_outputs
from shipyard.context import Context
from shipyard.domain.models import RunStatus
from shipyard.errors import InvalidStateError
from shipyard.tracking import runs


def workdir(tmp_path: Path) -> Path:
    root = tmp_path / "code"
    (root / "ckpt" / "sub").mkdir(parents=True)
    (root / "train.py").write_text("print('x')\n")
    (root / "model.pt").write_bytes(b"weights" * 100)
    (root / "ckpt" / "a.bin").write_bytes(b"a")
    (root / "ckpt" / "sub" / "b.bin").write_bytes(b"b")
    (root / "scratch.txt").write_text("left behind")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"\0")
    return root


def artifacts(ctx: Context, run_id: str) -> dict[str, int]:
    return {a.path: a.size for a in runs.get_run(ctx, run_id=run_id).artifacts}


def test_declared_files_and_folders_become_artifacts(ctx: Context, tmp_path: Path) -> None:
    run = runs.create_run(ctx, project="p", name="job")
    root = workdir(tmp_path)
    report = collect_outputs(
        ctx,
        job_id="j1",
        project="p",
        run_id=run.id,
        workdir=root,
        declared=["model.pt", "ckpt", "gone.pt"],
        code_files={"train.py"},
    )
    assert report.stored == ["model.pt", "ckpt/a.bin", "ckpt/sub/b.bin"]
    assert report.missing == ["gone.pt"]
    assert report.others == ["scratch.txt"] and report.others_total == 1
    assert report.kept_in == str(root)
    assert artifacts(ctx, run.id) == {"model.pt": 700, "ckpt/a.bin": 1, "ckpt/sub/b.bin": 1}
    stored = runs.get_artifact(ctx, run_id=run.id, path="model.pt")
    assert ctx.blobs.get_bytes(stored.digest) == b"weights" * 100
    lines = report.lines()
    assert lines[0].startswith(
        f"shipyard: stored 3 declared output files (0.7 KB) as artifacts of run {run.id}"
    )
    assert "'gone.pt' was not found" in lines[1]
    assert lines[2] == (
        f"shipyard: 1 file the job wrote outside its declared outputs stay in {root}: "
        "scratch.txt; declare them (--output PATH) to store them as artifacts of the run"
    )


def test_outputs_are_stored_on_a_run_the_job_already_finished(ctx: Context, tmp_path: Path) -> None:
    # The job's own shipyard.init() finishes its run at exit, before the executor collects.
    run = runs.create_run(ctx, project="p", name="job")
    runs.finish_run(ctx, run_id=run.id)
    root = workdir(tmp_path)
    report = collect_outputs(
        ctx, job_id="j1", project="p", run_id=run.id, workdir=root, declared=["model.pt"]
    )
    assert report.stored == ["model.pt"] and not report.problems
    assert runs.get_run(ctx, run_id=run.id).status == RunStatus.FINISHED
    # ...but an ended run's artifact is never replaced by other content
    (root / "model.pt").write_bytes(b"other")
    again = collect_outputs(
        ctx, job_id="j1", project="p", run_id=run.id, workdir=root, declared=["model.pt"]
    )
    assert again.stored == [] and "never replaced" in again.problems[0]
    assert artifacts(ctx, run.id) == {"model.pt": 700}
    # and the ordinary path (an SDK call) still refuses an ended run
    digest = ctx.blobs.put_bytes(b"x").digest
    with pytest.raises(InvalidStateError):
        runs.log_artifact(ctx, run_id=run.id, path="late.txt", digest=digest, size=1)


def test_unsafe_outputs_are_refused_and_the_others_still_stored(
    ctx: Context, tmp_path: Path
) -> None:
    run = runs.create_run(ctx, project="p")
    root = workdir(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    (root / "leak.txt").symlink_to(secret)
    (root / "linkdir").symlink_to(tmp_path)
    os.link(secret, root / "hard.txt")
    report = collect_outputs(
        ctx,
        job_id="j1",
        project="p",
        run_id=run.id,
        workdir=root,
        declared=["leak.txt", "linkdir", "hard.txt", "model.pt"],
        code_files=set(),
    )
    assert report.stored == ["model.pt"]
    assert [p.split(":")[0] for p in report.problems] == ["leak.txt", "linkdir", "hard.txt"]
    assert "outside" in report.problems[0] and "hard link" in report.problems[2]
    assert set(artifacts(ctx, run.id)) == {"model.pt"}
    assert all(line.startswith("shipyard: ") for line in report.lines())


@pytest.mark.parametrize("bad", ["../up.txt", "/etc/passwd", "a/../../b"])
def test_declared_paths_that_leave_the_folder_are_refused(
    ctx: Context, tmp_path: Path, bad: str
) -> None:
    run = runs.create_run(ctx, project="p")
    report = collect_outputs(
        ctx, job_id="j1", project="p", run_id=run.id, workdir=workdir(tmp_path), declared=[bad]
    )
    assert report.stored == [] and report.problems and report.problems[0].startswith(bad)
    assert artifacts(ctx, run.id) == {}


def test_others_of_a_discarded_folder_say_how_to_keep_them(ctx: Context, tmp_path: Path) -> None:
    root = tmp_path / "work"
    root.mkdir()
    for i in range(MAX_LISTED + 5):
        (root / f"f{i:03}.txt").write_text("x")
    report = collect_outputs(
        ctx, job_id="j1", project="p", run_id=None, workdir=root, declared=[], discarded=True
    )
    assert report.kept_in is None and report.others_total == MAX_LISTED + 5
    assert len(report.others) == MAX_LISTED
    (line,) = report.lines()
    assert line.startswith(f"shipyard: {MAX_LISTED + 5} files the job wrote outside")
    assert "were discarded with its folder" in line and "and 5 more" in line
    assert "--output PATH" in line


def test_without_a_run_nothing_is_stored_and_it_says_so(ctx: Context, tmp_path: Path) -> None:
    report = collect_outputs(
        ctx,
        job_id="j1",
        project="p",
        run_id=None,
        workdir=workdir(tmp_path),
        declared=["model.pt"],
    )
    assert report.stored == [] and report.problems == [
        "model.pt: the job has no run to store it in"
    ]
    assert "scratch.txt" in report.others and "model.pt" not in report.others


@pytest.mark.slow
def test_code_files_come_from_the_jobs_snapshot(ctx: Context, tmp_path: Path) -> None:
    """With no code_files given, the job's stored snapshot says which files were code."""
    from shipyard.client.client import Client
    from tests.conftest import wait_for

    code = tmp_path / "src"
    code.mkdir()
    (code / "train.py").write_text("open('result.txt', 'w').write('r')\n")
    client = Client(settings=ctx.settings)
    job = client.jobs.submit(["python", "train.py"], code_dir=code, project="p")
    done = wait_for(
        lambda: (j := client.jobs.get(job.id, project="p")).status.finished and j,
        what="the job to end",
    )
    assert done.status.value == "succeeded", done.message
    folder = ctx.settings.jobs_dir / job.id / "code"
    report = collect_outputs(
        ctx, job_id=job.id, project="p", run_id=None, workdir=folder, declared=[]
    )
    assert report.others == ["result.txt"]


def test_a_job_token_uploads_its_outputs_to_its_ended_run_over_http(
    ctx: Context, tmp_path: Path
) -> None:
    """What a Ray worker does (``upload_outputs``): over the REST API, auth on, with the job's
    own token, to the run the job already finished - the same files, checks and notes as the
    local executor's ``collect_outputs``; another run does not take them after its end."""
    with warnings.catch_warnings():  # Starlette asks for httpx2; plain httpx works the same
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
        from fastapi.testclient import TestClient

    from shipyard.security import principals
    from shipyard.server.app import create_app

    principals.create_project(ctx, name="alpha")
    own = runs.create_run(ctx, project="alpha", name="job-run")
    sibling = runs.create_run(ctx, project="alpha")
    for run in (own, sibling):
        runs.finish_run(ctx, run_id=run.id)
    secret = principals.issue_job_token(ctx, job_id="j1", project="alpha", run_id=own.id)
    root = workdir(tmp_path)
    outside = tmp_path / "secret.txt"
    outside.write_text("do not read")
    (root / "leak.txt").symlink_to(outside)
    os.link(outside, root / "hard.txt")
    declared = ["model.pt", "ckpt", "leak.txt", "hard.txt", "gone.pt"]
    app = create_app(ctx.settings, auth=True, scheduler=False)
    with TestClient(app) as http:
        report = upload_outputs(
            server_url="http://testserver",
            token=secret,
            project="alpha",
            run_id=own.id,
            workdir=root,
            declared=declared,
            code_files={"train.py"},
            transport=http._transport,
        )
        refused = upload_outputs(
            server_url="http://testserver",
            token=secret,
            project="alpha",
            run_id=sibling.id,
            workdir=root,
            declared=["model.pt"],
            code_files={"train.py"},
            transport=http._transport,
        )
    assert report.stored == ["model.pt", "ckpt/a.bin", "ckpt/sub/b.bin"]
    assert artifacts(ctx, own.id) == {"model.pt": 700, "ckpt/a.bin": 1, "ckpt/sub/b.bin": 1}
    stored = runs.get_artifact(ctx, run_id=own.id, path="model.pt")
    assert ctx.blobs.get_bytes(stored.digest) == b"weights" * 100
    assert report.missing == ["gone.pt"] and report.kept_in is None
    assert [p.split(":")[0] for p in report.problems] == ["leak.txt", "hard.txt"]
    # the very notes of the local executor, for the same folder and run
    local = collect_outputs(
        ctx,
        job_id="j1",
        project="alpha",
        run_id=own.id,
        workdir=root,
        declared=declared,
        code_files={"train.py"},
        discarded=True,
    )
    assert report.lines() == local.lines()
    assert refused.stored == [] and "only that job's token" in refused.problems[0]
    assert artifacts(ctx, sibling.id) == {}


def test_an_unreachable_server_is_named_once_and_nothing_is_sent(
    ctx: Context, tmp_path: Path
) -> None:
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    report = upload_outputs(
        server_url=url,
        token="shp_unused",
        project="p",
        run_id="r1",
        workdir=workdir(tmp_path),
        declared=["model.pt", "ckpt", "gone.pt"],
        code_files={"train.py"},
    )
    assert report.stored == [] and report.missing == ["gone.pt"]
    (problem,) = report.problems
    assert problem.startswith("model.pt, ckpt/a.bin, ckpt/sub/b.bin: ") and url in problem
    assert (
        f"shipyard: declared output not stored: model.pt, ckpt/a.bin, ckpt/sub/b.bin: the "
        f"shipyard server at {url} cannot be reached" in "\n".join(report.lines())
    )
