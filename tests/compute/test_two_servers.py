"""Two admission pipelines in two processes on one PostgreSQL never admit or launch a job twice.

Each worker process runs ``compute.admission.step`` in a loop, as a server's background thread
does, against ``AppendingExecutor``: a real ``Executor`` subclass (registered only here) whose
``launch`` appends the job's id to one shared file and whose ``observe`` reports a job finished
a moment after its launch, so capacity frees and every job passes through admission. The node
holds two jobs at a time, so the two processes compete for every slot. Afterwards every job
must be SUCCEEDED and its id must be in the file exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from shipyard import wiring
from shipyard.compute import admission, jobs
from shipyard.compute.executors.base import (
    Executor,
    Launch,
    NodeInfo,
    Observation,
    StopReason,
)
from shipyard.compute.policy.base import Node
from shipyard.context import open_context
from shipyard.domain.models import JobSpec, JobStatus, Resources
from shipyard.settings import Settings
from shipyard.store.engine import forget_database
from tests.pg import create_database, drop_database

JOBS = 40
ENV_FILE = "APPENDING_EXECUTOR_FILE"
REPO = Path(__file__).resolve().parents[2]


class AppendingExecutor(Executor):
    """Launches nothing: appends each launched job id to ``$APPENDING_EXECUTOR_FILE``."""

    name = "appending"

    def __init__(self, url: str, settings: Settings) -> None:
        self.path = os.environ[ENV_FILE]

    def nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node=Node(id="only", cpus=2.0, memory_mb=4096))]

    def launch(self, ctx: Any, launch: Launch) -> dict[str, Any]:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{launch.job_id} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
        return {"pid": os.getpid(), "at": time.time()}

    def observe(self, ctx: Any, refs: Mapping[str, Mapping[str, Any]]) -> dict[str, Observation]:
        now = time.time()
        return {
            job_id: Observation(
                job_id=job_id,
                state="finished",
                status=JobStatus.SUCCEEDED,
                exit_code=0,
                message="exited with code 0",
            )
            for job_id, ref in refs.items()
            if now - float(ref.get("at", now)) > 0.02
        }

    def stop(
        self, ctx: Any, job_id: str, ref: Mapping[str, Any], *, reason: StopReason, grace_s: float
    ) -> None:
        pass

    def read_logs(
        self, ctx: Any, job_id: str, ref: Mapping[str, Any] | None, *, offset: int, limit: int
    ) -> tuple[bytes, int]:
        return b"", 0


WORKER = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
from shipyard import wiring
wiring.EXECUTORS["appending"] = "tests.compute.test_two_servers:AppendingExecutor"
from shipyard.compute import admission
from shipyard.context import open_context
from shipyard.settings import Settings
from sqlalchemy import func, select
from shipyard.store.tables import JobRow

ctx = open_context(Settings.from_env(), actor="system:scheduler")
go = {go!r}
while not os.path.exists(go):
    time.sleep(0.01)
steps, deadline = 0, time.monotonic() + 60
while time.monotonic() < deadline:
    admission.step(ctx)
    steps += 1
    with ctx.db.read() as s:
        left = s.scalar(select(func.count()).select_from(JobRow).where(
            JobRow.status.in_(["queued", "running"])))
        total = s.scalar(select(func.count()).select_from(JobRow))
    if total >= {jobs} and left == 0:
        break
print(json.dumps({{"steps": steps}}))
"""


@pytest.mark.slow
def test_two_pipelines_on_one_postgresql_launch_every_job_exactly_once(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = create_database(postgres_url)
    launched, go = tmp_path / "launched", tmp_path / "go"
    monkeypatch.setenv(ENV_FILE, str(launched))
    monkeypatch.setitem(wiring.EXECUTORS, "appending", f"{__name__}:AppendingExecutor")
    settings = Settings(
        home=tmp_path / "home", db_url=url, executor="appending", server_url="http://127.0.0.1:1"
    )
    ctx = open_context(settings, actor="tester")  # migrates before the workers open it
    env = {
        **os.environ,
        "SHIPYARD_HOME": str(settings.home),
        "SHIPYARD_DB": url,
        "SHIPYARD_EXECUTOR": "appending",
        "SHIPYARD_SERVER_URL": "http://127.0.0.1:1",
        ENV_FILE: str(launched),
    }
    script = WORKER.format(repo=str(REPO), go=str(go), jobs=JOBS)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    admission.background(True)  # submit as a server's request does: queue, wake, return
    try:
        ids = [
            jobs.submit_job(
                ctx, project="p", spec=JobSpec(command=[sys.executable], resources=Resources())
            ).id
            for _ in range(JOBS)
        ]
        go.touch()
        outputs = []
        for worker in workers:
            out, err = worker.communicate(timeout=90)
            assert worker.returncode == 0, err
            outputs.append(json.loads(out.strip().splitlines()[-1]))
        statuses = Counter(jobs.get_job(ctx, job_id=job_id).status for job_id in ids)
        assert statuses == {JobStatus.SUCCEEDED: JOBS}
        lines = launched.read_text().split("\n")
        counts = Counter(line.split()[0] for line in lines if line)
        assert set(counts) == set(ids)
        assert max(counts.values()) == 1, [j for j, n in counts.items() if n > 1]
        by_process = Counter(line.split()[1] for line in lines if line)
        print(f"launches per process: {dict(by_process)}; steps: {outputs}")
    finally:
        admission.background(False)
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        wiring.close_executors()
        forget_database(url)
        drop_database(url)
