"""A discrete-event simulator that replays a GPU-cluster trace through an admission policy.

The policy is the *same* code the admission pipeline runs (``compute.policy``, by name through
``get_policy``): the simulator builds a ``Snapshot`` exactly as the pipeline does (the nodes, the
queues, the pending jobs, the running jobs with their placements and attained service) and applies
the ``Decision`` it gets back - ``admit`` starts jobs at their placements, ``preempt`` stops the
victims at once and requeues them, ``unschedulable`` drops jobs (counted).

Model (say so when quoting figures):

- Cluster: ``nodes`` x ``gpus_per_node`` GPUs; CPUs and memory per node are generous (a job's
  worker asks for 1 CPU and 512 MB per GPU), so GPUs are the only bottleneck.
- Every trace ``cluster`` value (a Philly virtual cluster, i.e. a team) is a queue; queues have no
  quota (unlimited, one weight each).
- Packing ``nodes``: a job of at most ``gpus_per_node`` GPUs is one worker with all its GPUs on one
  node; a larger one becomes a gang of ``ceil(num_gpus / gpus_per_node)`` workers of
  ``gpus_per_node`` GPUs each, i.e. whole nodes (a 12-GPU job holds 2 whole nodes, 16 GPUs; its
  work is still duration x 12). Packing ``count``: one worker of ``num_gpus`` GPUs, counted
  cluster-wide (the policy's ``count`` rule).
- Events: submissions (trace time), completions (start + restart penalty + remaining duration)
  and scheduling rounds. A round runs at every instant something happened (all events of one
  instant coalesced) and, while jobs are pending, every ``round_s`` of simulated time; a periodic
  round that changes nothing doubles the interval up to ``max_round_s`` (an event resets it). A
  round with nothing pending is skipped (a policy only admits or preempts for pending jobs), and
  so is one for a policy that declares ``idle_until_release`` (strict FIFO) while its last
  decision admitted nothing and no capacity was released since (nor a job of higher priority
  than every pending one submitted): such a decision would be the same again.
  When a decision preempts, another decision follows at the same instant (the victims have
  stopped), at most ``MAX_DECISIONS_PER_INSTANT`` in a row.
- Preemption keeps all progress (checkpoint/restore): the victim's attained service and useful
  progress are kept, and each restart costs ``restart_penalty_s`` of extra running time (with
  its GPUs held). Every trace job is preemptible (a policy still spares jobs preempted
  ``MAX_PREEMPTIONS`` times).
- ``max_runtime_s`` (backfill's estimate): none by default, as users rarely declare one;
  ``declared_runtime = k`` gives every job ``k x duration``.
- Offered load = total gpu_time / (cluster GPUs x trace span), the span being first to last
  submission. With ``load`` and no ``nodes``, the cluster is sized (rounded to whole nodes) to
  reach it; with both, submission times are scaled instead.

Metrics (``SimResult.metrics``): JCT (finish - submit) mean/median/p99, queueing delay (JCT minus
the time spent running, restarts included) mean/p99, makespan (first submission to last
completion), GPU utilisation (GPU-seconds allocated / (GPUs x makespan)), finish-time fairness and
jobs starved (queueing delay > 24 h). Finish-time fairness (Themis, NSDI '20): rho = JCT /
T_ideal, where T_ideal is the job's running time on its fair share of the cluster when it
arrives - an isolated cluster of C / N GPUs, N being the number of queues with work (pending or
running, the job's own included) at its submission: T_ideal = duration x max(1, gpus / (C / N)).
Reported per job (mean, p99, max) and per queue (sum of JCTs / sum of T_ideals; the max over
queues is the fairness between teams).
"""

from __future__ import annotations

import csv
import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np

from shipyard.compute.policy import get_policy
from shipyard.compute.policy.base import (
    Decision,
    Demand,
    Gpu,
    Node,
    Packing,
    PendingJob,
    Placement,
    Policy,
    QueueConfig,
    RunningJob,
    Snapshot,
)
from shipyard.errors import InvalidInputError, InvalidStateError, NotFoundError

TRACE_COLUMNS = ("timestamp", "duration", "num_gpus", "cluster")
PACKINGS: tuple[Packing, ...] = ("nodes", "count")
STARVED_S = 24 * 3600.0
_SUBMITTED = attrgetter("submitted_at")
MAX_DECISIONS_PER_INSTANT = 8
# Generous per-node CPUs and memory: GPUs are the bottleneck.
NODE_CPUS = 4096.0
NODE_MEMORY_MB = 1 << 40
CPUS_PER_GPU = 1.0
MEMORY_MB_PER_GPU = 512


@dataclass(frozen=True, slots=True)
class TraceJob:
    id: str  # "L<line>": the job's line in the trace file
    submitted_at: float  # seconds since the trace's (or the window's) first submission
    duration_s: float
    gpus: int
    queue: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    nodes: int | None = None  # None: 64, or sized to reach ``load``
    gpus_per_node: int = 8
    packing: Packing = "nodes"
    load: float | None = None  # target offered load (0.9 = 90%)
    round_s: float = 60.0
    max_round_s: float = 480.0
    restart_penalty_s: float = 30.0
    declared_runtime: float | None = None  # k: max_runtime_s = k x duration
    starved_s: float = STARVED_S


@dataclass(kw_only=True)
class SimResult:
    policy: str
    config: dict[str, Any]
    cluster: dict[str, Any]
    metrics: dict[str, Any]
    perf: dict[str, Any]
    checks: dict[str, Any] = field(default_factory=dict)
    jobs: dict[str, Any] = field(default_factory=dict)  # per job, when asked (record_jobs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "config": self.config,
            "cluster": self.cluster,
            "metrics": self.metrics,
            "perf": self.perf,
            "checks": self.checks,
        }


ProgressFn = Callable[[str], None]


# --- trace ------------------------------------------------------------------------------------


def load_trace(
    path: Path | str,
    *,
    start: str | None = None,
    end: str | None = None,
    jobs: int | None = None,
) -> list[TraceJob]:
    """The trace's jobs in submission order, times re-based to the first one kept.

    ``start``/``end`` keep jobs submitted in [start, end) (``2017-10-09`` or
    ``2017-10-09 07:00:00``, trace time); ``jobs`` keeps the first N of those.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(
            f"trace {str(path)!r} does not exist or is not a file: give a CSV with columns "
            f"{', '.join(TRACE_COLUMNS)} (e.g. ../shared/traces/philly.csv)",
            field="trace",
        )
    if jobs is not None and jobs < 1:
        raise InvalidInputError(f"--jobs must be at least 1, not {jobs}", field="jobs")
    lo = _parse_time(start, "start") if start else None
    hi = _parse_time(end, "end") if end else None
    if lo is not None and hi is not None and hi <= lo:
        raise InvalidInputError(f"--end {end!r} is not after --start {start!r}", field="end")
    raw: list[tuple[float, int, float, int, str]] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise InvalidInputError(f"trace {path.name} is empty: no header line", field="trace")
        names = [h.strip() for h in header]
        missing = [c for c in TRACE_COLUMNS if c not in names]
        if missing:
            raise InvalidInputError(
                f"trace {path.name} line 1 lacks the column(s) {', '.join(missing)}; it needs "
                f"{', '.join(TRACE_COLUMNS)} (it has {', '.join(names) or 'none'})",
                field=missing[0],
            )
        col = {name: names.index(name) for name in TRACE_COLUMNS}
        width = max(col.values()) + 1
        for line, row in enumerate(reader, start=2):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if len(row) < width:
                raise InvalidInputError(
                    f"trace {path.name} line {line} has {len(row)} fields, the header {len(names)}",
                    field="trace",
                )
            submitted = _field(path, line, "timestamp", row[col["timestamp"]], _timestamp)
            duration = _field(path, line, "duration", row[col["duration"]], float)
            gpus_f = _field(path, line, "num_gpus", row[col["num_gpus"]], float)
            queue = row[col["cluster"]].strip()
            if not math.isfinite(duration) or duration < 0:
                _bad(path, line, "duration", row[col["duration"]], "a number of seconds >= 0")
            if not gpus_f.is_integer() or gpus_f < 1:
                _bad(path, line, "num_gpus", row[col["num_gpus"]], "a whole number >= 1")
            if not queue:
                _bad(path, line, "cluster", "", "a queue name")
            if (lo is not None and submitted < lo) or (hi is not None and submitted >= hi):
                continue
            raw.append((submitted, line, duration, int(gpus_f), queue))
    if not raw:
        window = f" in [{start or '-'}, {end or '-'})" if (start or end) else ""
        raise InvalidInputError(f"trace {path.name} has no jobs{window}", field="trace")
    raw.sort()
    if jobs is not None:
        raw = raw[:jobs]
    origin = raw[0][0]
    return [TraceJob(f"L{line}", t - origin, d, g, q) for t, line, d, g, q in raw]


def offered_load(jobs: Sequence[TraceJob], total_gpus: int, *, time_scale: float = 1.0) -> float:
    """Total gpu_time / (GPUs x span); the span is first to last submission (1 s at least)."""
    return _work(jobs) / (total_gpus * _span(jobs) * time_scale)


def size_cluster(
    jobs: Sequence[TraceJob], config: SimConfig
) -> tuple[int, float, list[TraceJob], str]:
    """(nodes, time scale, jobs with scaled submission times, how the load was reached)."""
    g = config.gpus_per_node
    if config.load is None:
        return config.nodes or 64, 1.0, list(jobs), "as in the trace"
    if not config.load > 0:
        raise InvalidInputError(f"--load must be above 0, not {config.load}", field="load")
    work, span = _work(jobs), _span(jobs)
    if config.nodes is None:
        nodes = max(1, round(work / (config.load * span * g)))
        return nodes, 1.0, list(jobs), f"cluster sized to {nodes} nodes"
    scale = work / (config.load * config.nodes * g * span)
    scaled = [TraceJob(j.id, j.submitted_at * scale, j.duration_s, j.gpus, j.queue) for j in jobs]
    return config.nodes, scale, scaled, f"submission times scaled by {scale:.4g}"


# --- the simulation ---------------------------------------------------------------------------


def simulate(
    jobs: Sequence[TraceJob],
    policy: Policy | str,
    config: SimConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    check: bool = False,
    max_wall_s: float | None = None,
    record_jobs: bool = False,
) -> SimResult:
    """Replay ``jobs`` through ``policy`` (an instance or a registry name).

    ``check`` verifies after every decision that no GPU is held twice (slower; the tests use it).
    ``record_jobs`` adds every finished job's JCT (``SimResult.jobs["jct_s"]``).
    ``max_wall_s`` stops the replay after that much real time: the result then says
    ``"complete": false`` and its metrics cover the jobs finished by then, with lower bounds
    (``*_lower_bound_s``) that count every submitted unfinished job as finishing at the stop.
    """
    config = config or SimConfig()
    if config.packing not in PACKINGS:
        raise InvalidInputError(
            f"packing {config.packing!r} is not one of {', '.join(PACKINGS)}", field="packing"
        )
    if config.gpus_per_node < 1:
        raise InvalidInputError("--gpus-per-node must be at least 1", field="gpus_per_node")
    if config.nodes is not None and config.nodes < 1:
        raise InvalidInputError("--nodes must be at least 1", field="nodes")
    if not jobs:
        raise InvalidInputError("no jobs to simulate", field="trace")
    if isinstance(policy, str):
        try:
            policy = get_policy(policy)
        except ValueError as exc:
            raise InvalidInputError(str(exc), field="policy") from None
    nodes, scale, scaled, how = size_cluster(jobs, config)
    engine = _Engine(
        scaled, policy, config, nodes, progress=progress, check=check, max_wall_s=max_wall_s
    )
    engine.run()
    total_gpus = nodes * config.gpus_per_node
    return SimResult(
        policy=policy.name,
        config={
            "packing": config.packing,
            "gpus_per_node": config.gpus_per_node,
            "round_s": config.round_s,
            "max_round_s": config.max_round_s,
            "restart_penalty_s": config.restart_penalty_s,
            "declared_runtime": config.declared_runtime,
            "target_load": config.load,
        },
        cluster={
            "nodes": nodes,
            "gpus": total_gpus,
            "jobs": len(jobs),
            "queues": len({j.queue for j in jobs}),
            "offered_load": round(offered_load(jobs, total_gpus, time_scale=scale), 4),
            "time_scale": scale,
            "load_reached_by": how,
            "span_s": _span(scaled),
        },
        metrics=engine.metrics(),
        perf=engine.perf(),
        checks=engine.checks(),
        jobs={"jct_s": engine.jct_by_job()} if record_jobs else {},
    )


def run_many(
    jobs: Sequence[TraceJob],
    policies: Sequence[str],
    config: SimConfig,
    *,
    progress: ProgressFn | None = None,
) -> list[SimResult]:
    return [simulate(jobs, name, config, progress=progress) for name in policies]


class _Engine:
    """The event loop; jobs are indices into the trace list."""

    def __init__(
        self,
        jobs: Sequence[TraceJob],
        policy: Policy,
        config: SimConfig,
        nodes: int,
        *,
        progress: ProgressFn | None,
        check: bool,
        max_wall_s: float | None = None,
    ) -> None:
        self.jobs = jobs
        self.policy = policy
        self.config = config
        self.progress = progress
        self.check = check
        g = config.gpus_per_node
        self.total_gpus = nodes * g
        self.nodes = tuple(
            Node(
                id=f"n{i:03d}",
                cpus=NODE_CPUS,
                memory_mb=NODE_MEMORY_MB,
                gpus=tuple(Gpu(index=k, model="sim", memory_mb=16384) for k in range(g)),
            )
            for i in range(nodes)
        )
        self.queues = {q: QueueConfig(name=q) for q in sorted({j.queue for j in jobs})}
        n = len(jobs)
        # per-job shape: workers, demand (interned: one Demand object per shape)
        demands: dict[tuple[int, int], Demand] = {}
        self.workers = [1] * n
        self.demand: list[Demand] = []
        self.alloc = [0] * n  # GPUs held while running
        for i, job in enumerate(jobs):
            if config.packing == "nodes" and job.gpus > g:
                workers, per = math.ceil(job.gpus / g), g
            else:
                workers, per = 1, job.gpus
            key = (workers, per)
            if key not in demands:
                demands[key] = Demand(
                    cpus=CPUS_PER_GPU * per, memory_mb=MEMORY_MB_PER_GPU * per, gpus=per
                )
            self.workers[i] = workers
            self.demand.append(demands[key])
            self.alloc[i] = workers * per
        # state
        self.progress_s = [0.0] * n  # useful seconds done (earlier attempts)
        self.attained = [0.0] * n  # GPU-seconds held (earlier attempts)
        self.penalties = [0] * n  # restarts paid (each restart_penalty_s of running time)
        self.preemptions = [0] * n
        self.started = [0.0] * n  # current attempt's start
        self.first_start = [-1.0] * n
        self.run_s = [0.0] * n  # time spent running, all attempts
        self.finish = [-1.0] * n
        self.attempt = [0] * n  # bumps on each start: stale completion events are skipped
        self.ideal = [0.0] * n
        self.placement: dict[int, Placement] = {}
        # job id -> its PendingJob; in submission order but for requeued jobs (then resorted)
        self.pending: dict[str, PendingJob] = {}
        self.resort = False
        self.running: dict[int, RunningJob] = {}
        self.by_id = {job.id: i for i, job in enumerate(jobs)}
        self.heap: list[tuple[float, int, int]] = []  # (finish time, index, attempt)
        self.dropped: dict[str, str] = {}
        self.active: dict[str, int] = dict.fromkeys(self.queues, 0)
        self.active_queues = 0
        self.held: dict[tuple[str, int], int] = {}  # (node, gpu) -> job index, when checking
        # perf counters
        self.rounds = 0
        self.decisions = 0
        self.decide_s = 0.0
        self.wall_s = 0.0
        self.allocated_gpu_s = 0.0
        self.penalty_gpu_s = 0.0
        self.total_preemptions = 0
        self.now = 0.0
        self.max_wall_s = max_wall_s
        self.complete = True
        # A policy saying ``idle_until_release`` (strict FIFO) that admitted nothing is not asked
        # again until capacity is released or a job of higher priority than any pending arrives.
        self.idle_ok = bool(getattr(policy, "idle_until_release", False))
        self.idle = False
        self.idle_priority = 0
        self.skipped = 0

    # -- the loop

    def run(self) -> None:
        started = time.perf_counter()
        jobs, cfg = self.jobs, self.config
        n = len(jobs)
        nxt = 0  # next submission
        interval = cfg.round_s
        next_tick = math.inf
        changed = True
        last_report = started
        while True:
            t_sub = jobs[nxt].submitted_at if nxt < n else math.inf
            t_done = self.heap[0][0] if self.heap else math.inf
            t = min(t_sub, t_done)
            periodic = False
            if next_tick < t:
                t, periodic = next_tick, True
            if t == math.inf:
                break
            if t_sub == math.inf and t_done == math.inf and (self.idle or not changed):
                break  # only ticks are left and the last round changed nothing: stranded
            self.now = t
            if not periodic:
                while self.heap and self.heap[0][0] <= t:
                    _, i, attempt = heapq.heappop(self.heap)
                    if attempt == self.attempt[i] and i in self.running:
                        self._complete(i, t)
                while nxt < n and jobs[nxt].submitted_at <= t:
                    self._submit(nxt, t)
                    nxt += 1
                interval = cfg.round_s
            if self.pending and self.idle:
                self.skipped += 1
            changed = self._round(t) if self.pending and not self.idle else False
            if self.pending:
                if periodic and not changed:
                    interval = min(interval * 2, max(cfg.max_round_s, cfg.round_s))
                elif periodic:
                    interval = cfg.round_s
                next_tick = t + interval if cfg.round_s > 0 else math.inf
            else:
                next_tick = math.inf
            wall = time.perf_counter()
            if self.max_wall_s is not None and wall - started > self.max_wall_s:
                self.complete = False
                break
            if wall - last_report > 5.0:
                last_report = wall
                if self.progress is None:
                    continue
                done = sum(1 for f in self.finish if f >= 0)
                self.progress(
                    f"sim {self.policy.name}: day {t / 86400:.1f}, {done}/{n} done, "
                    f"{len(self.pending)} pending, {len(self.running)} running, "
                    f"{self.rounds} rounds, {last_report - started:.0f}s"
                )
        if self.pending and self.complete:  # no round could admit them: reported as stranded
            for job_id in list(self.pending):
                self.dropped[job_id] = "never admitted: the policy left it waiting at the end"
            self.pending.clear()
        self.wall_s = time.perf_counter() - started

    def _submit(self, i: int, t: float) -> None:
        job = self.jobs[i]
        q = job.queue
        if self.active[q] == 0:
            self.active_queues += 1
        self.active[q] += 1
        share = self.total_gpus / self.active_queues
        self.ideal[i] = max(job.duration_s, 1e-9) * max(1.0, job.gpus / share)
        self.pending[job.id] = self._pending_job(i)
        if self.idle and self.pending[job.id].priority > self.idle_priority:
            self.idle = False

    def _pending_job(self, i: int) -> PendingJob:
        job = self.jobs[i]
        k = self.config.declared_runtime
        return PendingJob(
            id=job.id,
            queue=job.queue,
            demand=self.demand[i],
            workers=self.workers[i],
            submitted_at=job.submitted_at,
            max_runtime_s=None if k is None else k * job.duration_s,
            preemptible=True,
            preemptions=self.preemptions[i],
            attained_gpu_s=self.attained[i],
            duration_s=job.duration_s + self.penalties[i] * self.config.restart_penalty_s,
        )

    def _round(self, t: float) -> bool:
        self.rounds += 1
        changed = False
        for _ in range(MAX_DECISIONS_PER_INSTANT):
            if not self.pending:
                break
            if self.resort:
                order = sorted(self.pending.values(), key=_SUBMITTED)
                self.pending = {p.id: p for p in order}
                self.resort = False
            pending = list(self.pending.values())
            running = self._running_view(t)
            snapshot = Snapshot(
                now=t,
                nodes=self.nodes,
                queues=self.queues,
                pending=pending,
                running=running,
                packing=self.config.packing,
            )
            before = time.perf_counter()
            decision = self.policy.decide(snapshot)
            self.decide_s += time.perf_counter() - before
            self.decisions += 1
            self._apply(decision, t)
            if decision.admit or decision.preempt or decision.unschedulable:
                changed = True
            elif self.idle_ok:
                self.idle = True
                self.idle_priority = max(p.priority for p in pending)
            if not decision.preempt:
                break
        return changed

    def _running_view(self, t: float) -> list[RunningJob]:
        # The running jobs' objects are the simulator's own; between decisions it refreshes the
        # one field that moves with time (attained service) in place instead of rebuilding them.
        view = []
        for i, obj in self.running.items():
            object.__setattr__(
                obj, "attained_gpu_s", self.attained[i] + self.alloc[i] * (t - self.started[i])
            )
            view.append(obj)
        return view

    def _apply(self, decision: Decision, t: float) -> None:
        for job_id, reason in decision.unschedulable.items():
            if self.pending.pop(job_id, None) is None:
                raise InvalidStateError(
                    f"policy {self.policy.name} called job {job_id} unschedulable, but it is not "
                    "pending",
                    field="policy",
                )
            self.dropped[job_id] = reason
            self._leave(self.by_id[job_id])
        for preemption in decision.preempt:
            i = self.by_id.get(preemption.job_id, -1)
            if i not in self.running:
                raise InvalidStateError(
                    f"policy {self.policy.name} preempted job {preemption.job_id}, which is not "
                    "running",
                    field="policy",
                )
            self._stop(i, t)
        for placement in decision.admit:
            pending = self.pending.pop(placement.job_id, None)
            if pending is None:
                raise InvalidStateError(
                    f"policy {self.policy.name} admitted job {placement.job_id}, which is not "
                    "pending",
                    field="policy",
                )
            self._start(self.by_id[placement.job_id], pending, placement, t)

    def _start(self, i: int, pending: PendingJob, placement: Placement, t: float) -> None:
        job = self.jobs[i]
        held = sum(len(w.gpus) for w in placement.workers)
        # Under "count" a worker spanning nodes has one WorkerPlacement per node.
        workers_ok = self.config.packing == "count" or len(placement.workers) == self.workers[i]
        if not workers_ok or held != self.alloc[i]:
            raise InvalidStateError(
                f"policy {self.policy.name} placed job {job.id} on {len(placement.workers)} "
                f"worker(s) with {held} GPUs; it needs {self.workers[i]} with {self.alloc[i]}",
                field="policy",
            )
        if self.check:
            for w in placement.workers:
                for gpu in w.gpus:
                    key = (w.node_id, gpu)
                    if key in self.held:
                        other = self.jobs[self.held[key]].id
                        raise InvalidStateError(
                            f"policy {self.policy.name} placed job {job.id} on GPU {gpu} of node "
                            f"{w.node_id}, which job {other} holds",
                            field="policy",
                        )
                    self.held[key] = i
        self.placement[i] = placement
        self.started[i] = t
        if self.first_start[i] < 0:
            self.first_start[i] = t
        self.attempt[i] += 1
        penalty = self.config.restart_penalty_s if self.preemptions[i] else 0.0
        if penalty:
            self.penalties[i] += 1
        remaining = max(0.0, job.duration_s - self.progress_s[i])
        heapq.heappush(self.heap, (t + penalty + remaining, i, self.attempt[i]))
        self.running[i] = RunningJob(
            id=job.id,
            queue=job.queue,
            demand=pending.demand,
            placement=placement,
            workers=pending.workers,
            submitted_at=job.submitted_at,
            started_at=t,
            max_runtime_s=pending.max_runtime_s,
            preemptible=True,
            preemptions=self.preemptions[i],
            attained_gpu_s=self.attained[i],
            duration_s=job.duration_s + self.penalties[i] * self.config.restart_penalty_s,
        )

    def _release(self, i: int, t: float) -> float:
        """Ends the current attempt; returns its running time."""
        self.idle = False
        del self.running[i]
        placement = self.placement.pop(i)
        if self.check:
            for w in placement.workers:
                for gpu in w.gpus:
                    self.held.pop((w.node_id, gpu), None)
        ran = t - self.started[i]
        self.run_s[i] += ran
        self.attained[i] += self.alloc[i] * ran
        self.allocated_gpu_s += self.alloc[i] * ran
        return ran

    def _stop(self, i: int, t: float) -> None:
        ran = self._release(i, t)
        penalty = self.config.restart_penalty_s if self.preemptions[i] else 0.0
        useful = max(0.0, ran - penalty)
        self.penalty_gpu_s += self.alloc[i] * (ran - useful)
        self.progress_s[i] += useful
        self.preemptions[i] += 1
        self.total_preemptions += 1
        job = self.jobs[i]
        self.pending[job.id] = self._pending_job(i)
        self.resort = True

    def _complete(self, i: int, t: float) -> None:
        ran = self._release(i, t)
        penalty = self.config.restart_penalty_s if self.preemptions[i] else 0.0
        self.penalty_gpu_s += self.alloc[i] * min(ran, penalty)
        self.progress_s[i] = self.jobs[i].duration_s
        self.finish[i] = t
        self._leave(i)

    def _leave(self, i: int) -> None:
        q = self.jobs[i].queue
        self.active[q] -= 1
        if self.active[q] == 0:
            self.active_queues -= 1

    # -- results

    def metrics(self) -> dict[str, Any]:
        done = [i for i, f in enumerate(self.finish) if f >= 0]
        out: dict[str, Any] = {
            "complete": self.complete,
            "jobs_finished": len(done),
            "jobs_dropped": len(self.dropped),
            "dropped_examples": dict(list(self.dropped.items())[:5]),
            "preemptions": self.total_preemptions,
            "jobs_preempted": sum(1 for p in self.preemptions if p),
        }
        if not done:
            return out | self._bounds(np.array([]), np.array([]))
        sub = np.array([self.jobs[i].submitted_at for i in done])
        fin = np.array([self.finish[i] for i in done])
        jct = fin - sub
        wait = jct - np.array([self.run_s[i] for i in done])
        wait = np.maximum(wait, 0.0)
        rho = jct / np.array([self.ideal[i] for i in done])
        makespan = float(fin.max() - min(j.submitted_at for j in self.jobs))
        per_queue: dict[str, list[float]] = {}
        for k, i in enumerate(done):
            acc = per_queue.setdefault(self.jobs[i].queue, [0.0, 0.0])
            acc[0] += float(jct[k])
            acc[1] += self.ideal[i]
        queue_rho = {q: a / b for q, a, b in ((q, v[0], v[1]) for q, v in per_queue.items())}
        worst_q = max(queue_rho, key=lambda q: queue_rho[q])
        out.update(
            jct_mean_s=_r(jct.mean()),
            jct_median_s=_r(np.median(jct)),
            jct_p99_s=_r(np.percentile(jct, 99)),
            wait_mean_s=_r(wait.mean()),
            wait_p99_s=_r(np.percentile(wait, 99)),
            makespan_s=_r(makespan),
            gpu_utilisation=round(self.allocated_gpu_s / (self.total_gpus * makespan), 4)
            if makespan > 0
            else None,
            rho_mean=_r(rho.mean()),
            rho_p99=_r(np.percentile(rho, 99)),
            rho_max=_r(rho.max()),
            queue_rho_max=_r(queue_rho[worst_q]),
            queue_rho_worst=worst_q,
            starved_24h=int((wait > self.config.starved_s).sum()),
        )
        return out | self._bounds(jct, fin)

    def _bounds(self, jct: Any, fin: Any) -> dict[str, Any]:
        """Lower bounds when the replay stopped early: unfinished jobs end "now" at best."""
        if self.complete:
            return {}
        now = self.now
        left = [
            now - j.submitted_at
            for i, j in enumerate(self.jobs)
            if self.finish[i] < 0 and j.submitted_at <= now and j.id not in self.dropped
        ]
        bound = np.concatenate([jct, np.array(left)]) if left else jct
        return {
            "stopped_at_s": _r(now),
            "jobs_unfinished": len(left),
            "jobs_not_submitted": sum(1 for j in self.jobs if j.submitted_at > now),
            "jct_mean_lower_bound_s": _r(bound.mean()) if len(bound) else None,
            "jct_p99_lower_bound_s": _r(np.percentile(bound, 99)) if len(bound) else None,
            "makespan_lower_bound_s": _r(max([now, *fin.tolist()])),
        }

    def jct_by_job(self) -> dict[str, float]:
        return {
            j.id: self.finish[i] - j.submitted_at
            for i, j in enumerate(self.jobs)
            if self.finish[i] >= 0
        }

    def perf(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 2),
            "rounds": self.rounds,
            "decisions": self.decisions,
            "rounds_skipped_idle": self.skipped,
            "decide_s": round(self.decide_s, 2),
            "decide_mean_ms": round(1000 * self.decide_s / self.decisions, 4)
            if self.decisions
            else None,
        }

    def checks(self) -> dict[str, Any]:
        useful = sum(
            self.jobs[i].duration_s * self.alloc[i] for i, f in enumerate(self.finish) if f >= 0
        )
        return {
            "allocated_gpu_s": self.allocated_gpu_s,
            "penalty_gpu_s": self.penalty_gpu_s,
            "useful_gpu_s": useful,
            "trace_gpu_s_finished": sum(
                self.jobs[i].duration_s * self.jobs[i].gpus
                for i, f in enumerate(self.finish)
                if f >= 0
            ),
        }


# --- helpers ----------------------------------------------------------------------------------


def _work(jobs: Sequence[TraceJob]) -> float:
    return sum(j.duration_s * j.gpus for j in jobs)


def _span(jobs: Sequence[TraceJob]) -> float:
    times = [j.submitted_at for j in jobs]
    return max(1.0, max(times) - min(times))


def _r(value: Any) -> float:
    return round(float(value), 3)


def _timestamp(text: str) -> float:
    text = text.strip()
    try:
        return float(text)  # seconds since any epoch
    except ValueError:
        pass
    stamp = datetime.fromisoformat(text)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def _parse_time(text: str, name: str) -> float:
    try:
        return _timestamp(text)
    except ValueError:
        raise InvalidInputError(
            f"--{name} {text!r} is not a time: use 2017-10-09 or 2017-10-09 07:00:00 (trace time)",
            field=name,
        ) from None


def _field(path: Path, line: int, name: str, text: str, parse: Callable[[str], Any]) -> Any:
    try:
        return parse(text)
    except ValueError:
        _bad(path, line, name, text, "a timestamp" if name == "timestamp" else "a number")


def _bad(path: Path, line: int, name: str, text: str, expected: str) -> Any:
    raise InvalidInputError(
        f"trace {path.name} line {line}: column {name} is {text!r}, expected {expected}",
        field=name,
    )


__all__ = [
    "PACKINGS",
    "TRACE_COLUMNS",
    "SimConfig",
    "SimResult",
    "TraceJob",
    "load_trace",
    "offered_load",
    "run_many",
    "simulate",
    "size_cluster",
]
