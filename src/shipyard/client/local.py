"""The embedded backend: services called in-process on ``$SHIPYARD_HOME``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shipyard.client.backend import Backend, Progress
from shipyard.client.oip import oip_call, poll_settled
from shipyard.compute import jobs, nodes, queues
from shipyard.context import Context
from shipyard.data import datasets, transform
from shipyard.data import lineage as lineage_service
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
    ReplicaState,
    Run,
    RunStatus,
)
from shipyard.domain.names import validate_relative_path
from shipyard.domain.principals import Role
from shipyard.errors import InvalidStateError
from shipyard.security import audit
from shipyard.security.blobrefs import authorize_blob
from shipyard.serving import batch, deployments, reconciler
from shipyard.tracking import checkpoints, registry, runs

if TYPE_CHECKING:
    from shipyard.data.quality import Suite


class LocalBackend(Backend):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    # datasets
    def commit_dataset(
        self,
        *,
        project: str,
        name: str,
        source: Path,
        message: str = "",
        progress: Progress | None = None,
        checks: Suite | None = None,
    ) -> DatasetVersion:
        return datasets.commit_directory(
            self.ctx,
            project=project,
            name=name,
            source=Path(source),
            message=message,
            progress=progress,
            checks=checks,
        )

    def list_datasets(self, *, project: str) -> list[Dataset]:
        return datasets.list_datasets(self.ctx, project=project)

    def list_dataset_versions(
        self, *, project: str, name: str, include_deleted: bool = False
    ) -> list[DatasetVersion]:
        return datasets.list_versions(
            self.ctx, project=project, name=name, include_deleted=include_deleted
        )

    def tag_dataset_version(
        self, *, project: str, name: str, version: int | str, tag: str, force: bool = False
    ) -> DatasetVersion:
        return datasets.tag_version(
            self.ctx, project=project, name=name, version=version, tag=tag, force=force
        )

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
    ) -> DatasetVersion:
        return transform.transform(
            self.ctx,
            project=project,
            source=source,
            fn=fn,
            to=to,
            params=params,
            mode=mode,
            workers=workers,
            batch_rows=batch_rows,
            search_path=search_path,
            progress=progress,
            on=on,
            ray_address=ray_address,
        )

    def untag_dataset(self, *, project: str, name: str, tag: str) -> None:
        datasets.untag(self.ctx, project=project, name=name, tag=tag)

    def delete_dataset_version(
        self, *, project: str, name: str, version: int | str
    ) -> DatasetVersion:
        return datasets.delete_version(self.ctx, project=project, name=name, version=version)

    def restore_dataset_version(
        self, *, project: str, name: str, version: int | str
    ) -> DatasetVersion:
        return datasets.restore_version(self.ctx, project=project, name=name, version=version)

    def get_dataset_version(
        self, *, project: str, name: str, version: int | str | None = None
    ) -> DatasetVersion:
        return datasets.get_version(self.ctx, project=project, name=name, version=version)

    def list_dataset_files(self, *, project: str, name: str, version: int) -> list[FileEntry]:
        return datasets.list_files(self.ctx, project=project, name=name, version=version)

    def read_blob(self, digest: str, *, project: str | None = None) -> bytes:
        if project is not None:  # the check the server makes on GET /projects/{project}/blobs
            authorize_blob(self.ctx, project=project, digest=digest, need=Role.VIEWER)
        return self.ctx.blobs.get_bytes(digest)

    # runs
    def create_run(
        self,
        *,
        project: str,
        name: str | None = None,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        job_id: str | None = None,
    ) -> Run:
        return runs.create_run(
            self.ctx, project=project, name=name, params=params, tags=tags, job_id=job_id
        )

    def get_run(self, run_id: str, *, project: str | None = None) -> Run:
        return runs.get_run(self.ctx, run_id=run_id, project=project)

    def list_runs(self, *, project: str | None = None) -> list[Run]:
        return runs.list_runs(self.ctx, project=project)

    def log_batch(
        self,
        run_id: str,
        *,
        metrics: Sequence[PointLike],
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        project: str | None = None,
    ) -> LogBatchResult:
        return runs.log_batch(
            self.ctx, run_id=run_id, project=project, metrics=metrics, params=params, tags=tags
        )

    def heartbeat(self, run_id: str, *, project: str | None = None) -> None:
        runs.heartbeat(self.ctx, run_id=run_id, project=project)

    def finish_run(
        self,
        run_id: str,
        *,
        status: RunStatus = RunStatus.FINISHED,
        project: str | None = None,
    ) -> Run:
        return runs.finish_run(self.ctx, run_id=run_id, project=project, status=status)

    def metric_history(
        self, run_id: str, *, key: str, project: str | None = None
    ) -> list[MetricPoint]:
        return runs.metric_history(self.ctx, run_id=run_id, project=project, key=key)

    def log_artifact(
        self, run_id: str, *, path: str, local_file: Path, project: str | None = None
    ) -> Artifact:
        validate_relative_path(path, field="path")
        stored = self.ctx.blobs.put_file(local_file)
        return runs.log_artifact(
            self.ctx,
            run_id=run_id,
            project=project,
            path=path,
            digest=stored.digest,
            size=stored.size,
        )

    def add_run_input(self, run_id: str, *, project: str, dataset: str, version: int) -> None:
        runs.add_input(self.ctx, run_id=run_id, project=project, dataset=dataset, version=version)

    def last_steps(self, run_id: str, *, project: str | None = None) -> dict[str, int]:
        return runs.last_steps(self.ctx, run_id=run_id, project=project)

    # checkpoints
    def save_checkpoint(
        self,
        run_id: str,
        *,
        local_path: Path,
        step: int | None = None,
        attempt: int = 1,
        project: str | None = None,
    ) -> Checkpoint:
        kind, sources = checkpoints.checkpoint_sources(Path(local_path))
        files = []
        for rel, real in sources:
            stored = self.ctx.blobs.put_file(real)
            files.append(FileEntry(path=rel, digest=stored.digest, size=stored.size))
        return checkpoints.record_checkpoint(
            self.ctx,
            run_id=run_id,
            project=project,
            files=files,
            kind=kind,
            step=step,
            attempt=attempt,
        )

    def list_checkpoints(self, run_id: str, *, project: str | None = None) -> list[Checkpoint]:
        return checkpoints.list_checkpoints(self.ctx, run_id=run_id, project=project)

    def latest_checkpoint(self, run_id: str, *, project: str | None = None) -> Checkpoint | None:
        return checkpoints.latest_checkpoint(self.ctx, run_id=run_id, project=project)

    def download_blob(self, digest: str, target: Path, *, project: str | None = None) -> None:
        if project is not None:
            authorize_blob(self.ctx, project=project, digest=digest, need=Role.VIEWER)
        self.ctx.blobs.copy_to(digest, target)

    # models
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
    ) -> ModelVersion:
        return registry.register_version(
            self.ctx,
            project=project,
            model=model,
            run_id=run_id,
            artifact_path=artifact_path,
            description=description,
            example=example,
            parity=parity,
        )

    def get_model_version(
        self, *, project: str, model: str, ref: str | int = "latest"
    ) -> ModelVersion:
        return registry.get_version(self.ctx, project=project, model=model, ref=ref)

    def list_models(self, *, project: str) -> list[RegisteredModel]:
        return registry.list_models(self.ctx, project=project)

    def list_model_versions(self, *, project: str, model: str) -> list[ModelVersion]:
        return registry.list_versions(self.ctx, project=project, model=model)

    def set_alias(
        self, *, project: str, model: str, alias: str, version: int | str
    ) -> ModelVersion:
        return registry.set_alias(
            self.ctx, project=project, model=model, alias=alias, version=version
        )

    def alias_history(self, *, project: str, model: str) -> list[AliasEvent]:
        return registry.alias_history(self.ctx, project=project, model=model)

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
        return batch.batch_predict(
            self.ctx,
            project=project,
            model=model,
            source=source,
            to=to,
            columns=columns,
            input_column=input_column,
            keep=keep,
            workers=workers,
            batch_rows=batch_rows,
            on=on,
            ray_address=ray_address,
            progress=progress,
        )

    # jobs
    def submit_job(
        self,
        *,
        project: str,
        spec: JobSpec,
        code_dir: Path | None = None,
        run_id: str | None = None,
    ) -> Job:
        return jobs.submit_job(
            self.ctx, project=project, spec=spec, code_dir=code_dir, run_id=run_id
        )

    def list_jobs(
        self, *, project: str | None = None, status: JobStatus | None = None
    ) -> list[Job]:
        return jobs.list_jobs(self.ctx, project=project, status=status)

    def get_job(self, job_id: str, *, project: str | None = None) -> Job:
        return jobs.get_job(self.ctx, job_id=job_id, project=project)

    def cancel_job(self, job_id: str, *, project: str | None = None) -> Job:
        return jobs.cancel_job(self.ctx, job_id=job_id, project=project)

    def read_logs(
        self, job_id: str, *, offset: int = 0, project: str | None = None
    ) -> tuple[str, int, bool]:
        data, new_offset, finished = jobs.read_logs(
            self.ctx, job_id=job_id, project=project, offset=offset
        )
        return data.decode("utf-8", errors="replace"), new_offset, finished

    # deployments
    # An embedded home has no server running the reconciler: each change runs a pass inline
    # (replicas are spawned, not waited for), and so does each look at a deployment, so a
    # replica that died is restarted by the next command that looks (see serving.deployments).
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
    ) -> Deployment:
        deployments.deploy(
            self.ctx,
            project=project,
            name=name,
            model=model,
            ref=ref,
            spec=spec,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
        )
        return self._reconciled(project, name)

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
    ) -> Deployment:
        deployments.update_deployment(
            self.ctx,
            project=project,
            name=name,
            targets=targets,
            replicas=replicas,
            resources=resources,
            batching=batching,
            autoscaling=(
                deployments.UNCHANGED
                if autoscaling is None
                else (None if autoscaling is False else autoscaling)
            ),
        )
        return self._reconciled(project, name)

    def scale_deployment(
        self, *, project: str, name: str, min_replicas: int, max_replicas: int | None = None
    ) -> Deployment:
        deployments.scale_deployment(
            self.ctx,
            project=project,
            name=name,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
        )
        return self._reconciled(project, name)

    def settle_deployment(self, *, project: str, name: str, timeout: float) -> Deployment:
        if reconciler.in_background():
            return poll_settled(lambda: self.get_deployment(project=project, name=name), timeout)
        return reconciler.settle(self.ctx, project=project, name=name, timeout=timeout)

    def predict(
        self, *, project: str, name: str, request: dict[str, Any], request_id: str | None = None
    ) -> dict[str, Any]:
        current = self.get_deployment(project=project, name=name)
        ready = [r for r in current.replicas if r.state is ReplicaState.READY and r.url]
        served = {t.version for t in current.targets if not t.shadow}
        ready = [r for r in ready if r.version in served] or ready
        if not ready:
            raise InvalidStateError(
                f"deployment {name!r} has no ready replica ({current.status.value}: "
                f"{current.message})",
                field="name",
            )
        replica = ready[hash(request_id or id(request)) % len(ready)]
        return oip_call(f"{replica.url}/v2/models/{name}/infer", name, request, request_id)

    def list_deployments(self, *, project: str) -> list[Deployment]:
        self._reconcile(project)
        return deployments.list_deployments(self.ctx, project=project)

    def get_deployment(self, *, project: str, name: str) -> Deployment:
        self._reconcile(project, name)
        return deployments.get_deployment(self.ctx, project=project, name=name)

    def _reconcile(self, project: str, name: str | None = None) -> None:
        if not reconciler.in_background():
            reconciler.reconcile_once(self.ctx, project=project, name=name)

    def _reconciled(self, project: str, name: str) -> Deployment:
        self._reconcile(project, name)
        return deployments.get_deployment(self.ctx, project=project, name=name)

    def stop_deployment(self, *, project: str, name: str) -> Deployment:
        return deployments.stop_deployment(self.ctx, project=project, name=name)

    # governance
    def lineage(self, *, kind: str, id: str, project: str | None = None) -> list[LineageEdge]:
        return lineage_service.lineage(self.ctx, kind=kind, id=id, project=project)

    def audit_events(self, *, after: int = 0, limit: int = 100) -> list[AuditEvent]:
        return audit.list_audit_events(self.ctx, after=after, limit=limit)

    def verify_audit(self) -> AuditVerification:
        return audit.verify_audit_chain(self.ctx)

    # cluster: nodes and queues
    def list_nodes(self) -> list[NodeView]:
        return nodes.list_nodes(self.ctx)

    def get_node(self, node_id: str) -> NodeView:
        return nodes.get_node(self.ctx, node_id=node_id)

    def list_queues(self) -> list[QueueView]:
        return queues.list_queues(self.ctx)

    def get_queue(self, name: str) -> QueueView:
        return queues.get_queue(self.ctx, name=name)

    def set_queue(
        self,
        name: str,
        *,
        nominal: QuotaSpec,
        cohort: str | None = None,
        borrowing_limit: QuotaSpec | None = None,
        weight: float = 1.0,
    ) -> QueueView:
        return queues.set_queue(
            self.ctx,
            name=name,
            nominal=nominal,
            cohort=cohort,
            borrowing_limit=borrowing_limit or QuotaSpec(),
            weight=weight,
        )

    def delete_queue(self, name: str) -> None:
        queues.delete_queue(self.ctx, name=name)
