"""The whole journey the README promises, on a fresh embedded home: data -> job -> run ->
model -> endpoint -> predictions, through the same code ``shipyard demo`` runs."""

from __future__ import annotations

from pathlib import Path

import httpx
import psutil
import pytest

from shipyard.client import Client
from shipyard.demo.lifecycle import Reporter, run_demo
from shipyard.domain.models import DeploymentStatus, JobStatus, RunStatus
from shipyard.security import audit
from shipyard.settings import Settings


class Recorder(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def step(self, title: str) -> None:
        self.lines.append(f"== {title}")

    def info(self, text: str) -> None:
        self.lines.append(text)

    def log_line(self, text: str) -> None:
        self.lines.append(f"| {text}")


@pytest.mark.slow
def test_demo_runs_the_whole_lifecycle(tmp_path: Path) -> None:
    client = Client(settings=Settings(home=tmp_path / "home"))
    rec = Recorder()
    result = run_demo(client, workdir=tmp_path / "work", reporter=rec, epochs=25)

    # data: a real dataset version with a profile and passing validation
    assert result.dataset.version == 1 and result.dataset.file_count == 2
    rows = {t.path: t.rows for t in result.dataset.profile.tables}
    assert rows["train.parquet"] + rows["test.parquet"] == 1797  # all of sklearn's digits
    assert all(check.passed for check in result.dataset.validation)

    # training: a job that ran as a subprocess, metered, with its run tracked per epoch
    assert result.job.status == JobStatus.SUCCEEDED and result.job.exit_code == 0
    assert result.job.usage.wall_seconds > 0 and result.job.usage.peak_memory_mb > 50
    assert result.run.status == RunStatus.FINISHED and result.run.job_id == result.job.id
    history = client.backend.metric_history(result.run.id, key="val_accuracy")
    assert [p.step for p in history] == list(range(25))
    assert any(line.startswith("| epoch") for line in rec.lines)  # logs streamed while running

    # registry: ONNX with its signature, production alias, lineage dataset -> run -> model
    assert result.model.format == "onnx" and result.model.aliases == ["production"]
    assert [(t.name, t.shape) for t in result.model.signature.inputs] == [("input", [-1, 64])]
    assert result.model.source_run_id == result.run.id
    assert result.model.metrics["val_accuracy"] > 0.9
    edges = {
        (e.source_kind, e.target_kind) for e in client.backend.lineage(kind="run", id=result.run.id)
    }
    assert edges == {("dataset_version", "run"), ("run", "model_version")}

    # serving: real HTTP predictions, good accuracy, and the endpoint stopped afterwards
    assert result.accuracy >= 0.9
    assert result.requests == rows["test.parquet"]
    assert 0 < result.p50_ms <= result.p99_ms
    assert result.stopped
    deployment = client.deployments.get("digits")
    assert deployment.status == DeploymentStatus.STOPPED
    assert result.deployment.pid is not None and not psutil.pid_exists(result.deployment.pid)
    assert result.deployment.url is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{result.deployment.url}/v2/health/ready", timeout=2)

    # governance: every step left an audit event in an unbroken chain
    ctx = client.backend.ctx  # type: ignore[attr-defined]
    with ctx.db.read() as s:
        assert audit.verify_chain(s) is None
        actions = {e.action for e in audit.list_events(s, limit=1000)}
    assert {
        "dataset.commit",
        "job.submit",
        "model.register",
        "model.alias.set",
        "deployment.create",
        "deployment.stop",
    } <= actions

    # a second demo on the same home reuses the dataset version and adds a model version
    again = run_demo(client, workdir=tmp_path / "work", reporter=Recorder(), epochs=25)
    assert again.dataset.version == 1 and again.model.version == 2
    assert again.accuracy >= 0.9
