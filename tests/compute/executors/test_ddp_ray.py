"""PyTorch DDP (gloo, CPU) on 2 workers on the Ray cluster (tests/compute/executors/conftest.py):
``python ddp_train.py out --print-weights`` submitted as a gang through the job service, with the
served admission pipeline driven as in test_contract.py. The job's folder is a temp folder on the
node, so each rank prints its result (weights included) as a ``DDP_WEIGHTS`` line and the test
reads them from the job's log. The ranks must end with identical weights that moved from where
they started, equal (to float rounding) to one local process training on the same global batches.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shipyard import wiring
from shipyard.compute import admission, jobs
from shipyard.context import open_context
from shipyard.domain.models import JobSpec, Resources
from shipyard.settings import Settings
from shipyard.store.engine import forget_database
from tests.conftest import wait_for
from tests.job_user import job_command

pytest.importorskip("torch")
pytest.importorskip("ray")

SCRIPT = Path(__file__).parents[1] / "ddp_train.py"
SERVER_URL = "http://127.0.0.1:1"  # served: nothing steps inline, the test drives admission
MARK = "DDP_WEIGHTS "
TOLERANCE = 1e-6
TORCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


@pytest.mark.slow
def test_two_ranks_on_ray_end_with_the_same_weights_as_one_process(
    tmp_path: Path, ray_executor: Any
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy(SCRIPT, code / "ddp_train.py")
    settings = Settings(
        home=tmp_path / "home",
        executor=ray_executor.url,
        cpus=4,
        memory_mb=8000,
        server_url=SERVER_URL,
    )
    ctx = open_context(settings, actor="tester")
    command, extra = job_command("ddp_train.py", "out", "--print-weights")
    spec = JobSpec(
        command=command,
        env=extra,
        resources=Resources(cpus=1, memory_mb=1024, gpus=0),
        workers=2,
        name="ddp-ray",
    )
    job_id = jobs.submit_job(ctx, project="p", spec=spec, code_dir=code).id
    # the single-process reference, here, side by side with the gang (torch's import dominates)
    env = {k: v for k, v in os.environ.items() if k not in TORCH_VARIABLES}
    single_out = tmp_path / "one"
    single = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(single_out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def ended() -> Any:
            admission.step(ctx)
            job = jobs.get_job(ctx, job_id=job_id)
            return job if job.status.finished else None

        job = wait_for(ended, timeout=90, interval=0.2, what="the DDP gang on Ray to end")
        log = jobs.read_logs(ctx, job_id=job_id, limit=1_000_000)[0].decode()
        assert job.status.value == "succeeded", f"{job.message}\n{log}"
        assert job.spec.workers == 2 and job.executor == "ray"
        assert len({w["node_id"] for w in job.placement}) == 1
    finally:
        if not jobs.get_job(ctx, job_id=job_id).status.finished:
            jobs.cancel_job(ctx, job_id=job_id)
        wiring.close_executors()
        forget_database(settings.database_url)
        try:
            shown, _ = single.communicate(timeout=60)
        finally:
            if single.poll() is None:
                single.kill()
                single.wait()

    assert single.returncode == 0, shown
    reference = json.loads((single_out / "rank0.json").read_text())

    ranks: dict[int, dict] = {}
    for line in log.splitlines():
        prefix, _, rest = line.partition("] ")
        if rest.startswith(MARK):  # "[rank N] DDP_WEIGHTS {...}"
            found = json.loads(rest[len(MARK) :])
            assert prefix == f"[rank {found['rank']}", line[:80]
            ranks[found["rank"]] = found
    assert sorted(ranks) == [0, 1], log[-2000:]
    first, second = ranks[0], ranks[1]
    assert first["world_size"] == second["world_size"] == 2
    # every rank holds exactly the same weights (the averaged gradients are the same everywhere)
    assert first["sha256"] == second["sha256"]
    assert first["weights"] == second["weights"]
    # ...they moved from where they started (the same start as the single process's)...
    assert first["sha256"] != first["initial_sha256"] == reference["initial_sha256"]
    # ...and they are what one process gets on the whole global batch (up to float rounding)
    diff = max(abs(a - b) for a, b in zip(first["weights"], reference["weights"], strict=True))
    assert diff < TOLERANCE, diff
    assert abs(first["loss"] - reference["loss"]) < TOLERANCE
    assert "[rank 0] rank 0 of 2: loss" in log and "[rank 1] rank 1 of 2: loss" in log
