"""The platform's domain models: what every layer passes around.

Pydantic models, immutable once built; ``extra="forbid"`` so an unknown field in a request is an
error rather than silently dropped.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from shipyard.domain.names import validate_relative_path
from shipyard.errors import InvalidInputError, ShipyardError

_MAX_INT64 = 2**63 - 1


class Model(BaseModel):
    # JSON has no NaN or infinities; they travel as the strings "NaN", "Infinity", "-Infinity"
    # (which pydantic reads back as floats), so a diverging loss survives the REST API.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="strings")


# --- data ---------------------------------------------------------------------------------------


class FileEntry(Model):
    path: str
    digest: str
    size: int

    @classmethod
    def trusted(cls, path: str, digest: str, size: int) -> FileEntry:
        """An entry from a row the platform wrote and verified itself (a hash-checked
        manifest): built without validation, about 3x cheaper than ``model_construct``. Input
        from users goes through the constructor."""
        entry = object.__new__(cls)
        _set = object.__setattr__
        _set(entry, "__dict__", {"path": path, "digest": digest, "size": size})
        _set(entry, "__pydantic_fields_set__", {"path", "digest", "size"})
        _set(entry, "__pydantic_extra__", None)
        _set(entry, "__pydantic_private__", None)
        return entry


class ColumnProfile(Model):
    name: str
    type: str
    count: int
    nulls: int
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None
    distinct: int | None = None


class TableProfile(Model):
    path: str
    rows: int
    columns: list[ColumnProfile]


class DatasetProfile(Model):
    files: int
    bytes: int
    tables: list[TableProfile] = Field(default_factory=list)


class ValidationResult(Model):
    check: str
    passed: bool
    message: str


class Dataset(Model):
    id: str
    project: str
    name: str
    created_at: datetime
    latest_version: int | None = None


class DatasetVersion(Model):
    id: str
    project: str
    dataset: str
    version: int
    manifest_digest: str
    file_count: int
    total_bytes: int
    new_bytes: int
    profile: DatasetProfile
    validation: list[ValidationResult]
    message: str
    created_at: datetime
    created_by: str
    tags: list[str] = []
    deleted_at: datetime | None = None  # soft-deleted: `shipyard gc` reclaims it


# --- tracking -------------------------------------------------------------------------------------


class RunStatus(str, enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    KILLED = "killed"
    CRASHED = "crashed"  # its process stopped sending heartbeats; a heartbeat revives it


class MetricPoint(Model):
    key: str
    value: float  # NaN and +-Infinity included
    step: int = Field(default=0, ge=-(2**63), le=2**63 - 1)  # what the store's BIGINT holds
    timestamp: float


class RejectedPoint(Model):
    """A metric point a batch could not store (the rest of the batch was stored)."""

    key: str
    step: int | None
    reason: str


class LogBatchResult(Model):
    stored: int
    rejected: list[RejectedPoint] = Field(default_factory=list)


class Artifact(Model):
    path: str
    digest: str
    size: int


class Run(Model):
    id: str
    project: str
    name: str
    status: RunStatus
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]  # latest value of each metric
    artifacts: list[Artifact]
    job_id: str | None
    created_at: datetime
    finished_at: datetime | None
    heartbeat_at: datetime | None = None  # last sign of life from the SDK logging to it


class ModelSignatureTensor(Model):
    name: str
    datatype: str  # OIP v2 datatype: FP32, INT64, ...
    shape: list[int]  # -1 for a dynamic dimension


class ModelExampleTensor(Model):
    """One input of a version's example, as an Open Inference Protocol (v2) tensor: ``data`` is
    the flat row-major contents (``BYTES`` as strings), ``shape`` the full shape."""

    name: str
    datatype: str
    shape: list[Annotated[int, Field(ge=0, le=_MAX_INT64)]]
    data: list[Any]


class ModelParity(Model):
    """How closely the stored ONNX model reproduces the model it was converted from.

    Measured on the example at registration: ``max_abs_diff`` is the largest absolute
    difference over every numeric output, and the check passed when every element satisfied
    ``|onnx - source| <= atol + rtol * |source|`` and every non-numeric output (class labels)
    was equal. ``outputs`` holds each output's own largest difference.
    """

    source: str  # "sklearn" | "torch.export" | "torch.nn.Module"
    source_type: str  # the converted object's class, e.g. "sklearn.pipeline.Pipeline"
    max_abs_diff: float
    atol: float
    rtol: float
    checked_rows: int = Field(ge=0, le=_MAX_INT64)
    outputs: dict[str, float] = Field(default_factory=dict)
    label_mismatches: int = Field(default=0, ge=0, le=_MAX_INT64)


class ModelSignature(Model):
    inputs: list[ModelSignatureTensor]
    outputs: list[ModelSignatureTensor]
    # A small example input (at most a few rows) and the parity check against the source model;
    # present for models shipyard converted itself (``run.log_model(estimator, example=...)``).
    example: list[ModelExampleTensor] | None = None
    parity: ModelParity | None = None


class RegisteredModel(Model):
    id: str
    project: str
    name: str
    created_at: datetime
    latest_version: int | None
    aliases: dict[str, int]


class ModelVersion(Model):
    id: str
    project: str
    model: str
    version: int
    format: str
    artifact_digest: str
    artifact_size: int
    signature: ModelSignature
    metrics: dict[str, float]
    source_run_id: str | None
    description: str
    created_at: datetime
    aliases: list[str] = Field(default_factory=list)


class AliasEvent(Model):
    model: str
    alias: str
    version: int | None  # None when the alias was removed
    previous_version: int | None
    actor: str
    at: datetime


# --- compute ----------------------------------------------------------------------------------


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def finished(self) -> bool:
        return self in FINISHED_JOB_STATUSES


FINISHED_JOB_STATUSES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMED_OUT}
)


MAX_WORKERS = 256


class Resources(Model):
    """What ONE worker of a job asks for (a gang of ``workers`` asks for that many times it)."""

    cpus: float = Field(default=1.0, gt=0, le=4096)
    memory_mb: int = Field(default=512, ge=1, le=16 * 1024 * 1024)
    gpus: int = Field(default=0, ge=0, le=1024)
    # A device model the GPUs must be ("A100": the model name contains it, case-insensitively).
    gpu_type: str | None = Field(default=None, min_length=1, max_length=128)
    # A share of one GPU instead of whole ones (0 < f < 1, only with gpus == 0), with a bound on
    # the device memory it may use.
    gpu_fraction: float | None = Field(default=None, gt=0, lt=1)
    gpu_memory_mb: int | None = Field(default=None, ge=0, le=16 * 1024 * 1024)

    @field_validator("gpu_fraction")
    @classmethod
    def _fraction_without_whole_gpus(
        cls, value: float | None, info: ValidationInfo
    ) -> float | None:
        if value is not None and info.data.get("gpus"):
            raise ValueError(
                "gpu_fraction asks for a share of one GPU; it cannot be combined with gpus > 0 "
                "(ask for whole GPUs or for a fraction, not both)"
            )
        return value

    @property
    def gpu_units(self) -> float:
        """GPUs this worker counts against quotas: whole ones, or its fraction."""
        return float(self.gpus) if self.gpus else float(self.gpu_fraction or 0.0)


class CodeSource(Model):
    """Where a job's code snapshot came from (filled in at submit when there is a repository)."""

    git_commit: str | None = Field(default=None, max_length=64, pattern=r"^[0-9a-f]{7,64}$")
    git_dirty: bool | None = None
    ignored_files: int = Field(default=0, ge=0, le=1_000_000_000)


class JobSpec(Model):
    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)  # per worker
    priority: int = Field(default=0, ge=-1000, le=1000)
    max_runtime_s: float | None = Field(default=None, gt=0)
    name: str | None = None
    # A gang when > 1: all workers start together or none does; resources are per worker.
    workers: int = Field(default=1, ge=1, le=MAX_WORKERS)
    # May be stopped (SIGTERM, grace, SIGKILL) and requeued for higher-priority work.
    preemptible: bool = False
    queue: str | None = Field(default=None, min_length=1, max_length=128)  # None: the project's
    # Relative paths in the job's folder that become artifacts of its run when it ends.
    outputs: list[str] = Field(default_factory=list, max_length=256)
    source: CodeSource | None = None

    @field_validator("outputs")
    @classmethod
    def _relative_outputs(cls, value: list[str]) -> list[str]:
        for path in value:
            try:
                validate_relative_path(path, field="outputs")
            except ShipyardError as exc:
                raise ValueError(exc.message) from None
        if len(set(value)) != len(value):
            raise ValueError("outputs names a path twice")
        return value

    @property
    def gpu_units(self) -> float:
        """GPUs the whole job counts against quotas: workers x (gpus or fraction)."""
        return self.workers * self.resources.gpu_units


class JobUsage(Model):
    cpu_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    wall_seconds: float = 0.0


class Job(Model):
    id: str
    project: str
    name: str
    spec: JobSpec
    status: JobStatus
    code_digest: str | None
    run_id: str | None
    assigned_gpus: list[int]
    exit_code: int | None
    message: str
    usage: JobUsage
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    created_by: str
    # How its resource limits were enforced, e.g. "cgroup v2: memory.max, cpu.max" or
    # "rlimit: RLIMIT_AS 64 MB; affinity: 1 of 2 cpus"; empty until it has been launched.
    enforcement: str = ""
    executor: str = "local"  # the executor that runs it (``shipyard.wiring``)
    attempt: int = 1  # 1 for the first start; +1 after each requeue (preemption, lost node)
    preemptions: int = 0
    queue: str = ""  # the queue it was admitted through (the project's by default)
    # Where each worker runs, rank order: [{"node_id", "gpus": [...], "gpu_share"}]
    placement: list[dict[str, Any]] = Field(default_factory=list)
    outputs: list[str] = Field(default_factory=list)  # artifact paths stored from its outputs


# --- serving ----------------------------------------------------------------------------------


class DeploymentStatus(str, enum.Enum):
    STARTING = "starting"  # no target serves yet: replicas are starting (or backing off)
    RUNNING = "running"  # every serving target has a ready replica
    STOPPED = "stopped"
    FAILED = "failed"  # nothing serves: the replicas could not start


def _bounds(lo: float, hi: float) -> Any:
    """The OpenAPI bounds of a spec field; ``check_deployment_spec`` enforces them, with an
    error that names the field, so pydantic does not check them twice."""
    return Field(json_schema_extra={"minimum": lo, "maximum": hi})


class DeploymentTarget(Model):
    """One target of a deployment: a model version (a number) or an alias the deployment
    follows, the share of traffic it gets (percent), or a shadow that sees a copy of it."""

    version: Annotated[int, _bounds(1, 2**31 - 1)] | None = None
    alias: str | None = None
    weight: Annotated[int, _bounds(0, 100)] = 100
    shadow: bool = False


class ReplicaBounds(Model):
    """How many replicas each target runs: at least ``min`` (kept running), at most ``max``.
    Without ``autoscaling`` each target runs ``min``; ``min`` 0 (scale to zero) needs it."""

    min: Annotated[int, _bounds(0, 64)] = 1
    max: Annotated[int, _bounds(1, 64)] = 1


class ReplicaResources(Model):
    """What one replica gets: ``cpus`` model threads, ``gpus`` devices (0: CPU only)."""

    cpus: Annotated[int, _bounds(1, 256)] = 1
    gpus: Annotated[int, _bounds(0, 16)] = 0


class BatchingSpec(Model):
    """The replica's adaptive batcher: up to ``max_batch`` rows per model call, waiting at most
    ``wait_ms`` for a batch to fill."""

    max_batch: Annotated[int, _bounds(1, 4096)] = 32
    wait_ms: Annotated[float, _bounds(0, 10_000)] = 5.0


class AutoscalingSpec(Model):
    """Scale each target between ``replicas.min`` and ``replicas.max`` on its load, the way
    KServe's concurrency target does: it wants ceil(requests in flight over its ready replicas
    / ``target_in_flight``) replicas. A higher count is reached once it has been wanted for
    ``scale_up_window_s`` (0: at once), a lower one only after ``scale_down_delay_s``; the
    replicas beyond it are drained. With ``replicas.min`` 0 an idle target scales to zero and
    the next request (the gateway calls ``reconciler.wake``) starts one again."""

    target_in_flight: Annotated[float, _bounds(0.1, 10_000)] = 8.0
    scale_up_window_s: Annotated[float, _bounds(0, 600)] = 0.0
    scale_down_delay_s: Annotated[float, _bounds(0, 3600)] = 60.0


class DeploymentSpec(Model):
    """A deployment's desired state; the reconciler (``serving.reconciler``) makes it so."""

    targets: list[DeploymentTarget] = Field(
        default_factory=lambda: [DeploymentTarget(alias="production")]
    )
    replicas: ReplicaBounds = Field(default_factory=ReplicaBounds)
    resources: ReplicaResources = Field(default_factory=ReplicaResources)
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    autoscaling: AutoscalingSpec | None = None  # None: each target runs replicas.min


MAX_TARGETS = 8
MAX_REPLICAS = 64


def check_deployment_spec(spec: DeploymentSpec) -> None:
    """Raise InvalidInputError naming the first field of ``spec`` that is out of bounds.

    Weights are percentages: the non-shadow targets' weights sum to 100 and at least one target
    is not a shadow. Each target names exactly one of ``version`` and ``alias``.
    """
    if not 1 <= len(spec.targets) <= MAX_TARGETS:
        raise _spec_error(f"a deployment has 1 to {MAX_TARGETS} targets", "targets")
    for i, target in enumerate(spec.targets):
        field = f"targets[{i}]"
        if (target.version is None) == (target.alias is None):
            raise _spec_error(
                f"{field} must name exactly one of version (a number) and alias", field
            )
        if target.version is not None and not 1 <= target.version <= 2**31 - 1:
            raise _spec_error(f"{field}.version must be a positive version number", field)
        if not 0 <= target.weight <= 100:
            raise _spec_error(f"{field}.weight must be a percentage (0-100)", f"{field}.weight")
    serving = [t for t in spec.targets if not t.shadow]
    if not serving:
        raise _spec_error("at least one target must take traffic (not a shadow)", "targets")
    total = sum(t.weight for t in serving)
    if total != 100:
        weights = " + ".join(str(t.weight) for t in serving)
        raise _spec_error(
            f"the weights of the non-shadow targets must sum to 100, and {weights} = {total}; "
            "give each target its share of traffic in percent",
            "targets",
        )
    bounds = spec.replicas
    if not 0 <= bounds.min <= MAX_REPLICAS:
        raise _spec_error(f"replicas.min must be between 0 and {MAX_REPLICAS}", "replicas.min")
    if bounds.min == 0 and spec.autoscaling is None:
        raise _spec_error(
            f"replicas.min must be between 1 and {MAX_REPLICAS} without autoscaling; 0 (scale "
            'to zero) needs an autoscaling policy, e.g. {"autoscaling": {"target_in_flight": 8}}',
            "replicas.min",
        )
    if not max(bounds.min, 1) <= bounds.max <= MAX_REPLICAS:
        raise _spec_error(
            f"replicas.max must be between {max(bounds.min, 1)} (at least 1 and replicas.min) "
            f"and {MAX_REPLICAS}",
            "replicas.max",
        )
    if spec.autoscaling is not None:
        _check_autoscaling(spec.autoscaling)
    if not 1 <= spec.resources.cpus <= 256:
        raise _spec_error("resources.cpus must be between 1 and 256", "resources.cpus")
    if not 0 <= spec.resources.gpus <= 16:
        raise _spec_error("resources.gpus must be between 0 and 16", "resources.gpus")
    if not 1 <= spec.batching.max_batch <= 4096:
        raise _spec_error("batching.max_batch must be between 1 and 4096", "batching.max_batch")
    if not 0 <= spec.batching.wait_ms <= 10_000:
        raise _spec_error("batching.wait_ms must be between 0 and 10000", "batching.wait_ms")


def _check_autoscaling(policy: AutoscalingSpec) -> None:
    if not 0.1 <= policy.target_in_flight <= 10_000:
        raise _spec_error(
            "autoscaling.target_in_flight must be between 0.1 and 10000 requests in flight per "
            "replica",
            "autoscaling.target_in_flight",
        )
    if not 0 <= policy.scale_up_window_s <= 600:
        raise _spec_error(
            "autoscaling.scale_up_window_s must be between 0 and 600 seconds",
            "autoscaling.scale_up_window_s",
        )
    if not 0 <= policy.scale_down_delay_s <= 3600:
        raise _spec_error(
            "autoscaling.scale_down_delay_s must be between 0 and 3600 seconds",
            "autoscaling.scale_down_delay_s",
        )


def _spec_error(message: str, field: str) -> ShipyardError:
    return InvalidInputError(message, field=field)


class ServingTarget(Model):
    """A target resolved to a version: what the gateway splits traffic over."""

    version: int
    weight: int
    shadow: bool = False
    alias: str | None = None  # the alias it was resolved from, if any


class DeploymentRollout(Model):
    """A move of traffic under way (``error`` None), or the last one that failed and why."""

    to: list[ServingTarget]
    error: str | None = None


class ReplicaState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"  # out of the traffic split, finishing what it has, then stopped
    FAILED = "failed"  # exited or stopped answering; restarted after a backoff
    STOPPED = "stopped"


class Replica(Model):
    id: str
    version: int
    state: ReplicaState
    url: str | None
    pid: int | None
    restarts: int
    message: str
    started_at: datetime | None
    next_restart_at: datetime | None = None


class Deployment(Model):
    id: str
    project: str
    name: str
    model: str
    alias: str | None  # the alias of the main target (the heaviest non-shadow), if it has one
    version: int  # the main target's version
    status: DeploymentStatus
    url: str | None  # where to send OIP requests: the server's gateway, or a ready replica
    pid: int | None  # a ready replica's pid (see ``replicas`` for all of them)
    message: str
    created_at: datetime
    created_by: str
    spec: DeploymentSpec = Field(default_factory=DeploymentSpec)
    targets: list[ServingTarget] = Field(default_factory=list)  # what serves now
    replicas: list[Replica] = Field(default_factory=list)
    rollout: DeploymentRollout | None = None

    def settled(self) -> bool:
        """Whether the reconciler is done with it for now: stopped; failed with nothing to
        serve; its rollout failed; or running with every serving target at its replica count
        (at least ``replicas.min``), nothing draining and, when it was scaled to zero, not
        waking (a replica starting, none ready). (Failed replicas of a version that serves
        are being restarted.)"""
        if self.status is DeploymentStatus.STOPPED:
            return True
        if self.rollout is not None and self.rollout.error is not None:
            return True
        if self.status is DeploymentStatus.FAILED:
            return not self.targets
        if self.rollout is not None:
            return False
        if self.status is not DeploymentStatus.RUNNING:
            return False
        ready: dict[int, int] = {}
        for replica in self.replicas:
            if replica.state is ReplicaState.READY:
                ready[replica.version] = ready.get(replica.version, 0) + 1
            elif replica.state is ReplicaState.DRAINING:
                return False
        waking = any(r.state is ReplicaState.STARTING for r in self.replicas)
        if waking and not ready:  # scaled to zero, a replica starting for a request
            return False
        return all(ready.get(t.version, 0) >= self.spec.replicas.min for t in self.targets)


# --- lineage, audit, security -------------------------------------------------------------------


class LineageEdge(Model):
    source_kind: str  # dataset_version | run | model_version | deployment
    source_id: str
    target_kind: str
    target_id: str
    relation: str  # input | output | serves
    created_at: datetime


class AuditEvent(Model):
    seq: int
    at: datetime
    actor: str
    action: str
    resource: str
    details: dict[str, Any]
    prev_hash: str
    hash: str


class AuditVerification(Model):
    """What ``verify`` found: ``ok``, or the first bad seq and what is wrong with it."""

    ok: bool
    events: int  # events checked (up to the first bad one)
    first_bad_seq: int | None = None
    problem: str | None = None
    head_seq: int | None = None  # the seq the head anchor names
    legacy_through: int = 0  # events up to this seq predate the key (plain SHA-256)


class Token(Model):
    id: str
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None = None
    principal: str | None = None  # the user or service account it acts as
    project: str | None = None  # narrowed to this project
    role: str | None = None  # narrowed to this role (viewer, editor, admin)
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


# --- cluster: queues and nodes (``shipyard queues``, ``shipyard nodes``) ------------------------


class QuotaSpec(Model):
    """An amount of each resource; ``None`` (or a key left out) means unlimited."""

    gpus: float | None = None
    cpus: float | None = None
    memory_mb: int | None = None
    gpus_by_model: dict[str, float] = Field(default_factory=dict)  # model name -> GPUs


class ResourceAmount(Model):
    gpus: float = 0.0
    cpus: float = 0.0
    memory_mb: int = 0


class WaitingJob(Model):
    job_id: str  # "" when the caller may not see the job's project
    project: str  # "" likewise
    position: int  # 1-based, in the order the queue serves them
    reason: str


class QueueView(Model):
    """A queue's configuration, what its running jobs use and who waits in it, in what order."""

    name: str
    configured: bool  # False: a project's default queue nobody configured (unlimited)
    cohort: str | None = None
    weight: float = 1.0
    nominal: QuotaSpec = Field(default_factory=QuotaSpec)
    borrowing_limit: QuotaSpec = Field(default_factory=QuotaSpec)
    usage: ResourceAmount = Field(default_factory=ResourceAmount)  # of its RUNNING jobs
    gpus_by_model: dict[str, float] = Field(default_factory=dict)  # usage per GPU model named
    borrowed: ResourceAmount = Field(default_factory=ResourceAmount)  # usage above nominal
    running: list[str] = Field(default_factory=list)  # job ids (those the caller may see)
    running_count: int = 0
    waiting: list[WaitingJob] = Field(default_factory=list)
    message: str = ""  # e.g. usage above a quota just shrunk: running jobs keep running
    created_at: datetime | None = None
    updated_at: datetime | None = None


class GpuView(Model):
    index: int
    model: str
    memory_mb: int
    allocated: float = 0.0  # 1.0 for a whole device, the sum of shares for a shared one
    jobs: list[str] = Field(default_factory=list)


class NodeView(Model):
    """One node: what it has, what is allocated and to which jobs, and whether it is healthy."""

    id: str
    hostname: str = ""
    address: str = ""
    healthy: bool = True
    message: str = ""
    gpu_source: str = "none"  # "nvml", "declared" or "none"
    labels: dict[str, str] = Field(default_factory=dict)
    cpus: float
    memory_mb: int
    gpus: list[GpuView] = Field(default_factory=list)
    allocated_cpus: float = 0.0
    allocated_memory_mb: int = 0
    jobs: list[str] = Field(default_factory=list)  # job ids running there (those the caller sees)
