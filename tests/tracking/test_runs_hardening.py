"""Tracking never loses a point, and a run's record can be trusted (issue 5, items 3, 4, 12).

Service level, on a real SQLite home: non-finite values are stored and returned; a bad point is
rejected alone; runs whose heartbeat stops are marked crashed (and revive on a beat); a run's
job link is checked; a finished run's artifacts cannot change.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from shipyard.compute import jobs
from shipyard.context import Context
from shipyard.domain.models import JobSpec, MetricPoint, RunStatus
from shipyard.errors import InvalidInputError, InvalidStateError, NotFoundError
from shipyard.schemas import MetricPointIn
from shipyard.security import audit
from shipyard.store.tables import MetricRow, RunArtifactRow, RunRow, utcnow
from shipyard.tracking import runs

NAN, INF = math.nan, math.inf


def _point(key: Any, value: Any, step: Any = 0) -> MetricPointIn:
    return MetricPointIn.model_construct(key=key, value=value, step=step, timestamp=time.time())


# --- item 3: NaN and infinities ----------------------------------------------------------------


def test_nan_and_infinities_are_stored_and_returned(ctx: Context) -> None:
    run = runs.create_run(ctx, project="p")
    points = [
        MetricPoint(key="loss", value=v, step=i, timestamp=time.time())
        for i, v in enumerate([1.0, NAN, INF, -INF, 0.5])
    ]
    result = runs.log_batch(ctx, run_id=run.id, metrics=points)
    assert result.stored == 5 and result.rejected == []
    history = [p.value for p in runs.metric_history(ctx, run_id=run.id, key="loss")]
    assert history[0] == 1.0 and math.isnan(history[1]) and history[2:] == [INF, -INF, 0.5]
    runs.log_batch(ctx, run_id=run.id, metrics=[MetricPoint(key="d", value=NAN, timestamp=0.0)])
    latest = runs.get_run(ctx, run_id=run.id).metrics
    assert latest["loss"] == 0.5 and math.isnan(latest["d"])
    assert math.isnan(runs.list_runs(ctx, project="p")[0].metrics["d"])


def test_the_wire_spellings_of_non_finite_values_are_read(ctx: Context) -> None:
    run = runs.create_run(ctx, project="p")
    spelled = ["NaN", "Infinity", "-Infinity", "nan", "inf", "-inf"]
    result = runs.log_batch(
        ctx, run_id=run.id, metrics=[_point("x", v, i) for i, v in enumerate(spelled)]
    )
    assert result.stored == 6
    got = [p.value for p in runs.metric_history(ctx, run_id=run.id, key="x")]
    assert math.isnan(got[0]) and math.isnan(got[3])
    assert got[1:3] == [INF, -INF] and got[4:] == [INF, -INF]


def test_a_bad_point_is_rejected_alone_with_its_key_and_step(ctx: Context) -> None:
    run = runs.create_run(ctx, project="p")
    batch = [
        _point("ok", 1.0, 0),
        _point("text", "abc", 1),
        _point("flag", True, 2),
        _point("missing", None, 3),
        _point("", 1.0, 4),
        _point("neg", 1.0, -1),
        _point("huge", 1.0, 2**63),
        _point("big", 10**400, 5),
        _point("ok", 2.0, 6),
    ]
    result = runs.log_batch(ctx, run_id=run.id, metrics=batch)

    assert result.stored == 2
    named = {(r.key, r.step): r.reason for r in result.rejected}
    assert set(named) == {
        ("text", 1),
        ("flag", 2),
        ("missing", 3),
        ("", 4),
        ("neg", -1),
        ("huge", 2**63),
        ("big", 5),
    }
    assert "string" in named[("text", 1)] and "boolean" in named[("flag", 2)]
    assert "negative" in named[("neg", -1)] and "larger" in named[("huge", 2**63)]
    history = runs.metric_history(ctx, run_id=run.id, key="ok")
    assert [(p.step, p.value) for p in history] == [(0, 1.0), (6, 2.0)]
    with ctx.db.read() as s:
        assert len(s.scalars(select(MetricRow)).all()) == 2


def test_a_batch_over_the_bound_is_refused_whole_and_names_the_field(ctx: Context) -> None:
    run = runs.create_run(ctx, project="p")
    too_many = [_point("x", 1.0, i) for i in range(runs.MAX_BATCH + 1)]
    with pytest.raises(InvalidInputError, match="split") as info:
        runs.log_batch(ctx, run_id=run.id, metrics=too_many)
    assert info.value.field == "metrics"
    assert runs.metric_history(ctx, run_id=run.id, key="x") == []


# --- item 4: heartbeats and crashed runs -------------------------------------------------------


def _age_heartbeat(ctx: Context, run_id: str, seconds: float) -> None:
    """Set the run's last heartbeat ``seconds`` back, as a process that died that long ago."""
    with ctx.db.transaction() as s:
        s.execute(
            update(RunRow)
            .where(RunRow.id == run_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )


def test_a_run_whose_heartbeat_stopped_is_marked_crashed(ctx: Context) -> None:
    alive = runs.create_run(ctx, project="p")
    dead = runs.create_run(ctx, project="p")
    queued = runs.create_run(ctx, project="p")  # never beat: e.g. a queued job's run
    runs.heartbeat(ctx, run_id=alive.id)
    runs.log_batch(ctx, run_id=dead.id, metrics=[_point("x", 1.0)])  # a batch is a beat too
    assert runs.get_run(ctx, run_id=dead.id).heartbeat_at is not None
    _age_heartbeat(ctx, dead.id, 120)

    assert runs.mark_crashed_runs(ctx, grace_s=60) == [dead.id]

    assert runs.get_run(ctx, run_id=dead.id).status == RunStatus.CRASHED
    assert runs.get_run(ctx, run_id=alive.id).status == RunStatus.RUNNING
    assert runs.get_run(ctx, run_id=queued.id).status == RunStatus.RUNNING
    assert runs.mark_crashed_runs(ctx, grace_s=60) == []  # nothing left to do
    with ctx.db.read() as s:
        actions = [e.action for e in audit.list_events(s, limit=1000)]
        assert actions.count("run.crash") == 1
        assert audit.verify_chain(s) is None


def test_reads_in_the_embedded_home_sweep_with_the_configured_grace(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(runs.ENV_RUN_GRACE, "5")
    run = runs.create_run(ctx, project="p")
    runs.heartbeat(ctx, run_id=run.id)
    _age_heartbeat(ctx, run.id, 3)
    assert runs.get_run(ctx, run_id=run.id).status == RunStatus.RUNNING
    _age_heartbeat(ctx, run.id, 6)
    assert runs.get_run(ctx, run_id=run.id).status == RunStatus.CRASHED  # the read swept it


def test_a_crashed_run_revives_on_a_sign_of_life_and_can_be_finished(ctx: Context) -> None:
    run = runs.create_run(ctx, project="p")
    runs.heartbeat(ctx, run_id=run.id)
    _age_heartbeat(ctx, run.id, 120)
    runs.mark_crashed_runs(ctx, grace_s=60)

    # an outage longer than the grace: the process comes back and nothing it logs is refused
    assert runs.log_batch(ctx, run_id=run.id, metrics=[_point("x", 1.0)]).stored == 1
    assert runs.get_run(ctx, run_id=run.id).status == RunStatus.RUNNING
    _age_heartbeat(ctx, run.id, 120)
    runs.mark_crashed_runs(ctx, grace_s=60)
    assert runs.heartbeat(ctx, run_id=run.id) == RunStatus.RUNNING
    _age_heartbeat(ctx, run.id, 120)
    runs.mark_crashed_runs(ctx, grace_s=60)
    assert runs.finish_run(ctx, run_id=run.id, status=RunStatus.FAILED).status == RunStatus.FAILED
    with pytest.raises(InvalidStateError):
        runs.heartbeat(ctx, run_id=run.id)  # an ended run takes no beats


@pytest.mark.parametrize("raw", ["x", "0", "-1", "inf"])
def test_a_bad_grace_period_is_refused_naming_the_variable(raw: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        runs.parse_grace(raw)
    assert info.value.field == runs.ENV_RUN_GRACE


def test_crashed_is_not_a_status_a_caller_can_finish_with(ctx: Context) -> None:
    run = runs.create_run(ctx, project="p")
    with pytest.raises(InvalidInputError) as info:
        runs.finish_run(ctx, run_id=run.id, status=RunStatus.CRASHED)
    assert info.value.field == "status"
    assert runs.get_run(ctx, run_id=run.id).status == RunStatus.RUNNING


# --- item 12: the job link and immutable artifacts ---------------------------------------------


def test_a_runs_job_must_exist_in_the_same_project(ctx: Context) -> None:
    job = jobs.submit_job(ctx, project="p", spec=JobSpec(command=["true"]))
    other = jobs.submit_job(ctx, project="other", spec=JobSpec(command=["true"]))
    linked = runs.create_run(ctx, project="p", job_id=job.id)
    assert linked.job_id == job.id

    with pytest.raises(NotFoundError, match="does not exist in project") as info:
        runs.create_run(ctx, project="p", job_id="0123456789abcdef")
    assert info.value.field == "job_id"
    with pytest.raises(NotFoundError) as info:
        runs.create_run(ctx, project="other", job_id=job.id)  # a job of another project
    assert info.value.field == "job_id"
    with pytest.raises(InvalidInputError) as info:
        runs.create_run(ctx, project="p", job_id="../x")
    assert info.value.field == "job_id"
    # nothing else was created (but the runs every submit creates for its job)
    assert {r.id for r in runs.list_runs(ctx)} == {linked.id, job.run_id, other.run_id}
    jobs.wait_job(ctx, job_id=job.id, timeout=60)


@pytest.mark.parametrize("status", [RunStatus.FINISHED, RunStatus.FAILED, RunStatus.KILLED])
def test_a_finished_runs_artifacts_are_immutable(ctx: Context, status: RunStatus) -> None:
    run = runs.create_run(ctx, project="p")
    weights = ctx.blobs.put_bytes(b"weights")
    forged = ctx.blobs.put_bytes(b"forged!")
    runs.log_artifact(ctx, run_id=run.id, path="m.onnx", digest=weights.digest, size=7)
    runs.finish_run(ctx, run_id=run.id, status=status)
    with ctx.db.read() as s:
        events_before = len(audit.list_events(s, limit=1000))

    for path in ("m.onnx", "new.bin"):  # neither overwritten nor added
        with pytest.raises(InvalidStateError, match=status.value) as info:
            runs.log_artifact(ctx, run_id=run.id, path=path, digest=forged.digest, size=7)
        assert info.value.field == "run_id"

    assert runs.get_run(ctx, run_id=run.id).artifacts[0].digest == weights.digest
    with ctx.db.read() as s:
        assert len(s.scalars(select(RunArtifactRow)).all()) == 1
        assert len(audit.list_events(s, limit=1000)) == events_before
