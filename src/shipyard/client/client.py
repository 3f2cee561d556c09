"""The SDK's entry object: ``Client`` and its resource clients.

``Client()`` talks to ``SHIPYARD_URL`` when it is set and to the embedded home otherwise; pass
``backend=`` to choose explicitly (tests use this to run one scenario both ways).

Every call is in one project: the ``project=`` it names, else the client's (``SHIPYARD_PROJECT``,
else ``default``) - by-id calls too (``jobs.get(id)`` finds only a job of that project), so the
embedded home and a server answer alike.
"""

from __future__ import annotations

import builtins
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import ValidationError

from shipyard.client.backend import Backend, Progress
from shipyard.client.http import HttpBackend
from shipyard.client.local import LocalBackend
from shipyard.compute.policy.base import priority_value
from shipyard.compute.snapshot import code_source
from shipyard.context import open_context
from shipyard.data import datasets, worktree
from shipyard.data.datasets import select_files, stat_cache, table_changes
from shipyard.data.fs import HttpSource, LocalSource, ShipyardFile, Source, open_file
from shipyard.data.statcache import StatCache
from shipyard.data.worktree import CheckoutResult, LinkMode, WorktreeStatus
from shipyard.domain.models import (
    AutoscalingSpec,
    BatchingSpec,
    Dataset,
    DatasetVersion,
    Deployment,
    DeploymentSpec,
    DeploymentStatus,
    DeploymentTarget,
    FileEntry,
    Job,
    JobSpec,
    JobStatus,
    ModelVersion,
    NodeView,
    QueueView,
    QuotaSpec,
    RegisteredModel,
    ReplicaBounds,
    ReplicaResources,
    Resources,
    Run,
)
from shipyard.errors import BackendError, InvalidInputError, NotFoundError
from shipyard.settings import Settings

if TYPE_CHECKING:
    from shipyard.data.quality import Suite

DEPLOY_TIMEOUT_S = 120.0  # how long create/update/scale wait for a deployment to settle


def backend_from_settings(settings: Settings) -> Backend:
    if settings.url:
        return HttpBackend(
            settings.url,
            token=settings.token,
            project=settings.project,
            stat_cache=StatCache(settings.home / "cache" / "stat.sqlite"),
        )
    return LocalBackend(open_context(settings))


class Client:
    """``Client().datasets``, ``.runs``, ``.models``, ``.jobs``, ``.deployments``."""

    def __init__(self, *, settings: Settings | None = None, backend: Backend | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.backend = backend or backend_from_settings(self.settings)
        self.project = self.settings.project
        self.datasets = DatasetsClient(self)
        self.runs = RunsClient(self)
        self.models = ModelsClient(self)
        self.jobs = JobsClient(self)
        self.deployments = DeploymentsClient(self)
        self.nodes = NodesClient(self)
        self.queues = QueuesClient(self)

    @property
    def is_remote(self) -> bool:
        return isinstance(self.backend, HttpBackend)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Resource:
    def __init__(self, client: Client) -> None:
        self._client = client
        self._b = client.backend

    def _project(self, project: str | None) -> str:
        return project or self._client.project


class DatasetsClient(_Resource):
    def commit(
        self,
        source: str | Path,
        *,
        name: str,
        message: str = "",
        project: str | None = None,
        progress: Progress | None = None,
        checks: Suite | Mapping[str, Any] | str | Path | None = None,
    ) -> DatasetVersion:
        """Commit the folder (or file) ``source`` as the next version of ``name``.

        ``checks``: a validation suite (a :class:`~shipyard.data.quality.Suite`, a mapping of
        ``shipyard-checks.yaml``'s structure, or that file's path) instead of a
        ``shipyard-checks.yaml`` among the files; giving both is refused."""
        return self._b.commit_dataset(
            project=self._project(project),
            name=name,
            source=Path(source),
            message=message,
            progress=progress,
            checks=None if checks is None else _suite(checks),
        )

    def list(self, *, project: str | None = None) -> builtins.list[Dataset]:
        return self._b.list_datasets(project=self._project(project))

    def versions(
        self, name: str, *, project: str | None = None, include_deleted: bool = False
    ) -> builtins.list[DatasetVersion]:
        """The dataset's versions, oldest first, with their tags (soft-deleted ones too with
        ``include_deleted``)."""
        return self._b.list_dataset_versions(
            project=self._project(project), name=name, include_deleted=include_deleted
        )

    def tag(
        self,
        name: str,
        version: int | str,
        tag: str,
        *,
        force: bool = False,
        project: str | None = None,
    ) -> DatasetVersion:
        """Name ``version`` ``tag`` so ``name@tag`` reads it; a tag on another version moves
        only with ``force``."""
        return self._b.tag_dataset_version(
            project=self._project(project), name=name, version=version, tag=tag, force=force
        )

    def untag(self, name: str, tag: str, *, project: str | None = None) -> None:
        self._b.untag_dataset(project=self._project(project), name=name, tag=tag)

    def delete(
        self, name: str, version: int | str, *, project: str | None = None
    ) -> DatasetVersion:
        """Soft-delete a version: hidden and unreadable, restorable until ``shipyard gc``
        reclaims the files only it held."""
        return self._b.delete_dataset_version(
            project=self._project(project), name=name, version=version
        )

    def restore(
        self, name: str, version: int | str, *, project: str | None = None
    ) -> DatasetVersion:
        return self._b.restore_dataset_version(
            project=self._project(project), name=name, version=version
        )

    def get(
        self, name: str, version: int | str | None = None, *, project: str | None = None
    ) -> DatasetVersion:
        return self._b.get_dataset_version(
            project=self._project(project), name=name, version=version
        )

    def files(
        self, name: str, version: int | str | None = None, *, project: str | None = None
    ) -> builtins.list[FileEntry]:
        dv = self.get(name, version, project=project)
        return self._b.list_dataset_files(project=dv.project, name=name, version=dv.version)

    def status(
        self,
        source: str | Path,
        *,
        name: str,
        version: int | str | None = None,
        project: str | None = None,
    ) -> WorktreeStatus:
        """The folder ``source`` against a version (the latest by default): files ``added``,
        ``modified`` and ``removed``. Files the stat cache knows unchanged are not read."""
        if isinstance(self._b, LocalBackend):  # the manifest read without an object per file
            return datasets.status(
                self._b.ctx,
                project=self._project(project),
                name=name,
                source=Path(source),
                version=version,
            )
        files = self.files(name, version, project=project)
        return worktree.status(files, Path(source), cache=self._stat_cache())

    def diff(
        self, name: str, a: int | str, b: int | str, *, project: str | None = None
    ) -> dict[str, Any]:
        """Paths ``added`` in ``b``, ``removed`` from ``a``, ``modified``, and ``tables``: each
        table whose row count or columns changed (``datasets.table_changes``)."""
        old, new = self.get(name, a, project=project), self.get(name, b, project=project)
        was = {f.path: f.digest for f in self.files(name, old.version, project=project)}
        now = {f.path: f.digest for f in self.files(name, new.version, project=project)}
        return {
            "added": sorted(now.keys() - was.keys()),
            "removed": sorted(was.keys() - now.keys()),
            "modified": sorted(p for p in was.keys() & now.keys() if was[p] != now[p]),
            "tables": table_changes(old, new),
        }

    def checkout(
        self,
        name: str,
        dest: str | Path,
        version: int | str | None = None,
        *,
        project: str | None = None,
        force: bool = False,
        link: LinkMode = "auto",
        progress: Progress | None = None,
        include: Sequence[str] = (),
    ) -> CheckoutResult:
        """Make the folder ``dest`` hold a version's files, writing only those that differ.
        Refuses (409, listing them) to overwrite local edits unless ``force``. ``link``:
        ``auto`` (reflink, else copy), ``reflink``, ``hardlink`` (read-only loose blobs) or
        ``copy``; through a server, files are downloaded (``auto`` or ``copy`` only).
        ``include``: only the files matching these globs (``images/**``), as :meth:`pull`."""
        dv = self.get(name, version, project=project)
        files = select_files(
            self._b.list_dataset_files(project=dv.project, name=name, version=dv.version),
            include,
        )
        write_many = None
        if isinstance(self._b, LocalBackend):
            write = worktree.local_writer(self._b.ctx.blobs, link=link)
        elif link in ("auto", "copy"):
            backend = self._b

            def write(entry: FileEntry, target: Path) -> bool:
                backend.download_blob(entry.digest, target, project=dv.project)
                return False

            if isinstance(backend, HttpBackend):
                http = backend

                def write_many(items: builtins.list[tuple[FileEntry, Path]]) -> None:
                    http.download_blobs(items, project=dv.project)
        else:
            raise InvalidInputError(
                f"link {link!r} needs the blob store on this machine; through a server use "
                "'auto' or 'copy'",
                field="link",
            )
        return worktree.checkout(
            files,
            Path(dest),
            cache=self._stat_cache(),
            write=write,
            force=force,
            progress=progress,
            write_many=write_many,
        )

    def pull(
        self,
        name: str,
        dest: str | Path,
        version: int | str | None = None,
        *,
        include: Sequence[str],
        project: str | None = None,
        force: bool = False,
        progress: Progress | None = None,
    ) -> CheckoutResult:
        """Part of a version into ``dest``: the files matching ``include`` (gitignore-style
        globs, e.g. ``["images/**", "labels.csv"]``); only those are read or downloaded."""
        return self.checkout(
            name, dest, version, project=project, force=force, progress=progress, include=include
        )

    def transform(
        self,
        source: str,
        *,
        fn: str,
        to: str,
        params: Mapping[str, Any] | None = None,
        mode: Literal["rows", "files", "auto"] = "auto",
        workers: int = 2,
        batch_rows: int = 65_536,
        search_path: Sequence[str | Path] = (),
        project: str | None = None,
        progress: Progress | None = None,
        on: Literal["local", "ray"] = "local",
        ray_address: str | None = None,
    ) -> DatasetVersion:
        """Run ``fn`` (``pkg.module:function``) over version ``source`` (``NAME@V``) in worker
        processes and commit the result as the next version of ``to``, with lineage; the same
        version, code and ``params`` return the earlier result (:mod:`shipyard.data.transform`)."""
        return self._b.transform_dataset(
            project=self._project(project),
            source=source,
            fn=fn,
            to=to,
            params=dict(params or {}),
            mode=mode,
            workers=workers,
            batch_rows=batch_rows,
            search_path=list(search_path),
            progress=progress,
            on=on,
            ray_address=ray_address,
        )

    def _stat_cache(self) -> StatCache:
        if isinstance(self._b, LocalBackend):
            return stat_cache(self._b.ctx)
        return StatCache(Settings.from_env().home / "cache" / "stat.sqlite")

    def read_table(
        self, name: str, path: str, version: int | str | None = None, *, project: str | None = None
    ) -> pa.Table:
        """One Parquet or CSV file of a dataset version as an Arrow table (hash-verified)."""
        entries = {f.path: f for f in self.files(name, version, project=project)}
        if path not in entries:
            raise NotFoundError(
                f"dataset {name!r} has no file {path!r}; it has: {', '.join(sorted(entries)[:10])}",
                field="path",
            )
        data = self._b.read_blob(entries[path].digest, project=self._project(project))
        if path.endswith(".parquet"):
            return pq.read_table(io.BytesIO(data))
        if path.endswith(".csv"):
            return pacsv.read_csv(io.BytesIO(data))
        raise InvalidInputError(f"{path!r} is neither Parquet nor CSV", field="path")

    def open(
        self,
        name: str,
        path: str,
        version: int | str | None = None,
        *,
        project: str | None = None,
    ) -> ShipyardFile:
        """One file of a dataset version as a binary, seekable file object that streams from
        the blob store (ranged reads; never the whole file in memory unless read whole), its
        blob's digest verified once (``shipyard.data.fs`` says when)."""
        return open_file(
            self._file_source(),
            project=self._project(project),
            name=name,
            path=path,
            version=version,
        )

    def _file_source(self) -> Source:
        """Kept per client, so resolved versions and verified digests are reused."""
        found: Source | None = getattr(self, "_source", None)
        if found is None:
            if isinstance(self._b, LocalBackend):
                found = LocalSource(ctx=self._b.ctx)
            elif isinstance(self._b, HttpBackend):  # its connection: token and transport
                found = HttpSource(self._b.url, http=self._b._http)
            else:
                raise InvalidInputError(
                    f"datasets.open needs a local or HTTP backend, not {type(self._b).__name__}",
                    field="backend",
                )
            self._source = found
        return found


def _suite(checks: Suite | Mapping[str, Any] | str | Path) -> Suite:
    from shipyard.data.quality import load_suite  # pandera's import is paid only with a suite

    return load_suite(checks)


class RunsClient(_Resource):
    def list(self, *, project: str | None = None) -> builtins.list[Run]:
        return self._b.list_runs(project=self._project(project))

    def get(self, run_id: str, *, project: str | None = None) -> Run:
        return self._b.get_run(run_id, project=self._project(project))


class ModelsClient(_Resource):
    def register(
        self,
        name: str,
        *,
        run_id: str,
        artifact_path: str,
        description: str = "",
        project: str | None = None,
    ) -> ModelVersion:
        return self._b.register_model_version(
            project=self._project(project),
            model=name,
            run_id=run_id,
            artifact_path=artifact_path,
            description=description,
        )

    def get(
        self, name: str, ref: str | int = "latest", *, project: str | None = None
    ) -> ModelVersion:
        return self._b.get_model_version(project=self._project(project), model=name, ref=ref)

    def list(self, *, project: str | None = None) -> builtins.list[RegisteredModel]:
        return self._b.list_models(project=self._project(project))

    def versions(self, name: str, *, project: str | None = None) -> builtins.list[ModelVersion]:
        return self._b.list_model_versions(project=self._project(project), model=name)

    def set_alias(
        self, name: str, alias: str, version: int | str, *, project: str | None = None
    ) -> ModelVersion:
        return self._b.set_alias(
            project=self._project(project), model=name, alias=alias, version=version
        )

    def batch_predict(
        self,
        model: str,
        *,
        input: str,
        output: str,
        columns: Sequence[str] | None = None,
        input_column: str | None = None,
        keep: Sequence[str] = (),
        workers: int | None = None,
        batch_rows: int = 256,
        on: Literal["local", "ray"] = "local",
        ray_address: str | None = None,
        project: str | None = None,
        progress: Progress | None = None,
    ) -> DatasetVersion:
        """Run ``model`` (``NAME@ALIAS``, ``NAME@vN``; ``NAME`` for ``production``) over the
        tables of dataset version ``input`` (``NAME@V``) in worker processes here (or an actor
        pool on Ray) and commit the predictions as the next version of dataset ``output``, with
        lineage from the dataset version and the model version (:mod:`shipyard.serving.batch`).
        ``columns`` / ``input_column`` choose the features; ``keep`` columns pass through."""
        return self._b.batch_predict(
            project=self._project(project),
            model=model,
            source=input,
            to=output,
            columns=None if columns is None else list(columns),
            input_column=input_column,
            keep=list(keep),
            workers=workers,
            batch_rows=batch_rows,
            on=on,
            ray_address=ray_address,
            progress=progress,
        )


class JobsClient(_Resource):
    def submit(
        self,
        command: list[str],
        *,
        code_dir: str | Path | None = None,
        cpus: float = 1.0,
        memory_mb: int = 512,
        gpus: int = 0,
        priority: int | str = 0,
        max_runtime_s: float | None = None,
        env: dict[str, str] | None = None,
        name: str | None = None,
        project: str | None = None,
        run_id: str | None = None,
        workers: int = 1,
        gpu_type: str | None = None,
        gpu_fraction: float | None = None,
        gpu_memory_mb: int | None = None,
        preemptible: bool = False,
        queue: str | None = None,
        outputs: Sequence[str] = (),
    ) -> Job:
        """Submit ``command`` as a job. Resources are per worker (``workers`` > 1: a gang, all
        started together); ``priority`` is an integer or a class (low, normal, high, critical);
        ``outputs`` are paths in the job's folder stored as artifacts of its run when it ends."""
        try:
            level = priority_value(priority)
        except ValueError as exc:
            raise InvalidInputError(str(exc), field="priority") from None
        try:
            spec = JobSpec(
                command=command,
                env=env or {},
                resources=_job_resources(
                    cpus=cpus,
                    memory_mb=memory_mb,
                    gpus=gpus,
                    gpu_type=gpu_type,
                    gpu_fraction=gpu_fraction,
                    gpu_memory_mb=gpu_memory_mb,
                ),
                priority=level,
                max_runtime_s=max_runtime_s,
                name=name,
                workers=workers,
                preemptible=preemptible,
                queue=queue,
                outputs=list(outputs),
            )
        except ValidationError as exc:
            raise _invalid_spec(exc) from None
        if code_dir and spec.source is None:  # where the code comes from (git commit, dirty)
            spec = spec.model_copy(update={"source": code_source(Path(code_dir))})
        return self._b.submit_job(
            project=self._project(project),
            spec=spec,
            code_dir=Path(code_dir) if code_dir else None,
            run_id=run_id,
        )

    def list(
        self, *, project: str | None = None, status: JobStatus | None = None
    ) -> builtins.list[Job]:
        return self._b.list_jobs(project=self._project(project), status=status)

    def get(self, job_id: str, *, project: str | None = None) -> Job:
        return self._b.get_job(job_id, project=self._project(project))

    def cancel(self, job_id: str, *, project: str | None = None) -> Job:
        return self._b.cancel_job(job_id, project=self._project(project))

    def logs(
        self, job_id: str, *, offset: int = 0, project: str | None = None
    ) -> tuple[str, int, bool]:
        return self._b.read_logs(job_id, offset=offset, project=self._project(project))


class DeploymentsClient(_Resource):
    """Deployments: desired state that the reconciler makes so.

    ``create``, ``update`` and ``scale`` record the change and, with ``wait`` (the default),
    return once the deployment has settled: running as its spec says, or failed (then they raise
    BackendError with the reason; ``wait=False`` returns at once and ``wait()`` waits later).
    """

    def create(
        self,
        name: str,
        *,
        model: str,
        ref: str | None = None,
        spec: DeploymentSpec | None = None,
        max_batch_size: int | None = None,
        max_wait_ms: float | None = None,
        wait: bool = True,
        timeout: float = DEPLOY_TIMEOUT_S,
        project: str | None = None,
    ) -> Deployment:
        project = self._project(project)
        created = self._b.deploy(
            project=project,
            name=name,
            model=model,
            ref=ref,
            spec=spec,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
        )
        return self._settled(created, project, wait=wait, timeout=timeout)

    def update(
        self,
        name: str,
        *,
        targets: Sequence[DeploymentTarget] | None = None,
        replicas: ReplicaBounds | None = None,
        resources: ReplicaResources | None = None,
        batching: BatchingSpec | None = None,
        autoscaling: AutoscalingSpec | Literal[False] | None = None,
        wait: bool = True,
        timeout: float = DEPLOY_TIMEOUT_S,
        project: str | None = None,
    ) -> Deployment:
        """Change parts of the spec; new targets roll out (see ``serving.reconciler``).

        ``autoscaling``: a policy to scale replicas between ``replicas.min`` and ``max`` on
        in-flight requests, False to turn it off, None to leave it as it is."""
        project = self._project(project)
        updated = self._b.update_deployment(
            project=project,
            name=name,
            targets=list(targets) if targets is not None else None,
            replicas=replicas,
            resources=resources,
            batching=batching,
            autoscaling=autoscaling,
        )
        return self._settled(updated, project, wait=wait, timeout=timeout)

    def scale(
        self,
        name: str,
        *,
        min: int,
        max: int | None = None,
        wait: bool = True,
        timeout: float = DEPLOY_TIMEOUT_S,
        project: str | None = None,
    ) -> Deployment:
        project = self._project(project)
        scaled = self._b.scale_deployment(
            project=project, name=name, min_replicas=min, max_replicas=max
        )
        return self._settled(scaled, project, wait=wait, timeout=timeout)

    def wait(
        self, name: str, *, timeout: float = DEPLOY_TIMEOUT_S, project: str | None = None
    ) -> Deployment:
        """Return once the deployment has settled (or after ``timeout``, as it is then)."""
        return self._b.settle_deployment(project=self._project(project), name=name, timeout=timeout)

    def predict(
        self,
        name: str,
        request: dict[str, Any],
        *,
        request_id: str | None = None,
        project: str | None = None,
    ) -> dict[str, Any]:
        """One OIP v2 inference request (``{"inputs": [...]}``); the OIP response body, plus
        ``shipyard: {request_id, model_version}``. Through the server's gateway when the client
        talks to a server, else straight to a ready replica."""
        return self._b.predict(
            project=self._project(project), name=name, request=request, request_id=request_id
        )

    def _settled(
        self, deployment: Deployment, project: str, *, wait: bool, timeout: float
    ) -> Deployment:
        if not wait:
            return deployment
        settled = self._b.settle_deployment(project=project, name=deployment.name, timeout=timeout)
        failure = settled.rollout.error if settled.rollout is not None else None
        if settled.status is DeploymentStatus.FAILED or failure:
            raise BackendError(
                f"deployment {deployment.name!r} failed: {failure or settled.message}",
                field="name",
            )
        if not settled.settled():
            raise BackendError(
                f"deployment {deployment.name!r} has not settled after {timeout:.0f}s "
                f"({settled.status.value}: {settled.message}); wait for it with "
                f"`shipyard deployments show {deployment.name}`",
                field="name",
            )
        return settled

    def list(self, *, project: str | None = None) -> builtins.list[Deployment]:
        return self._b.list_deployments(project=self._project(project))

    def get(self, name: str, *, project: str | None = None) -> Deployment:
        return self._b.get_deployment(project=self._project(project), name=name)

    def stop(self, name: str, *, project: str | None = None) -> Deployment:
        return self._b.stop_deployment(project=self._project(project), name=name)


class NodesClient(_Resource):
    """The cluster's nodes (not per project): what each has and what is allocated there."""

    def list(self) -> builtins.list[NodeView]:
        return self._b.list_nodes()

    def get(self, node_id: str) -> NodeView:
        return self._b.get_node(node_id)


class QueuesClient(_Resource):
    """Queues with quotas (not per project; a project's own queue is named like it).

    ``set`` and ``delete`` are for server admins. A quota given as a dict or ``QuotaSpec``
    (``{"gpus": 8, "gpus_by_model": {"A100": 4}}``); a resource left out is unlimited.
    """

    def list(self) -> builtins.list[QueueView]:
        return self._b.list_queues()

    def get(self, name: str) -> QueueView:
        return self._b.get_queue(name)

    def set(
        self,
        name: str,
        *,
        nominal: QuotaSpec | dict[str, object] | None = None,
        cohort: str | None = None,
        borrowing_limit: QuotaSpec | dict[str, object] | None = None,
        weight: float = 1.0,
    ) -> QueueView:
        return self._b.set_queue(
            name,
            nominal=_quota(nominal),
            cohort=cohort,
            borrowing_limit=_quota(borrowing_limit),
            weight=weight,
        )

    def delete(self, name: str) -> None:
        self._b.delete_queue(name)


def _job_resources(**values: Any) -> Resources:
    try:
        return Resources(**values)
    except ValidationError as exc:
        raise _invalid_spec(exc, prefix="resources.") from None


def _invalid_spec(exc: ValidationError, *, prefix: str = "") -> InvalidInputError:
    """A job spec the model refuses: the first problem, naming its field (e.g. resources.gpus)."""
    first = exc.errors()[0]
    where = prefix + ".".join(str(part) for part in first.get("loc", ()))
    return InvalidInputError(f"{where or 'spec'}: {first.get('msg', exc)}", field=where or "spec")


def _quota(quota: QuotaSpec | dict[str, object] | None) -> QuotaSpec:
    if quota is None:
        return QuotaSpec()
    if isinstance(quota, QuotaSpec):
        return quota
    try:
        return QuotaSpec.model_validate(quota)
    except ValueError as exc:
        raise InvalidInputError(f"not a quota: {exc}", field="quota") from None
