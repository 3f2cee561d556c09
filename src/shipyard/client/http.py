"""The HTTP backend: the REST API of a shipyard server, over httpx.

Every resource lives under its project (``/api/v1/projects/{project}/...``), by-id routes too; a
call that names no project uses the backend's own (``SHIPYARD_PROJECT``, else ``default``).
Blobs travel separately from metadata: a dataset commit hashes files locally, uploads only the
blobs the server lacks (``HEAD`` first, so re-committing unchanged data sends nothing), then
posts the manifest. Every response body is validated into the domain models, and every error
body is turned back into the exception the service raised.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import blake3
import httpx
from pydantic import BaseModel, TypeAdapter

from shipyard.blobs import hash_bytes, hash_file
from shipyard.client.backend import Backend, Progress
from shipyard.client.oip import oip_call, poll_settled
from shipyard.compute.snapshot import snapshot_code
from shipyard.data.scan import ScannedFile, scan_source
from shipyard.data.statcache import StatCache
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
from shipyard.domain.names import validate_name, validate_relative_path
from shipyard.errors import BackendError, IntegrityError, InvalidInputError, error_from_dict
from shipyard.schemas import (
    AddRunInputRequest,
    CommitDatasetRequest,
    CreateDeploymentRequest,
    CreateRunRequest,
    FinishRunRequest,
    JobLogsResponse,
    LogArtifactRequest,
    NewFile,
    RecordCheckpointRequest,
    RegisterModelVersionRequest,
    SetAliasRequest,
    SubmitJobRequest,
    UpdateDeploymentRequest,
)
from shipyard.settings import DEFAULT_PROJECT
from shipyard.tracking.checkpoints import checkpoint_sources

if TYPE_CHECKING:
    from shipyard.data.quality import Suite

M = TypeVar("M", bound=BaseModel)
API = "/api/v1"


class HttpBackend(Backend):
    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 120.0,
        project: str = DEFAULT_PROJECT,
        stat_cache: StatCache | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.stat_cache = stat_cache  # this machine's: unchanged files are not hashed again
        self.url = url.rstrip("/")
        self.project = validate_name(project, field="project")
        self._http = httpx.Client(
            base_url=self.url, headers=headers, transport=transport, timeout=timeout
        )

    def close(self) -> None:
        self._http.close()

    # --- plumbing ------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise BackendError(
                f"cannot reach the shipyard server at {self.url} ({exc}); is 'shipyard server' "
                "running there, and is SHIPYARD_URL right?"
            ) from None
        if response.status_code >= 400 and method != "HEAD":
            self._raise_for(response)
        return response

    def _raise_for(self, response: httpx.Response) -> None:
        """Raise the error a failed response's body names (the service's own exception)."""
        try:
            body = response.json()
        except ValueError:
            body = {"message": response.text[:500]}
        if not isinstance(body, dict):
            body = {"message": str(body)}
        raise error_from_dict(body, status=response.status_code)

    def _json(self, method: str, path: str, model: type[M], **kwargs: Any) -> M:
        return model.model_validate(self._request(method, path, **kwargs).json())

    def _list(self, path: str, model: type[M], **params: Any) -> list[M]:
        data = self._request("GET", path, params=_clean(params)).json()
        return TypeAdapter(list[model]).validate_python(data)  # type: ignore[valid-type]

    def _p(self, project: str | None) -> str:
        """The URL prefix of ``project``'s resources (the backend's project when None)."""
        return f"{API}/projects/{_seg(project or self.project, 'project')}"

    def _put_blob(self, project: str, local: Path, digest: str | None = None) -> tuple[str, int]:
        digest = digest or hash_file(local)
        size = local.stat().st_size
        url = f"{self._p(project)}/blobs/{_seg(digest, 'digest')}"
        if self._request("HEAD", url).status_code != 200:
            with open(local, "rb") as fh:
                self._request(
                    "PUT",
                    url,
                    content=fh,
                    headers={"Content-Type": "application/octet-stream"},
                )
        return digest, size

    # --- datasets ------------------------------------------------------------------------------

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
        """Hash the files (those the stat cache knows unchanged are not read), ask the server
        in one request which blobs it lacks, upload those -- small ones many to a request, in
        frames, large ones streamed one by one -- then post the manifest."""
        validate_name(name, field="name")
        source = Path(source)
        found = scan_source(source)
        root = Path(os.path.realpath(source if source.is_dir() else source.parent))
        digests = self._hash_files(root, found)
        total = sum(f.size for f in found)
        missing = set(self._missing(project, list(set(digests.values()))))
        todo: dict[str, ScannedFile] = {}
        for f in found:
            if digests[f.path] in missing:
                todo.setdefault(digests[f.path], f)
        done = total - sum(f.size for f in todo.values())
        if progress is not None and done:
            progress(done, total, found[-1].path)
        for uploaded in self._upload(project, todo):
            done += uploaded.size
            if progress is not None:
                progress(done, total, uploaded.path)
        entries = [
            _unchecked(NewFile, path=f.path, digest=digests[f.path], size=f.size) for f in found
        ]
        body = _unchecked(
            CommitDatasetRequest,
            files=entries,
            message=message,
            checks=None if checks is None else checks.model_dump(mode="json"),
        )
        return self._json(
            "POST",
            f"{self._p(project)}/datasets/{_seg(name)}/versions",
            DatasetVersion,
            json=body.model_dump(mode="json"),
        )

    def _hash_files(self, root: Path, found: list[ScannedFile]) -> dict[str, str]:
        """Each file's digest by path: from the stat cache when its stamps are unchanged, else
        read and hashed (a thread pool: BLAKE3 and the reads release the GIL)."""
        cache = self.stat_cache
        known = cache.load(root) if cache is not None else {}
        digests: dict[str, str] = {}
        todo: list[ScannedFile] = []
        for f in found:
            hit = cache.lookup(known, f) if cache is not None else None
            if hit is not None:
                digests[f.path] = hit
            else:
                todo.append(f)
        hashed_at = time.time_ns()
        with ThreadPoolExecutor(_HASH_WORKERS) as pool:
            for f, digest in zip(todo, pool.map(lambda f: hash_file(f.real), todo), strict=True):
                digests[f.path] = digest
        if cache is not None:
            gone = known.keys() - digests.keys()
            cache.save(
                root, [(f, digests[f.path]) for f in todo], hashed_at_ns=hashed_at, gone=gone
            )
        return digests

    def _missing(self, project: str, digests: list[str]) -> list[str]:
        """The digests the server wants uploaded (one request per 100,000)."""
        out: list[str] = []
        for start in range(0, len(digests), _MISSING_PER_REQUEST):
            part = digests[start : start + _MISSING_PER_REQUEST]
            body = self._request(
                "POST", f"{self._p(project)}/blobs/missing", json={"digests": part}
            ).json()
            out.extend(body["missing"])
        return out

    def _upload(self, project: str, todo: dict[str, ScannedFile]) -> Iterator[ScannedFile]:
        """Upload each ``digest -> file``; yields each file once it is stored. Small ones go in
        framed batches of up to 32 MiB, two requests in flight; large ones one by one."""
        small = [(d, f) for d, f in todo.items() if f.size <= _BATCH_MAX_BLOB_BYTES]
        large = [(d, f) for d, f in todo.items() if f.size > _BATCH_MAX_BLOB_BYTES]
        batches: list[list[tuple[str, ScannedFile]]] = [[]]
        size = 0
        for item in small:
            if batches[-1] and (size + item[1].size > _BATCH_BYTES or len(batches[-1]) >= 20_000):
                batches.append([])
                size = 0
            batches[-1].append(item)
            size += item[1].size
        url = f"{self._p(project)}/blobs/batch"

        def send(batch: list[tuple[str, ScannedFile]]) -> list[tuple[str, ScannedFile]]:
            body = b"".join(_frame(digest, f) for digest, f in batch)
            self._request(
                "POST", url, content=body, headers={"Content-Type": "application/octet-stream"}
            )
            return batch

        with ThreadPoolExecutor(_UPLOADS_IN_FLIGHT) as pool:
            for batch in pool.map(send, [b for b in batches if b]):
                for _, f in batch:
                    yield f
        for digest, f in large:
            self._put_blob(project, Path(f.real), digest)
            yield f

    def download_blobs(
        self, items: Sequence[tuple[FileEntry, Path]], *, project: str | None = None
    ) -> None:
        """Write each entry's blob to its target (atomically, digest checked): small blobs
        fetched many to a request, in frames; large ones streamed one by one."""
        small = [(e.digest, t) for e, t in items if e.size <= _BATCH_MAX_BLOB_BYTES]
        for start in range(0, len(small), _FETCH_PER_REQUEST):
            self._fetch_into(small[start : start + _FETCH_PER_REQUEST], project=project)
        for entry, target in items:
            if entry.size > _BATCH_MAX_BLOB_BYTES:
                self.download_blob(entry.digest, target, project=project)

    def _fetch_into(self, items: list[tuple[str, Path]], *, project: str | None) -> None:
        wanted = list(dict.fromkeys(d for d, _ in items))
        targets: dict[str, list[Path]] = {}
        for digest, target in items:
            targets.setdefault(digest, []).append(target)
        url = f"{self._p(project)}/blobs/fetch"
        got: set[str] = set()
        try:
            with self._http.stream("POST", url, json={"digests": wanted}) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response)
                buffer = bytearray()
                for chunk in response.iter_bytes():
                    buffer += chunk
                    at = 0
                    while len(buffer) - at >= _FRAME.size:
                        raw, size = _FRAME.unpack_from(buffer, at)
                        end = at + _FRAME.size + size
                        if end > len(buffer):
                            break
                        digest = raw.hex()
                        data = bytes(buffer[at + _FRAME.size : end])
                        if digest not in targets or hash_bytes(data) != digest:
                            raise IntegrityError(
                                f"blob {digest} arrived corrupted; try again", digest=digest
                            )
                        for target in targets[digest]:
                            _write_atomic(target, data)
                        got.add(digest)
                        at = end
                    del buffer[:at]
        except httpx.TransportError as exc:
            raise BackendError(
                f"downloading blobs from {self.url} failed ({exc}); try again"
            ) from None
        lost = [d for d in wanted if d not in got]
        if lost:
            raise BackendError(
                f"the server's response ended before blob {lost[0]} ({len(lost)} missing); "
                "try again"
            )

    def list_datasets(self, *, project: str) -> list[Dataset]:
        return self._list(f"{self._p(project)}/datasets", Dataset)

    def list_dataset_versions(
        self, *, project: str, name: str, include_deleted: bool = False
    ) -> list[DatasetVersion]:
        return self._list(
            f"{self._p(project)}/datasets/{_seg(name)}/versions",
            DatasetVersion,
            include_deleted=include_deleted or None,
        )

    def tag_dataset_version(
        self, *, project: str, name: str, version: int | str, tag: str, force: bool = False
    ) -> DatasetVersion:
        return self._json(
            "PUT",
            f"{self._p(project)}/datasets/{_seg(name)}/tags/{_seg(tag, 'tag')}",
            DatasetVersion,
            json={"version": version, "force": force},
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
        raise InvalidInputError(
            "data transform runs against this machine's home for now (the server would have to "
            "import your code); unset SHIPYARD_URL, or run it on the server's host",
            field="source",
        )

    def untag_dataset(self, *, project: str, name: str, tag: str) -> None:
        self._request("DELETE", f"{self._p(project)}/datasets/{_seg(name)}/tags/{_seg(tag, 'tag')}")

    def delete_dataset_version(
        self, *, project: str, name: str, version: int | str
    ) -> DatasetVersion:
        return self._json(
            "DELETE",
            f"{self._p(project)}/datasets/{_seg(name)}/versions/{_seg(version, 'version')}",
            DatasetVersion,
        )

    def restore_dataset_version(
        self, *, project: str, name: str, version: int | str
    ) -> DatasetVersion:
        return self._json(
            "POST",
            f"{self._p(project)}/datasets/{_seg(name)}/versions/{_seg(version, 'version')}/restore",
            DatasetVersion,
        )

    def get_dataset_version(
        self, *, project: str, name: str, version: int | str | None = None
    ) -> DatasetVersion:
        ref = "latest" if version is None else version
        return self._json(
            "GET",
            f"{self._p(project)}/datasets/{_seg(name)}/versions/{_seg(ref, 'version')}",
            DatasetVersion,
        )

    def list_dataset_files(self, *, project: str, name: str, version: int) -> list[FileEntry]:
        return self._list(
            f"{self._p(project)}/datasets/{_seg(name)}/versions/{_seg(version, 'version')}/files",
            FileEntry,
        )

    def read_blob(self, digest: str, *, project: str | None = None) -> bytes:
        url = f"{self._p(project)}/blobs/{_seg(digest, 'digest')}"
        data = self._request("GET", url).content
        if hash_bytes(data) != digest:
            raise IntegrityError(f"blob {digest} arrived corrupted; try again", digest=digest)
        return data

    # --- runs ----------------------------------------------------------------------------------

    def create_run(
        self,
        *,
        project: str,
        name: str | None = None,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        job_id: str | None = None,
    ) -> Run:
        body = _unchecked(
            CreateRunRequest, name=name, params=params or {}, tags=tags or {}, job_id=job_id
        )
        return self._json(
            "POST", f"{self._p(project)}/runs", Run, json=body.model_dump(mode="json")
        )

    def get_run(self, run_id: str, *, project: str | None = None) -> Run:
        return self._json("GET", self._run(project, run_id), Run)

    def list_runs(self, *, project: str | None = None) -> list[Run]:
        return self._list(f"{self._p(project)}/runs", Run)

    def _run(self, project: str | None, run_id: str) -> str:
        return f"{self._p(project)}/runs/{_seg(run_id, 'run_id')}"

    def log_batch(
        self,
        run_id: str,
        *,
        metrics: Sequence[PointLike],
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        project: str | None = None,
    ) -> LogBatchResult:
        # Encoded by hand, not through LogBatchRequest: it is the hot path, and JSON has no NaN
        # (httpx refuses it), so non-finite values travel as "NaN", "Infinity", "-Infinity".
        body = {
            "metrics": [_wire_point(p) for p in metrics],
            "params": params or {},
            "tags": tags or {},
        }
        return self._json(
            "POST",
            f"{self._run(project, run_id)}/log-batch",
            LogBatchResult,
            content=json.dumps(body, allow_nan=False, separators=(",", ":")),
            headers={"Content-Type": "application/json"},
        )

    def heartbeat(self, run_id: str, *, project: str | None = None) -> None:
        self._request("POST", f"{self._run(project, run_id)}/heartbeat")

    def finish_run(
        self,
        run_id: str,
        *,
        status: RunStatus = RunStatus.FINISHED,
        project: str | None = None,
    ) -> Run:
        return self._json(
            "PATCH",
            self._run(project, run_id),
            Run,
            json=_unchecked(FinishRunRequest, status=status).model_dump(mode="json"),
        )

    def metric_history(
        self, run_id: str, *, key: str, project: str | None = None
    ) -> list[MetricPoint]:
        return self._list(f"{self._run(project, run_id)}/metrics", MetricPoint, key=key)

    def log_artifact(
        self,
        run_id: str,
        *,
        path: str,
        local_file: Path,
        project: str | None = None,
        after_end: bool = False,  # a job's declared outputs, with its token (the Ray worker)
    ) -> Artifact:
        validate_relative_path(path, field="path")
        digest, size = self._put_blob(project or self.project, Path(local_file))
        body = _unchecked(
            LogArtifactRequest, path=path, digest=digest, size=size, after_end=after_end
        )
        return self._json(
            "POST",
            f"{self._run(project, run_id)}/artifacts",
            Artifact,
            json=body.model_dump(mode="json"),
        )

    def add_run_input(self, run_id: str, *, project: str, dataset: str, version: int) -> None:
        body = _unchecked(AddRunInputRequest, dataset=dataset, version=version)
        self._request(
            "POST", f"{self._run(project, run_id)}/inputs", json=body.model_dump(mode="json")
        )

    def last_steps(self, run_id: str, *, project: str | None = None) -> dict[str, int]:
        data = self._request("GET", f"{self._run(project, run_id)}/metric-steps").json()
        return TypeAdapter(dict[str, int]).validate_python(data)

    # --- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(
        self,
        run_id: str,
        *,
        local_path: Path,
        step: int | None = None,
        attempt: int = 1,
        project: str | None = None,
    ) -> Checkpoint:
        kind, sources = checkpoint_sources(Path(local_path))
        entries: list[NewFile] = []
        for rel, real in sources:
            digest, size = self._put_blob(project or self.project, real)
            entries.append(_unchecked(NewFile, path=rel, digest=digest, size=size))
        body = _unchecked(
            RecordCheckpointRequest, files=entries, kind=kind, step=step, attempt=attempt
        )
        return self._json(
            "POST",
            f"{self._run(project, run_id)}/checkpoints",
            Checkpoint,
            json=body.model_dump(mode="json"),
        )

    def list_checkpoints(self, run_id: str, *, project: str | None = None) -> list[Checkpoint]:
        return self._list(f"{self._run(project, run_id)}/checkpoints", Checkpoint)

    def latest_checkpoint(self, run_id: str, *, project: str | None = None) -> Checkpoint | None:
        data = self._request("GET", f"{self._run(project, run_id)}/checkpoints/latest").json()
        return None if data is None else Checkpoint.model_validate(data)

    def download_blob(self, digest: str, target: Path, *, project: str | None = None) -> None:
        url = f"{self._p(project)}/blobs/{_seg(digest, 'digest')}"
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".shipyard-")
        try:
            hasher = blake3.blake3()
            with os.fdopen(fd, "wb") as out:
                try:
                    with self._http.stream("GET", url) as response:
                        if response.status_code >= 400:
                            response.read()
                            self._raise_for(response)
                        for chunk in response.iter_bytes():
                            hasher.update(chunk)
                            out.write(chunk)
                except httpx.TransportError as exc:
                    raise BackendError(
                        f"downloading blob {digest} from {self.url} failed ({exc}); try again"
                    ) from None
            if hasher.hexdigest() != digest:
                raise IntegrityError(f"blob {digest} arrived corrupted; try again", digest=digest)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    # --- models --------------------------------------------------------------------------------

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
        body = _unchecked(
            RegisterModelVersionRequest,
            run_id=run_id,
            artifact_path=artifact_path,
            description=description,
            example=example,
            parity=parity,
        )
        return self._json(
            "POST",
            f"{self._p(project)}/models/{_seg(model, 'model')}/versions",
            ModelVersion,
            json=body.model_dump(mode="json"),
        )

    def get_model_version(
        self, *, project: str, model: str, ref: str | int = "latest"
    ) -> ModelVersion:
        return self._json(
            "GET",
            f"{self._p(project)}/models/{_seg(model, 'model')}/versions/{_seg(ref, 'ref')}",
            ModelVersion,
        )

    def list_models(self, *, project: str) -> list[RegisteredModel]:
        return self._list(f"{self._p(project)}/models", RegisteredModel)

    def list_model_versions(self, *, project: str, model: str) -> list[ModelVersion]:
        return self._list(
            f"{self._p(project)}/models/{_seg(model, 'model')}/versions", ModelVersion
        )

    def set_alias(
        self, *, project: str, model: str, alias: str, version: int | str
    ) -> ModelVersion:
        body = _unchecked(SetAliasRequest, version=version)
        return self._json(
            "PUT",
            f"{self._p(project)}/models/{_seg(model, 'model')}/aliases/{_seg(alias, 'alias')}",
            ModelVersion,
            json=body.model_dump(mode="json"),
        )

    def alias_history(self, *, project: str, model: str) -> list[AliasEvent]:
        return self._list(
            f"{self._p(project)}/models/{_seg(model, 'model')}/alias-history", AliasEvent
        )

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
        raise InvalidInputError(
            "batch inference runs against this machine's home for now (the server has no API "
            "yet to record a batch's lineage); unset SHIPYARD_URL, or run it on the server's "
            "host",
            field="model",
        )

    # --- jobs ----------------------------------------------------------------------------------

    def submit_job(
        self,
        *,
        project: str,
        spec: JobSpec,
        code_dir: Path | None = None,
        run_id: str | None = None,
    ) -> Job:
        code_digest = None
        if code_dir is not None:
            with tempfile.TemporaryDirectory() as tmp:
                archive = Path(tmp) / "code.tar.gz"
                archive.write_bytes(snapshot_code(Path(code_dir)))
                code_digest, _ = self._put_blob(project, archive)
        body = _unchecked(SubmitJobRequest, spec=spec, code_digest=code_digest, run_id=run_id)
        return self._json(
            "POST", f"{self._p(project)}/jobs", Job, json=body.model_dump(mode="json")
        )

    def list_jobs(
        self, *, project: str | None = None, status: JobStatus | None = None
    ) -> list[Job]:
        return self._list(f"{self._p(project)}/jobs", Job, status=status.value if status else None)

    def get_job(self, job_id: str, *, project: str | None = None) -> Job:
        return self._json("GET", self._job(project, job_id), Job)

    def cancel_job(self, job_id: str, *, project: str | None = None) -> Job:
        return self._json("POST", f"{self._job(project, job_id)}/cancel", Job)

    def read_logs(
        self, job_id: str, *, offset: int = 0, project: str | None = None
    ) -> tuple[str, int, bool]:
        logs = self._json(
            "GET",
            f"{self._job(project, job_id)}/logs",
            JobLogsResponse,
            params={"offset": offset},
        )
        return logs.data, logs.offset, logs.finished

    def _job(self, project: str | None, job_id: str) -> str:
        return f"{self._p(project)}/jobs/{_seg(job_id, 'job_id')}"

    # --- deployments ---------------------------------------------------------------------------

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
        body = _unchecked(
            CreateDeploymentRequest,
            name=name,
            model=model,
            ref=ref,
            spec=spec,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
        )
        return self._json(
            "POST",
            f"{self._p(project)}/deployments",
            Deployment,
            json=body.model_dump(mode="json", exclude_none=True),
        )

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
        body = _unchecked(
            UpdateDeploymentRequest,
            targets=targets,
            replicas=replicas,
            resources=resources,
            batching=batching,
        )
        payload = body.model_dump(mode="json", exclude_none=True)
        if autoscaling is not None:  # null (False) turns it off; absent leaves it
            payload["autoscaling"] = (
                None if autoscaling is False else autoscaling.model_dump(mode="json")
            )
        return self._json(
            "PATCH", f"{self._p(project)}/deployments/{_seg(name)}", Deployment, json=payload
        )

    def scale_deployment(
        self, *, project: str, name: str, min_replicas: int, max_replicas: int | None = None
    ) -> Deployment:
        body = {"min": min_replicas, **({"max": max_replicas} if max_replicas else {})}
        return self._json(
            "POST", f"{self._p(project)}/deployments/{_seg(name)}/scale", Deployment, json=body
        )

    def settle_deployment(self, *, project: str, name: str, timeout: float) -> Deployment:
        return poll_settled(lambda: self.get_deployment(project=project, name=name), timeout)

    def predict(
        self, *, project: str, name: str, request: dict[str, Any], request_id: str | None = None
    ) -> dict[str, Any]:
        base = "" if project == DEFAULT_PROJECT else f"/projects/{_seg(project, 'project')}"
        return oip_call(
            f"{base}/v2/models/{_seg(name)}/infer", name, request, request_id, client=self._http
        )

    def list_deployments(self, *, project: str) -> list[Deployment]:
        return self._list(f"{self._p(project)}/deployments", Deployment)

    def get_deployment(self, *, project: str, name: str) -> Deployment:
        return self._json("GET", f"{self._p(project)}/deployments/{_seg(name)}", Deployment)

    def stop_deployment(self, *, project: str, name: str) -> Deployment:
        return self._json("POST", f"{self._p(project)}/deployments/{_seg(name)}/stop", Deployment)

    # --- governance ----------------------------------------------------------------------------

    def lineage(self, *, kind: str, id: str, project: str | None = None) -> list[LineageEdge]:
        return self._list(
            f"{self._p(project)}/lineage/{_seg(kind, 'kind')}/{_seg(id, 'id')}", LineageEdge
        )

    def audit_events(self, *, after: int = 0, limit: int = 100) -> list[AuditEvent]:
        return self._list(f"{API}/audit", AuditEvent, after=after, limit=limit)

    def verify_audit(self) -> AuditVerification:
        data = self._request("GET", f"{API}/audit/verify").json()
        return AuditVerification.model_validate(data)

    # --- cluster: nodes and queues -------------------------------------------------------------

    def list_nodes(self) -> list[NodeView]:
        return self._list(f"{API}/nodes", NodeView)

    def get_node(self, node_id: str) -> NodeView:
        return self._json("GET", f"{API}/nodes/{_seg(node_id, 'node_id')}", NodeView)

    def list_queues(self) -> list[QueueView]:
        return self._list(f"{API}/queues", QueueView)

    def get_queue(self, name: str) -> QueueView:
        return self._json("GET", f"{API}/queues/{_seg(name)}", QueueView)

    def set_queue(
        self,
        name: str,
        *,
        nominal: QuotaSpec,
        cohort: str | None = None,
        borrowing_limit: QuotaSpec | None = None,
        weight: float = 1.0,
    ) -> QueueView:
        body = {
            "nominal": _quota_body(nominal),
            "cohort": cohort,
            "borrowing_limit": _quota_body(borrowing_limit or QuotaSpec()),
            "weight": wire_float(weight),
        }
        return self._json("PUT", f"{API}/queues/{_seg(name)}", QueueView, json=body)

    def delete_queue(self, name: str) -> None:
        self._request("DELETE", f"{API}/queues/{_seg(name)}")


def wire_float(value: float) -> float | str:
    """A float as JSON can carry it: NaN and the infinities as the strings the server reads."""
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _wire_point(p: PointLike) -> dict[str, Any]:
    return {"key": p.key, "value": wire_float(p.value), "step": p.step, "timestamp": p.timestamp}


def _unchecked(cls: type[M], /, **fields: Any) -> M:
    """A request body built without validation: the server validates it, so an error is the
    service's own (``InvalidInputError``/``UnsafePathError`` naming the field), exactly as the
    embedded backend raises it - never a client-side pydantic error."""
    return cls.model_construct(**fields)


def _quota_body(quota: QuotaSpec) -> dict[str, Any]:
    """A quota as the PUT body carries it: unlimited fields left out."""
    body = _clean(quota.model_dump(exclude={"gpus_by_model"}))
    body = {k: wire_float(v) if isinstance(v, float) else v for k, v in body.items()}
    if quota.gpus_by_model:
        body["gpus_by_model"] = {k: wire_float(v) for k, v in quota.gpus_by_model.items()}
    return body


def _clean(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _seg(value: str | int, field: str = "name") -> str:
    """A name that goes into a URL path: validated so it can never change the route."""
    return validate_name(str(value), field=field)


_FRAME = struct.Struct(">32sQ")  # as the server's /blobs/batch and /blobs/fetch frames
_BATCH_MAX_BLOB_BYTES = 8 * 1024 * 1024  # larger files: PUT one by one, streamed
_BATCH_BYTES = 32 * 1024 * 1024
_UPLOADS_IN_FLIGHT = 2
_MISSING_PER_REQUEST = 100_000
_FETCH_PER_REQUEST = 2000
_HASH_WORKERS = 4


def _frame(digest: str, f: ScannedFile) -> bytes:
    with open(f.real, "rb") as fh:
        data = fh.read()
    return _FRAME.pack(bytes.fromhex(digest), len(data)) + data


def _write_atomic(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".shipyard-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
