"""The seam between the SDK and where the work happens.

``LocalBackend`` calls the services on the embedded home in-process; ``HttpBackend`` speaks the
REST API to a server. Both return the same domain models and raise the same ``shipyard.errors``,
so user code (and the CLI) cannot tell them apart; ``tests/client`` runs one scenario both ways.

By-id methods (a run, a job, a blob, a lineage node) take ``project``: when given, the resource
must belong to it, else ``NotFoundError`` as for a missing id. ``HttpBackend`` always names one
(its own project when None: the REST paths are per project); ``LocalBackend`` checks only when
given. ``Client`` always passes its project, so both backends answer alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shipyard.domain.checkpoints import Checkpoint
from shipyard.domain.metrics import PointLike
from shipyard.domain.models import (
    AliasEvent,
    Artifact,
    AuditEvent,
    AuditVerification,
    AutoscalingSpec,
    BatchingSpec,
    Dataset,
    DatasetVersion,
    Deployment,
    DeploymentSpec,
    DeploymentTarget,
    FileEntry,
    Job,
    JobSpec,
    JobStatus,
    LineageEdge,
    LogBatchResult,
    MetricPoint,
    ModelExampleTensor,
    ModelParity,
    ModelVersion,
    NodeView,
    QueueView,
    QuotaSpec,
    RegisteredModel,
    ReplicaBounds,
    ReplicaResources,
    Run,
    RunStatus,
)

if TYPE_CHECKING:
    from shipyard.data.quality import Suite

Progress = Callable[[int, int, str], None]  # (done, total, what)


class Backend(ABC):
    """Everything the SDK and CLI can ask for. Methods mirror the services one to one."""

    # datasets
    @abstractmethod
    def commit_dataset(
        self,
        *,
        project: str,
        name: str,
        source: Path,
        message: str = "",
        progress: Progress | None = None,
        checks: Suite | None = None,
    ) -> DatasetVersion: ...
    @abstractmethod
    def list_datasets(self, *, project: str) -> list[Dataset]: ...
    @abstractmethod
    def list_dataset_versions(
        self, *, project: str, name: str, include_deleted: bool = False
    ) -> list[DatasetVersion]: ...
    @abstractmethod
    def tag_dataset_version(
        self, *, project: str, name: str, version: int | str, tag: str, force: bool = False
    ) -> DatasetVersion: ...
    @abstractmethod
    def transform_dataset(
        self,
        *,
        project: str,
        source: str,
        fn: str,
        to: str,
        params: dict[str, Any],
        mode: Literal["rows", "files", "auto"],
        workers: int,
        batch_rows: int,
        search_path: Sequence[str | Path],
        progress: Progress | None = None,
        on: Literal["local", "ray"] = "local",
        ray_address: str | None = None,
    ) -> DatasetVersion: ...
    @abstractmethod
    def untag_dataset(self, *, project: str, name: str, tag: str) -> None: ...
    @abstractmethod
    def delete_dataset_version(
        self, *, project: str, name: str, version: int | str
    ) -> DatasetVersion: ...
    @abstractmethod
    def restore_dataset_version(
        self, *, project: str, name: str, version: int | str
    ) -> DatasetVersion: ...
    @abstractmethod
    def get_dataset_version(
        self, *, project: str, name: str, version: int | str | None = None
    ) -> DatasetVersion: ...
    @abstractmethod
    def list_dataset_files(self, *, project: str, name: str, version: int) -> list[FileEntry]: ...
    @abstractmethod
    def read_blob(self, digest: str, *, project: str | None = None) -> bytes: ...

    # runs
    @abstractmethod
    def create_run(
        self,
        *,
        project: str,
        name: str | None = None,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        job_id: str | None = None,
    ) -> Run: ...
    @abstractmethod
    def get_run(self, run_id: str, *, project: str | None = None) -> Run: ...
    @abstractmethod
    def list_runs(self, *, project: str | None = None) -> list[Run]: ...
    @abstractmethod
    def log_batch(
        self,
        run_id: str,
        *,
        metrics: Sequence[PointLike],
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        project: str | None = None,
    ) -> LogBatchResult:
        """Store a batch; a point that cannot be stored comes back in ``rejected``."""

    @abstractmethod
    def heartbeat(self, run_id: str, *, project: str | None = None) -> None:
        """A sign of life from the process logging to the run (revives a crashed run)."""

    @abstractmethod
    def finish_run(
        self,
        run_id: str,
        *,
        status: RunStatus = RunStatus.FINISHED,
        project: str | None = None,
    ) -> Run: ...
    @abstractmethod
    def metric_history(
        self, run_id: str, *, key: str, project: str | None = None
    ) -> list[MetricPoint]: ...
    @abstractmethod
    def log_artifact(
        self, run_id: str, *, path: str, local_file: Path, project: str | None = None
    ) -> Artifact: ...
    @abstractmethod
    def add_run_input(self, run_id: str, *, project: str, dataset: str, version: int) -> None: ...
    @abstractmethod
    def last_steps(self, run_id: str, *, project: str | None = None) -> dict[str, int]:
        """The largest stored step of each of the run's metric keys."""

    # checkpoints
    @abstractmethod
    def save_checkpoint(
        self,
        run_id: str,
        *,
        local_path: Path,
        step: int | None = None,
        attempt: int = 1,
        project: str | None = None,
    ) -> Checkpoint:
        """Upload a file or a folder's files as blobs and record them as the run's next
        checkpoint."""

    @abstractmethod
    def list_checkpoints(self, run_id: str, *, project: str | None = None) -> list[Checkpoint]: ...
    @abstractmethod
    def latest_checkpoint(self, run_id: str, *, project: str | None = None) -> Checkpoint | None:
        """The run's newest checkpoint, or None."""

    @abstractmethod
    def download_blob(self, digest: str, target: Path, *, project: str | None = None) -> None:
        """Write blob ``digest`` to ``target`` atomically, verified against its digest."""

    # models
    @abstractmethod
    def register_model_version(
        self,
        *,
        project: str,
        model: str,
        run_id: str | None,
        artifact_path: str | None,
        description: str = "",
        example: list[ModelExampleTensor] | None = None,
        parity: ModelParity | None = None,
    ) -> ModelVersion: ...
    @abstractmethod
    def get_model_version(
        self, *, project: str, model: str, ref: str | int = "latest"
    ) -> ModelVersion: ...
    @abstractmethod
    def list_models(self, *, project: str) -> list[RegisteredModel]: ...
    @abstractmethod
    def list_model_versions(self, *, project: str, model: str) -> list[ModelVersion]: ...
    @abstractmethod
    def set_alias(
        self, *, project: str, model: str, alias: str, version: int | str
    ) -> ModelVersion: ...
    @abstractmethod
    def alias_history(self, *, project: str, model: str) -> list[AliasEvent]: ...
    @abstractmethod
    def batch_predict(
        self,
        *,
        project: str,
        model: str,
        source: str,
        to: str,
        columns: Sequence[str] | None = None,
        input_column: str | None = None,
        keep: Sequence[str] = (),
        workers: int | None = None,
        batch_rows: int = 256,
        on: Literal["local", "ray"] = "local",
        ray_address: str | None = None,
        progress: Progress | None = None,
    ) -> DatasetVersion:
        """Predict with ``model`` (``NAME@REF``) over dataset version ``source`` and commit the
        predictions as the next version of ``to`` (:mod:`shipyard.serving.batch`)."""

    # jobs
    @abstractmethod
    def submit_job(
        self,
        *,
        project: str,
        spec: JobSpec,
        code_dir: Path | None = None,
        run_id: str | None = None,
    ) -> Job: ...
    @abstractmethod
    def list_jobs(
        self, *, project: str | None = None, status: JobStatus | None = None
    ) -> list[Job]: ...
    @abstractmethod
    def get_job(self, job_id: str, *, project: str | None = None) -> Job: ...
    @abstractmethod
    def cancel_job(self, job_id: str, *, project: str | None = None) -> Job: ...
    @abstractmethod
    def read_logs(
        self, job_id: str, *, offset: int = 0, project: str | None = None
    ) -> tuple[str, int, bool]: ...

    # deployments
    @abstractmethod
    def deploy(
        self,
        *,
        project: str,
        name: str,
        model: str,
        ref: str | None = None,
        spec: DeploymentSpec | None = None,
        max_batch_size: int | None = None,
        max_wait_ms: float | None = None,
    ) -> Deployment: ...
    @abstractmethod
    def update_deployment(
        self,
        *,
        project: str,
        name: str,
        targets: list[DeploymentTarget] | None = None,
        replicas: ReplicaBounds | None = None,
        resources: ReplicaResources | None = None,
        batching: BatchingSpec | None = None,
        autoscaling: AutoscalingSpec | Literal[False] | None = None,
    ) -> Deployment: ...
    @abstractmethod
    def scale_deployment(
        self, *, project: str, name: str, min_replicas: int, max_replicas: int | None = None
    ) -> Deployment: ...
    @abstractmethod
    def settle_deployment(self, *, project: str, name: str, timeout: float) -> Deployment:
        """Return once the deployment has settled (``Deployment.settled``) or ``timeout``."""

    @abstractmethod
    def predict(
        self, *, project: str, name: str, request: dict[str, Any], request_id: str | None = None
    ) -> dict[str, Any]:
        """Send one OIP v2 inference request to the deployment; its OIP response body."""

    @abstractmethod
    def list_deployments(self, *, project: str) -> list[Deployment]: ...
    @abstractmethod
    def get_deployment(self, *, project: str, name: str) -> Deployment: ...
    @abstractmethod
    def stop_deployment(self, *, project: str, name: str) -> Deployment: ...

    # governance
    @abstractmethod
    def lineage(self, *, kind: str, id: str, project: str | None = None) -> list[LineageEdge]: ...
    @abstractmethod
    def audit_events(self, *, after: int = 0, limit: int = 100) -> list[AuditEvent]: ...
    @abstractmethod
    def verify_audit(self) -> AuditVerification: ...

    # cluster: nodes and queues
    @abstractmethod
    def list_nodes(self) -> list[NodeView]: ...
    @abstractmethod
    def get_node(self, node_id: str) -> NodeView: ...
    @abstractmethod
    def list_queues(self) -> list[QueueView]: ...
    @abstractmethod
    def get_queue(self, name: str) -> QueueView: ...
    @abstractmethod
    def set_queue(
        self,
        name: str,
        *,
        nominal: QuotaSpec,
        cohort: str | None = None,
        borrowing_limit: QuotaSpec | None = None,
        weight: float = 1.0,
    ) -> QueueView: ...
    @abstractmethod
    def delete_queue(self, name: str) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default holds none."""
