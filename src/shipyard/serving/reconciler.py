"""The reconciler: turns each deployment's spec into running, healthy replicas.

``reconcile_once(ctx)`` is one pass over every active deployment, in three steps (the shape of
the compute plane's admission pipeline):

1. **observe**, outside any transaction: each starting or ready replica is asked
   ``/v2/health/ready`` (a short timeout) and its process is looked at. A starting replica that
   answers is READY; one that exited, or is not ready after ``READY_TIMEOUT_S``, is FAILED with
   the end of its log. A ready replica that exited, or failed two probes in a row, is FAILED.
   A draining replica whose drain time is up is stopped.
2. **decide**, a pure function (``plan``) of the spec's targets as resolved now (an alias the
   deployment follows may have moved), what serves, the rollout and the replicas: which slots to
   start, which failed ones to restart (after an exponential backoff: ``RESTART_BACKOFF_S``
   doubling per restart up to ``RESTART_BACKOFF_MAX_S``), which to drain or stop, and whether
   traffic moves. A rollout starts the new versions' replicas next to the old ones, moves
   traffic only once every new target has ``replicas.min`` ready replicas, and drains the old
   ones for ``DRAIN_S`` (the gateway stops picking them at once, and requests already sent to
   them finish) before stopping them. A new version whose replica fails before it was ever ready
   stops the rollout: its replicas are stopped, the old version keeps serving, and the
   deployment's message says why; it is tried again when its targets are updated.
3. **apply**, in one short transaction under the ``deployments`` lock, guarded: a replica is
   only changed if it is still what step 1 saw, and slots are only added up to the count the
   plan wants, so two reconcilers (a server and a CLI on one home) never double a replica. Then,
   outside the transaction, the new slots' processes are spawned and their pids recorded.

**Autoscaling** (a spec with ``autoscaling``, the way KServe's concurrency target works): step 1
also reads each ready replica's ``shipyard_serving_in_flight_requests`` gauge (``GET /metrics``,
the same short-timeout client), and ``plan`` gives each target ceil(requests in flight over its
ready replicas / ``target_in_flight``) replicas, clamped to ``replicas``' bounds. A higher count
is taken once it has been wanted for ``scale_up_window_s`` (0: at once); a lower one only once
it has been wanted for ``scale_down_delay_s`` with no replica of the target still starting; the
replicas beyond it drain as above. A target whose ready replica did not answer ``/metrics`` keeps
its count. With ``replicas.min`` 0 an idle target scales to zero (the deployment stays RUNNING,
its message says it is idle) and ``wake`` (the gateway, when a request finds no ready replica)
asks for one replica at once; a new deployment counts as woken when it is created. Each scale
step is in the deployment's message and the audit log (``deployment.autoscale``).

When a lower count started being wanted (and the last wake) is kept in this process's memory,
keyed by deployment: it is only a timer, so a restarted server starts it over, which delays a
scale-down by at most one more ``scale_down_delay_s`` and never scales down early; a second
reconciler (a CLI pass next to the server) has its own timer, so it can scale up but never
scales down before the delay either. Nothing of it needs a migration.

Every step is idempotent: running a pass twice, or in two processes, converges on the same
replicas. ``settle`` runs passes until a deployment has settled (embedded homes and tests).
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import select

from shipyard.context import Context, new_id
from shipyard.domain.models import (
    Deployment,
    DeploymentSpec,
    DeploymentStatus,
    ReplicaState,
    ServingTarget,
)
from shipyard.errors import ShipyardError
from shipyard.security import audit
from shipyard.serving import deployments, launcher
from shipyard.serving.deployments import LOCK
from shipyard.store.engine import lock
from shipyard.store.tables import (
    DeploymentReplicaRow,
    DeploymentRow,
    ModelRow,
    ProjectRow,
    aware,
    utcnow,
)
from shipyard.tracking import registry

log = logging.getLogger("shipyard.serving.reconciler")

INTERVAL_S = 0.5  # a server's pass interval (and at once when a spec changes)
PROBE_TIMEOUT_S = 2.0
READY_TIMEOUT_S = 60.0
RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_MAX_S = 60.0
DRAIN_S = 2.0  # > the gateway's route refresh, so nothing is sent to a stopped replica
CLAIM_STALE_S = 30.0  # a slot claimed without a pid for this long lost its spawner
PROBE_STRIKES = 2
ACTOR = "system:reconciler"
IN_FLIGHT_METRIC = "shipyard_serving_in_flight_requests"
WAKE_HOLD_MIN_S = 1.0  # a wake keeps a replica at least this long (for the held request)

_strikes: dict[str, int] = {}  # failed probes in a row, per ready replica (this process)
_background = 0
_background_lock = threading.Lock()
# Bumped when what serves changes in this process: an in-process gateway reloads its routes.
_generation = 0
_autoscale_lock = threading.Lock()
_wakes: dict[str, datetime] = {}  # "project/name" -> when a replica was last asked for
_autoscale: dict[str, _AutoscaleMemory] = {}  # deployment id -> its pending timers


@dataclass(slots=True)
class ReconcileResult:
    started: list[str] = field(default_factory=list)  # replica ids spawned
    ready: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    switched: list[str] = field(default_factory=list)  # deployments whose traffic moved


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What ``plan`` needs of a replica slot (after observation)."""

    id: str
    version: int
    state: ReplicaState
    restarts: int
    ever_ready: bool
    next_restart_at: datetime | None
    message: str


@dataclass(frozen=True, slots=True)
class Load:
    """What ``plan`` needs to autoscale: the load observed now and the timers kept so far."""

    in_flight: dict[int, float] = field(default_factory=dict)  # over its ready replicas (0: none)
    unmeasured: frozenset[int] = frozenset()  # a ready replica did not answer: its count holds
    # version -> (+1 up or -1 down, since when another count than its current one is wanted)
    pending: dict[int, tuple[int, datetime]] = field(default_factory=dict)
    woken_at: datetime | None = None  # the last wake (or the deployment's creation)
    last_step: str = ""  # the last scale step, for the message


@dataclass(slots=True)
class _AutoscaleMemory:
    pending: dict[int, tuple[int, datetime]] = field(default_factory=dict)
    last_step: str = ""


@dataclass(slots=True)
class Plan:
    start: dict[int, int] = field(default_factory=dict)  # version -> slots wanted in all
    restart: list[str] = field(default_factory=list)
    drain: list[str] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    serving: list[ServingTarget] = field(default_factory=list)
    rollout: dict[str, Any] | None = None
    status: DeploymentStatus = DeploymentStatus.STARTING
    message: str = ""
    counts: dict[int, int] = field(default_factory=dict)  # version -> replicas it runs
    pending: dict[int, tuple[int, datetime]] = field(default_factory=dict)  # see ``Load``
    scaled: list[dict[str, Any]] = field(default_factory=list)  # the scale steps of this pass
    last_step: str = ""


def background(running: bool) -> None:
    """A server's reconcile loop starts (True) or stops (False) in this process."""
    global _background
    with _background_lock:
        _background += 1 if running else -1


def in_background() -> bool:
    """Whether a reconcile loop runs in this process (else callers reconcile inline)."""
    return _background > 0


def generation() -> int:
    """Changes whenever a pass in this process changed what serves (for the gateway)."""
    return _generation


def wake(ctx: Context, *, project: str, name: str) -> None:
    """Ask for at least one replica of deployment ``name`` at once (a request arrived for it
    and none is ready): the next pass (run now in a server: this sets ``deployments.WAKE``)
    starts one per serving target even when it is scaled to zero, and keeps it for at least
    ``scale_down_delay_s``. Cheap (no I/O): a gateway may call it on every such request. It only
    matters to a deployment with autoscaling; the wish lives in this process's memory."""
    del ctx  # the wish is kept in memory (see the module docstring), not in the database
    with _autoscale_lock:
        _wakes[f"{project}/{name}"] = utcnow()
    deployments.WAKE.set()


def reconcile_once(
    ctx: Context, *, project: str | None = None, name: str | None = None
) -> ReconcileResult:
    """One pass over every active deployment (or just ``project``/``name``)."""
    result = ReconcileResult()
    for loaded in _load(ctx, project=project, name=name):
        try:
            _reconcile(ctx, loaded, result)
        except Exception:  # one bad deployment must not stop the others
            log.exception("reconciling deployment %s/%s failed", loaded.project, loaded.name)
    launcher.reap_exited()  # after observing: reaping forgets a child's exit status
    return result


def settle(
    ctx: Context, *, project: str, name: str, timeout: float = READY_TIMEOUT_S
) -> Deployment:
    """Run passes until the deployment has settled, and return it.

    Settled: stopped; running with every target at its replica count and no rollout under way;
    or failed / rolled back (its message says why). After ``timeout`` it is returned as it is.
    """
    deadline = time.monotonic() + timeout
    while True:
        reconcile_once(ctx, project=project, name=name)
        current = deployments.get_deployment(ctx, project=project, name=name)
        if current.settled() or time.monotonic() >= deadline:
            return current
        time.sleep(0.05)


def plan(
    *,
    spec: DeploymentSpec,
    desired: list[ServingTarget] | None,
    desired_error: str | None,
    serving: list[ServingTarget],
    rollout: dict[str, Any] | None,
    replicas: list[ReplicaView],
    now: datetime,
    load: Load | None = None,
) -> Plan:
    """Decide one deployment's next step (pure: no I/O). See the module docstring.

    ``load`` is what autoscaling needs (ignored without ``spec.autoscaling``; None: no load).
    """
    out = Plan(serving=list(serving), rollout=rollout)
    load = load or Load()
    out.last_step = load.last_step
    out.counts = _autoscale_counts(spec, desired, serving, replicas, load, now, out)

    def count_of(version: int) -> int:
        return out.counts.get(version, spec.replicas.min)

    key = _key(desired) if desired is not None else None
    rolling = desired is not None and key != _key(serving)
    failed_rollout = bool(
        rolling and rollout and rollout.get("to_key") == key and rollout.get("error")
    )
    keep = {t.version for t in serving}
    if rolling and not failed_rollout:
        assert desired is not None
        new_versions = {t.version for t in desired} - keep
        broken = [
            r
            for r in replicas
            if r.version in new_versions and r.state is ReplicaState.FAILED and not r.ever_ready
        ]
        if broken:
            out.rollout = {
                "to": deployments.dump_targets(desired),
                "to_key": key,
                "error": broken[0].message,
            }
            failed_rollout = True
        else:
            out.rollout = {"to": deployments.dump_targets(desired), "to_key": key, "error": None}
            keep |= {t.version for t in desired}
            ready = _ready_counts(replicas)
            if all(ready.get(t.version, 0) >= count_of(t.version) for t in desired):
                out.serving = list(desired)
                out.rollout = None
                keep = {t.version for t in desired}
    elif not rolling:
        out.rollout = None if rollout is None or not rollout.get("error") else rollout
        if desired is not None and not failed_rollout:
            out.serving = list(desired)  # same versions: weights or aliases may have changed
            out.rollout = None

    for version in sorted(keep):
        count = count_of(version)
        slots = [r for r in replicas if r.version == version and _is_slot(r)]
        if len(slots) < count:
            out.start[version] = count
        for extra in _excess(slots, count):
            (out.drain if extra.state is ReplicaState.READY else out.stop).append(extra.id)
        for r in slots:
            due = r.next_restart_at is None or r.next_restart_at <= now
            if r.state is ReplicaState.FAILED and due and r.id not in out.stop:
                out.restart.append(r.id)
    for r in replicas:
        if r.version in keep or r.state in (ReplicaState.DRAINING, ReplicaState.STOPPED):
            continue
        (out.drain if r.state is ReplicaState.READY else out.stop).append(r.id)

    out.pending = {v: p for v, p in out.pending.items() if v in keep}
    out.status, out.message = _summary(
        out,
        replicas,
        spec=spec,
        count_of=count_of,
        failed_rollout=failed_rollout,
        desired_error=desired_error,
    )
    return out


def backoff_s(restarts: int) -> float:
    """How long a failed replica waits before its next restart (``restarts`` so far)."""
    return float(min(RESTART_BACKOFF_S * (2 ** min(restarts, 30)), RESTART_BACKOFF_MAX_S))


# --- helpers ------------------------------------------------------------------------------------


def _autoscale_counts(
    spec: DeploymentSpec,
    desired: list[ServingTarget] | None,
    serving: list[ServingTarget],
    replicas: list[ReplicaView],
    load: Load,
    now: datetime,
    out: Plan,
) -> dict[int, int]:
    """The replicas each version runs; records pending timers and scale steps in ``out``."""
    versions = {t.version for t in serving} | {t.version for t in desired or []}
    policy = spec.autoscaling
    if policy is None:
        return {v: spec.replicas.min for v in versions}
    lo, hi = spec.replicas.min, spec.replicas.max
    woken = load.woken_at is not None and (
        (now - load.woken_at).total_seconds() < max(policy.scale_down_delay_s, WAKE_HOLD_MIN_S)
    )
    slots = {v: [r for r in replicas if r.version == v and _is_slot(r)] for v in versions}
    current = {v: min(max(len(slots[v]), lo), hi) for v in versions}
    serving_versions = {t.version for t in serving}
    taking_over = max((current[v] for v in serving_versions), default=lo)
    counts: dict[int, int] = {}
    for v in sorted(versions):
        in_flight = load.in_flight.get(v, 0.0)
        if v in load.unmeasured:
            counts[v] = current[v]
            continue
        want = math.ceil(in_flight / policy.target_in_flight - 1e-9)
        if woken:
            want = max(want, 1)
        if v not in serving_versions:
            want = max(want, taking_over)  # a version rolling in takes the old one's traffic
        want = min(max(want, lo), hi)
        have = current[v]
        starting = any(r.state is ReplicaState.STARTING for r in slots[v])
        if want == have or (want < have and starting):
            counts[v] = have  # a starting replica has had no chance to take load yet
            continue
        direction = 1 if want > have else -1
        window = policy.scale_up_window_s if direction > 0 else policy.scale_down_delay_s
        previous = load.pending.get(v)
        since = previous[1] if previous is not None and previous[0] == direction else now
        if (now - since).total_seconds() < window:
            counts[v] = have
            out.pending[v] = (direction, since)
            continue
        counts[v] = want
        step = {"version": v, "from": have, "to": want, "in_flight": in_flight}
        out.scaled.append(step)
        out.last_step = (
            f"scaled version {v} {'up' if direction > 0 else 'down'} from {have} to {want} "
            f"replicas at {now.isoformat(timespec='seconds')} ({in_flight:g} requests in "
            f"flight, target {policy.target_in_flight:g} per replica)"
        )
    return counts


@dataclass(slots=True)
class _Loaded:
    id: str
    project: str
    name: str
    model: str
    spec: DeploymentSpec
    serving: list[ServingTarget]
    rollout: dict[str, Any] | None
    status: str
    replicas: list[DeploymentReplicaRow]
    legacy: tuple[int, float | None] | None  # a replica from before replica slots existed
    created_at: datetime | None = None


def _load(ctx: Context, *, project: str | None, name: str | None) -> list[_Loaded]:
    with ctx.db.read() as s:
        query = (
            select(DeploymentRow, ProjectRow.name, ModelRow.name)
            .join(ProjectRow, ProjectRow.id == DeploymentRow.project_id)
            .join(ModelRow, ModelRow.id == DeploymentRow.model_id)
            .where(DeploymentRow.status != DeploymentStatus.STOPPED.value)
        )
        if project is not None:
            query = query.where(ProjectRow.name == project)
        if name is not None:
            query = query.where(DeploymentRow.name == name)
        loaded = []
        for row, project_name, model_name in s.execute(query).all():
            replicas = list(
                s.scalars(
                    select(DeploymentReplicaRow).where(DeploymentReplicaRow.deployment_id == row.id)
                ).all()
            )
            for replica in replicas:
                s.expunge(replica)
            loaded.append(
                _Loaded(
                    id=row.id,
                    project=project_name,
                    name=row.name,
                    model=model_name,
                    spec=deployments.spec_of(row),
                    serving=deployments.load_targets(row.serving),
                    rollout=row.rollout,
                    status=row.status,
                    replicas=replicas,
                    legacy=(row.pid, row.pid_started) if row.pid is not None else None,
                    created_at=aware(row.created_at),
                )
            )
    return loaded


@dataclass(slots=True)
class _Observed:
    state: ReplicaState
    message: str
    ready_at: datetime | None = None
    next_restart_at: datetime | None = None
    stop_process: bool = False
    note: str = ""  # what the slot's message adds (when it restarts)


def _reconcile(ctx: Context, loaded: _Loaded, result: ReconcileResult) -> None:
    now = utcnow()
    if loaded.legacy is not None:  # adopt nothing from before slots: stop it, start per spec
        launcher.stop_process_group(*loaded.legacy)
    observed, in_flight = _observe(ctx, loaded, now)
    for replica_id, seen in observed.items():
        if seen.stop_process:
            row = next(r for r in loaded.replicas if r.id == replica_id)
            if row.pid is not None:
                launcher.stop_process_group(row.pid, row.create_time)
    desired: list[ServingTarget] | None = None
    desired_error = None
    digests: dict[int, str] = {}
    try:
        resolved = deployments.resolve_targets(
            ctx, project=loaded.project, model=loaded.model, spec=loaded.spec
        )
        desired = [r.target for r in resolved]
        digests = {r.target.version: r.digest for r in resolved}
    except ShipyardError as exc:
        desired_error = exc.message
    views = [_view(r, observed.get(r.id)) for r in loaded.replicas]
    memory = _memory(loaded)
    decided = plan(
        spec=loaded.spec,
        desired=desired,
        desired_error=desired_error,
        serving=loaded.serving,
        rollout=loaded.rollout,
        replicas=views,
        now=now,
        load=_load_of(loaded, views, in_flight, memory),
    )
    with _autoscale_lock:
        memory.pending = decided.pending
        memory.last_step = decided.last_step
    stopping = [r for r in loaded.replicas if r.id in decided.stop and r.pid is not None]
    for row in stopping:
        launcher.stop_process_group(row.pid or 0, row.create_time)
    spawns = _apply(ctx, loaded, observed, decided, now, result)
    for slot_id, version in spawns:
        digest = digests.get(version) or _digest_of(ctx, loaded, version)
        _spawn(ctx, loaded, slot_id, version, digest, result)


def _observe(
    ctx: Context, loaded: _Loaded, now: datetime
) -> tuple[dict[str, _Observed], dict[str, float | None]]:
    """What changed of each replica, and (with autoscaling) each ready one's requests in flight
    (None: it did not answer ``/metrics``)."""
    seen: dict[str, _Observed] = {}
    in_flight: dict[str, float | None] = {}
    client = _probe_client()  # one for every pass: making one costs more than a probe
    for row in loaded.replicas:
        state = ReplicaState(row.state)
        observed = _observe_one(ctx, client, loaded, row, state, now)
        if observed is not None:
            seen[row.id] = observed
            state = observed.state
        if loaded.spec.autoscaling is not None and state is ReplicaState.READY and row.url:
            in_flight[row.id] = read_in_flight(client, row.url)
    return seen, in_flight


_probe: httpx.Client | None = None
_probe_lock = threading.Lock()


def _probe_client() -> httpx.Client:
    """The reconciler's HTTP client for probes (thread-safe, kept for the process's life)."""
    global _probe
    with _probe_lock:
        if _probe is None:
            timeout = httpx.Timeout(PROBE_TIMEOUT_S, connect=min(1.0, PROBE_TIMEOUT_S))
            _probe = httpx.Client(timeout=timeout, trust_env=False)
            atexit.register(_probe.close)
        return _probe


def read_in_flight(client: httpx.Client, url: str) -> float | None:
    """The replica's ``shipyard_serving_in_flight_requests`` gauge (from ``GET /metrics``);
    None when it does not answer or the line is missing."""
    try:
        response = client.get(f"{url}/metrics")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    text = response.text
    at = text.find(f"\n{IN_FLIGHT_METRIC}")
    if at < 0:
        return None
    end = text.find("\n", at + 1)
    line = text[at + 1 : end if end >= 0 else len(text)]
    try:
        value = float(line.rsplit(" ", 1)[1])
    except (IndexError, ValueError):
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _memory(loaded: _Loaded) -> _AutoscaleMemory:
    with _autoscale_lock:
        return _autoscale.setdefault(loaded.id, _AutoscaleMemory())


def _load_of(
    loaded: _Loaded,
    views: list[ReplicaView],
    in_flight: dict[str, float | None],
    memory: _AutoscaleMemory,
) -> Load | None:
    if loaded.spec.autoscaling is None:
        return None
    totals: dict[int, float] = {}
    unknown: set[int] = set()
    for view in views:
        if view.state is not ReplicaState.READY:
            continue
        value = in_flight.get(view.id)
        if value is None:
            unknown.add(view.version)
        else:
            totals[view.version] = totals.get(view.version, 0.0) + value
    with _autoscale_lock:
        woken = _wakes.get(f"{loaded.project}/{loaded.name}")
        pending = dict(memory.pending)
        last_step = memory.last_step
    woken_at = max([t for t in (woken, loaded.created_at) if t is not None], default=None)
    return Load(
        in_flight=totals,
        unmeasured=frozenset(unknown),
        pending=pending,
        woken_at=woken_at,
        last_step=last_step,
    )


def _observe_one(
    ctx: Context,
    client: httpx.Client,
    loaded: _Loaded,
    row: DeploymentReplicaRow,
    state: ReplicaState,
    now: datetime,
) -> _Observed | None:
    started = aware(row.started_at) or now
    if state is ReplicaState.DRAINING:
        until = aware(row.drain_until)
        if until is None or until <= now or not launcher.is_alive(row.pid, row.create_time):
            return _Observed(ReplicaState.STOPPED, "drained and stopped", stop_process=True)
        return None
    if state not in (ReplicaState.STARTING, ReplicaState.READY):
        return None
    if row.pid is None or row.url is None:
        if (now - started).total_seconds() > CLAIM_STALE_S:
            return _failed(row, now, "the process starting this replica went away before it did")
        return None
    code = launcher.exit_code(row.pid)  # first: for our own child it reaps, then forgets
    if code is not None or not launcher.is_alive(row.pid, row.create_time):
        status = (
            ""
            if code in (None, -1)
            else f" (killed by signal {-code})"
            if code < 0
            else f" with status {code}"
        )
        tail = _tail(ctx, loaded, row)
        return _failed(row, now, f"replica process {row.pid} exited{status}{tail}")
    if launcher.probe_ready(client, row.url):
        _strikes.pop(row.id, None)
        if state is ReplicaState.STARTING:
            return _Observed(ReplicaState.READY, f"ready at {row.url}", ready_at=now)
        return None
    if state is ReplicaState.STARTING:
        if (now - started).total_seconds() > READY_TIMEOUT_S:
            tail = _tail(ctx, loaded, row)
            message = f"not ready after {READY_TIMEOUT_S:.0f}s and stopped{tail}"
            return _failed(row, now, message, stop=True)
        return None
    strikes = _strikes.get(row.id, 0) + 1
    _strikes[row.id] = strikes
    if strikes < PROBE_STRIKES:
        return None
    _strikes.pop(row.id, None)
    return _failed(row, now, f"stopped answering {row.url}/v2/health/ready; stopped", stop=True)


def _failed(
    row: DeploymentReplicaRow, now: datetime, message: str, *, stop: bool = False
) -> _Observed:
    wait = backoff_s(row.restarts)
    return _Observed(
        ReplicaState.FAILED,
        message,
        next_restart_at=now + timedelta(seconds=wait),
        stop_process=stop,
        note=f"; restart {row.restarts + 1} in {wait:.1f}s",
    )


def _tail(ctx: Context, loaded: _Loaded, row: DeploymentReplicaRow) -> str:
    path = launcher.replica_log_path(
        ctx, name=loaded.name, project=loaded.project, log_name=_log_name(row.id)
    )
    text = launcher.log_tail(path, offset=row.log_offset, max_lines=15)
    return f"; last lines of its log ({path}):\n{text}" if text else f"; its log is {path}"


def _view(row: DeploymentReplicaRow, seen: _Observed | None) -> ReplicaView:
    state = seen.state if seen is not None else ReplicaState(row.state)
    return ReplicaView(
        id=row.id,
        version=row.version,
        state=state,
        restarts=row.restarts,
        ever_ready=row.ready_at is not None or (seen is not None and seen.ready_at is not None),
        next_restart_at=(seen.next_restart_at if seen is not None else None)
        or aware(row.next_restart_at),
        message=seen.message if seen is not None else row.message,
    )


def _apply(
    ctx: Context,
    loaded: _Loaded,
    observed: dict[str, _Observed],
    decided: Plan,
    now: datetime,
    result: ReconcileResult,
) -> list[tuple[str, int]]:
    """Write the plan, guarded; return the (slot id, version) pairs to spawn."""
    global _generation
    spawns: list[tuple[str, int]] = []
    with ctx.db.transaction() as s:
        lock(s, LOCK)
        row = s.get(DeploymentRow, loaded.id)
        if row is None or row.status == DeploymentStatus.STOPPED.value:
            return []
        if deployments.spec_of(row) != loaded.spec or row.rollout != loaded.rollout:
            return []  # changed since the load: the next pass plans again
        before = {r.id: (r.state, r.pid) for r in loaded.replicas}
        current = {
            r.id: r
            for r in s.scalars(
                select(DeploymentReplicaRow).where(DeploymentReplicaRow.deployment_id == row.id)
            ).all()
        }
        changed = False
        for replica_id, slot in current.items():
            if before.get(replica_id) != (slot.state, slot.pid):
                continue  # someone else moved it: leave it to them
            seen = observed.get(replica_id)
            if seen is not None:
                slot.state = seen.state.value
                slot.message = seen.message + seen.note
                if seen.ready_at is not None:
                    slot.ready_at = seen.ready_at
                    result.ready.append(replica_id)
                if seen.state is ReplicaState.FAILED:
                    slot.next_restart_at = seen.next_restart_at
                    result.failed.append(replica_id)
                changed = True
            if replica_id in decided.drain:
                slot.state = ReplicaState.DRAINING.value
                slot.drain_until = now + timedelta(seconds=DRAIN_S)
                slot.message = f"draining until {slot.drain_until.isoformat()}"
                changed = True
            elif replica_id in decided.stop:
                slot.state = ReplicaState.STOPPED.value
                slot.message = "stopped: not wanted by the spec"
                changed = True
            elif replica_id in decided.restart:
                slot.state = ReplicaState.STARTING.value
                slot.restarts += 1
                slot.pid = None
                slot.url = None
                slot.create_time = None
                slot.started_at = now
                slot.next_restart_at = None
                slot.message = f"restarting (restart {slot.restarts})"
                spawns.append((replica_id, slot.version))
                changed = True
            if slot.state == ReplicaState.STOPPED.value:
                if seen is not None and seen.state is ReplicaState.STOPPED:
                    result.stopped.append(replica_id)
                s.delete(slot)
        for version, wanted in decided.start.items():
            have = sum(
                1
                for slot in current.values()
                if slot.version == version
                and slot.state
                in (
                    ReplicaState.STARTING.value,
                    ReplicaState.READY.value,
                    ReplicaState.FAILED.value,
                )
            )
            for _ in range(max(0, wanted - have)):
                slot_id = new_id()
                s.add(
                    DeploymentReplicaRow(
                        id=slot_id,
                        deployment_id=row.id,
                        version=version,
                        state=ReplicaState.STARTING.value,
                        restarts=0,
                        message="starting",
                        started_at=now,
                        log_offset=0,
                    )
                )
                spawns.append((slot_id, version))
                changed = True
        if deployments.dump_targets(decided.serving) != (row.serving or []):
            row.serving = deployments.dump_targets(decided.serving)
            if decided.serving:
                main = max(
                    [t for t in decided.serving if not t.shadow] or decided.serving,
                    key=lambda t: t.weight,
                )
                row.version = main.version
                row.alias = main.alias
            result.switched.append(row.name)
            changed = True
        if decided.rollout != row.rollout:
            row.rollout = decided.rollout
        for step in decided.scaled:
            audit.record(
                s,
                actor=ACTOR,
                action="deployment.autoscale",
                resource=f"project/{loaded.project}/deployment/{loaded.name}",
                details=step,
            )
        if row.status != decided.status.value or row.message != decided.message:
            row.status = decided.status.value
            row.message = decided.message
            changed = True
        if loaded.legacy is not None:
            row.pid = None
            row.pid_started = None
            row.url = None
    if changed:
        _generation += 1
    return spawns


def _spawn(
    ctx: Context,
    loaded: _Loaded,
    slot_id: str,
    version: int,
    digest: str,
    result: ReconcileResult,
) -> None:
    spec = loaded.spec
    log_name = _log_name(slot_id)
    try:
        replica = launcher.spawn_replica(
            ctx,
            name=loaded.name,
            model_name=loaded.model,
            digest=digest,
            version=version,
            project=loaded.project,
            max_batch_size=spec.batching.max_batch,
            max_wait_ms=spec.batching.wait_ms,
            threads=spec.resources.cpus if spec.resources.cpus != 1 else None,
            log_name=log_name,
        )
    except (OSError, ShipyardError) as exc:
        _record_spawn(ctx, slot_id, None, f"could not start a replica: {exc}")
        return
    if not _record_spawn(ctx, slot_id, replica, f"starting at {replica.url}"):
        launcher.stop_process_group(replica.pid, replica.create_time)
        return
    result.started.append(slot_id)


def _record_spawn(
    ctx: Context, slot_id: str, replica: launcher.ReplicaProcess | None, message: str
) -> bool:
    """Attach a spawned process to its slot (still STARTING without one); False otherwise."""
    with ctx.db.transaction() as s:
        lock(s, LOCK)
        slot = s.get(DeploymentReplicaRow, slot_id)
        if slot is None or slot.state != ReplicaState.STARTING.value or slot.pid is not None:
            return False
        if replica is None:
            slot.state = ReplicaState.FAILED.value
            slot.message = message
            slot.next_restart_at = utcnow() + timedelta(seconds=backoff_s(slot.restarts))
            return True
        slot.pid = replica.pid
        slot.create_time = replica.create_time
        slot.url = replica.url
        slot.log_offset = replica.log_offset
        slot.message = message
        return True


def _log_name(slot_id: str) -> str:
    return f"replica-{slot_id}.log"


def _digest_of(ctx: Context, loaded: _Loaded, version: int) -> str:
    return registry.get_version(
        ctx, project=loaded.project, model=loaded.model, ref=str(version)
    ).artifact_digest


def _key(targets: list[ServingTarget] | None) -> list[Any] | None:
    return None if targets is None else deployments.rollout_key(targets)


def _ready_counts(replicas: list[ReplicaView]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for r in replicas:
        if r.state is ReplicaState.READY:
            counts[r.version] = counts.get(r.version, 0) + 1
    return counts


_SLOT_STATES = (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.FAILED)


def _is_slot(r: ReplicaView) -> bool:
    return r.state in _SLOT_STATES


def _excess(slots: list[ReplicaView], count: int) -> list[ReplicaView]:
    """The slots beyond ``count``: failed ones first, then starting, then the newest ready."""
    order = {ReplicaState.FAILED: 0, ReplicaState.STARTING: 1, ReplicaState.READY: 2}
    ranked = sorted(slots, key=lambda r: order[r.state])
    return ranked[: max(0, len(slots) - count)]


def _autoscale_notes(out: Plan, spec: DeploymentSpec) -> list[str]:
    policy = spec.autoscaling
    if policy is None:
        return []
    notes = [
        f"autoscaling {spec.replicas.min}-{spec.replicas.max} replicas per target at "
        f"{policy.target_in_flight:g} requests in flight each"
    ]
    for version, (direction, since) in sorted(out.pending.items()):
        window = policy.scale_up_window_s if direction > 0 else policy.scale_down_delay_s
        notes.append(
            f"version {version} scales {'up' if direction > 0 else 'down'} if its load stays "
            f"{'above' if direction > 0 else 'below'} its replicas for {window:g}s (since "
            f"{since.isoformat(timespec='seconds')})"
        )
    if out.last_step:
        notes.append(f"last {out.last_step}")
    return notes


def _summary(
    out: Plan,
    replicas: list[ReplicaView],
    *,
    spec: DeploymentSpec,
    count_of: Callable[[int], int],
    failed_rollout: bool,
    desired_error: str | None,
) -> tuple[DeploymentStatus, str]:
    ready = _ready_counts(replicas)
    serving = [t for t in out.serving if not t.shadow]
    described = deployments.describe_targets(out.serving) if out.serving else ""
    notes = []
    if desired_error:
        notes.append(f"the spec's targets cannot be resolved now: {desired_error}")
    if failed_rollout and out.rollout:
        to = deployments.describe_targets(deployments.load_targets(out.rollout.get("to")))
        notes.append(f"the rollout to {to} failed: {out.rollout.get('error')}")
    elif out.rollout:
        moving = deployments.load_targets(out.rollout.get("to"))
        done = sum(min(ready.get(t.version, 0), count_of(t.version)) for t in moving)
        wanted = sum(count_of(t.version) for t in moving)
        notes.append(
            f"rolling out {deployments.describe_targets(moving)}: {done}/{wanted} replicas ready"
        )
    failing = [r for r in replicas if r.state is ReplicaState.FAILED and r.id not in out.stop]
    if failing:
        notes.append(f"replica {failing[0].id} failed: {failing[0].message}")
    notes += _autoscale_notes(out, spec)
    starting = any(r.state is ReplicaState.STARTING for r in replicas)
    if serving and any(ready.get(t.version, 0) for t in serving):
        total = sum(min(ready.get(t.version, 0), count_of(t.version)) for t in out.serving)
        wanted = sum(count_of(t.version) for t in out.serving)
        head = f"serving {described} ({total}/{wanted} replicas ready)"
        return DeploymentStatus.RUNNING, "; ".join([head, *notes])
    if serving and not starting and failing:
        return DeploymentStatus.FAILED, "; ".join(["no replica is ready", *notes])
    if serving and spec.autoscaling is not None and spec.replicas.min == 0 and not failing:
        if starting or any(count_of(t.version) for t in out.serving):
            head = f"waking from zero: starting a replica of {described}"
        else:
            head = (
                f"idle (scaled to zero): no replica runs; the next request to it starts one "
                f"of {described}"
            )
        return DeploymentStatus.RUNNING, "; ".join([head, *notes])
    if not serving and failed_rollout:
        return DeploymentStatus.FAILED, "; ".join(notes)
    head = f"starting {described}" if serving else "starting"
    return DeploymentStatus.STARTING, "; ".join([head, *notes])
