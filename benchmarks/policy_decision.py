"""One scheduling decision of shipyard's default policy on a large cluster: p50/p99 latency.

Workload (fixed seed, so every run decides the same snapshot): 1,000 nodes x 8 GPUs (96 CPUs,
1 TB of memory each); about half of the GPUs held by running jobs (1, 2, 4 and 8-GPU jobs and a
few 2-node gangs; a third preemptible, priorities low/normal/high, some near their declared max
runtime); 10,000 pending jobs over 24 queues (8 with nominal quotas in 2 cohorts, 16 not
configured), of 1 to 8 GPUs per worker, 5% gangs of 2 to 4 workers, 4% fractional GPUs, 2%
CPU-only, 5% high priority, with and without max runtimes and attained service. ``--quick``:
the same shape at a tenth of the pending jobs and nodes.

Measured: ``DefaultPolicy().decide(snapshot)`` wall time, ``--repeat`` times after ``--warmup``
untimed calls (the policy keeps no state between calls, so every call does the whole work).
Also reported: what the decision did (admitted, preempted, waiting, reserved) so that a fast but
empty decision cannot pass unnoticed, and the same decision for DRF for comparison.

Run: ``.venv/bin/python benchmarks/policy_decision.py [--quick] [--repeat N] [--out FILE]``
(``benchmarks/run.py --only policy``).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import latency_summary, loadavg, machine, progress, write_result

from shipyard.compute.policy.base import (
    Demand,
    Gpu,
    Node,
    PendingJob,
    QueueConfig,
    Quota,
    RunningJob,
    Snapshot,
)
from shipyard.compute.policy.default import DefaultPolicy
from shipyard.compute.policy.drf import Drf
from shipyard.compute.policy.placement import FreeCapacity

NAME = "policy_decision"
TARGET_MS = 50.0


def build_snapshot(*, nodes: int, pending: int, seed: int = 6) -> Snapshot:
    rng = random.Random(seed)
    now = 1_000_000.0
    node_list = [
        Node(
            id=f"node-{i:04d}",
            cpus=96,
            memory_mb=1_000_000,
            gpus=tuple(
                Gpu(index=g, model="NVIDIA A100-SXM4-80GB", memory_mb=81_920) for g in range(8)
            ),
        )
        for i in range(nodes)
    ]
    ids = [n.id for n in node_list]
    queues: dict[str, QueueConfig] = {}
    names = [f"team-{k:02d}" for k in range(24)]
    for k, name in enumerate(names[:8]):
        queues[name] = QueueConfig(
            name=name,
            nominal=Quota(gpus=nodes * 8 / 16, cpus=nodes * 96 / 8),
            cohort="research" if k < 4 else "product",
            borrowing_limit=Quota(gpus=nodes * 8 / 8),
            weight=1.0 + (k % 3),
        )
    # Running: about half of the GPUs, scattered (every node partly busy, as after hours of
    # churn), so that placement has to search rather than take the first empty node.
    free = FreeCapacity.empty(node_list)
    running: list[RunningJob] = []
    target = nodes * 8 // 2
    held = 0
    j = 0
    while held < target:
        gpus = rng.choice([1, 1, 2, 2, 4, 8])
        workers = 2 if gpus == 8 and rng.random() < 0.2 else 1
        probe = PendingJob(
            id=f"run-{j}",
            queue=rng.choice(names),
            demand=Demand(cpus=gpus * 8, memory_mb=gpus * 64_000, gpus=gpus),
            workers=workers,
        )
        if workers == 1:
            exclude = rng.sample(ids, k=len(ids) - 1)  # one random node, if it has room
            placement = free.place(probe, exclude=exclude)
            if placement is None:
                continue
        else:
            placement = free.place(probe)
            if placement is None:
                break
        free.take(probe, placement)
        started = now - rng.uniform(60, 48 * 3600)
        runtime = rng.choice([None, 3600.0, 6 * 3600.0, 72 * 3600.0])
        running.append(
            RunningJob(
                id=probe.id,
                queue=probe.queue,
                demand=probe.demand,
                placement=placement,
                workers=workers,
                priority=rng.choice([-100, 0, 0, 0, 100]),
                submitted_at=started - rng.uniform(0, 3600),
                started_at=started,
                max_runtime_s=runtime,
                preemptible=rng.random() < 0.33,
                preemptions=rng.choice([0, 0, 0, 1, 3]),
                attained_gpu_s=(now - started) * gpus * workers,
                stopping=rng.random() < 0.01,
            )
        )
        held += gpus * workers
        j += 1
    pend: list[PendingJob] = []
    for i in range(pending):
        kind = rng.random()
        workers = 1
        gpus = rng.choice([1, 1, 1, 2, 2, 4, 8])
        fraction = 0.0
        if kind < 0.05:
            workers = rng.choice([2, 3, 4])
            gpus = rng.choice([4, 8])
        elif kind < 0.09:
            gpus, fraction = 0, rng.choice([0.25, 0.5])
        elif kind < 0.11:
            gpus = 0
        pend.append(
            PendingJob(
                id=f"job-{i}",
                queue=rng.choice(names),
                demand=Demand(
                    cpus=max(gpus, 1) * 8,
                    memory_mb=max(gpus, 1) * 64_000,
                    gpus=gpus,
                    gpu_fraction=fraction,
                    gpu_memory_mb=20_000 if fraction else 0,
                ),
                workers=workers,
                priority=100 if rng.random() < 0.05 else rng.choice([0, 0, 0, -100]),
                submitted_at=now - rng.uniform(0, 24 * 3600),
                max_runtime_s=rng.choice([None, 1800.0, 4 * 3600.0]),
                preemptible=rng.random() < 0.5,
                attained_gpu_s=rng.choice([0.0, 0.0, 0.0, 2 * 3600.0, 20 * 3600.0]),
            )
        )
    return Snapshot(now=now, nodes=node_list, queues=queues, pending=pend, running=running)


def measure(policy: Any, snapshot: Snapshot, *, warmup: int, repeat: int) -> dict[str, Any]:
    for _ in range(warmup):
        policy.decide(snapshot)
    times: list[float] = []
    cpu: list[float] = []
    decision = None
    gc.collect()
    for _ in range(repeat):
        started = time.perf_counter()
        cpu_started = time.process_time()
        decision = policy.decide(snapshot)
        cpu.append(time.process_time() - cpu_started)
        times.append(time.perf_counter() - started)
    assert decision is not None
    outcome = {
        "admitted": len(decision.admit),
        "preempted": len(decision.preempt),
        "waiting": len(decision.waiting),
        "unschedulable": len(decision.unschedulable),
        "reserved": len(decision.reserved),
    }
    accounted = sum(outcome[k] for k in ("admitted", "waiting", "unschedulable"))
    if accounted != len(snapshot.pending):
        raise SystemExit(
            f"{policy.name}: {accounted} of {len(snapshot.pending)} pending jobs accounted for"
        )
    return {
        "latency": latency_summary(times),
        # CPU time of this process: what the decision costs when other work shares the cores
        "cpu": latency_summary(cpu),
        "decision": outcome,
        "calls": repeat,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 pending jobs on 100 nodes")
    parser.add_argument("--repeat", type=int, help="timed decisions (default 50; quick 10)")
    parser.add_argument(
        "--out", type=Path, help="result file (default results/policy_decision.json)"
    )
    args = parser.parse_args(argv)
    nodes, pending = (100, 1_000) if args.quick else (1_000, 10_000)
    repeat = args.repeat or (10 if args.quick else 50)
    info = machine()
    progress(f"building the snapshot: {pending} pending jobs on {nodes} nodes x 8 GPUs")
    snapshot = build_snapshot(nodes=nodes, pending=pending)
    busy = sum(len(w.gpus) for r in snapshot.running for w in r.placement.workers)
    variants: dict[str, Any] = {}
    for policy in (DefaultPolicy(), Drf()):
        progress(f"{policy.name}: {repeat} decisions")
        variants[policy.name] = measure(policy, snapshot, warmup=2, repeat=repeat)
        lat = variants[policy.name]["latency"]
        cpu = variants[policy.name]["cpu"]
        progress(
            f"{policy.name}: wall p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms; "
            f"CPU p50 {cpu['p50_ms']} ms, p99 {cpu['p99_ms']} ms"
        )
    default = variants["default"]["latency"]
    result = {
        "name": NAME,
        "workload": {
            "nodes": nodes,
            "gpus_per_node": 8,
            "pending_jobs": pending,
            "running_jobs": len(snapshot.running),
            "gpus_busy": busy,
            "queues": len({j.queue for j in snapshot.pending}),
            "configured_queues": len(snapshot.queues),
            "repeat": repeat,
            "quick": args.quick,
        },
        "machine": info,
        "variants": variants,
        "target_ms": TARGET_MS,
        "meets_target": default["p50_ms"] <= TARGET_MS and default["p99_ms"] <= TARGET_MS,
        "headline": [
            {
                "name": "default decide p50",
                "value": default["p50_ms"],
                "unit": "ms",
                "detail": f"{pending} pending, {nodes} nodes; target <= {TARGET_MS:g} ms",
            },
            {"name": "default decide p99", "value": default["p99_ms"], "unit": "ms"},
            {
                "name": "default decide CPU p50",
                "value": variants["default"]["cpu"]["p50_ms"],
                "unit": "ms",
                "detail": "process CPU time (excludes waiting for a core on a busy machine)",
            },
            {"name": "drf decide p50", "value": variants["drf"]["latency"]["p50_ms"], "unit": "ms"},
        ],
        "caveats": [
            "one synthetic snapshot (fixed seed); wall time of one Python process on a shared "
            "machine (see machine.loadavg and loadavg_after): with a load above the core count "
            "the wall figures include waiting for a core; variants.*.cpu is the process's CPU "
            "time",
        ],
        "loadavg_after": loadavg(),
    }
    write_result(NAME, result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
