"""Queues: quotas, cohorts and fair-share weights, and what each queue uses and who waits in it.

Kueue's shape. Every job belongs to a queue (``JobSpec.queue``; by default its project's, named
like the project). A configured queue has a *nominal* quota of GPUs, CPUs and memory (optionally
GPUs per model), may sit in a *cohort* whose members borrow each other's idle nominal quota up
to their *borrowing limit*, and has a fair-share *weight*. A queue nobody configured is
unlimited. Server admins configure queues; anyone signed in may read them (the ids of jobs in
projects the caller cannot see are left out of the views; the totals count them).

``load_configs`` is what the admission pipeline reads; ``check_submit`` is what submit calls to
refuse an unknown queue or a GPU model no node has. Shrinking a quota below what a queue uses
never stops a job: its running jobs keep running, new ones wait (the policy does that), and the
view says so in ``message``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shipyard.compute.policy.base import UNLIMITED, Node, QueueConfig, Quota, gpu_matches
from shipyard.context import Context
from shipyard.domain.models import (
    JobSpec,
    JobStatus,
    QueueView,
    QuotaSpec,
    ResourceAmount,
    WaitingJob,
)
from shipyard.domain.names import validate_name
from shipyard.errors import InvalidInputError, NotFoundError
from shipyard.security import audit
from shipyard.security.rbac import can_view, require_server_admin
from shipyard.store.tables import JobRow, ProjectRow, QueueRow, aware, utcnow

# Bounds on what a quota may say (beyond them a number is a typo, not a cluster).
MAX_GPUS = 1_000_000.0
MAX_CPUS = 100_000_000.0
MAX_MEMORY_MB = 2**53  # exact in a JSON double
MAX_WEIGHT = 1_000_000.0
MAX_MODEL_LEN = 128
MAX_MODELS = 64


def load_configs(session: Session) -> dict[str, QueueConfig]:
    """Every configured queue as the policy reads it (a queue left out is unlimited)."""
    rows = session.scalars(select(QueueRow).order_by(QueueRow.name))
    return {row.name: _config(row) for row in rows}


def set_queue(
    ctx: Context,
    *,
    name: str,
    nominal: Quota | QuotaSpec = UNLIMITED,
    cohort: str | None = None,
    borrowing_limit: Quota | QuotaSpec = UNLIMITED,
    weight: float = 1.0,
) -> QueueView:
    """Create or replace queue ``name``'s configuration (server admins only).

    A quota below what the queue uses now is allowed: its running jobs keep running, new ones
    wait until usage drops below it; the returned view's ``message`` says so.
    """
    require_server_admin(ctx, what="configuring queues")
    name = validate_name(name, field="name")
    if cohort is not None:
        cohort = validate_name(cohort, field="cohort")
    nominal_json = quota_json(_as_quota(nominal), field="nominal")
    limit_json = quota_json(_as_quota(borrowing_limit), field="borrowing_limit")
    weight = _check_weight(weight)
    with ctx.db.transaction() as s:
        row = s.get(QueueRow, name)
        previous = None if row is None else _row_details(row)
        now = utcnow()
        if row is None:
            row = QueueRow(name=name, created_at=now)
            s.add(row)
        row.cohort = cohort
        row.weight = weight
        row.nominal = nominal_json
        row.borrowing_limit = limit_json
        row.updated_at = now
        s.flush()
        audit.record(
            s,
            actor=ctx.actor,
            action="queue.set",
            resource=_resource(name),
            details={**_row_details(row), "previous": previous},
        )
    return get_queue(ctx, name=name)


def delete_queue(ctx: Context, *, name: str) -> None:
    """Remove a queue's configuration: it becomes unlimited (its jobs stay where they are)."""
    require_server_admin(ctx, what="deleting queues")
    name = validate_name(name, field="name")
    with ctx.db.transaction() as s:
        row = s.get(QueueRow, name)
        if row is None:
            raise _unknown_queue(s, name)
        details = _row_details(row)
        s.delete(row)
        audit.record(
            s, actor=ctx.actor, action="queue.delete", resource=_resource(name), details=details
        )


def list_queues(ctx: Context) -> list[QueueView]:
    """The configured queues and the unconfigured ones that have jobs, by name."""
    with ctx.db.read() as s:
        configured = {row.name: row for row in s.scalars(select(QueueRow))}
        jobs = _active_jobs(s)
        names = set(configured)
        for job in jobs:
            if job.queue not in configured and _visible(ctx, job.project):
                names.add(job.queue)
        return [_view(ctx, name, configured.get(name), jobs) for name in sorted(names)]


def get_queue(ctx: Context, *, name: str) -> QueueView:
    """One queue: configured, or a project's default queue (unlimited) - else NotFoundError."""
    name = validate_name(name, field="name")
    with ctx.db.read() as s:
        row = s.get(QueueRow, name)
        jobs = _active_jobs(s)
        if row is None:
            # a project's own queue, or one with jobs - as far as the caller may see (a name
            # nobody may see answers like a missing one, so project names do not leak)
            known = any(job.queue == name and _visible(ctx, job.project) for job in jobs) or (
                _is_project(s, name) and _visible(ctx, name)
            )
            if not known:
                raise _unknown_queue(s, name)
        return _view(ctx, name, row, jobs)


def check_submit(
    session: Session,
    *,
    project: str,
    queue: str | None,
    gpu_type: str | None,
    nodes: Sequence[Node] | None,
) -> str:
    """Refuse, at submit, a queue that does not exist or a GPU model no node has.

    Returns the job's queue: ``queue``, or the project's own when None. A job may go to a
    configured queue or to its project's own queue (which needs no configuration). ``nodes``:
    the cluster's nodes, or None when they cannot be read now (the GPU model is then not
    checked; the job waits and the policy says why).
    """
    resolved = project if queue is None else validate_name(queue, field="queue")
    if resolved != project and session.get(QueueRow, resolved) is None:
        names = _configured_names(session)
        have = f"the configured queues are: {', '.join(names)}" if names else "none is configured"
        raise InvalidInputError(
            f"queue {resolved!r} does not exist ({have}); leave the queue out to use project "
            f"{project!r}'s own queue, or ask a server admin to create it with "
            f"'shipyard queues set {resolved} --gpus N'",
            field="queue",
        )
    if gpu_type is not None:
        wanted = _check_model(gpu_type, field="resources.gpu_type")
        if nodes is not None:
            models: dict[str, int] = {}
            for node in nodes:
                for gpu in node.gpus:
                    models[gpu.model] = models.get(gpu.model, 0) + 1
            if not any(gpu_matches(model, wanted) for model in models):
                have = (
                    "the cluster's GPUs are: "
                    + ", ".join(f"{m or 'unnamed'} ({n})" for m, n in sorted(models.items()))
                    if models
                    else "the cluster has no GPUs"
                )
                raise InvalidInputError(
                    f"no node has a GPU of model {wanted!r} ({have}); ask for one of those "
                    "models or leave --gpu-type out",
                    field="resources.gpu_type",
                )
    return resolved


def quota_json(quota: Quota, *, field: str) -> dict[str, Any]:
    """A checked quota as stored (keys left out are unlimited)."""
    out: dict[str, Any] = {}
    if quota.gpus is not None:
        out["gpus"] = _amount(quota.gpus, MAX_GPUS, field=f"{field}.gpus")
    if quota.cpus is not None:
        out["cpus"] = _amount(quota.cpus, MAX_CPUS, field=f"{field}.cpus")
    if quota.memory_mb is not None:
        value = _amount(quota.memory_mb, MAX_MEMORY_MB, field=f"{field}.memory_mb")
        if value != int(value):
            raise InvalidInputError(
                f"{field}.memory_mb must be a whole number of MB, not {quota.memory_mb!r}",
                field=f"{field}.memory_mb",
            )
        out["memory_mb"] = int(value)
    models = dict(quota.gpus_by_model or {})
    if len(models) > MAX_MODELS:
        raise InvalidInputError(
            f"{field}.gpus_by_model names {len(models)} models; at most {MAX_MODELS}",
            field=f"{field}.gpus_by_model",
        )
    by_model: dict[str, float] = {}
    for model, amount in models.items():
        key = _check_model(model, field=f"{field}.gpus_by_model")
        if key in by_model:
            raise InvalidInputError(
                f"{field}.gpus_by_model names model {key!r} twice", field=f"{field}.gpus_by_model"
            )
        by_model[key] = _amount(amount, MAX_GPUS, field=f"{field}.gpus_by_model[{key}]")
    if by_model:
        out["gpus_by_model"] = by_model
    return out


def quota_of(data: Mapping[str, Any] | None) -> Quota:
    """A stored quota (``quota_json``) as the policy's ``Quota``."""
    data = data or {}
    memory = data.get("memory_mb")
    return Quota(
        gpus=None if data.get("gpus") is None else float(data["gpus"]),
        cpus=None if data.get("cpus") is None else float(data["cpus"]),
        memory_mb=None if memory is None else int(memory),
        gpus_by_model={str(k): float(v) for k, v in (data.get("gpus_by_model") or {}).items()},
    )


def spec_of(quota: Quota) -> QuotaSpec:
    return QuotaSpec(
        gpus=quota.gpus,
        cpus=quota.cpus,
        memory_mb=quota.memory_mb,
        gpus_by_model=dict(quota.gpus_by_model),
    )


# --- helpers ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Job:
    """One queued or running job, as much as a queue view needs."""

    id: str
    project: str
    queue: str
    status: JobStatus
    priority: int
    created: float
    gpus: float  # GPU units, all workers
    cpus: float
    memory_mb: int
    gpu_type: str | None
    message: str


def _active_jobs(s: Session) -> list[_Job]:
    rows = s.execute(
        select(JobRow, ProjectRow.name)
        .join(ProjectRow, JobRow.project_id == ProjectRow.id)
        .where(JobRow.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))
        .order_by(JobRow.created_at, JobRow.id)
    ).all()
    return [job_facts(row, project) for row, project in rows]


def job_facts(row: JobRow, project: str) -> _Job:
    """What a job row says about its queue and its demand (all workers together)."""
    spec = JobSpec.model_validate(row.spec)
    workers = int(row.workers or 1)
    created = aware(row.created_at)
    return _Job(
        id=row.id,
        project=project,
        queue=row.queue or spec.queue or project,
        status=JobStatus(row.status),
        priority=int(row.priority or 0),
        created=created.timestamp() if created else 0.0,
        gpus=float(row.gpu_units or 0.0),
        cpus=workers * float(row.cpus),
        memory_mb=workers * int(row.memory_mb),
        gpu_type=spec.resources.gpu_type,
        message=row.message or "",
    )


def _view(ctx: Context, name: str, row: QueueRow | None, jobs: Sequence[_Job]) -> QueueView:
    config = _config(row) if row is not None else QueueConfig(name=name)
    mine = [job for job in jobs if job.queue == name]
    running = [job for job in mine if job.status is JobStatus.RUNNING]
    waiting = sorted(
        (job for job in mine if job.status is JobStatus.QUEUED),
        key=lambda job: (-job.priority, job.created, job.id),
    )
    usage = ResourceAmount(
        gpus=_round(sum(job.gpus for job in running)),
        cpus=_round(sum(job.cpus for job in running)),
        memory_mb=sum(job.memory_mb for job in running),
    )
    by_model = {
        model: _round(
            sum(
                job.gpus
                for job in running
                if job.gpu_type is not None and gpu_matches(model, job.gpu_type)
            )
        )
        for model in config.nominal.gpus_by_model
    }
    nominal = config.nominal
    borrowed = ResourceAmount(
        gpus=_above(usage.gpus, nominal.gpus),
        cpus=_above(usage.cpus, nominal.cpus),
        memory_mb=int(_above(usage.memory_mb, nominal.memory_mb)),
    )

    def visible(job: _Job) -> bool:
        return _visible(ctx, job.project)

    return QueueView(
        name=name,
        configured=row is not None,
        cohort=config.cohort,
        weight=config.weight,
        nominal=spec_of(config.nominal),
        borrowing_limit=spec_of(config.borrowing_limit),
        usage=usage,
        gpus_by_model=by_model,
        borrowed=borrowed,
        running=[job.id for job in running if visible(job)],
        running_count=len(running),
        waiting=[
            WaitingJob(
                job_id=job.id if visible(job) else "",
                project=job.project if visible(job) else "",
                position=position,
                reason=job.message or "waiting: queued",
            )
            for position, job in enumerate(waiting, start=1)
        ],
        message=_over_quota_message(config, usage, by_model),
        created_at=aware(row.created_at) if row is not None else None,
        updated_at=aware(row.updated_at) if row is not None else None,
    )


def _over_quota_message(
    config: QueueConfig, usage: ResourceAmount, by_model: Mapping[str, float]
) -> str:
    """Say so when the running jobs use more than the queue may hold (a quota just shrunk)."""
    nominal, limit = config.nominal, config.borrowing_limit
    over: list[str] = []

    def check(what: str, used: float, quota: float | None, extra: float | None) -> None:
        if quota is None:
            return
        allowed = quota if config.cohort is None else (None if extra is None else quota + extra)
        if allowed is not None and used > allowed + 1e-9:
            over.append(f"{_num(used)} {what} (may hold {_num(allowed)})")

    check("GPUs", usage.gpus, nominal.gpus, limit.gpus)
    check("CPUs", usage.cpus, nominal.cpus, limit.cpus)
    check("MB of memory", usage.memory_mb, nominal.memory_mb, limit.memory_mb)
    for model, used in by_model.items():
        check(f"{model} GPUs", used, nominal.gpus_by_model.get(model), None)
    if not over:
        return ""
    return (
        f"queue {config.name} uses {', '.join(over)}: its running jobs keep running, new ones "
        "wait until its usage is below its quota"
    )


def _config(row: QueueRow) -> QueueConfig:
    return QueueConfig(
        name=row.name,
        nominal=quota_of(row.nominal),
        cohort=row.cohort,
        borrowing_limit=quota_of(row.borrowing_limit),
        weight=float(row.weight),
    )


def _as_quota(quota: Quota | QuotaSpec | Mapping[str, Any]) -> Quota:
    if isinstance(quota, Quota):
        return quota
    if isinstance(quota, QuotaSpec):
        return Quota(
            gpus=quota.gpus,
            cpus=quota.cpus,
            memory_mb=quota.memory_mb,
            gpus_by_model=dict(quota.gpus_by_model),
        )
    if isinstance(quota, Mapping):
        return Quota(
            gpus=quota.get("gpus"),
            cpus=quota.get("cpus"),
            memory_mb=quota.get("memory_mb"),
            gpus_by_model=dict(quota.get("gpus_by_model") or {}),
        )
    raise InvalidInputError(f"a quota must be a Quota, not {type(quota).__name__}", field="quota")


def _amount(value: object, bound: float, *, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInputError(f"{field} must be a number, not {value!r}", field=field)
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise InvalidInputError(
            f"{field} must be a non-negative number, not {value!r}; leave it out for no limit",
            field=field,
        )
    if number > bound:
        raise InvalidInputError(f"{field} is {value!r}; at most {bound:g}", field=field)
    return number


def _check_weight(weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise InvalidInputError(f"weight must be a number, not {weight!r}", field="weight")
    value = float(weight)
    if not math.isfinite(value) or value <= 0 or value > MAX_WEIGHT:
        raise InvalidInputError(
            f"weight must be above 0 and at most {MAX_WEIGHT:g}, not {weight!r} "
            "(1 is an equal share)",
            field="weight",
        )
    return value


def _check_model(model: object, *, field: str) -> str:
    if not isinstance(model, str) or not model.strip():
        raise InvalidInputError(f"{field}: a GPU model must be a non-empty name", field=field)
    text = model.strip()
    if len(text) > MAX_MODEL_LEN or not text.isprintable():
        raise InvalidInputError(
            f"{field}: GPU model {text[:40]!r} must be at most {MAX_MODEL_LEN} printable "
            "characters",
            field=field,
        )
    return text


def _visible(ctx: Context, project: str) -> bool:
    return ctx.principal.server_admin or can_view(ctx.principal, project)


def _unknown_queue(s: Session, name: str) -> NotFoundError:
    names = _configured_names(s)
    have = f"the configured queues are: {', '.join(names)}" if names else "no queue is configured"
    return NotFoundError(f"queue {name!r} does not exist ({have})", field="name")


def _configured_names(s: Session) -> list[str]:
    return list(s.scalars(select(QueueRow.name).order_by(QueueRow.name)))


def _is_project(s: Session, name: str) -> bool:
    return s.scalar(select(ProjectRow.id).where(ProjectRow.name == name)) is not None


def _row_details(row: QueueRow) -> dict[str, Any]:
    return {
        "cohort": row.cohort,
        "weight": row.weight,
        "nominal": row.nominal,
        "borrowing_limit": row.borrowing_limit,
    }


def _above(used: float, quota: float | None) -> float:
    return 0.0 if quota is None else _round(max(0.0, used - quota))


def _round(value: float) -> float:
    return round(value, 6)


def _num(value: float) -> str:
    return f"{value:g}"


def _resource(name: str) -> str:
    return f"queue/{name}"


__all__ = [
    "check_submit",
    "delete_queue",
    "get_queue",
    "job_facts",
    "list_queues",
    "load_configs",
    "quota_json",
    "quota_of",
    "set_queue",
    "spec_of",
]
