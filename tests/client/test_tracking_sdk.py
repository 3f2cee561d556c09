from __future__ import annotations

from pathlib import Path

import pytest

import shipyard
from shipyard.client import Client, LocalBackend
from shipyard.client.tracking import ActiveRun
from shipyard.context import Context
from shipyard.domain.models import LogBatchResult, MetricPoint, RunStatus
from shipyard.errors import InvalidInputError, InvalidStateError, NotFoundError
from tests.onnx_models import linear_model


class CountingBackend(LocalBackend):
    """The real embedded backend, counting round-trips of log_batch."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.batches: list[int] = []

    def log_batch(
        self, run_id: str, *, metrics: list[MetricPoint], params=None, tags=None, project=None
    ) -> LogBatchResult:
        if metrics:
            self.batches.append(len(metrics))
        return super().log_batch(run_id, metrics=metrics, params=params, tags=tags, project=project)


def _client(ctx: Context) -> tuple[Client, CountingBackend]:
    backend = CountingBackend(ctx)
    return Client(settings=ctx.settings, backend=backend), backend


def test_logging_is_batched_not_one_round_trip_per_call(ctx: Context) -> None:
    client, backend = _client(ctx)
    with shipyard.init(project="p", client=client, flush_interval=60) as run:
        for step in range(3000):
            run.log({"loss": 1.0 / (step + 1), "acc": step / 3000}, step=step)
    assert sum(backend.batches) == 6000
    assert len(backend.batches) <= 3, backend.batches  # 5000-point buffer + final flush
    stored = client.runs.get(run.id, project="p")
    assert stored.status == RunStatus.FINISHED
    assert stored.metrics == {"loss": pytest.approx(1 / 3000), "acc": pytest.approx(2999 / 3000)}
    assert len(backend.metric_history(run.id, key="loss")) == 3000


def test_background_flush_sends_without_finish(ctx: Context) -> None:
    client, backend = _client(ctx)
    run = shipyard.init(project="p", client=client, flush_interval=0.05)
    run.log({"x": 1.0})
    from tests.conftest import wait_for

    wait_for(lambda: backend.metric_history(run.id, key="x"), timeout=10, what="background flush")
    run.finish()


def test_default_steps_advance_and_params_tags(ctx: Context) -> None:
    client, _ = _client(ctx)
    with shipyard.init(project="p", client=client, params={"lr": 0.01}, tags={"t": 1}) as run:
        run.log({"a": 1.0})
        run.log({"a": 2.0})
        run.log({"a": 5.0}, step=10)
        run.log({"a": 6.0})
    history = client.backend.metric_history(run.id, key="a")
    assert [p.step for p in history] == [0, 1, 10, 11]
    got = client.runs.get(run.id, project="p")
    assert got.params == {"lr": "0.01"} and got.tags == {"t": "1"}


def test_exception_marks_run_failed_and_bad_values_raise(ctx: Context) -> None:
    client, _ = _client(ctx)
    with pytest.raises(RuntimeError), shipyard.init(project="p", client=client) as run:
        with pytest.raises(InvalidInputError, match="not a number"):
            run.log({"x": "abc"})  # type: ignore[dict-item]
        raise RuntimeError("boom")
    assert client.runs.get(run.id, project="p").status == RunStatus.FAILED
    with pytest.raises(InvalidStateError):
        run.log({"x": 1.0})


def test_background_error_surfaces_on_next_call(ctx: Context) -> None:
    client, _ = _client(ctx)
    run = shipyard.init(project="p", client=client, flush_interval=60)
    run.log_params({"lr": "0.1"})
    run._params["lr"] = "0.5"  # a conflicting param reaches the next send
    with pytest.raises(InvalidInputError, match="lr"):
        run.flush()
    run.finish()


def test_attaches_to_the_job_run_from_env(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    client, _ = _client(ctx)
    created = client.backend.create_run(project="p", name="from-job")
    monkeypatch.setenv("SHIPYARD_RUN_ID", created.id)
    with shipyard.init(client=client) as run:
        assert isinstance(run, ActiveRun) and run.id == created.id
        run.log({"m": 3.0})
    assert client.runs.get(created.id, project="p").metrics == {"m": 3.0}
    monkeypatch.setenv("SHIPYARD_RUN_ID", "missing")
    with pytest.raises(NotFoundError):
        shipyard.init(client=client)


def test_log_model_registers_version_with_lineage(ctx: Context, tmp_path: Path) -> None:
    client, _ = _client(ctx)
    model_bytes = linear_model(input_name="input", output_name="logits").data
    path = tmp_path / "m.onnx"
    path.write_bytes(model_bytes)
    with shipyard.init(project="p", client=client) as run:
        run.log({"val_accuracy": 0.93})
        mv = run.log_model(path, name="digits")
    assert mv is not None and mv.version == 1 and mv.metrics == {"val_accuracy": 0.93}
    edges = client.backend.lineage(kind="run", id=run.id)
    assert [(e.target_kind, e.target_id) for e in edges] == [("model_version", mv.id)]


def test_public_api_is_explicit() -> None:
    assert shipyard.__all__ == sorted(shipyard.__all__, key=lambda n: (n[0].islower(), n))
    for name in shipyard.__all__:
        assert getattr(shipyard, name) is not None
    with pytest.raises(AttributeError):
        _ = shipyard.not_a_thing  # type: ignore[attr-defined]
