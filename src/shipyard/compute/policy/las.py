"""Tiresias-style least-attained-service (Gu et al., NSDI '19: discretised 2D-LAS), preemptive.

A job's service is the GPU-seconds it has attained (GPUs x time, all attempts: the "2D" of
2D-LAS). Service is discretised into levels by ``thresholds`` (default 1 and 10 GPU-hours: three
levels); a lower level comes first, FIFO (by submission) within a level, and higher priority
before everything. Jobs start in that order wherever they fit (work-conserving: a job that does
not fit does not block the ones behind it). A pending job that does not fit may preempt running
jobs of a *strictly* worse level (or lower priority): victims are chosen worst first (lowest
priority, highest level, latest started) until it fits, and then only those whose resources the
placement uses are kept. The victims stop and are requeued; the job starts in a later decision,
once they have stopped; their capacity is not used by this decision. Jobs preempted
``MAX_PREEMPTIONS`` times, stopping ones and ones not preemptible are never victims. Tiresias's
starvation knob (promoting a job that waited too long) is not modelled.

``PreemptivePriority`` is the engine, shared with ``srtf.Srtf`` (same rules, another key).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from shipyard.compute.policy.base import (
    MAX_PREEMPTIONS,
    Decision,
    Packing,
    PendingJob,
    Placement,
    Preemption,
    RunningJob,
    Snapshot,
    WorkerPlacement,
)
from shipyard.compute.policy.fifo import NeverFits, needs
from shipyard.compute.policy.placement import FreeCapacity

Job = PendingJob | RunningJob

# GPU-seconds at which a job moves down a level: 1 GPU-hour, 10 GPU-hours.
DEFAULT_THRESHOLDS: tuple[float, ...] = (3600.0, 36000.0)


class PreemptivePriority:
    """Start jobs by ``key`` (lower first; higher priority before any key) where they fit, and
    preempt running jobs of a strictly worse key for a pending job that does not fit."""

    name = "preemptive"

    def key(self, job: Job) -> float:
        raise NotImplementedError

    def describe(self, job: PendingJob) -> str:
        """The order a waiting reason names, e.g. "LAS level 2"."""
        return f"{self.name} key {self.key(job):g}"

    def decide(self, snapshot: Snapshot) -> Decision:
        decision = Decision()
        packing = snapshot.packing
        free = FreeCapacity.of(snapshot)
        unfit = NeverFits(snapshot)
        key = self.key
        ranked = sorted(
            (
                (-job.priority, key(job), job.submitted_at, n, job)
                for n, job in enumerate(snapshot.pending)
            ),
            key=lambda r: r[:4],
        )
        # Candidate victims, worst first: lowest priority, highest key, latest started.
        candidates = sorted(
            (
                (run.priority, -key(run), -run.started_at, n, run)
                for n, run in enumerate(snapshot.running)
                if run.preemptible and not run.stopping and run.preemptions < MAX_PREEMPTIONS
            ),
            key=lambda r: r[:4],
        )
        victims: list[tuple[int, float, RunningJob]] = [(r[0], -r[1], r[4]) for r in candidates]
        gone: set[str] = set()  # victims already chosen in this decision
        no_room: dict[tuple[int, int], str] = {}  # shapes that neither fit nor preempt -> why
        for neg_priority, job_key, _, _, job in ranked:
            why = unfit(job)
            if why is not None:
                decision.unschedulable[job.id] = why
                continue
            shape = (id(job.demand), job.workers)
            reason = no_room.get(shape)
            if reason is None:
                placement = free.place(job, packing)
                if placement is not None:
                    free.take(job, placement, packing=packing)
                    decision.admit.append(placement)
                    continue
                chosen = _preempt_for(job, -neg_priority, job_key, victims, gone, free, packing)
                if chosen:
                    for victim in chosen:
                        gone.add(victim.id)
                        decision.preempt.append(
                            Preemption(
                                job_id=victim.id,
                                for_job=job.id,
                                reason=f"preempted for job {job.id} ({self.describe(job)})",
                            )
                        )
                    decision.waiting[job.id] = (
                        f"waiting: {len(chosen)} job(s) being preempted to make room "
                        f"({self.describe(job)})"
                    )
                    continue
                # Later jobs of this shape come after it: they cannot fit or preempt either.
                reason = f"waiting: {needs(job, free, packing)} ({self.name} order)"
                no_room[shape] = reason
            decision.waiting[job.id] = reason
        return decision


def _preempt_for(
    job: PendingJob,
    priority: int,
    job_key: float,
    victims: Sequence[tuple[int, float, RunningJob]],
    gone: set[str],
    free: FreeCapacity,
    packing: Packing,
) -> list[RunningJob]:
    """The running jobs to stop so that ``job`` fits (and hold what it will use), or []."""
    trial: FreeCapacity | None = None
    chosen: list[RunningJob] = []
    placement: Placement | None = None
    for v_priority, v_key, run in victims:
        if run.id in gone:
            continue
        if v_priority > priority or (v_priority == priority and v_key <= job_key):
            break  # worst first: the rest are no worse than the job
        if trial is None:
            trial = free.copy()
        trial.give_back(run, run.placement, packing=packing)
        chosen.append(run)
        placement = trial.place(job, packing)
        if placement is not None:
            break
    if placement is None:
        return []
    # Keep only the victims the placement uses (on the nodes it lands on, for "nodes").
    used_gpus = {(w.node_id, g) for w in placement.workers for g in w.gpus}
    used_nodes = {w.node_id for w in placement.workers}
    needed = [
        run
        for run in chosen
        if any((w.node_id, g) in used_gpus for w in run.placement.workers for g in w.gpus)
        or (
            packing == "nodes"
            and any(w.node_id in used_nodes and not w.gpus for w in run.placement.workers)
        )
    ]
    if len(needed) < len(chosen):
        check = free.copy()
        for run in needed:
            check.give_back(run, run.placement, packing=packing)
        if check.can_take(job, placement, packing=packing):
            chosen = needed
    # Hold the part of the placement that is free now, so that no later job of this
    # decision takes it; the victims' part stays held (they are still running).
    victim_gpus = {(w.node_id, g) for run in chosen for w in run.placement.workers for g in w.gpus}
    mine = tuple(
        WorkerPlacement(
            node_id=w.node_id,
            gpus=tuple(g for g in w.gpus if (w.node_id, g) not in victim_gpus),
            gpu_share=w.gpu_share,
        )
        for w in placement.workers
    )
    free.take(job, Placement(job_id=job.id, workers=mine), packing=packing)
    return chosen


class Las(PreemptivePriority):
    name = "las"

    def __init__(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> None:
        self.thresholds = tuple(sorted(thresholds))

    def key(self, job: Job) -> float:
        return float(bisect.bisect_right(self.thresholds, job.attained_gpu_s))

    def describe(self, job: PendingJob) -> str:
        return f"LAS level {int(self.key(job))} of {len(self.thresholds)}"


__all__ = ["DEFAULT_THRESHOLDS", "Las", "PreemptivePriority"]
