from __future__ import annotations

import time

import pytest

from shipyard.context import Context
from shipyard.domain.models import LogBatchResult, MetricPoint, RunStatus
from shipyard.errors import InvalidInputError, InvalidStateError, NotFoundError, UnsafePathError
from shipyard.security import audit
from shipyard.tracking import runs
from tests.domain.cases import UNSAFE_PATHS


def _points(key: str, values: list[float]) -> list[MetricPoint]:
    now = time.time()
    return [MetricPoint(key=key, value=v, step=i, timestamp=now) for i, v in enumerate(values)]


def test_run_lifecycle_params_metrics_latest(ctx: Context) -> None:
    run = runs.create_run(ctx, project="p1", name="first", params={"lr": 0.1, "epochs": 3})
    assert run.status == RunStatus.RUNNING and run.params == {"lr": "0.1", "epochs": "3"}
    stored = runs.log_batch(
        ctx, run_id=run.id, metrics=_points("loss", [3.0, 2.0, 1.5]), tags={"team": "a"}
    )
    assert stored == LogBatchResult(stored=3)
    runs.log_batch(ctx, run_id=run.id, metrics=_points("acc", [0.5, 0.9]))
    got = runs.get_run(ctx, run_id=run.id)
    assert got.metrics == {"loss": 1.5, "acc": 0.9}
    assert got.tags == {"team": "a"}
    history = runs.metric_history(ctx, run_id=run.id, key="loss")
    assert [(p.step, p.value) for p in history] == [(0, 3.0), (1, 2.0), (2, 1.5)]
    done = runs.finish_run(ctx, run_id=run.id)
    assert done.status == RunStatus.FINISHED and done.finished_at is not None
    listed = runs.list_runs(ctx, project="p1")
    assert [r.id for r in listed] == [run.id] and listed[0].metrics["acc"] == 0.9


def test_latest_metric_is_highest_step_not_last_logged(ctx: Context) -> None:
    run = runs.create_run(ctx, project="p")
    now = time.time()
    runs.log_batch(
        ctx,
        run_id=run.id,
        metrics=[
            MetricPoint(key="m", value=9.0, step=5, timestamp=now),
            MetricPoint(key="m", value=1.0, step=2, timestamp=now),
        ],
    )
    assert runs.get_run(ctx, run_id=run.id).metrics == {"m": 9.0}


def test_params_are_write_once(ctx: Context) -> None:
    run = runs.create_run(ctx, project="p", params={"lr": "0.1"})
    runs.log_batch(ctx, run_id=run.id, params={"lr": "0.1", "bs": "32"})  # same value: fine
    with pytest.raises(InvalidInputError, match="lr") as info:
        runs.log_batch(ctx, run_id=run.id, params={"lr": "0.2"}, metrics=_points("x", [1.0]))
    assert info.value.field == "params"
    got = runs.get_run(ctx, run_id=run.id)
    assert got.params == {"lr": "0.1", "bs": "32"}
    assert got.metrics == {}  # the failed batch stored nothing


def test_finished_run_refuses_logging_and_refinish(ctx: Context) -> None:
    run = runs.create_run(ctx, project="p")
    runs.finish_run(ctx, run_id=run.id, status=RunStatus.FAILED)
    with pytest.raises(InvalidStateError):
        runs.log_batch(ctx, run_id=run.id, metrics=_points("x", [1.0]))
    with pytest.raises(InvalidStateError):
        runs.finish_run(ctx, run_id=run.id, status=RunStatus.FINISHED)
    assert runs.get_run(ctx, run_id=run.id).status == RunStatus.FAILED


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"params": {"k": "x" * 7000}}, "params"),
        ({"tags": {"bad\x00key": "v"}}, "tags"),
    ],
)
def test_bad_batches_are_rejected_whole(ctx: Context, kwargs: dict, field: str) -> None:
    run = runs.create_run(ctx, project="p")
    runs.log_batch(ctx, run_id=run.id, metrics=_points("ok", [1.0]))
    with pytest.raises(InvalidInputError) as info:
        runs.log_batch(ctx, run_id=run.id, **kwargs)
    assert info.value.field == field
    assert runs.get_run(ctx, run_id=run.id).metrics == {"ok": 1.0}


def test_unknown_run_and_bad_names(ctx: Context) -> None:
    with pytest.raises(NotFoundError, match="nope"):
        runs.get_run(ctx, run_id="nope")
    with pytest.raises(InvalidInputError) as info:
        runs.create_run(ctx, project="../etc")
    assert info.value.field == "project"
    with pytest.raises(InvalidInputError):
        runs.create_run(ctx, project="p", name="a/b")


@pytest.mark.parametrize(
    "path", [value for _, value in UNSAFE_PATHS], ids=[i for i, _ in UNSAFE_PATHS]
)
def test_artifact_paths_cannot_escape(ctx: Context, path: str) -> None:
    run = runs.create_run(ctx, project="p")
    blob = ctx.blobs.put_bytes(b"weights")
    with pytest.raises(UnsafePathError) as info:
        runs.log_artifact(ctx, run_id=run.id, path=path, digest=blob.digest, size=blob.size)
    assert info.value.field == "path"
    assert runs.get_run(ctx, run_id=run.id).artifacts == []


def test_artifact_must_exist_with_its_size(ctx: Context) -> None:
    run = runs.create_run(ctx, project="p")
    blob = ctx.blobs.put_bytes(b"weights")
    with pytest.raises(InvalidInputError, match="size"):
        runs.log_artifact(ctx, run_id=run.id, path="m.onnx", digest=blob.digest, size=3)
    with pytest.raises(NotFoundError):
        runs.log_artifact(ctx, run_id=run.id, path="m.onnx", digest="0" * 64, size=7)
    art = runs.log_artifact(ctx, run_id=run.id, path="models/m.onnx", digest=blob.digest, size=7)
    assert runs.get_run(ctx, run_id=run.id).artifacts == [art]


def test_every_mutation_is_audited_in_a_valid_chain(ctx: Context) -> None:
    run = runs.create_run(ctx, project="p")
    runs.finish_run(ctx, run_id=run.id)
    with ctx.db.read() as s:
        events = audit.list_events(s)
        assert [e.action for e in events] == ["run.create", "run.finish"]
        assert all(e.actor == "tester" for e in events)
        assert audit.verify_chain(s) is None
