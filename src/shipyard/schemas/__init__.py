"""Request and response bodies of the REST API, shared by the server and the SDK.

They live below both so the SDK never imports server code. Responses are the domain models
themselves (``shipyard.domain.models``); these are the request bodies and the few wrappers.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from shipyard.domain.models import FileEntry, JobSpec, MetricPoint, RunStatus
from shipyard.settings import DEFAULT_PROJECT


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CommitDatasetRequest(Request):
    project: str = DEFAULT_PROJECT
    files: list[FileEntry] = Field(min_length=1, max_length=1_000_000)
    message: str = Field(default="", max_length=10_000)


class CreateRunRequest(Request):
    project: str = DEFAULT_PROJECT
    name: str | None = None
    params: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    job_id: str | None = None


class LogBatchRequest(Request):
    metrics: list[MetricPoint] = Field(default_factory=list)
    params: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)


class LogBatchResponse(BaseModel):
    stored: int


class FinishRunRequest(Request):
    status: RunStatus = RunStatus.FINISHED


class LogArtifactRequest(Request):
    path: str
    digest: str
    size: int = Field(ge=0)


class AddRunInputRequest(Request):
    project: str = DEFAULT_PROJECT
    dataset: str
    version: int = Field(ge=1)


class RegisterModelVersionRequest(Request):
    project: str = DEFAULT_PROJECT
    run_id: str | None = None
    artifact_path: str | None = None
    digest: str | None = None
    format: str = "onnx"
    description: str = Field(default="", max_length=100_000)


class SetAliasRequest(Request):
    project: str = DEFAULT_PROJECT
    version: int | str


class SubmitJobRequest(Request):
    project: str = DEFAULT_PROJECT
    spec: JobSpec
    code_digest: str | None = None
    run_id: str | None = None


class JobLogsResponse(BaseModel):
    data: str  # UTF-8 text, undecodable bytes replaced
    offset: int
    finished: bool


class CreateDeploymentRequest(Request):
    project: str = DEFAULT_PROJECT
    name: str
    model: str
    ref: str = "production"
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_wait_ms: float = Field(default=5.0, ge=0, le=10_000)


class DatasetDiff(BaseModel):
    added: list[str]
    removed: list[str]
    modified: list[str]


class Health(BaseModel):
    status: str
    version: str
