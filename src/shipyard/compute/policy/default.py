"""shipyard's admission policy: quotas and cohorts, weighted DRF, priorities, least attained
service, preemption, EASY backfill, gangs. Pure: a ``Snapshot`` in, a ``Decision`` out.

**Quotas** (Kueue's shape, ``drf.QuotaBook``): a queue may use its nominal quota; a queue in a
cohort may borrow the cohort's idle nominal quota up to its borrowing limit; a queue that is not
configured is unlimited. Work over quota waits ("waiting: ... queue vision is at its GPU quota
8/8"); a quota shrunk below use stops nothing, new work waits.

**Order.** Jobs are considered one at a time, picking among the queues' first jobs: higher
priority first, then the lower least-attained-service level (Tiresias' discretised LAS: the
service a job received so far, in levels split at ``las_thresholds_s``, by default 10 minutes, 1
hour and 6 hours, so that short jobs overtake long ones without anyone knowing durations), then
the queue with the smaller weighted dominant share (DRF), then the queue's name. Within a queue:
priority, LAS level, age (oldest first), id. Service is running time (``las_service="time"``, the
GPU time received per GPU held), not Tiresias' GPU time (``"gpu"``): on the Philly trace at 90%
load the running time gave a mean JCT 8% lower (47.8k s vs 52.0k s; ``benchmarks/sim_philly.py``),
as a wide job's running time predicts its remaining time as well as a narrow one's, while its GPU
time demoted it early; DRF between queues still charges wide jobs their GPUs.

**Admission.** A job starts when it fits its queue's quota and the free capacity now (placement
rules: ``placement``); a gang starts whole or not at all, so two half-placed gangs never deadlock.

**Preemption** (preemptible running jobs only; never one already preempted ``MAX_PREEMPTIONS``
times, never one already stopping): a job that does not fit may make room by preempting

- running jobs of lower priority (anywhere);
- jobs of queues in its cohort that borrow (use more than their nominal quota), when its own
  queue stays within its nominal quota with it (reclaiming lent quota);
- running jobs of no higher priority that sit on a higher LAS level and have run at least
  ``las_min_run_s`` in their current attempt (the hysteresis that keeps LAS from thrashing).

Victims are taken borrowers first, then lowest priority, then least lost work (shortest run of
the current attempt), each simulated as freed until the job fits; then every victim that turns
out not to be needed is spared. The job does not start in this decision: it holds the capacity
its victims free (jobs admitted meanwhile must fit around it) and starts once they have stopped.
Capacity of jobs already stopping counts as freeing in the same way, before any new victim.
At most ``max_preemption_searches`` jobs look for victims per decision (the rest on later ones).

**EASY backfill.** The first job that fits its quota but not the free capacity (and cannot make
room) keeps a reservation: its earliest start, found by releasing running jobs in order of their
expected end (``started_at + max_runtime_s``; a job without a max runtime never ends in this
reckoning), and the nodes it would take then. A later job starts only if it fits now and either
its ``max_runtime_s`` ends it before the reservation or it uses none of the reserved nodes
("count" packing: none of the GPUs the reservation needs). With an unknown start time the
reserved nodes are still held: they drain until the job fits.

Every other pending job gets a waiting reason: its position in its queue and what it waits for.

**Cost** (``benchmarks/policy_decision.py``: 10,000 pending jobs on 1,000 nodes): placement is
indexed (``placement.FreeCapacity``), and a decision remembers the job shapes (GPUs, fraction,
CPUs, memory, type, workers) that found no room: what is free only shrinks during a decision and
what is freeing grows only with new victims, so the rest of a busy queue is given its reasons in
one pass instead of being placed job by job.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from shipyard.compute.policy.base import (
    EPSILON,
    MAX_PREEMPTIONS,
    PRIORITY_CLASSES,
    Decision,
    Packing,
    PendingJob,
    Placement,
    Preemption,
    RunningJob,
    Snapshot,
    cyclic_gc_paused,
)
from shipyard.compute.policy.drf import ORDINALS, QuotaBook, demand_text, ordinal
from shipyard.compute.policy.placement import FitCheck, FreeCapacity, Job

LAS_THRESHOLDS_S = (600.0, 3600.0, 21600.0)  # 10 min, 1 h, 6 h of service
LAS_MIN_RUN_S = 600.0
LAS_SERVICE = "time"  # levels by running time ("gpu": by GPU time received)
MAX_PREEMPTION_SEARCHES = 8
MAX_VICTIMS = 64  # victims tried for one job before giving up (a later decision tries again)

_PRIORITY_NAMES = {v: k for k, v in PRIORITY_CLASSES.items()}
_AGE = attrgetter("submitted_at", "id")
_NO_NODES: frozenset[str] = frozenset()
_PRIORITY = attrgetter("priority")


@dataclass(slots=True)
class _Reservation:
    job_id: str
    at: float  # expected start (inf: unknown)
    nodes: frozenset[str]  # nodes its placement takes then ("nodes" packing)
    spare_units: float  # GPU units free at that time beyond its need ("count" packing)


@dataclass(slots=True)
class _State:
    snapshot: Snapshot
    packing: Packing
    decision: Decision
    free: FreeCapacity
    book: QuotaBook
    future: FreeCapacity | None = None  # after stopping jobs and chosen victims have stopped
    admitted: list[tuple[PendingJob, Placement]] = field(default_factory=list)
    victims: set[str] = field(default_factory=set)
    candidates: list[RunningJob] = field(default_factory=list)
    reservation: _Reservation | None = None
    searches: int = 0
    min_candidate_priority: int = 0
    max_candidate_level: int = -1
    borrowing: dict[str, bool] = field(default_factory=dict)
    any_stopping: bool = False
    hold_failed: set[int] = field(default_factory=set)
    # Memories of one decision, by "key" = 2 x shape id + (1 if limited by the reservation):
    # shapes (what a job asks for: GPUs, fraction, CPUs, memory, type, workers) that found no
    # room now (see _place_now), none freeing (_hold_freeing), or neither ("dead": the merge's
    # fast path); and the waiting reasons per queue and key.
    shape_ids: dict[tuple[object, ...], int] = field(default_factory=dict)
    place_failed: set[int] = field(default_factory=set)
    dead: set[int] = field(default_factory=set)
    reasons: dict[str, dict[int, str]] = field(default_factory=dict)


class DefaultPolicy:
    """shipyard's policy (see the module docstring)."""

    name = "default"

    def __init__(
        self,
        *,
        las_thresholds_s: Sequence[float] = LAS_THRESHOLDS_S,
        las_min_run_s: float = LAS_MIN_RUN_S,
        max_preemption_searches: int = MAX_PREEMPTION_SEARCHES,
        backfill: bool = True,
        las_service: str = LAS_SERVICE,
    ) -> None:
        if las_service not in ("gpu", "time"):
            raise ValueError(f"las_service must be 'gpu' or 'time', not {las_service!r}")
        self.per_gpu = las_service == "time"
        self.thresholds = tuple(sorted(las_thresholds_s))
        self.las_min_run_s = las_min_run_s
        self.max_preemption_searches = max_preemption_searches
        self.backfill = backfill

    def level(self, attained_gpu_s: float) -> int:
        """The LAS level of a job that has received ``attained_gpu_s`` GPU-seconds."""
        return bisect_right(self.thresholds, attained_gpu_s)

    def level_of(self, job: PendingJob | RunningJob) -> int:
        """The LAS level of ``job``: by its running time, i.e. the GPU time it received per
        GPU it holds (``las_service="time"``, the default), or by that GPU time itself
        (``"gpu"``, Tiresias' 2D-LAS, which also demotes wide jobs early)."""
        service = job.attained_gpu_s
        if not service:
            return 0
        if self.per_gpu:
            units = job.demand.gpu_units * job.workers
            if units > 0:
                service /= units
        return bisect_right(self.thresholds, service)

    # -- the decision -------------------------------------------------------------------------

    def decide(self, snapshot: Snapshot) -> Decision:
        with cyclic_gc_paused():
            return self._decide(snapshot)

    def _decide(self, snapshot: Snapshot) -> Decision:
        decision = Decision()
        packing = snapshot.packing
        free = FreeCapacity.of(snapshot)
        book = QuotaBook(snapshot.queues, snapshot.nodes, snapshot.running)
        state = _State(snapshot, packing, decision, free, book)
        self._prepare_candidates(state)

        fits = FitCheck(snapshot.nodes, packing)
        by_queue: dict[str, list[PendingJob]] = {}
        unschedulable = decision.unschedulable
        gpus_max, cpus_max, mem_max = fits.dominating
        for job in snapshot.pending:
            d = job.demand
            if (
                d.gpus > gpus_max
                or d.cpus > cpus_max
                or d.memory_mb > mem_max
                or job.workers != 1
                or d.gpu_type is not None
                or d.gpu_fraction
            ):
                reason = fits(job)
                if reason is not None:
                    unschedulable[job.id] = reason
                    continue
            queue = by_queue.get(job.queue)
            if queue is None:
                by_queue[job.queue] = [job]
            else:
                queue.append(job)
        level = self.level_of
        now = snapshot.now
        for jobs in by_queue.values():
            # priority (higher first), LAS level, age, id: stable sorts from the last key up
            jobs.sort(key=_AGE)
            if any(j.attained_gpu_s for j in jobs):
                jobs.sort(key=level)
            jobs.sort(key=_PRIORITY, reverse=True)

        heap: list[tuple[int, int, float, str]] = []
        heads: dict[str, int] = {}
        for name, jobs in by_queue.items():
            heads[name] = 0
            head = jobs[0]
            heap.append((-head.priority, level(head), book.share(name), name))
        heapq.heapify(heap)
        shape_ids = state.shape_ids
        dead = state.dead
        ordinals = ORDINALS
        last = len(ORDINALS)
        waiting = decision.waiting
        item = heapq.heappop(heap) if heap else None
        while item is not None:
            name = item[3]
            jobs = by_queue[name]
            index = heads[name]
            self._consider(state, jobs[index], index + 1)
            index += 1
            count = len(jobs)
            # The fast path, most of a busy queue: a job whose shape found no room now nor
            # freeing earlier in this decision, and that could preempt no one, waits. It changes
            # nothing, so the queue's next job is taken without going back to the merge: what
            # is free only shrinks during a decision, and what is freeing grows only with new
            # victims, which forgets the dead shapes.
            where = " in queue " + name + "; "
            reasons = state.reasons.setdefault(name, {})
            reservation = state.reservation
            at = reservation.at + EPSILON if reservation is not None else 0.0
            preempting = bool(state.candidates) and state.searches < self.max_preemption_searches
            while index < count:
                job = jobs[index]
                d = job.demand
                shape = (d.gpus, d.gpu_fraction, d.cpus, d.memory_mb, d.gpu_type, job.workers)
                sid = shape_ids.get(shape)
                if sid is None:
                    break
                key = sid << 1
                if key not in dead:
                    runtime = job.max_runtime_s
                    if reservation is None or (runtime is not None and now + runtime <= at):
                        break
                    key += 1
                    if key not in dead:
                        break
                if preempting and self._may_preempt(state, job):
                    break
                suffix = reasons.get(key)
                if suffix is None:
                    suffix = reasons[key] = self._blocked_suffix(state, job)
                index += 1
                waiting[job.id] = (
                    "waiting: "
                    + (ordinals[index] if index < last else ordinal(index))
                    + where
                    + suffix
                )
            heads[name] = index
            if index < count:
                nxt = jobs[index]
                # back into the merge; often it is still first: then this costs one comparison
                item = heapq.heappushpop(heap, (-nxt.priority, level(nxt), book.share(name), name))
            else:
                item = heapq.heappop(heap) if heap else None
        return decision

    # -- one job --------------------------------------------------------------------------------

    def _consider(self, state: _State, job: PendingJob, position: int) -> None:
        d = job.demand
        shape = (d.gpus, d.gpu_fraction, d.cpus, d.memory_mb, d.gpu_type, job.workers)
        sid = state.shape_ids.setdefault(shape, len(state.shape_ids))
        limits = self._limits(state, job)
        limited = limits[0]
        key = (sid << 1) | limited
        book = state.book
        quota = book.check(job)
        if quota is not None:
            if self._may_preempt(state, job, same_queue_only=True) and self._preempt(
                state, job, position, same_queue_only=True
            ):
                return
            state.decision.waiting[job.id] = (
                f"waiting: {ordinal(position)} in queue {job.queue}; {quota}"
            )
            return
        placement = self._place_now(state, job, sid, limits)
        if placement is not None:
            quota = book.check(job, book.model_of(placement)) if book.per_model else None
            if quota is not None:
                placement = self._place_within_model_quota(state, job)
                if placement is None:
                    state.decision.waiting[job.id] = (
                        f"waiting: {ordinal(position)} in queue {job.queue}; {quota}"
                    )
                    return
            self._admit(state, job, placement)
            return
        # It does not fit now. Capacity that is freeing (stopping jobs) first, then victims.
        if self._hold_freeing(state, job, position, sid, limits):
            return
        state.dead.add(key)
        if self._may_preempt(state, job) and self._preempt(state, job, position):
            return
        if state.reservation is None and self.backfill:
            self._reserve(state, job, position)
            return
        reasons = state.reasons.setdefault(job.queue, {})
        suffix = reasons.get(key)
        if suffix is None:
            suffix = reasons[key] = self._blocked_suffix(state, job)
        state.decision.waiting[job.id] = (
            f"waiting: {ordinal(position)} in queue {job.queue}; {suffix}"
        )

    def _place_now(
        self,
        state: _State,
        job: PendingJob,
        sid: int,
        limits: tuple[bool, frozenset[str] | None],
    ) -> Placement | None:
        """Where ``job`` starts now, if it fits now without delaying the reservation or
        taking capacity held for a job waiting on its victims.

        A shape that found no room is not searched again in this decision: what is free now only
        shrinks as jobs are admitted (and what is freeing grows only with new victims, which
        clears this memory).
        """
        failed = state.place_failed
        if sid << 1 in failed:
            return None
        free, packing = state.free, state.packing
        limited, exclude = limits
        key = (sid << 1) | limited
        if limited and key in failed:
            return None
        if exclude is None:
            failed.add(key)
            return None
        placement = free.place(job, packing, exclude=exclude)
        if placement is None:
            failed.add(key)
        return placement

    def _limits(self, state: _State, job: PendingJob) -> tuple[bool, frozenset[str] | None]:
        """Whether the reservation limits where ``job`` may go (it does not end before it),
        and the nodes it may then not use (None: "count" packing has no GPU to spare for it)."""
        reservation = state.reservation
        if reservation is None:
            return False, _NO_NODES
        if job.max_runtime_s is not None and (
            state.snapshot.now + job.max_runtime_s <= reservation.at + EPSILON
        ):
            return False, _NO_NODES
        if state.packing == "count":
            if job.demand.gpu_units * job.workers > reservation.spare_units + EPSILON:
                return True, None
            return True, _NO_NODES
        return True, reservation.nodes

    def _place_within_model_quota(self, state: _State, job: PendingJob) -> Placement | None:
        """Another placement, on GPU models whose per-model quota the job still fits."""
        book = state.book
        bad = {
            n.id
            for n in state.snapshot.nodes
            if n.gpus and book.check(job, n.gpus[0].model) is not None
        }
        if state.reservation is not None:
            bad |= state.reservation.nodes
        placement = state.free.place(job, state.packing, exclude=bad)
        if placement is None:
            return None
        if book.check(job, book.model_of(placement)) is not None:
            return None
        return placement

    def _admit(self, state: _State, job: PendingJob, placement: Placement) -> None:
        packing = state.packing
        state.free.take(job, placement, packing=packing)
        if state.future is not None:
            state.future.take(job, placement, packing=packing)
        state.book.add(job, state.book.model_of(placement))
        state.decision.admit.append(placement)
        state.admitted.append((job, placement))
        state.reasons.clear()
        if state.reservation is not None and packing == "count":
            ends = job.max_runtime_s is not None and (
                state.snapshot.now + job.max_runtime_s <= state.reservation.at + EPSILON
            )
            if not ends:
                state.reservation.spare_units -= job.demand.gpu_units * job.workers

    # -- capacity that frees: stopping jobs and victims -----------------------------------------

    def _future(self, state: _State) -> FreeCapacity:
        if state.future is None:
            future = state.free.copy()
            for r in state.snapshot.running:
                if r.stopping:
                    future.give_back(r, r.placement, packing=state.packing)
            state.future = future
        return state.future

    def _hold_freeing(
        self,
        state: _State,
        job: PendingJob,
        position: int,
        sid: int,
        limits: tuple[bool, frozenset[str] | None],
    ) -> bool:
        """Hold capacity that jobs being stopped will free, when that is enough for ``job``."""
        if not state.any_stopping and not state.victims:
            return False
        limited, exclude = limits
        key = (sid << 1) | limited
        if exclude is None or key in state.hold_failed:
            return False  # the same shape found no room, and no room has been added since
        future = self._future(state)
        placement = future.place(job, state.packing, exclude=exclude)
        if placement is None:
            state.hold_failed.add(key)
            return False
        self._hold(state, job, placement)
        state.reasons.clear()
        state.decision.waiting[job.id] = (
            f"waiting: {ordinal(position)} in queue {job.queue}; starts once the jobs being "
            "stopped have freed its capacity"
        )
        return True

    def _hold(self, state: _State, job: PendingJob, placement: Placement) -> None:
        """Hold ``placement`` (on what is freeing) for ``job``, which starts in a later decision:
        taken from the future view, and from what is free now as far as it is free now, so
        that no job admitted meanwhile gets any of it."""
        assert state.future is not None
        state.future.take(job, placement, packing=state.packing)
        state.free.take(job, placement, packing=state.packing)
        state.book.add(job, state.book.model_of(placement))

    def _prepare_candidates(self, state: _State) -> None:
        now = state.snapshot.now
        book = state.book
        cands = [
            r
            for r in state.snapshot.running
            if r.preemptible and not r.stopping and r.preemptions < MAX_PREEMPTIONS
        ]
        borrowing = {q: book.borrowing(q) for q in {r.queue for r in cands}}
        cands.sort(key=lambda r: (not borrowing[r.queue], r.priority, now - r.started_at, r.id))
        state.candidates = cands
        state.borrowing = borrowing
        state.any_stopping = any(r.stopping for r in state.snapshot.running)
        if cands:
            state.min_candidate_priority = min(r.priority for r in cands)
            state.max_candidate_level = max(self.level_of(r) for r in cands)

    def _may_preempt(
        self, state: _State, job: PendingJob, *, same_queue_only: bool = False
    ) -> bool:
        """A cheap filter: could any candidate be a victim for ``job``?"""
        if not state.candidates or state.searches >= self.max_preemption_searches:
            return False
        if job.priority > state.min_candidate_priority:
            return True
        if same_queue_only:
            return False
        if job.priority >= state.min_candidate_priority and (
            self.level_of(job) < state.max_candidate_level
        ):
            return True
        cohort = state.book.cohort_of(job.queue)
        return cohort is not None and any(state.borrowing.values())

    def _eligible(
        self, state: _State, job: PendingJob, victim: RunningJob, *, reclaim: bool, level: int
    ) -> str | None:
        """Why ``victim`` may make room for ``job`` (the preemption's reason), or None."""
        if victim.id in state.victims:
            return None
        if victim.priority < job.priority:
            name = _PRIORITY_NAMES.get(job.priority, str(job.priority))
            return f"preempted for job {job.id} (priority {name})"
        book = state.book
        if (
            reclaim
            and victim.queue != job.queue
            and state.borrowing.get(victim.queue, False)
            and book.cohort_of(victim.queue) == book.cohort_of(job.queue)
        ):
            return f"preempted: queue {job.queue} reclaims its lent quota for job {job.id}"
        if (
            victim.priority <= job.priority
            and self.level_of(victim) > level
            and state.snapshot.now - victim.started_at >= self.las_min_run_s
        ):
            if self.per_gpu:
                return (
                    f"preempted for job {job.id}, which has run for less time "
                    f"({_ran(job) / 3600:.1f} vs {_ran(victim) / 3600:.1f} hours per GPU)"
                )
            return (
                f"preempted for job {job.id}, which has received less GPU time "
                f"({job.attained_gpu_s / 3600:.1f} vs {victim.attained_gpu_s / 3600:.1f} GPU-hours)"
            )
        return None

    def _preempt(
        self, state: _State, job: PendingJob, position: int, *, same_queue_only: bool = False
    ) -> bool:
        """Find the fewest victims that make room for ``job``; hold the room. True if found."""
        state.searches += 1
        book = state.book
        packing = state.packing
        reclaim = (
            not same_queue_only
            and book.cohort_of(job.queue) is not None
            and book.within_nominal(job)
        )
        level = self.level_of(job)
        future = self._future(state)
        need = job.demand.gpu_units * job.workers
        chosen: list[tuple[RunningJob, str]] = []

        def fits() -> Placement | None:
            if book.check(job) is not None or future.total_free_gpus() + EPSILON < need:
                return None
            placement = future.place(job, packing)
            if placement is not None and book.check(job, book.model_of(placement)) is not None:
                return None
            return placement

        placement: Placement | None = None
        for victim in state.candidates:
            if same_queue_only and victim.queue != job.queue:
                continue
            why = self._eligible(state, job, victim, reclaim=reclaim, level=level)
            if why is None:
                continue
            future.give_back(victim, victim.placement, packing=packing)
            book.add(victim, book.model_of(victim.placement), -1.0)
            chosen.append((victim, why))
            placement = fits()
            if placement is not None or len(chosen) >= MAX_VICTIMS:
                break
        if placement is None:
            for victim, _ in chosen:
                future.take(victim, victim.placement, packing=packing)
                book.add(victim, book.model_of(victim.placement), 1.0)
            return False
        # Spare every victim that is not needed, the least preferred victims first.
        for k in range(len(chosen) - 2, -1, -1):
            victim, _ = chosen[k]
            future.take(victim, victim.placement, packing=packing)
            book.add(victim, book.model_of(victim.placement), 1.0)
            again = fits()
            if again is None:
                future.give_back(victim, victim.placement, packing=packing)
                book.add(victim, book.model_of(victim.placement), -1.0)
            else:
                chosen.pop(k)
                placement = again
        assert placement is not None
        self._hold(state, job, placement)
        # What the victims free beyond the job's need may fit others.
        state.hold_failed.clear()
        state.dead.clear()
        state.reasons.clear()
        for victim, why in chosen:
            state.victims.add(victim.id)
            state.decision.preempt.append(Preemption(job_id=victim.id, for_job=job.id, reason=why))
        names = ", ".join(v.id for v, _ in chosen)
        state.decision.waiting[job.id] = (
            f"waiting: {ordinal(position)} in queue {job.queue}; preempting "
            f"{len(chosen)} job{'s' if len(chosen) != 1 else ''} to make room ({names})"
        )
        return True

    # -- EASY backfill --------------------------------------------------------------------------

    def _reserve(self, state: _State, job: PendingJob, position: int) -> None:
        snapshot = state.snapshot
        packing = state.packing
        now = snapshot.now
        if state.future is not None:
            sim = state.future.copy()
        else:
            sim = state.free.copy()
            for r in snapshot.running:
                if r.stopping:
                    sim.give_back(r, r.placement, packing=packing)
        known: list[tuple[float, Job, Placement]] = []
        unknown: list[tuple[float, Job, Placement]] = []
        for r in snapshot.running:
            if r.stopping or r.id in state.victims:
                continue
            if r.max_runtime_s is None:
                unknown.append((r.started_at, r, r.placement))
            else:
                known.append((max(now, r.started_at + r.max_runtime_s), r, r.placement))
        for a, p in state.admitted:
            if a.max_runtime_s is None:
                unknown.append((now, a, p))
            else:
                known.append((now + a.max_runtime_s, a, p))
        known.sort(key=lambda t: (t[0], t[1].id))
        unknown.sort(key=lambda t: (t[0], t[1].id))
        need = job.demand.gpu_units * job.workers
        at = math.inf
        placement: Placement | None = None
        for end, ended, p in known:
            sim.give_back(ended, p, packing=packing)
            if sim.total_free_gpus() + EPSILON >= need:
                placement = sim.place(job, packing)
                if placement is not None:
                    at = end
                    break
        if placement is None:
            for _, ended, p in unknown:
                sim.give_back(ended, p, packing=packing)
                if sim.total_free_gpus() + EPSILON >= need:
                    placement = sim.place(job, packing)
                    if placement is not None:
                        break
        where = f"waiting: {ordinal(position)} in queue {job.queue}; needs {demand_text(job)}"
        if placement is None:
            # Not even an empty cluster (of healthy nodes) holds it now: no reservation.
            state.decision.waiting[job.id] = f"{where}; not enough healthy capacity"
            return
        spare = sim.total_free_gpus() - need
        state.reservation = _Reservation(
            job_id=job.id,
            at=at,
            nodes=frozenset(w.node_id for w in placement.workers),
            spare_units=spare,
        )
        if math.isfinite(at):
            state.decision.reserved[job.id] = at
            when = f"expected to start in {_duration(at - now)} (by running jobs' max runtimes)"
        else:
            when = "start time unknown (running jobs declare no max runtime)"
        state.decision.waiting[job.id] = (
            f"{where}; holds the reservation, {when}; smaller jobs run ahead only where they "
            "cannot delay it"
        )

    # -- reasons --------------------------------------------------------------------------------

    def _blocked_suffix(self, state: _State, job: PendingJob) -> str:
        quota = state.book.check(job)
        if quota is not None:
            return quota
        free = state.free
        d = job.demand
        if d.gpus:
            most = free.most_free_gpus_on_a_node()
            if state.packing == "count":
                have = f"{free.total_free_gpus():g} GPUs free"
            else:
                have = f"most free on one node: {most}"
            text = f"needs {demand_text(job)} ({have})"
        elif d.gpu_fraction:
            text = f"needs {demand_text(job)} ({free.total_free_gpus():g} GPUs free)"
        else:
            text = f"needs {demand_text(job)} ({free.free_cpus():g} CPUs free)"
        if state.reservation is not None:
            text += f", behind job {state.reservation.job_id}'s reservation"
        return text


def _ran(job: PendingJob | RunningJob) -> float:
    """How long ``job`` has run, in seconds: the GPU time it received per GPU it holds."""
    units = job.demand.gpu_units * job.workers
    return job.attained_gpu_s / units if units > 0 else job.attained_gpu_s


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = ["LAS_MIN_RUN_S", "LAS_SERVICE", "LAS_THRESHOLDS_S", "DefaultPolicy"]
