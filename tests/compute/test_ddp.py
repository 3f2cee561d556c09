"""PyTorch DDP (gloo, CPU) on 2 workers: started by our Gang directly, and by ``shipyard run
--workers 2`` on the local executor. The ranks must end with identical weights, equal (to float
rounding) to one process training on the same global batches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shipyard.compute.policy.base import Placement, WorkerPlacement
from shipyard.compute.workers import Gang, PrefixedLog, free_port, gang_layout, rank_env
from tests.conftest import wait_for

pytest.importorskip("torch")

SCRIPT = Path(__file__).with_name("ddp_train.py")
PY = sys.executable
TOLERANCE = 1e-6
TORCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


def clean_env() -> dict[str, str]:
    """Our environment without any torchrun variables it might carry."""
    env = {k: v for k, v in os.environ.items() if k not in TORCH_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_gang(tmp_path: Path, workers: int, out: Path) -> tuple[Gang, PrefixedLog]:
    placement = Placement(
        job_id="ddp", workers=tuple(WorkerPlacement(node_id="local") for _ in range(workers))
    )
    slots = gang_layout(placement)
    port = free_port()
    envs = [
        {
            **clean_env(),
            **rank_env(
                slot, world_size=workers, master_addr="127.0.0.1", master_port=port, job_id="ddp"
            ),
        }
        for slot in slots
    ]
    log = PrefixedLog(tmp_path / f"ddp-{workers}.log", prefix=workers > 1)
    gang = Gang(
        commands=[[PY, str(SCRIPT), str(out)]] * workers,
        envs=envs,
        cwd=tmp_path,
        log=log,
        ranks=[slot.rank for slot in slots],
    )
    gang.start()
    return gang, log


def finish_gang(gang: Gang, log: PrefixedLog, out: Path) -> tuple[list[dict], str]:
    try:
        result = wait_for(gang.poll, timeout=90, what="the DDP workers to finish")
    finally:
        gang.stop(grace_s=2)
        log.close()
    text = log.path.read_text()
    assert result.ok, f"{result.message}\n{text}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in gang.ranks], text


@pytest.mark.slow
def test_two_ranks_end_with_the_same_weights_as_one_process(tmp_path: Path) -> None:
    # both at once: torch's import dominates, and the two cores can share it
    two = start_gang(tmp_path, 2, tmp_path / "two")
    one = start_gang(tmp_path, 1, tmp_path / "one")
    ranks, log = finish_gang(*two, tmp_path / "two")
    (single,), _ = finish_gang(*one, tmp_path / "one")
    first, second = ranks
    assert first["world_size"] == second["world_size"] == 2
    # every rank holds exactly the same weights (the averaged gradients are the same everywhere)
    assert first["sha256"] == second["sha256"]
    assert first["weights"] == second["weights"]
    # ...they moved from where they started...
    assert first["sha256"] != first["initial_sha256"] == single["initial_sha256"]
    # ...and they are what one process gets on the whole global batch (up to float rounding:
    # the all-reduce sums in another order)
    diff = max(abs(a - b) for a, b in zip(first["weights"], single["weights"], strict=True))
    assert diff < TOLERANCE, diff
    assert abs(first["loss"] - single["loss"]) < TOLERANCE
    # both ranks' lines are in the one log, prefixed
    assert "[rank 0] rank 0 of 2: loss" in log and "[rank 1] rank 1 of 2: loss" in log


@pytest.mark.slow
def test_two_ranks_through_shipyard_run_workers(tmp_path: Path, home: Path) -> None:
    """``shipyard run --workers 2 --output out -- python ddp_train.py out`` on the local executor
    of an embedded home: the same result, every rank's lines prefixed in the log the CLI
    follows, and both ranks' files stored as artifacts of the job's run."""
    from shipyard.client.client import Client
    from shipyard.settings import Settings

    code = tmp_path / "code"
    code.mkdir()
    shutil.copy(SCRIPT, code / "ddp_train.py")
    env = {k: v for k, v in clean_env().items() if not k.startswith("SHIPYARD_")}
    env.update(SHIPYARD_HOME=str(home), COLUMNS="250")
    options = ["--workers", "2", "--memory", "1024", "--output", "out", "--name", "ddp"]
    done = subprocess.run(
        [PY, "-m", "shipyard.cli.main", "run", *options, "--", PY, "ddp_train.py", "out"],
        cwd=code,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    shown = done.stdout + done.stderr
    assert done.returncode == 0, shown
    assert "[rank 0] rank 0 of 2: loss" in done.stdout, shown
    assert "[rank 1] rank 1 of 2: loss" in done.stdout, shown
    assert "shipyard: stored 2 declared output files" in done.stdout, shown

    client = Client(settings=Settings(home=home))
    (job,) = client.jobs.list()
    assert job.status.value == "succeeded" and job.spec.workers == 2
    assert sorted(job.outputs) == ["out/rank0.json", "out/rank1.json"]
    assert job.run_id is not None
    stored = {a.path: a.digest for a in client.runs.get(job.run_id).artifacts}
    ranks = []
    for r in (0, 1):
        target = tmp_path / f"rank{r}.json"
        client.backend.download_blob(stored[f"out/rank{r}.json"], target, project=job.project)
        ranks.append(json.loads(target.read_text()))
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["sha256"] == ranks[1]["sha256"] != ranks[0]["initial_sha256"]
