"""Weighted dominant-resource fairness across queues, FIFO within a queue; and quota accounting.

``Drf`` repeatedly picks the queue with the smallest weighted dominant share (its largest share of
any cluster resource, divided by its weight) and admits that queue's first job (highest priority,
then oldest) if it fits now and within the queue's quota; a queue whose first job does not fit
waits for this decision (head-of-line within the queue, others go on). Gangs are all or nothing.
No preemption, no backfill.

``QuotaBook`` is the quota and share accounting that ``Drf`` and ``DefaultPolicy`` share: usage
per queue (running jobs, plus what a decision admits), Kueue-shaped quota checks (nominal quota;
a queue in a cohort may borrow the cohort's idle nominal quota up to its borrowing limit; a queue
that is not configured is unlimited) and dominant shares.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from shipyard.compute.policy.base import (
    EPSILON,
    Decision,
    Node,
    PendingJob,
    Placement,
    QueueConfig,
    Quota,
    RunningJob,
    Snapshot,
    gpu_matches,
)
from shipyard.compute.policy.placement import FitCheck, FreeCapacity, Job

GPUS, CPUS, MEMORY = 0, 1, 2
_LABEL = ("GPU", "CPU", "memory")


@dataclass(slots=True)
class _Limit:
    resource: int  # GPUS/CPUS/MEMORY, or 3 + an index into the queue's model keys
    key: int | str  # the cohort's key: GPUS/CPUS/MEMORY, or the model name
    label: str  # "GPU", "CPU", "memory", "A100 GPU"
    nominal: float
    borrow: float | None  # None = unlimited borrowing (still bound by the cohort's idle quota)


class QuotaBook:
    """Usage per queue and cohort, quota checks and weighted dominant shares."""

    def __init__(
        self,
        queues: Mapping[str, QueueConfig],
        nodes: Sequence[Node],
        running: Iterable[RunningJob] = (),
    ) -> None:
        self.queues = queues
        # Per-model quotas need the model of each placement's devices; without any, skip it.
        self._per_model = any(cfg.nominal.gpus_by_model for cfg in queues.values())
        self._model_of: dict[str, list[str]] = {}
        self._gpu_index: dict[str, dict[int, int]] = {}
        if self._per_model:
            self._model_of = {n.id: [g.model for g in n.gpus] for n in nodes}
            self._gpu_index = {n.id: {g.index: j for j, g in enumerate(n.gpus)} for n in nodes}
        healthy = [n for n in nodes if n.healthy] or list(nodes)
        self.totals = (
            float(sum(len(n.gpus) for n in healthy)),
            float(sum(n.cpus for n in healthy)),
            float(sum(n.memory_mb for n in healthy)),
        )
        self.usage: dict[str, list[float]] = {}
        self._shares: dict[str, float] = {}
        self._models: dict[str, list[str]] = {}  # queue -> model keys it has quotas for
        self._limits: dict[str, list[_Limit]] = {}
        self._cohort_of: dict[str, str] = {}
        self._cohort_nominal: dict[str, dict[int | str, float | None]] = {}
        self._cohort_usage: dict[str, dict[int | str, float]] = {}
        for name, cfg in queues.items():
            keys = list(cfg.nominal.gpus_by_model)
            self._models[name] = keys
            self._limits[name] = _limits_of(cfg, keys)
            if cfg.cohort is not None:
                self._cohort_of[name] = cfg.cohort
        for name, cohort in self._cohort_of.items():
            totals = self._cohort_nominal.setdefault(cohort, {})
            cfg = queues[name]
            for key, amount in _quota_items(cfg.nominal):
                if key in totals and totals[key] is None:
                    continue
                totals[key] = None if amount is None else (totals.get(key) or 0.0) + amount
            self._cohort_usage.setdefault(cohort, {})
        # A resource some member leaves unlimited is unlimited for the cohort.
        for name, cohort in self._cohort_of.items():
            totals = self._cohort_nominal[cohort]
            for key, amount in _quota_items(queues[name].nominal):
                if amount is None:
                    totals[key] = None
        for job in running:
            self.add(job, self.model_of(job.placement))

    # -- usage ----------------------------------------------------------------------------------

    @property
    def per_model(self) -> bool:
        """Whether some queue has per-model GPU quotas (else models need not be looked up)."""
        return self._per_model

    def model_of(self, placement: Placement | None) -> str | None:
        """The model of the first GPU a placement names (None without GPUs, and whenever no
        queue has per-model quotas: then nothing needs it)."""
        if placement is None or not self._per_model:
            return None
        for wp in placement.workers:
            if wp.gpus:
                models = self._model_of.get(wp.node_id)
                pos = self._gpu_index.get(wp.node_id, {}).get(wp.gpus[0])
                if models is not None and pos is not None:
                    return models[pos]
        return None

    def add(self, job: Job, model: str | None, sign: float = 1.0) -> None:
        """Count ``job`` (on devices of ``model``) against its queue (``sign`` -1: release)."""
        demand = job.demand
        workers = job.workers
        gpus = (demand.gpus or demand.gpu_fraction) * workers * sign
        cpus = demand.cpus * workers * sign
        mem = demand.memory_mb * workers * sign
        self._shares.pop(job.queue, None)
        keys = self._models.get(job.queue, [])
        usage = self.usage.get(job.queue)
        if usage is None:
            usage = self.usage[job.queue] = [0.0] * (3 + len(keys))
        usage[GPUS] += gpus
        usage[CPUS] += cpus
        usage[MEMORY] += mem
        if keys and model is not None and gpus:
            for k, key in enumerate(keys):
                if gpu_matches(model, key):
                    usage[3 + k] += gpus
        cohort = self._cohort_of.get(job.queue)
        if cohort is not None:
            cu = self._cohort_usage[cohort]
            cu[GPUS] = cu.get(GPUS, 0.0) + gpus
            cu[CPUS] = cu.get(CPUS, 0.0) + cpus
            cu[MEMORY] = cu.get(MEMORY, 0.0) + mem
            if model is not None and gpus:
                for ckey in self._cohort_nominal[cohort]:
                    if isinstance(ckey, str) and gpu_matches(model, ckey):
                        cu[ckey] = cu.get(ckey, 0.0) + gpus

    def share(self, queue: str) -> float:
        """The queue's weighted dominant share: max over resources of used / cluster total."""
        cached = self._shares.get(queue)
        if cached is None:
            cached = self._shares[queue] = self._share(queue)
        return cached

    def _share(self, queue: str) -> float:
        usage = self.usage.get(queue)
        if usage is None:
            return 0.0
        best = 0.0
        for r in (GPUS, CPUS, MEMORY):
            total = self.totals[r]
            if total > 0:
                best = max(best, usage[r] / total)
        cfg = self.queues.get(queue)
        weight = cfg.weight if cfg is not None and cfg.weight > 0 else 1.0
        return best / weight

    def borrowing(self, queue: str) -> bool:
        """Whether the queue uses more than its nominal quota of some resource."""
        usage = self.usage.get(queue)
        if usage is None:
            return False
        return any(
            usage[lim.resource] > lim.nominal + EPSILON for lim in self._limits.get(queue, ())
        )

    def within_nominal(self, job: Job, model: str | None = None) -> bool:
        """Whether the queue stays within its nominal quota (no borrowing) with ``job`` added."""
        limits = self._limits.get(job.queue)
        if not limits:
            return job.queue in self.queues  # an unconfigured queue has no nominal to reclaim
        amounts = self._amounts(job, model)
        usage = self.usage.get(job.queue)
        for lim in limits:
            need = amounts[lim.resource]
            used = usage[lim.resource] if usage is not None else 0.0
            if need and used + need > lim.nominal + EPSILON:
                return False
        return True

    def cohort_of(self, queue: str) -> str | None:
        return self._cohort_of.get(queue)

    # -- checks ---------------------------------------------------------------------------------

    def check(self, job: Job, model: str | None = None) -> str | None:
        """Why ``job`` may not start within its queue's quota now, or None when it may.

        ``model``: the GPU model it would get (per-model quotas are checked only with one).
        """
        limits = self._limits.get(job.queue)
        if not limits:
            return None
        amounts = self._amounts(job, model)
        usage = self.usage.get(job.queue)
        cfg = self.queues[job.queue]
        cohort = self._cohort_of.get(job.queue)
        for lim in limits:
            need = amounts[lim.resource]
            if not need:
                continue
            used = usage[lim.resource] if usage is not None else 0.0
            if used + need <= lim.nominal + EPSILON:
                continue
            unit = " MB" if lim.resource == MEMORY else ""
            at = f"{_num(used)}/{_num(lim.nominal)}{unit}"
            if cohort is None:
                ceiling = lim.nominal
            elif lim.borrow is None:
                ceiling = float("inf")
            else:
                ceiling = lim.nominal + lim.borrow
            if need > ceiling + EPSILON:
                return (
                    f"needs {_num(need)}{unit} {_what(lim)}, more than queue {cfg.name}'s "
                    f"{lim.label} quota {_num(lim.nominal)}{unit}"
                    + (
                        f" plus its borrowing limit {_num(lim.borrow)}{unit}"
                        if cohort is not None and lim.borrow
                        else ""
                    )
                    + "; it waits until the quota is raised"
                )
            if cohort is None:
                return f"queue {cfg.name} is at its {lim.label} quota {at}"
            if used + need > ceiling + EPSILON:
                return (
                    f"queue {cfg.name} is at its {lim.label} quota {at} and its borrowing "
                    f"limit {_num(lim.borrow or 0.0)}{unit}"
                )
            total = self._cohort_nominal[cohort].get(lim.key)
            if total is None:
                continue  # the cohort is unlimited in it
            in_use = self._cohort_usage[cohort].get(lim.key, 0.0)
            if in_use + need > total + EPSILON:
                return (
                    f"queue {cfg.name} is at its {lim.label} quota {at} and cohort {cohort} "
                    f"has no idle {lim.label} quota to lend ({_num(in_use)}/{_num(total)}{unit} "
                    "in use)"
                )
        return None

    def _amounts(self, job: Job, model: str | None) -> list[float]:
        demand = job.demand
        workers = job.workers
        gpus = (demand.gpus or demand.gpu_fraction) * workers
        amounts = [gpus, demand.cpus * workers, float(demand.memory_mb * workers)]
        for key in self._models.get(job.queue, ()):
            amounts.append(gpus if model is not None and gpu_matches(model, key) else 0.0)
        return amounts


def _limits_of(cfg: QueueConfig, keys: list[str]) -> list[_Limit]:
    nominal, borrow = cfg.nominal, cfg.borrowing_limit
    limits: list[_Limit] = []
    for r, amount, extra in (
        (GPUS, nominal.gpus, borrow.gpus),
        (CPUS, nominal.cpus, borrow.cpus),
        (MEMORY, nominal.memory_mb, borrow.memory_mb),
    ):
        if amount is not None:
            limits.append(_Limit(r, r, _LABEL[r], float(amount), _opt(extra)))
    for k, key in enumerate(keys):
        limits.append(
            _Limit(
                3 + k,
                key,
                f"{key} GPU",
                float(nominal.gpus_by_model[key]),
                _opt(borrow.gpus_by_model.get(key)),
            )
        )
    return limits


def _quota_items(quota: Quota) -> list[tuple[int | str, float | None]]:
    items: list[tuple[int | str, float | None]] = [
        (GPUS, _opt(quota.gpus)),
        (CPUS, _opt(quota.cpus)),
        (MEMORY, _opt(quota.memory_mb)),
    ]
    items.extend((key, float(v)) for key, v in quota.gpus_by_model.items())
    return items


def _opt(value: float | None) -> float | None:
    return None if value is None else float(value)


def _what(lim: _Limit) -> str:
    return {GPUS: "GPUs", CPUS: "CPUs", MEMORY: "of memory"}.get(lim.resource, lim.label + "s")


def _num(value: float) -> str:
    return f"{value:g}" if value != int(value) else str(int(value))


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 12th, 21st..."""
    if n < len(ORDINALS):
        return ORDINALS[n]
    if 10 <= n % 100 <= 20:
        return f"{n}th"
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th') }"


ORDINALS: list[str] = []
ORDINALS.extend(ordinal(n) for n in range(20_000))


def demand_text(job: PendingJob) -> str:
    """What a job asks for, as a reason says it: "4 workers x 2 GPUs", "a 0.25 GPU share"."""
    d = job.demand
    if d.gpus:
        what = f"{d.gpus} GPU{'s' if d.gpus != 1 else ''}"
        if d.gpu_type:
            what = f"{d.gpus} {d.gpu_type} GPU{'s' if d.gpus != 1 else ''}"
    elif d.gpu_fraction:
        what = f"a {d.gpu_fraction:g} GPU share"
    else:
        what = f"{d.cpus:g} CPUs"
    return f"{job.workers} workers x {what}" if job.workers > 1 else what


def fifo_key(job: PendingJob) -> tuple[int, float, str]:
    return (-job.priority, job.submitted_at, job.id)


class Drf:
    """Weighted DRF across queues, priority then FIFO within a queue; no preemption."""

    name = "drf"

    def decide(self, snapshot: Snapshot) -> Decision:
        decision = Decision()
        packing = snapshot.packing
        free = FreeCapacity.of(snapshot)
        book = QuotaBook(snapshot.queues, snapshot.nodes, snapshot.running)
        by_queue: dict[str, list[PendingJob]] = {}
        fits = FitCheck(snapshot.nodes, packing)
        for job in snapshot.pending:
            reason = fits(job)
            if reason is not None:
                decision.unschedulable[job.id] = reason
                continue
            by_queue.setdefault(job.queue, []).append(job)
        for jobs in by_queue.values():
            jobs.sort(key=fifo_key)
        heads = {name: 0 for name in by_queue}
        while heads:
            name = min(heads, key=lambda q: (book.share(q), q))
            jobs = by_queue[name]
            job = jobs[heads[name]]
            reason = book.check(job)
            placement: Placement | None = None
            if reason is None:
                placement = free.place(job, packing)
                if placement is None:
                    reason = f"needs {demand_text(job)}; not free now"
                else:
                    reason = book.check(job, book.model_of(placement))
            if reason is not None or placement is None:
                position = heads[name] + 1
                decision.waiting[job.id] = f"waiting: {ordinal(position)} in queue {name}; {reason}"
                for k, later in enumerate(jobs[heads[name] + 1 :], start=position + 1):
                    decision.waiting[later.id] = (
                        f"waiting: {ordinal(k)} in queue {name}, behind job {job.id}"
                    )
                del heads[name]
                continue
            free.take(job, placement, packing=packing)
            book.add(job, book.model_of(placement))
            decision.admit.append(placement)
            heads[name] += 1
            if heads[name] == len(jobs):
                del heads[name]
        return decision


__all__ = ["ORDINALS", "Drf", "QuotaBook", "demand_text", "fifo_key", "ordinal"]
