"""Where Prometheus scrapes: the server itself and every replica a deployment should be running.

Prometheus reads these through the server's HTTP service-discovery route
(``GET /api/v1/prometheus/targets``, in Prometheus's ``http_sd`` format), so a redeploy - a new
replica on a new port - is found at the next refresh instead of breaking a static scrape config.

A replica is listed while its deployment *wants* it (a replica slot with an address, of a
deployment that is not stopped), whether or not its process is still alive: a replica that died
stays a target until the reconciler restarts it, its scrape fails meanwhile, and ``up == 0``
raises the ``ShipyardReplicaDown`` alert. Dropping it from the list would make it silently
disappear instead. Its ``replica`` label is the slot's id, which a restart keeps.

Each replica target carries the labels the replica's own metrics use (``deployment``, ``model``,
``version``) plus ``project`` and ``replica``; the scrape config sets ``honor_labels: true``, so a
label the replica exports itself is kept as is and the target's fills in the rest (``project``,
``replica``, and all of them on the process metrics).

``serving_targets`` is the one function that knows where replicas are: it reads the table of
replica slots the reconciler keeps. Replicas listen on the server host's loopback, so Prometheus
runs on that host.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from shipyard.context import Context
from shipyard.domain.models import DeploymentStatus, ReplicaState
from shipyard.domain.principals import Role
from shipyard.security.rbac import authorize, viewable
from shipyard.store.queries import project_id
from shipyard.store.tables import DeploymentReplicaRow, DeploymentRow, ModelRow, ProjectRow

__all__ = [
    "METRICS_PATH",
    "REPLICA_JOB",
    "SERVER_JOB",
    "WANTED_STATES",
    "Target",
    "TargetGroup",
    "scrape_targets",
    "server_target",
    "serving_targets",
    "to_http_sd",
]

METRICS_PATH = "/metrics"
SERVER_JOB = "shipyard-server"
REPLICA_JOB = "shipyard-replica"
# A failed replica is still wanted (the reconciler restarts it): it stays a target, down.
WANTED_STATES = tuple(
    s.value
    for s in (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.DRAINING, ReplicaState.FAILED)
)


class Target(BaseModel):
    """One scrape target: ``host:port`` and the labels Prometheus attaches to its series.

    Labels starting with ``__`` are Prometheus's own (``__metrics_path__``, ``__scheme__``): they
    steer the scrape and are dropped after relabeling.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    address: str
    labels: dict[str, str]


class TargetGroup(BaseModel):
    """One entry of Prometheus's ``http_sd`` response: addresses sharing one label set."""

    model_config = ConfigDict(extra="forbid")
    targets: list[str] = Field(description="host:port of each target")
    labels: dict[str, str] = Field(description="labels attached to every target of the group")


def scrape_targets(ctx: Context, *, project: str | None = None) -> list[Target]:
    """The replicas of ``project`` (caller needs the viewer role there); without a project, the
    server itself and the replicas of every project the caller may view."""
    if project is not None:
        return serving_targets(ctx, project=project)
    return [server_target(ctx), *serving_targets(ctx)]


def serving_targets(ctx: Context, *, project: str | None = None) -> list[Target]:
    """Every replica a deployment wants, in ``project`` or in each project the caller may view,
    ordered by project, deployment, version and replica.

    Wanted: a replica slot with an address that is starting, ready, draining or failed (awaiting
    its restart), of a deployment that is not stopped. Raises ``NotFoundError`` (as for a
    missing project) when the caller has no role in ``project``.
    """
    if project is not None:
        authorize(ctx, project=project, need=Role.VIEWER)
    with ctx.db.read() as s:
        query = (
            select(
                ProjectRow.name,
                DeploymentRow.name,
                ModelRow.name,
                DeploymentReplicaRow.version,
                DeploymentReplicaRow.id,
                DeploymentReplicaRow.url,
            )
            .join(DeploymentRow, DeploymentRow.id == DeploymentReplicaRow.deployment_id)
            .join(ProjectRow, ProjectRow.id == DeploymentRow.project_id)
            .join(ModelRow, ModelRow.id == DeploymentRow.model_id)
            .where(
                DeploymentRow.status != DeploymentStatus.STOPPED.value,
                DeploymentReplicaRow.state.in_(WANTED_STATES),
                DeploymentReplicaRow.url.is_not(None),
            )
            .order_by(
                ProjectRow.name,
                DeploymentRow.name,
                DeploymentReplicaRow.version,
                DeploymentReplicaRow.id,
            )
        )
        if project is not None:
            query = query.where(DeploymentRow.project_id == project_id(s, project, create=False))
        rows = [tuple(r) for r in s.execute(query)]
    allowed = set(viewable(ctx.principal, sorted({r[0] for r in rows})))
    return [
        _replica_target(project=p, deployment=d, model=m, version=v, replica=r, url=url)
        for p, d, m, v, r, url in rows
        if p in allowed and url
    ]


def server_target(ctx: Context) -> Target:
    """The server's own ``/metrics``, at the URL its jobs reach it on (``SHIPYARD_SERVER_URL``
    behind a proxy)."""
    url = ctx.settings.server_url or "http://127.0.0.1:8340"
    address, labels = _address(url)
    return Target(address=address, labels={"job": SERVER_JOB, **labels})


def to_http_sd(targets: list[Target]) -> list[TargetGroup]:
    """Prometheus's ``http_sd`` document: one group per target (each has its own labels)."""
    return [TargetGroup(targets=[t.address], labels=dict(t.labels)) for t in targets]


# --- helpers ------------------------------------------------------------------------------------


def _replica_target(
    *, project: str, deployment: str, model: str, version: int, replica: str, url: str
) -> Target:
    address, labels = _address(url)
    return Target(
        address=address,
        labels={
            "job": REPLICA_JOB,
            "project": project,
            "deployment": deployment,
            "model": model,
            "version": str(version),
            "replica": replica,
            **labels,
        },
    )


def _address(url: str) -> tuple[str, dict[str, str]]:
    """``host:port`` of ``url`` and the labels that tell Prometheus its scheme and path."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    labels = {
        "__scheme__": parts.scheme or "http",
        "__metrics_path__": parts.path.rstrip("/") + METRICS_PATH,
    }
    return f"{shown}:{port}", labels
