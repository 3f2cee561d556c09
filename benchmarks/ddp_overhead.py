"""Distributed overhead: a fixed-work DDP job (2 ranks, gloo, CPU) through shipyard vs torchrun.

The job is ``tests/compute/ddp_train.py`` (an MLP trained with DistributedDataParallel on
generated data): ``--steps`` steps of a ``--batch`` global batch, the first ``--warmup`` of them
not timed. The script measures its own throughput (samples/s of the global batch, rank 0, from a
barrier after the warm-up to a barrier at the end), so process start-up, torch's import and the
rendezvous are excluded on both sides: what is compared is the training itself, under

- **shipyard**: ``shipyard run --workers 2 --cpus 1 -- python ddp_train.py ...`` in a fresh
  embedded home (the local executor: code snapshot, gang admission, rank environment, per-worker
  limits, the prefixed log streamed back by the CLI). Until the executor runs gangs, the
  shipyard side falls back to ``shipyard.compute.workers.Gang`` + ``rank_env`` directly (the
  code the executor runs the workers with) and the JSON says so (``shipyard_mode``);
- **torchrun**: ``torchrun --standalone --nproc-per-node 2 ddp_train.py ...``.

Rounds alternate (shipyard, torchrun, shipyard, ...), so drifting machine load hits both; the
figure is the ratio of the medians (target >= 0.98).

Run: ``.venv/bin/python benchmarks/ddp_overhead.py [--quick] [--rounds N] [--mode auto|cli|gang]
[--out FILE]`` or ``benchmarks/run.py --only ddp``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO_ROOT, child_env, loadavg, machine, progress, ratio, write_result

NAME = "ddp_overhead"
SCRIPT = REPO_ROOT / "tests" / "compute" / "ddp_train.py"
WORKERS = 2
TARGET = 0.98
MARK = "DDP_RESULT "
TORCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per side (default 5)")
    parser.add_argument("--mode", choices=("auto", "cli", "sdk", "gang"), default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    workload = (
        {"steps": 80, "warmup": 10, "batch": 512, "hidden": 512}
        if args.quick
        else {"steps": 800, "warmup": 50, "batch": 512, "hidden": 512}
    )
    try:
        import torch  # noqa: F401 - only to know it is there
    except ImportError:
        result = {"benchmark": NAME, "headline": [{"name": "ratio", "skipped": "no torch"}]}
        write_result(NAME, result, args.out)
        return 0
    info = machine()  # before the rounds: the load they start under
    mode, why = _choose_mode(args.mode)
    progress(f"shipyard side: {mode} ({why})")
    samples: dict[str, list[float]] = {"shipyard": [], "torchrun": []}
    per_cpu: dict[str, list[float]] = {"shipyard": [], "torchrun": []}
    wall: dict[str, list[float]] = {"shipyard": [], "torchrun": []}
    with tempfile.TemporaryDirectory(prefix="shipyard-ddp-bench-") as tmp:
        root = Path(tmp)
        code = root / "code"
        code.mkdir()
        shutil.copy(SCRIPT, code / "ddp_train.py")
        for index in range(rounds):
            for side in ("shipyard", "torchrun"):
                started = time.perf_counter()
                if side == "torchrun":
                    result = _torchrun(code, root / f"torchrun-{index}", workload)
                elif mode == "cli":
                    result = _shipyard_cli(code, root / f"home-{index}", workload)
                elif mode == "sdk":
                    result = _shipyard_sdk(code, root / f"home-{index}", workload)
                else:
                    result = _shipyard_gang(code, root / f"gang-{index}", workload)
                seconds = time.perf_counter() - started
                samples[side].append(result["samples_per_s"])
                per_cpu[side].append(result.get("samples_per_cpu_s", 0.0))
                wall[side].append(seconds)
                progress(
                    f"round {index + 1}/{rounds} {side}: {result['samples_per_s']:,.0f} "
                    f"samples/s (wall {seconds:.1f} s)"
                )
    medians = {side: statistics.median(values) for side, values in samples.items()}
    overhead = ratio(medians["shipyard"], medians["torchrun"])
    # each shipyard round against the torchrun round right after it (the same load, roughly)
    pairs = [a / b for a, b in zip(samples["shipyard"], samples["torchrun"], strict=True) if b > 0]
    cpu_medians = {side: statistics.median(values) for side, values in per_cpu.items()}
    result = {
        "benchmark": NAME,
        "quick": args.quick,
        "workload": {**workload, "workers": WORKERS, "backend": "gloo", "device": "cpu"},
        "shipyard_mode": mode,
        "shipyard_mode_reason": why,
        "rounds": rounds,
        "samples_per_s": samples,
        "wall_s_per_round": {k: [round(v, 2) for v in vs] for k, vs in wall.items()},
        "median_samples_per_s": {k: round(v, 1) for k, v in medians.items()},
        "ratio": overhead,
        "median_pair_ratio": round(statistics.median(pairs), 3) if pairs else None,
        "samples_per_cpu_s": per_cpu,
        "cpu_ratio": ratio(cpu_medians["shipyard"], cpu_medians["torchrun"]),
        "target": TARGET,
        "meets_target": overhead is not None and overhead >= TARGET,
        "ratio_definition": "median samples/s under shipyard / median samples/s under torchrun "
        "(>= 1: shipyard is as fast); measured inside the script, start-up excluded",
        "machine": info,
        "loadavg_after": loadavg(),
        "headline": [
            {
                "name": f"shipyard ({mode})",
                "value": round(medians["shipyard"], 1),
                "unit": "samples/s",
                "detail": f"median of {rounds}",
            },
            {
                "name": "torchrun",
                "value": round(medians["torchrun"], 1),
                "unit": "samples/s",
                "detail": f"median of {rounds}",
            },
            {
                "name": "ratio shipyard/torchrun",
                "value": overhead,
                "unit": "x",
                "detail": f"target >= {TARGET}",
            },
            {
                "name": "ratio per CPU-second",
                "value": ratio(cpu_medians["shipyard"], cpu_medians["torchrun"]),
                "unit": "x",
                "detail": "samples per CPU-second of rank 0 (load-insensitive)",
            },
        ],
        "caveats": [
            "Wall-clock throughput on a shared machine; rounds alternate so that load drift hits "
            "both sides, and the medians are compared.",
            "Both sides set OMP_NUM_THREADS=1 for the 2 workers (torchrun's default, which "
            "shipyard's rank_env follows).",
            "shipyard runs each worker under its CPU reservation (--cpus 1: affinity/cgroup "
            "where available); torchrun's workers are unconstrained.",
        ],
    }
    write_result(NAME, result, args.out)
    return 0


def _choose_mode(wanted: str) -> tuple[str, str]:
    if wanted == "gang":
        return "gang", "asked for (--mode gang)"
    if wanted == "sdk":
        return "sdk", _SDK
    help_text = subprocess.run(
        [sys.executable, "-m", "shipyard.cli.main", "run", "--help"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    if "--workers" in help_text:
        return "cli", "shipyard run --workers 2 on the local executor (embedded home)"
    if wanted == "cli":
        raise SystemExit("--mode cli: this shipyard's `run` has no --workers option yet")
    from shipyard.domain.models import JobSpec

    if "workers" in JobSpec.model_fields:
        return "sdk", "fallback: `shipyard run` has no --workers option yet; " + _SDK
    return (
        "gang",
        "fallback: jobs have no workers yet, so the workers are started with "
        "shipyard.compute.workers.Gang + rank_env directly (what the executor will use)",
    )


_SDK = (
    "a job of 2 workers submitted with the SDK (JobSpec(workers=2)) to the local executor of an "
    "embedded home: the same path as `shipyard run --workers 2` but for the CLI's log follower"
)


def _args(workload: dict[str, int], out: str) -> list[str]:
    return [
        "ddp_train.py",
        out,
        *("--steps", str(workload["steps"]), "--warmup", str(workload["warmup"])),
        *("--batch", str(workload["batch"]), "--hidden", str(workload["hidden"])),
    ]


def _env(**extra: str) -> dict[str, str]:
    env = child_env(**extra)
    for key in (*TORCH_VARIABLES, "SHIPYARD_HOME", "SHIPYARD_EXECUTOR", "OMP_NUM_THREADS"):
        env.pop(key, None)
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _torchrun(code: Path, out: Path, workload: dict[str, int]) -> dict[str, Any]:
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun) if torchrun.exists() else "torchrun",
        "--standalone",
        "--nproc-per-node",
        str(WORKERS),
        *_args(workload, str(out)),
    ]
    done = subprocess.run(
        command, cwd=code, env=_env(), capture_output=True, text=True, check=False
    )
    return _parse(done.stdout, done.returncode, done.stderr, "torchrun")


def _shipyard_cli(code: Path, home: Path, workload: dict[str, int]) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "shipyard.cli.main",
        "run",
        "--workers",
        str(WORKERS),
        "--cpus",
        "1",
        "--memory",
        "1024",
        "--name",
        "ddp-bench",
        "--",
        sys.executable,
        *_args(workload, "out"),
    ]
    home.mkdir(parents=True)
    done = subprocess.run(
        command,
        cwd=code,
        env=_env(SHIPYARD_HOME=str(home)),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return _parse(done.stdout, done.returncode, done.stderr, "shipyard run")
    # The CLI's console wraps long lines: read rank 0's file from the job's folder instead.
    (result,) = (home / "jobs").glob("*/code/out/rank0.json")
    found: dict[str, Any] = json.loads(result.read_text())
    found.pop("weights", None)
    return found


def _shipyard_sdk(code: Path, home: Path, workload: dict[str, int]) -> dict[str, Any]:
    """Submit in a child process (a fresh embedded home each round, like the CLI would)."""
    home.mkdir(parents=True)
    program = f"""
import sys, time
from shipyard.client.client import Client
from shipyard.domain.models import JobSpec, Resources
from shipyard.settings import Settings
client = Client(settings=Settings.from_env())
spec = JobSpec(command=[sys.executable, *{_args(workload, "out")!r}], workers={WORKERS},
               resources=Resources(cpus=1, memory_mb=1024), name="ddp-bench")
job = client.backend.submit_job(project="bench", spec=spec, code_dir=".")
while not (job := client.jobs.get(job.id, project="bench")).status.finished:
    time.sleep(0.1)
text, _, _ = client.jobs.logs(job.id, project="bench")
print(text)
sys.exit(0 if job.status.value == "succeeded" else 1)
"""
    done = subprocess.run(
        [sys.executable, "-c", program],
        cwd=code,
        env=_env(SHIPYARD_HOME=str(home)),
        capture_output=True,
        text=True,
        check=False,
    )
    return _parse(done.stdout, done.returncode, done.stderr, "shipyard job (SDK)")


def _shipyard_gang(code: Path, folder: Path, workload: dict[str, int]) -> dict[str, Any]:
    from shipyard.compute.policy.base import Placement, WorkerPlacement
    from shipyard.compute.workers import Gang, PrefixedLog, free_port, gang_layout, rank_env

    folder.mkdir(parents=True)
    placement = Placement(
        job_id="bench", workers=tuple(WorkerPlacement(node_id="local") for _ in range(WORKERS))
    )
    slots = gang_layout(placement)
    port = free_port()
    base = _env()
    envs = [
        {
            **base,
            **rank_env(
                slot,
                world_size=WORKERS,
                master_addr="127.0.0.1",
                master_port=port,
                job_id="bench",
                inherited=base,
            ),
        }
        for slot in slots
    ]
    log = PrefixedLog(folder / "output.log", prefix=True)
    gang = Gang(
        commands=[[sys.executable, *_args(workload, str(folder / "out"))]] * WORKERS,
        envs=envs,
        cwd=code,
        log=log,
        ranks=[slot.rank for slot in slots],
    )
    gang.start()
    outcome = gang.wait(timeout=600)
    if outcome is None:
        gang.stop(grace_s=5)
    log.close()
    text = (folder / "output.log").read_text(errors="replace")
    code_ = 0 if outcome is not None and outcome.ok else 1
    return _parse(text, code_, outcome.message if outcome else "timed out", "Gang")


def _parse(stdout: str, returncode: int, stderr: str, what: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        at = line.find(MARK)
        if at >= 0:
            # raw_decode: another rank's output may follow on the same line (torchrun's pipe)
            found: dict[str, Any] = json.JSONDecoder().raw_decode(line[at + len(MARK) :])[0]
            if returncode != 0:
                break
            if found.get("world_size") != WORKERS:
                raise SystemExit(f"{what}: the job ran with world size {found.get('world_size')}")
            return found
    tail = "\n".join((stdout + "\n" + stderr).splitlines()[-30:])
    raise SystemExit(f"{what} failed (exit status {returncode}):\n{tail}")


if __name__ == "__main__":
    os.environ.pop("SHIPYARD_HOME", None)
    sys.exit(main())
