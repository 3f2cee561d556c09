"""Deployments as desired state: a named endpoint, its spec, and what serves it now.

A deployment's spec (``DeploymentSpec``) names its targets (model versions, or aliases it
follows, with traffic weights and shadows), how many replicas each target runs, their resources
and their batcher. ``deploy``, ``update_deployment`` and ``scale_deployment`` check the spec,
resolve its targets through the registry (an unknown alias or version is refused, and nothing is
stored), record it, audit it, and return at once: the reconciler (``serving.reconciler``) starts,
health-checks, restarts and drains the replicas until the deployment is what its spec says, and
keeps the deployment's status, message and replica list up to date.

A server runs the reconciler on a background thread and wakes it (``WAKE``) when a spec changes;
an embedded home has no such thread, so the SDK runs reconcile passes inline after each change
and while it waits (``shipyard.client.local``), and any later call that looks at a deployment
runs one more pass: a replica that died is restarted then.

``stop_deployment`` stops every replica itself (SIGTERM to each process group, SIGKILL after a
grace) before it returns, so a stopped deployment leaves no process behind.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from shipyard.context import Context, new_id
from shipyard.domain.models import (
    AutoscalingSpec,
    BatchingSpec,
    Deployment,
    DeploymentRollout,
    DeploymentSpec,
    DeploymentStatus,
    DeploymentTarget,
    ModelVersion,
    Replica,
    ReplicaBounds,
    ReplicaResources,
    ReplicaState,
    ServingTarget,
    check_deployment_spec,
)
from shipyard.domain.names import validate_name
from shipyard.domain.principals import Role
from shipyard.errors import ConflictError, InvalidInputError, InvalidStateError, NotFoundError
from shipyard.security import audit
from shipyard.security.rbac import authorize
from shipyard.serving import launcher
from shipyard.serving.launcher import start_replica
from shipyard.settings import DEFAULT_PROJECT
from shipyard.store.engine import lock
from shipyard.store.queries import add_edge, project_id
from shipyard.store.tables import (
    DeploymentReplicaRow,
    DeploymentRow,
    ModelRow,
    ModelVersionRow,
    ProjectRow,
    aware,
    utcnow,
)
from shipyard.tracking import registry

__all__ = [
    "UNCHANGED",
    "WAKE",
    "ResolvedTarget",
    "VersionResolver",
    "deploy",
    "get_deployment",
    "list_deployments",
    "resolve_targets",
    "rollout_key",
    "scale_deployment",
    "spec_of",
    "start_replica",
    "stop_deployment",
    "update_deployment",
]

SERVABLE_FORMATS = ("onnx",)
LOCK = "deployments"
# Set when a spec changes: the server's reconciler runs at once instead of at its next interval.
WAKE = threading.Event()
_ACTIVE_REPLICAS = (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.DRAINING)


class _Unchanged:
    """``update_deployment(autoscaling=...)`` not given (``None`` turns autoscaling off)."""

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED = _Unchanged()


class VersionResolver(Protocol):
    def __call__(self, ctx: Context, *, project: str, model: str, ref: str) -> ModelVersion: ...


@dataclass(frozen=True)
class ResolvedTarget:
    """A spec target resolved to a version, with the blob a replica of it loads."""

    target: ServingTarget
    digest: str


def deploy(
    ctx: Context,
    *,
    project: str,
    name: str,
    model: str,
    ref: str | None = None,
    spec: DeploymentSpec | None = None,
    max_batch_size: int | None = None,
    max_wait_ms: float | None = None,
    version_resolver: VersionResolver | None = None,
) -> Deployment:
    """Record deployment ``name`` of ``model`` with ``spec`` and return it STARTING, at once.

    Without a spec, one target: ``ref`` (an alias or a version number; default ``production``)
    with the given batcher settings. Raises InvalidInputError for a bad spec (the field named),
    NotFoundError for an unknown model, alias or version, and ConflictError when a deployment of
    that name is active (update it, or stop it first).
    """
    validate_name(name, field="name")
    validate_name(model, field="model")
    authorize(ctx, project=project, need=Role.EDITOR)
    spec = _spec_from_args(spec, ref, max_batch_size, max_wait_ms)
    check_deployment_spec(spec)
    resolved = resolve_targets(
        ctx, project=project, model=model, spec=spec, version_resolver=version_resolver
    )

    with ctx.db.transaction() as s:
        lock(s, LOCK)
        pid = project_id(s, project, create=True)
        model_id = s.scalar(
            select(ModelRow.id).where(ModelRow.project_id == pid, ModelRow.name == model)
        )
        if model_id is None:
            raise NotFoundError(
                f"model {model!r} does not exist in project {project!r}", field="model"
            )
        row = _find(s, pid, name)
        if row is not None:
            _refuse_if_active(s, row, project=project)
            for old in _replica_rows(s, row.id):
                s.delete(old)  # stopped slots of the previous life of this name
        else:
            row = DeploymentRow(id=new_id(), project_id=pid, name=name)
            s.add(row)
        main = _main_target([r.target for r in resolved])
        row.model_id = model_id
        row.alias = main.alias
        row.version = main.version
        row.status = DeploymentStatus.STARTING.value
        row.url = None
        row.pid = None
        row.pid_started = None
        row.spec = spec.model_dump(mode="json")
        row.serving = []
        row.rollout = None
        row.message = f"starting replicas of model {model!r} {describe_targets(resolved)}"
        row.created_at = utcnow()
        row.created_by = ctx.actor
        s.flush()
        deployment_id = row.id
        _add_edges(ctx, s, project, model, deployment_id, resolved)
        audit.record(
            s,
            actor=ctx.actor,
            action="deployment.create",
            resource=_resource(project, name),
            details={
                "model": model,
                "version": main.version,
                "ref": main.alias or str(main.version),
                "spec": spec.model_dump(mode="json"),
            },
        )
        result = _to_domain(ctx, s, row, project, model)
    WAKE.set()
    return result


def update_deployment(
    ctx: Context,
    *,
    project: str,
    name: str,
    targets: list[DeploymentTarget] | None = None,
    replicas: ReplicaBounds | None = None,
    resources: ReplicaResources | None = None,
    batching: BatchingSpec | None = None,
    autoscaling: AutoscalingSpec | _Unchanged | None = UNCHANGED,
) -> Deployment:
    """Change parts of a deployment's spec (those given) and return at once.

    ``autoscaling``: a policy to set, or None to turn autoscaling off (each target then runs
    ``replicas.min``, which must be at least 1).

    New targets are rolled out by the reconciler: the new versions' replicas start, traffic
    moves to them once they are ready, and the old ones drain; a version that fails to load
    stops the rollout and the old one keeps serving. Batcher and resource changes apply to
    replicas started from then on.
    """
    validate_name(name, field="name")
    authorize(ctx, project=project, need=Role.EDITOR)
    with ctx.db.read() as s:
        row = _require(s, project, name)
        _refuse_if_stopped(row, project=project)
        current = spec_of(row)
        model = _model_names(s, {row.model_id}).get(row.model_id, "")
    changes: dict[str, Any] = {}
    if targets is not None:
        changes["targets"] = targets
    if replicas is not None:
        changes["replicas"] = replicas
    if resources is not None:
        changes["resources"] = resources
    if batching is not None:
        changes["batching"] = batching
    if not isinstance(autoscaling, _Unchanged):
        changes["autoscaling"] = autoscaling
    spec = current.model_copy(update=changes)
    check_deployment_spec(spec)
    resolved = resolve_targets(ctx, project=project, model=model, spec=spec)

    with ctx.db.transaction() as s:
        lock(s, LOCK)
        row = _require(s, project, name)
        _refuse_if_stopped(row, project=project)
        row.spec = spec.model_dump(mode="json")
        if targets is not None:
            # a new rollout (even to a version that failed before), under way from now on, so a
            # caller that waits does not take the old state for the settled new one
            wanted = [r.target for r in resolved]
            moving = rollout_key(wanted) != rollout_key(load_targets(row.serving))
            row.rollout = (
                {"to": dump_targets(wanted), "to_key": rollout_key(wanted), "error": None}
                if moving
                else None
            )
        _add_edges(ctx, s, project, model, row.id, resolved)
        audit.record(
            s,
            actor=ctx.actor,
            action="deployment.update",
            resource=_resource(project, name),
            details={"before": current.model_dump(mode="json"), "spec": row.spec},
        )
        s.flush()
        result = _to_domain(ctx, s, row, project, model)
    WAKE.set()
    return result


def scale_deployment(
    ctx: Context,
    *,
    project: str,
    name: str,
    min_replicas: int,
    max_replicas: int | None = None,
) -> Deployment:
    """Set how many replicas each target runs (``max`` defaults to ``max(min, current max, 1)``).

    With autoscaling these are its bounds (``min`` may then be 0: scale to zero)."""
    authorize(ctx, project=project, need=Role.EDITOR)  # before the lookup: a viewer gets 403
    current = get_deployment(ctx, project=project, name=name).spec.replicas
    top = max_replicas if max_replicas is not None else max(min_replicas, current.max, 1)
    return update_deployment(
        ctx,
        project=project,
        name=name,
        replicas=ReplicaBounds(min=min_replicas, max=top),
    )


def list_deployments(ctx: Context, *, project: str) -> list[Deployment]:
    """Every deployment of ``project``, by name."""
    authorize(ctx, project=project, need=Role.VIEWER)
    launcher.reap_exited()
    with ctx.db.read() as s:
        pid = project_id(s, project, create=False)
        rows = s.scalars(
            select(DeploymentRow)
            .where(DeploymentRow.project_id == pid)
            .order_by(DeploymentRow.name)
        ).all()
        models = _model_names(s, {row.model_id for row in rows})
        return [_to_domain(ctx, s, row, project, models.get(row.model_id, "")) for row in rows]


def get_deployment(ctx: Context, *, project: str, name: str) -> Deployment:
    """One deployment, with its spec, what serves now and each replica's state."""
    validate_name(name, field="name")
    authorize(ctx, project=project, need=Role.VIEWER)
    with ctx.db.read() as s:
        row = _require(s, project, name)
        models = _model_names(s, {row.model_id})
        return _to_domain(ctx, s, row, project, models.get(row.model_id, ""))


def stop_deployment(ctx: Context, *, project: str, name: str) -> Deployment:
    """Mark the deployment STOPPED and stop every replica before returning.

    Raises InvalidStateError when the deployment is already stopped.
    """
    validate_name(name, field="name")
    authorize(ctx, project=project, need=Role.EDITOR)
    with ctx.db.transaction() as s:
        lock(s, LOCK)
        row = _require(s, project, name)
        if row.status == DeploymentStatus.STOPPED.value:
            raise InvalidStateError(f"deployment {name!r} is already stopped", field="name")
        previous = row.status
        row.status = DeploymentStatus.STOPPED.value
        row.serving = []
        row.rollout = None
        row.message = f"stopped by {ctx.actor}"
        legacy = (row.pid, row.pid_started) if row.pid is not None else None
        row.url = None
        row.pid = None
        row.pid_started = None
        processes = []
        for replica in _replica_rows(s, row.id):
            if replica.pid is not None and replica.state != ReplicaState.STOPPED.value:
                processes.append((replica.pid, replica.create_time))
            replica.state = ReplicaState.STOPPED.value
            replica.message = f"stopped with the deployment by {ctx.actor}"
        audit.record(
            s,
            actor=ctx.actor,
            action="deployment.stop",
            resource=_resource(project, name),
            details={"previous_status": previous, "pids": [p for p, _ in processes]},
        )
    if legacy is not None:
        processes.append(legacy)
    for pid, started in processes:  # outside the transaction: this waits for each to exit
        launcher.stop_process_group(pid, started)
    WAKE.set()
    return get_deployment(ctx, project=project, name=name)


def resolve_targets(
    ctx: Context,
    *,
    project: str,
    model: str,
    spec: DeploymentSpec,
    version_resolver: VersionResolver | None = None,
) -> list[ResolvedTarget]:
    """The spec's targets as versions (aliases looked up now), one entry per version.

    Raises NotFoundError for an unknown alias or version, and InvalidInputError for a version
    that cannot be served (its format), or two targets that resolve to one version in
    different roles (one a shadow).
    """
    resolve = version_resolver or registry.get_version
    by_version: dict[int, ResolvedTarget] = {}
    for i, target in enumerate(spec.targets):
        ref = target.alias if target.alias is not None else str(target.version)
        try:
            version = resolve(ctx, project=project, model=model, ref=ref)
        except NotFoundError as exc:
            raise NotFoundError(exc.message, field=f"targets[{i}]") from None
        _check_servable(ctx, model, version, field=f"targets[{i}]")
        seen = by_version.get(version.version)
        if seen is not None:
            if seen.target.shadow != target.shadow:
                raise InvalidInputError(
                    f"targets[{i}] resolves to version {version.version}, which another target "
                    "serves in the other role (shadow or not); a version has one role",
                    field=f"targets[{i}]",
                )
            merged = seen.target.model_copy(update={"weight": seen.target.weight + target.weight})
            by_version[version.version] = ResolvedTarget(merged, seen.digest)
            continue
        serving = ServingTarget(
            version=version.version, weight=target.weight, shadow=target.shadow, alias=target.alias
        )
        by_version[version.version] = ResolvedTarget(serving, version.artifact_digest)
    return list(by_version.values())


def spec_of(row: DeploymentRow) -> DeploymentSpec:
    """The row's spec; rows from before specs existed get one from their alias or version."""
    if row.spec:
        return DeploymentSpec.model_validate(row.spec)
    target = (
        DeploymentTarget(alias=row.alias) if row.alias else DeploymentTarget(version=row.version)
    )
    return DeploymentSpec(targets=[target])


def describe_targets(resolved: list[ResolvedTarget] | list[ServingTarget]) -> str:
    """``version 2`` or ``versions 1 (90%), 2 (10%), 3 (shadow)``."""
    targets = [r.target if isinstance(r, ResolvedTarget) else r for r in resolved]
    if len(targets) == 1:
        return f"version {targets[0].version}"
    parts = [f"{t.version} ({'shadow' if t.shadow else f'{t.weight}%'})" for t in targets]
    return "versions " + ", ".join(parts)


def base_url(ctx: Context, project: str) -> str | None:
    """The gateway's OIP base URL for ``project`` when this process is (or knows) a server."""
    if ctx.settings.server_url is None:
        return None
    root = ctx.settings.server_url.rstrip("/")
    return root if project == DEFAULT_PROJECT else f"{root}/projects/{project}"


def replica_to_domain(row: DeploymentReplicaRow) -> Replica:
    """The domain view of a replica slot; a ready one whose process has gone shows FAILED."""
    state = ReplicaState(row.state)
    message = row.message
    alive = row.pid is not None and launcher.is_alive(row.pid, row.create_time)
    if state in _ACTIVE_REPLICAS and row.pid is not None and not alive:
        state = ReplicaState.FAILED
        message = f"replica process {row.pid} exited; it is restarted by the reconciler"
    return Replica(
        id=row.id,
        version=row.version,
        state=state,
        url=row.url,
        pid=row.pid,
        restarts=row.restarts,
        message=message,
        started_at=aware(row.started_at),
        next_restart_at=aware(row.next_restart_at),
    )


def rollout_key(targets: list[ServingTarget]) -> list[list[Any]]:
    """What identifies a set of serving targets (versions, weights, roles), order aside."""
    return sorted([t.version, t.weight, t.shadow] for t in targets)


def dump_targets(targets: list[ServingTarget]) -> list[dict[str, Any]]:
    return [t.model_dump(mode="json") for t in targets]


def load_targets(raw: list[Any] | None) -> list[ServingTarget]:
    return [ServingTarget.model_validate(item) for item in raw or []]


# --- helpers ------------------------------------------------------------------------------------


def _spec_from_args(
    spec: DeploymentSpec | None,
    ref: str | None,
    max_batch_size: int | None,
    max_wait_ms: float | None,
) -> DeploymentSpec:
    if spec is not None:
        if ref is not None or max_batch_size is not None or max_wait_ms is not None:
            raise InvalidInputError(
                "give either a spec or ref/max_batch_size/max_wait_ms, not both", field="spec"
            )
        return spec
    ref = "production" if ref is None else str(ref)
    if not ref:
        raise InvalidInputError("ref must be an alias or a version number", field="ref")
    if _is_version_number(ref):
        number = int(ref.removeprefix("v"))
        if not 1 <= number <= 2**31 - 1:
            raise InvalidInputError(
                f"ref {ref!r} is not a version number (1 to {2**31 - 1}) or an alias", field="ref"
            )
        target = DeploymentTarget(version=number)
    else:
        target = DeploymentTarget(alias=ref)
    batching = BatchingSpec(
        max_batch=32 if max_batch_size is None else max_batch_size,
        wait_ms=5.0 if max_wait_ms is None else max_wait_ms,
    )
    if not 1 <= batching.max_batch <= 4096:
        raise InvalidInputError("max_batch_size must be between 1 and 4096", field="max_batch_size")
    if not 0 <= batching.wait_ms <= 10_000:
        raise InvalidInputError("max_wait_ms must be between 0 and 10000", field="max_wait_ms")
    return DeploymentSpec(targets=[target], batching=batching)


def _check_servable(ctx: Context, model: str, version: ModelVersion, *, field: str) -> None:
    if version.format not in SERVABLE_FORMATS:
        raise InvalidInputError(
            f"model {model!r} version {version.version} is in format {version.format!r}; only "
            f"{', '.join(SERVABLE_FORMATS)} models can be deployed",
            field=field,
        )
    if not ctx.blobs.exists(version.artifact_digest):
        raise NotFoundError(
            f"the artifact of model {model!r} version {version.version} (blob "
            f"{version.artifact_digest}) is missing from the blob store {ctx.blobs.url}",
            field=field,
        )


def _main_target(targets: list[ServingTarget]) -> ServingTarget:
    serving = [t for t in targets if not t.shadow] or targets
    return max(serving, key=lambda t: t.weight)


def _add_edges(
    ctx: Context,
    s: Session,
    project: str,
    model: str,
    deployment_id: str,
    resolved: list[ResolvedTarget],
) -> None:
    numbers = [r.target.version for r in resolved]
    model_id = s.scalar(
        select(ModelRow.id)
        .join(ProjectRow, ProjectRow.id == ModelRow.project_id)
        .where(ProjectRow.name == project, ModelRow.name == model)
    )
    ids = s.scalars(
        select(ModelVersionRow.id).where(
            ModelVersionRow.model_id == model_id, ModelVersionRow.version.in_(numbers)
        )
    ).all()
    for version_id in ids:
        add_edge(
            s,
            source_kind="model_version",
            source_id=version_id,
            target_kind="deployment",
            target_id=deployment_id,
            relation="serves",
        )


def _find(s: Session, project_pk: str, name: str) -> DeploymentRow | None:
    return s.scalar(
        select(DeploymentRow).where(
            DeploymentRow.project_id == project_pk, DeploymentRow.name == name
        )
    )


def _require(s: Session, project: str, name: str) -> DeploymentRow:
    row = _find(s, project_id(s, project, create=False), name)
    if row is None:
        raise NotFoundError(
            f"deployment {name!r} does not exist in project {project!r}", field="name"
        )
    return row


def _replica_rows(s: Session, deployment_id: str) -> list[DeploymentReplicaRow]:
    return list(
        s.scalars(
            select(DeploymentReplicaRow)
            .where(DeploymentReplicaRow.deployment_id == deployment_id)
            .order_by(DeploymentReplicaRow.version, DeploymentReplicaRow.id)
        ).all()
    )


def _refuse_if_active(s: Session, row: DeploymentRow, *, project: str) -> None:
    if row.status in (DeploymentStatus.STOPPED.value, DeploymentStatus.FAILED.value):
        live = [
            r
            for r in _replica_rows(s, row.id)
            if r.state != ReplicaState.STOPPED.value and r.pid is not None
        ]
        if not live:
            return
    raise ConflictError(
        f"deployment {row.name!r} already exists ({row.status}); change it with "
        f"`shipyard deployments update {row.name} --target ...` (or PATCH "
        f"/api/v1/projects/{project}/deployments/{row.name}), or stop it first "
        f"(`shipyard deployments stop {row.name} --project {project}`), or pick another name",
        field="name",
    )


def _refuse_if_stopped(row: DeploymentRow, *, project: str) -> None:
    if row.status == DeploymentStatus.STOPPED.value:
        raise InvalidStateError(
            f"deployment {row.name!r} is stopped; deploy it again (`shipyard deploy ... --name "
            f"{row.name} --project {project}`)",
            field="name",
        )


def _to_domain(
    ctx: Context, s: Session, row: DeploymentRow, project: str, model: str
) -> Deployment:
    """The domain view of a row, with its replica slots, read in the caller's transaction."""
    status = DeploymentStatus(row.status)
    replicas = [
        replica_to_domain(r)
        for r in _replica_rows(s, row.id)
        if status is DeploymentStatus.STOPPED or r.state != ReplicaState.STOPPED.value
    ]
    ready = [r for r in replicas if r.state is ReplicaState.READY]
    serving = load_targets(row.serving)
    message = row.message
    spec = spec_of(row)
    # scaled to zero (or waking from it): no ready replica is expected, none has died
    idle = (
        spec.autoscaling is not None
        and spec.replicas.min == 0
        and not any(r.state is ReplicaState.FAILED for r in replicas)
    )
    if status is DeploymentStatus.RUNNING and not ready and not idle:
        # every replica died since the reconciler last looked: say so until it restarts them
        status = DeploymentStatus.FAILED
        message = "no replica is ready (they exited); the reconciler restarts them"
    url = None
    if status is DeploymentStatus.RUNNING:
        url = base_url(ctx, project) or (ready[0].url if ready else None)
    return Deployment(
        id=row.id,
        project=project,
        name=row.name,
        model=model,
        alias=row.alias,
        version=row.version,
        status=status,
        url=url,
        pid=ready[0].pid if ready and status is DeploymentStatus.RUNNING else None,
        message=message,
        created_at=aware(row.created_at) or utcnow(),
        created_by=row.created_by,
        spec=spec,
        targets=serving,
        replicas=replicas,
        rollout=(
            DeploymentRollout(
                to=load_targets(row.rollout.get("to")), error=row.rollout.get("error")
            )
            if row.rollout and status is not DeploymentStatus.STOPPED
            else None
        ),
    )


def _rollout_of(row: DeploymentRow) -> DeploymentRollout | None:
    if not row.rollout:
        return None
    return DeploymentRollout(to=load_targets(row.rollout.get("to")), error=row.rollout.get("error"))


def _model_names(s: Session, ids: set[str]) -> dict[str, str]:
    if not ids:
        return {}
    rows = s.execute(select(ModelRow.id, ModelRow.name).where(ModelRow.id.in_(ids))).all()
    return {model_id: name for model_id, name in rows}


def _resource(project: str, name: str) -> str:
    return f"project/{project}/deployment/{name}"


def _is_version_number(ref: str) -> bool:
    return ref.isdigit() or (ref[:1] == "v" and ref[1:].isdigit())
