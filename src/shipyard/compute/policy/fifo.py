"""FIFO baselines: strict FIFO (head-of-line blocking, the floor) and FIFO with EASY backfill.

Order: higher priority first, then earlier submission (then the order the snapshot lists them).
Placement is ``policy.placement`` (the executor's own rules); nothing here preempts.

``Fifo``: jobs start in order while they fit; the first that does not fit blocks every job
behind it (head-of-line blocking), even ones that would fit.

``FifoBackfill`` (EASY backfill, Lifka '95 / Mu'alem & Feitelson '01): the first blocked job gets
a reservation - the earliest time it could start, found by releasing the running jobs (and those
admitted now) in order of their expected end (``started_at + max_runtime_s``; a job without a max
runtime never ends in this reckoning) - and the resources it would take then. A job behind it
may start now when it fits now and either ends before the reservation (its ``max_runtime_s``
says so) or touches none of the reserved resources (it fits in what is left at the reservation
time once the blocked job has what it needs). A job without a max runtime can thus only use
resources the reservation does not need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import attrgetter

from shipyard.compute.policy.base import (
    EPSILON,
    Decision,
    Packing,
    PendingJob,
    Placement,
    RunningJob,
    Snapshot,
)
from shipyard.compute.policy.placement import FreeCapacity, never_fits

_SUBMITTED = attrgetter("submitted_at")
_PRIORITY = attrgetter("priority")
_DEMAND = attrgetter("demand")
_WORKERS = attrgetter("workers")
_ID = attrgetter("id")


class Fifo:
    name = "fifo"
    # A strict FIFO decision that admits nothing stays right until capacity is released or a job
    # of higher priority arrives (new jobs queue behind the blocked head); the simulator skips
    # the rounds in between (``sim``), which it may for a policy that says so.
    idle_until_release = True

    def decide(self, snapshot: Snapshot) -> Decision:
        decision = Decision()
        packing = snapshot.packing
        free = FreeCapacity.of(snapshot)
        unfit = NeverFits(snapshot)
        order = fifo_order(snapshot.pending)
        for k, job in enumerate(order):
            why = unfit(job)
            if why is not None:
                decision.unschedulable[job.id] = why
                continue
            placement = free.place(job, packing)
            if placement is not None:
                free.take(job, placement, packing=packing)
                decision.admit.append(placement)
                continue
            decision.waiting[job.id] = f"waiting: first in line, {needs(job, free, packing)}"
            behind = f"waiting: behind job {job.id}, first in line (strict FIFO)"
            wait_all(decision, order[k + 1 :], behind, unfit)
            break
        return decision


class FifoBackfill:
    name = "fifo-backfill"

    def decide(self, snapshot: Snapshot) -> Decision:
        decision = Decision()
        packing = snapshot.packing
        now = snapshot.now
        free = FreeCapacity.of(snapshot)
        unfit = NeverFits(snapshot)
        admitted: list[tuple[PendingJob, Placement]] = []
        head: PendingJob | None = None
        shadow = math.inf  # when the head is expected to start
        after: FreeCapacity | None = None  # free at ``shadow`` once the head holds its share
        no_room: set[tuple[int, int]] = set()  # shapes that do not fit now (it only shrinks)
        no_long: set[tuple[int, int]] = set()  # shapes that would touch the reservation
        blocked = ""
        delays = ""
        order = fifo_order(snapshot.pending)
        all_gpu: bool | None = None  # every job left asks for GPUs (found out when needed)
        for k, job in enumerate(order):
            why = unfit(job)
            if why is not None:
                decision.unschedulable[job.id] = why
                continue
            shape = (id(job.demand), job.workers)
            if shape in no_room:
                decision.waiting[job.id] = blocked
                continue
            if head is not None and all_gpu is not False and free.total_free_gpus() <= EPSILON:
                if all_gpu is None:
                    all_gpu = gpu_only(order, k)
                if all_gpu:
                    wait_all(decision, order[k:], blocked, unfit)
                    break
            placement = free.place(job, packing)
            if head is None:
                if placement is not None:
                    free.take(job, placement, packing=packing)
                    decision.admit.append(placement)
                    admitted.append((job, placement))
                    continue
                head = job
                shadow, after = _reserve(snapshot, free, admitted, job)
                when = (
                    f"expected to start at t={shadow:.0f}"
                    if shadow < math.inf
                    else ("no start time known (running jobs declare no max runtime)")
                )
                if shadow < math.inf:
                    decision.reserved[job.id] = shadow
                decision.waiting[job.id] = (
                    f"waiting: first in line, {needs(job, free, packing)}; reserved, {when}"
                )
                blocked = f"waiting: does not fit now, behind job {job.id} (reserved)"
                delays = (
                    f"waiting: would delay job {job.id}'s reservation (only a job whose max "
                    "runtime ends before it may use the reserved resources)"
                )
                continue
            if placement is None:
                no_room.add(shape)
                decision.waiting[job.id] = blocked
                continue
            estimate = job.max_runtime_s
            if estimate is not None and now + estimate <= shadow:
                free.take(job, placement, packing=packing)
                decision.admit.append(placement)
                continue
            if shape in no_long:
                decision.waiting[job.id] = delays
                continue
            if after is not None:
                later = _outside_reservation(job, placement, free, after, packing)
                if later is None:
                    no_long.add(shape)
                    decision.waiting[job.id] = delays
                    continue
                placement, at_shadow = later
                after.take(job, at_shadow, packing=packing)
            free.take(job, placement, packing=packing)
            decision.admit.append(placement)
        return decision


def _outside_reservation(
    job: PendingJob, placement: Placement, free: FreeCapacity, after: FreeCapacity, packing: Packing
) -> tuple[Placement, Placement] | None:
    """(where it goes now, what it holds at the reservation time) for a job that runs past the
    reservation, or None when it would take something the reserved job needs."""
    if packing == "count":  # GPUs are interchangeable: enough left at the reservation suffices
        at_shadow = after.place(job, packing)
        return None if at_shadow is None else (placement, at_shadow)
    if after.can_take(job, placement, packing=packing):
        return placement, placement
    other = after.place(job, packing)
    if other is None or not free.can_take(job, other, packing=packing):
        return None
    return other, other


def _reserve(
    snapshot: Snapshot,
    free: FreeCapacity,
    admitted: Sequence[tuple[PendingJob, Placement]],
    head: PendingJob,
) -> tuple[float, FreeCapacity | None]:
    """(the head's expected start, what is free then once it holds its placement)."""
    now = snapshot.now
    packing = snapshot.packing
    ends: list[tuple[float, int, PendingJob | RunningJob, Placement]] = []
    for k, run in enumerate(snapshot.running):
        if run.stopping:
            end = now
        elif run.max_runtime_s is None:
            end = math.inf
        else:
            end = max(now, run.started_at + run.max_runtime_s)
        ends.append((end, k, run, run.placement))
    base = len(ends)
    for k, (new, placement) in enumerate(admitted):
        end = math.inf if new.max_runtime_s is None else now + new.max_runtime_s
        ends.append((end, base + k, new, placement))
    ends.sort(key=lambda e: (e[0], e[1]))
    future = free.copy()
    need = head.demand.gpu_units * head.workers - EPSILON
    for end, _, job, placement in ends:
        future.give_back(job, placement, packing=packing)
        if future.total_free_gpus() < need:
            continue
        spot = future.place(head, packing)
        if spot is not None:
            future.take(head, spot, packing=packing)
            return end, future
    return math.inf, None


def fifo_order(pending: Sequence[PendingJob]) -> list[PendingJob]:
    """Higher priority first, then earlier submission; stable (ties keep the snapshot's order)."""
    order = sorted(pending, key=_SUBMITTED)
    if len(set(map(_PRIORITY, order))) > 1:
        order.sort(key=lambda j: -j.priority)
    return order


def wait_all(decision: Decision, jobs: Sequence[PendingJob], reason: str, unfit: NeverFits) -> None:
    """Every one of ``jobs`` waits for ``reason`` (or is unschedulable): in bulk, by shape."""
    if not jobs:
        return
    keys = zip(map(id, map(_DEMAND, jobs)), map(_WORKERS, jobs), strict=True)
    shapes = dict(zip(keys, jobs, strict=True))
    if all(unfit(job) is None for job in shapes.values()):
        decision.waiting.update(dict.fromkeys(map(_ID, jobs), reason))
        return
    for job in jobs:
        why = unfit(job)
        if why is None:
            decision.waiting[job.id] = reason
        else:
            decision.unschedulable[job.id] = why


def gpu_only(jobs: Sequence[PendingJob], start: int) -> bool:
    """Whether every job from ``start`` on asks for GPUs (so none fits where no GPU is free)."""
    return all(d.gpu_units > 0 for d in {id(d): d for d in map(_DEMAND, jobs[start:])}.values())


class NeverFits:
    """``placement.never_fits`` for one snapshot, remembered per
    demand: by object first (the simulator shares one ``Demand`` per job shape, so a round over
    thousands of pending jobs asks only a few times), then by value."""

    __slots__ = ("_by_id", "_by_value", "_nodes", "_packing")

    def __init__(self, snapshot: Snapshot) -> None:
        self._nodes = snapshot.nodes
        self._packing: Packing = snapshot.packing
        self._by_id: dict[tuple[int, int], tuple[object, str | None]] = {}
        self._by_value: dict[tuple[object, int], str | None] = {}

    def __call__(self, job: PendingJob) -> str | None:
        key = (id(job.demand), job.workers)
        hit = self._by_id.get(key)
        if hit is not None and hit[0] is job.demand:
            return hit[1]
        value = (job.demand, job.workers)
        if value in self._by_value:
            why = self._by_value[value]
        else:
            why = never_fits(self._nodes, job, self._packing)
            self._by_value[value] = why
        self._by_id[key] = (job.demand, why)
        return why


def needs(job: PendingJob, free: FreeCapacity, packing: Packing) -> str:
    """e.g. "needs 2 workers of 8 GPUs; 3 GPUs free (at most 2 on one node)"."""
    demand = job.demand
    units = demand.gpu_units
    what = (
        f"{units:g} GPUs"
        if demand.gpus
        else (f"a {units:g} GPU share" if units else f"{demand.cpus:g} CPUs")
    )
    if job.workers > 1:
        what = f"{job.workers} workers of {what}"
    have = f"{free.total_free_gpus():g} GPUs free"
    if packing == "nodes":
        have += f" (at most {free.most_free_gpus_on_a_node()} on one node)"
    return f"needs {what}; {have}"


__all__ = ["Fifo", "FifoBackfill", "NeverFits", "fifo_order", "gpu_only", "needs", "wait_all"]
