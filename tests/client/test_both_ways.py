"""One scenario, run through the SDK against the embedded home and against a real server, must
give the same results (ids and timestamps aside)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import shipyard
from shipyard.client import Client, HttpBackend
from shipyard.demo.lifecycle import follow_job
from shipyard.domain.models import JobStatus, RunStatus
from shipyard.errors import InvalidInputError, NotFoundError, UnsafePathError
from shipyard.settings import Settings
from tests.conftest import LiveServer
from tests.job_user import job_command
from tests.onnx_models import linear_model


def _scenario(client: Client, workdir: Path) -> dict[str, Any]:
    data = workdir / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(7)
    pq.write_table(
        pa.table({"x": rng.standard_normal(100), "y": np.arange(100)}), data / "t.parquet"
    )
    (data / "notes.txt").write_text("hello")
    v1 = client.datasets.commit(data, name="ds", message="first")
    again = client.datasets.commit(data, name="ds")
    (data / "notes.txt").write_text("changed")
    v2 = client.datasets.commit(data, name="ds")
    table = client.datasets.read_table("ds", "t.parquet", 1)

    model_file = workdir / "m.onnx"
    model_file.write_bytes(linear_model(input_name="input", output_name="logits").data)
    client.backend.create_run(project="shared")  # a project that exists, but not run's
    with shipyard.init(project="default", client=client, params={"lr": 0.1}) as run:
        run.use_dataset("ds", 2)
        for step in range(50):
            run.log({"loss": 1 / (step + 1)}, step=step)
        mv = run.log_model(model_file, name="m")
    assert mv is not None
    client.models.set_alias("m", "production", mv.version)
    errors = []
    for bad in (
        lambda: client.datasets.get("nope"),
        lambda: client.models.get("m", "staging"),
        lambda: client.datasets.commit(data, name="../x"),
        # by id, but in another project: not found, as over the REST API's per-project paths
        lambda: client.runs.get(run.id, project="elsewhere"),
        lambda: client.runs.get(run.id, project="shared"),
    ):
        try:
            bad()
        except (NotFoundError, InvalidInputError, UnsafePathError) as exc:
            errors.append((type(exc).__name__, exc.field))
    got_run = client.runs.get(run.id)
    prod = client.models.get("m", "production")
    return {
        "versions": [v1.version, again.version, v2.version],
        "new_bytes_v2": v2.new_bytes,
        "files": [(f.path, f.digest, f.size) for f in client.datasets.files("ds", 2)],
        "profile": v1.profile.model_dump(),
        "validation": [c.model_dump() for c in v1.validation],
        "table_rows": table.num_rows,
        "run": (
            got_run.status.value,
            got_run.params,
            got_run.metrics,
            [(a.path, a.size) for a in got_run.artifacts],
        ),
        "history": [(p.step, p.value) for p in client.backend.metric_history(run.id, key="loss")],
        "model": (
            prod.version,
            prod.aliases,
            prod.signature.model_dump(),
            prod.metrics,
            prod.artifact_digest,
        ),
        "lineage": sorted(
            (e.source_kind, e.relation, e.target_kind)
            for e in client.backend.lineage(kind="run", id=run.id)
        ),
        "alias_history": [
            (e.alias, e.previous_version, e.version)
            for e in client.backend.alias_history(project="default", model="m")
        ],
        "errors": errors,
    }


@pytest.mark.slow
def test_embedded_and_server_give_the_same_results(tmp_path: Path, live_server: LiveServer) -> None:
    embedded = Client(settings=Settings(home=tmp_path / "embedded-home"))
    remote = Client(settings=Settings(home=tmp_path / "unused", url=live_server.url))
    assert isinstance(remote.backend, HttpBackend) and not embedded.is_remote
    local_result = _scenario(embedded, tmp_path / "a")
    remote_result = _scenario(remote, tmp_path / "b")
    assert local_result["versions"] == [1, 1, 2]
    assert local_result["errors"] == [
        ("NotFoundError", "name"),
        ("NotFoundError", "ref"),
        ("InvalidInputError", "name"),
        ("NotFoundError", "run_id"),
        ("NotFoundError", "run_id"),
    ]
    assert remote_result == local_result
    remote.close()


def _remote_job(remote: Client, workdir: Path) -> None:
    """``shipyard run`` against a server: the code travels as a blob, the job attaches its run."""
    code = workdir / "code"
    code.mkdir(parents=True)
    (code / "train.py").write_text(
        "import shipyard\n"
        "with shipyard.init() as run:\n"
        "    for i in range(5):\n"
        "        run.log({'loss': 1.0 / (i + 1)}, step=i)\n"
        "print('trained', run.id)\n"
    )
    run = remote.backend.create_run(project="default", name="remote-train")
    command, env = job_command("train.py")  # a server runs it as its job user
    job = remote.jobs.submit(command, code_dir=code, env=env, run_id=run.id)
    lines: list[str] = []
    done = follow_job(remote, job.id, on_line=lines.append, timeout=120)
    assert done.status == JobStatus.SUCCEEDED, (done.message, lines)
    assert f"trained {run.id}" in lines
    tracked = remote.runs.get(run.id)
    assert tracked.status == RunStatus.FINISHED and tracked.job_id == job.id
    assert tracked.metrics == {"loss": pytest.approx(0.2)}


@pytest.mark.slow
def test_remote_job_runs_uploaded_code_and_tracks_its_run(
    tmp_path: Path, live_server: LiveServer
) -> None:
    remote = Client(settings=Settings(home=tmp_path / "unused", url=live_server.url))
    _remote_job(remote, tmp_path)
    remote.close()


@pytest.mark.slow
def test_a_server_on_postgresql_gives_the_same_results(tmp_path: Path, postgres_url: str) -> None:
    """The team size: metadata in PostgreSQL, same answers as the embedded SQLite home."""
    from tests.pg import create_database, drop_database

    db_url = create_database(postgres_url)
    home = tmp_path / "pg-server-home"
    home.mkdir()
    server = LiveServer(home, env={"SHIPYARD_DB": db_url})
    try:
        remote = Client(settings=Settings(home=tmp_path / "unused", url=server.url))
        embedded = Client(settings=Settings(home=tmp_path / "embedded-home"))
        assert _scenario(remote, tmp_path / "b") == _scenario(embedded, tmp_path / "a")
        _remote_job(remote, tmp_path / "job")  # supervisor and job reach PostgreSQL too
        assert not (home / "shipyard.db").exists()  # nothing went to a SQLite file
        remote.close()
    finally:
        server.stop()
        drop_database(db_url)
