"""Deployments: a named endpoint serving one registered model version from a replica process.

``deploy`` resolves the model reference through the registry, records the deployment as
STARTING (and audits it) in one transaction, then - outside any transaction - starts a replica on
a socket it bound itself and waits until the replica reports ready; only then is the deployment
RUNNING, with its URL and the replica's pid. A replica that exits or does not become ready in
time leaves the deployment FAILED, with the end of the replica's log in its message.

The replica's pid is stored with its start time, so a reused pid is never mistaken for the
replica: a RUNNING deployment whose replica has gone is reported FAILED ("replica exited") by the
read functions, and may be deployed again. Replicas run in their own session and outlive the
process that deployed them; ``stop_deployment`` signals the replica's process group.
"""

from __future__ import annotations

from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from shipyard.context import Context, new_id
from shipyard.domain.models import Deployment, DeploymentStatus, ModelVersion
from shipyard.domain.names import validate_name
from shipyard.domain.principals import Role
from shipyard.errors import (
    BackendError,
    ConflictError,
    InvalidInputError,
    InvalidStateError,
    NotFoundError,
    ShipyardError,
)
from shipyard.security import audit
from shipyard.security.rbac import authorize
from shipyard.serving import launcher
from shipyard.serving.launcher import ReplicaProcess, start_replica
from shipyard.store.engine import lock
from shipyard.store.queries import add_edge, project_id
from shipyard.store.tables import DeploymentRow, ModelRow, aware, utcnow
from shipyard.tracking import registry

__all__ = [
    "VersionResolver",
    "deploy",
    "get_deployment",
    "list_deployments",
    "start_replica",
    "stop_deployment",
]

SERVABLE_FORMATS = ("onnx",)
# A STARTING row without a replica pid older than this is left over from a deployer that died.
STALE_STARTING_S = 300.0


class VersionResolver(Protocol):
    def __call__(self, ctx: Context, *, project: str, model: str, ref: str) -> ModelVersion: ...


def deploy(
    ctx: Context,
    *,
    project: str,
    name: str,
    model: str,
    ref: str = "production",
    version_resolver: VersionResolver | None = None,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    ready_timeout: float = 60.0,
) -> Deployment:
    """Serve version ``ref`` (an alias or a version number) of ``model`` as deployment ``name``.

    ``version_resolver`` defaults to the registry's ``get_version``. Raises ConflictError when a
    deployment of that name is running (stop it first), NotFoundError for an unknown model or
    ref, and BackendError when the replica does not start (the deployment is then FAILED).
    """
    validate_name(name, field="name")
    validate_name(model, field="model")
    authorize(ctx, project=project, need=Role.EDITOR)
    ref = str(ref)
    if not ref:
        raise InvalidInputError("ref must be an alias or a version number", field="ref")
    if not 1 <= max_batch_size <= 4096:
        raise InvalidInputError("max_batch_size must be between 1 and 4096", field="max_batch_size")
    if not 0 <= max_wait_ms <= 10_000:
        raise InvalidInputError("max_wait_ms must be between 0 and 10000", field="max_wait_ms")
    if ready_timeout <= 0:
        raise InvalidInputError("ready_timeout must be positive", field="ready_timeout")

    resolve = version_resolver or registry.get_version
    version = resolve(ctx, project=project, model=model, ref=ref)
    if version.format not in SERVABLE_FORMATS:
        raise InvalidInputError(
            f"model {model!r} version {version.version} is in format {version.format!r}; only "
            f"{', '.join(SERVABLE_FORMATS)} models can be deployed",
            field="model",
        )
    if not ctx.blobs.exists(version.artifact_digest):
        raise NotFoundError(
            f"the artifact of model {model!r} version {version.version} (blob "
            f"{version.artifact_digest}) is missing from the blob store {ctx.blobs.url}",
            field="model",
        )
    alias = None if _is_version_number(ref) else ref
    seen, seen_alive = _peek(ctx, project, name)  # liveness is read here, not in the transaction

    with ctx.db.transaction() as s:
        lock(s, "deployments")
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
            # A pid that changed since the peek belongs to a concurrent start: treat it as alive.
            alive = row.pid is not None and ((row.pid, row.pid_started) != seen or seen_alive)
            _refuse_if_active(row, alive=alive, project=project)
        else:
            row = DeploymentRow(id=new_id(), project_id=pid, name=name)
            s.add(row)
        row.model_id = model_id
        row.alias = alias
        row.version = version.version
        row.status = DeploymentStatus.STARTING.value
        row.url = None
        row.pid = None
        row.pid_started = None
        row.message = f"starting a replica for model {model!r} version {version.version}"
        row.created_at = utcnow()
        row.created_by = ctx.actor
        s.flush()
        deployment_id = row.id
        add_edge(
            s,
            source_kind="model_version",
            source_id=version.id,
            target_kind="deployment",
            target_id=deployment_id,
            relation="serves",
        )
        audit.record(
            s,
            actor=ctx.actor,
            action="deployment.create",
            resource=_resource(project, name),
            details={
                "model": model,
                "version": version.version,
                "ref": ref,
                "max_batch_size": max_batch_size,
                "max_wait_ms": max_wait_ms,
            },
        )

    try:
        replica = launcher.spawn_replica(
            ctx,
            name=name,
            digest=version.artifact_digest,
            version=version.version,
            project=project,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
        )
    except (OSError, ShipyardError) as exc:
        message = f"could not start a replica: {exc}"
        _finish(ctx, project, name, deployment_id, None, DeploymentStatus.FAILED, message)
        raise BackendError(f"deployment {name!r}: {message}") from None

    if not _record_pid(ctx, deployment_id, replica):
        launcher.stop_process_group(replica.pid, replica.create_time)
        raise ConflictError(
            f"deployment {name!r} was stopped or redeployed while it was starting", field="name"
        )
    try:
        launcher.wait_until_ready(replica, timeout=ready_timeout)
    except BackendError as exc:
        launcher.stop_process_group(replica.pid, replica.create_time)
        _finish(ctx, project, name, deployment_id, replica, DeploymentStatus.FAILED, exc.message)
        raise BackendError(
            f"deployment {name!r} failed: {exc.message}", log=str(replica.log_path)
        ) from None
    return _finish(
        ctx,
        project,
        name,
        deployment_id,
        replica,
        DeploymentStatus.RUNNING,
        f"serving model {model!r} version {version.version} at {replica.url}",
        url=replica.url,
    )


def list_deployments(ctx: Context, *, project: str) -> list[Deployment]:
    """Every deployment of ``project``, by name; a vanished replica shows as FAILED."""
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
    return [_to_domain(ctx, row, project, models.get(row.model_id, "")) for row in rows]


def get_deployment(ctx: Context, *, project: str, name: str) -> Deployment:
    """One deployment; RUNNING whose replica has exited is reported FAILED ("replica exited")."""
    validate_name(name, field="name")
    authorize(ctx, project=project, need=Role.VIEWER)
    with ctx.db.read() as s:
        row = _require(s, project, name)
        models = _model_names(s, {row.model_id})
    return _to_domain(ctx, row, project, models.get(row.model_id, ""))


def stop_deployment(ctx: Context, *, project: str, name: str) -> Deployment:
    """Stop the replica (SIGTERM to its process group, SIGKILL after a grace) and mark STOPPED.

    Raises InvalidStateError when the deployment is already stopped.
    """
    validate_name(name, field="name")
    authorize(ctx, project=project, need=Role.EDITOR)
    with ctx.db.read() as s:
        row = _require(s, project, name)
        if row.status == DeploymentStatus.STOPPED.value:
            raise InvalidStateError(f"deployment {name!r} is already stopped", field="name")
        pid, pid_started = row.pid, row.pid_started

    if pid is not None:
        launcher.stop_process_group(pid, pid_started)

    with ctx.db.transaction() as s:
        lock(s, "deployments")
        row = _require(s, project, name)
        if row.status == DeploymentStatus.STOPPED.value:
            raise InvalidStateError(f"deployment {name!r} is already stopped", field="name")
        if row.pid is not None and row.pid != pid:
            raise ConflictError(
                f"deployment {name!r} was deployed again while it was being stopped; stop it again",
                field="name",
            )
        previous = row.status
        row.status = DeploymentStatus.STOPPED.value
        row.url = None
        row.pid = None
        row.pid_started = None
        row.message = f"stopped by {ctx.actor}"
        audit.record(
            s,
            actor=ctx.actor,
            action="deployment.stop",
            resource=_resource(project, name),
            details={"previous_status": previous, "pid": pid},
        )
        s.flush()
        models = _model_names(s, {row.model_id})
    return _to_domain(ctx, row, project, models.get(row.model_id, ""))


# --- helpers ------------------------------------------------------------------------------------


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


def _refuse_if_active(row: DeploymentRow, *, alive: bool, project: str) -> None:
    if row.status == DeploymentStatus.RUNNING.value and alive:
        raise ConflictError(
            f"deployment {row.name!r} is already running at {row.url} (pid {row.pid}); stop it "
            f"first (`shipyard endpoints stop {row.name} --project {project}`, or POST "
            f"/api/v1/projects/{project}/deployments/{row.name}/stop) or pick another name",
            field="name",
        )
    if row.status == DeploymentStatus.STARTING.value:
        created = aware(row.created_at)
        recent = created is not None and (utcnow() - created).total_seconds() < STALE_STARTING_S
        if alive or (row.pid is None and recent):
            raise ConflictError(
                f"deployment {row.name!r} is being started by another request; wait for it to "
                "finish, or stop it first",
                field="name",
            )


def _record_pid(ctx: Context, deployment_id: str, replica: ReplicaProcess) -> bool:
    """Attach the spawned replica to the STARTING row; False if the row moved on meanwhile."""
    with ctx.db.transaction() as s:
        lock(s, "deployments")
        row = s.get(DeploymentRow, deployment_id)
        if row is None or row.status != DeploymentStatus.STARTING.value or row.pid is not None:
            return False
        row.pid = replica.pid
        row.pid_started = replica.create_time
        return True


def _finish(
    ctx: Context,
    project: str,
    name: str,
    deployment_id: str,
    replica: ReplicaProcess | None,
    status: DeploymentStatus,
    message: str,
    *,
    url: str | None = None,
) -> Deployment:
    """Apply the outcome of a start, guarded: only if the row is still this start's STARTING."""
    with ctx.db.transaction() as s:
        lock(s, "deployments")
        row = s.get(DeploymentRow, deployment_id)
        ours = (
            row is not None
            and row.status == DeploymentStatus.STARTING.value
            and row.pid == (replica.pid if replica else None)
        )
        if ours:
            assert row is not None
            row.status = status.value
            row.message = message
            row.url = url
            if status is not DeploymentStatus.RUNNING:
                row.pid = None
                row.pid_started = None
            s.flush()
            models = _model_names(s, {row.model_id})
    if not ours or row is None:
        if replica is not None:
            launcher.stop_process_group(replica.pid, replica.create_time)
        raise ConflictError(
            f"deployment {name!r} was stopped or redeployed while it was starting", field="name"
        )
    return _to_domain(ctx, row, project, models.get(row.model_id, ""))


def _to_domain(ctx: Context, row: DeploymentRow, project: str, model: str) -> Deployment:
    """The domain view of a row read in a finished transaction (liveness is checked here)."""
    status = DeploymentStatus(row.status)
    message = row.message
    active = status in (DeploymentStatus.RUNNING, DeploymentStatus.STARTING)
    if active and row.pid is not None and not launcher.is_alive(row.pid, row.pid_started):
        status = DeploymentStatus.FAILED
        log = launcher.replica_log_path(ctx, name=row.name, project=project)
        message = f"replica exited (pid {row.pid}); its log is {log}"
    return Deployment(
        id=row.id,
        project=project,
        name=row.name,
        model=model,
        alias=row.alias,
        version=row.version,
        status=status,
        url=row.url if status is DeploymentStatus.RUNNING else None,
        pid=row.pid if status in (DeploymentStatus.RUNNING, DeploymentStatus.STARTING) else None,
        message=message,
        created_at=aware(row.created_at) or utcnow(),
        created_by=row.created_by,
    )


def _model_names(s: Session, ids: set[str]) -> dict[str, str]:
    if not ids:
        return {}
    rows = s.execute(select(ModelRow.id, ModelRow.name).where(ModelRow.id.in_(ids))).all()
    return {model_id: name for model_id, name in rows}


def _peek(ctx: Context, project: str, name: str) -> tuple[tuple[int, float | None] | None, bool]:
    """The current replica (pid, start time) of a deployment, if any, and whether it is alive."""
    with ctx.db.read() as s:
        try:
            row = _find(s, project_id(s, project, create=False), name)
        except NotFoundError:
            return None, False
        if row is None or row.pid is None:
            return None, False
        seen = (row.pid, row.pid_started)
    return seen, launcher.is_alive(*seen)


def _resource(project: str, name: str) -> str:
    return f"project/{project}/deployment/{name}"


def _is_version_number(ref: str) -> bool:
    return ref.isdigit() or (ref[:1] == "v" and ref[1:].isdigit())
