"""Request and response bodies of the REST API, shared by the server and the SDK.

They live below both so the SDK never imports server code. Responses are the domain models
themselves (``shipyard.domain.models``); these are the request bodies and the few wrappers.

Every integer is bounded here (nothing larger than SQLite's signed 64 bits reaches the store; a
version is at most 2^31 - 1) and every name, path and digest carries its rule as ``pattern`` and
``maxLength``, so the OpenAPI tells generated clients what the services will accept (the services
enforce those rules, see ``published_rule``). A body never
names its project: the project is the ``/projects/{project}/`` segment of the path.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

from shipyard.domain.checkpoints import CheckpointKind
from shipyard.domain.models import (
    AutoscalingSpec,
    BatchingSpec,
    DeploymentSpec,
    DeploymentTarget,
    JobSpec,
    ModelExampleTensor,
    ModelParity,
    RejectedPoint,
    ReplicaBounds,
    ReplicaResources,
    RunStatus,
)
from shipyard.domain.names import MAX_PATH_LEN, NAME_MAX_LEN, NAME_PATTERN, PATH_PATTERN

MAX_INT64 = 2**63 - 1  # the largest integer SQLite (and PostgreSQL's BIGINT) stores
MAX_VERSION = 2**31 - 1  # dataset and model version numbers
DIGEST_PATTERN = r"^[0-9a-f]{64}$"  # BLAKE3, lowercase hex
DIGEST_LEN = 64
# A version reference: a number, 'vN', 'latest' or (models) an alias - a name either way.
REF_PATTERN = NAME_PATTERN


def published_rule(
    *, pattern: str, max_length: int, min_length: int = 1, description: str
) -> dict[str, object]:
    """A string rule as the OpenAPI states it (``pattern``, ``minLength``, ``maxLength``).

    Published, not enforced by pydantic: the rule's one implementation stays in the domain
    (``validate_name``, ``validate_relative_path``, ``check_digest``), which the services call
    with their precise errors (``unsafe_path`` naming ``files[0].path``, "not a BLAKE3 digest"),
    so the embedded SDK and the REST API refuse the same input with the same error."""
    return {
        "pattern": pattern,
        "minLength": min_length,
        "maxLength": max_length,
        "description": description,
    }


NAME_RULE = published_rule(
    pattern=NAME_PATTERN,
    max_length=NAME_MAX_LEN,
    description="A name: 1-128 letters, digits, '.', '_' or '-'; starts with a letter or digit; "
    "no '..'; does not end with '.'.",
)
PATH_RULE = published_rule(
    pattern=PATH_PATTERN,
    max_length=MAX_PATH_LEN,
    description="A relative '/'-separated path: no leading '/' or '~', no '.' or '..' "
    "segments, no '%', '\\', '#', '?' or control characters.",
)
DIGEST_RULE = published_rule(
    pattern=DIGEST_PATTERN,
    min_length=DIGEST_LEN,
    max_length=DIGEST_LEN,
    description="A BLAKE3 digest, 64 lowercase hex digits.",
)
REF_RULE = published_rule(
    pattern=REF_PATTERN,
    max_length=NAME_MAX_LEN,
    description="A version number, 'vN', 'latest', or an alias.",
)

Name = Annotated[str, Field(json_schema_extra=NAME_RULE)]
RelPath = Annotated[str, Field(json_schema_extra=PATH_RULE)]
Digest = Annotated[str, Field(json_schema_extra=DIGEST_RULE)]
Ref = Annotated[str, Field(json_schema_extra=REF_RULE)]
Size = Annotated[int, Field(ge=0, le=MAX_INT64, description="A size in bytes.")]
Version = Annotated[int, Field(ge=1, le=MAX_VERSION, description="A version number.")]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    """Every error the API returns."""

    code: str
    message: str
    field: str | None = None
    details: dict[str, object] | None = None


class NewFile(Request):
    path: RelPath
    digest: Digest
    size: Size


class CommitDatasetRequest(Request):
    files: list[NewFile] = Field(min_length=1, max_length=1_000_000)
    message: str = Field(default="", max_length=10_000)
    checks: dict[str, Any] | None = Field(
        default=None,
        description="A validation suite, the structure of shipyard-checks.yaml (instead of that "
        "file among the files).",
    )


class TagDatasetRequest(Request):
    version: Version | Annotated[str, Field(max_length=NAME_MAX_LEN)] = Field(
        description="The version to tag: 3, 'v3', 'latest' or a tag."
    )
    force: bool = Field(default=False, description="Move the tag if another version holds it.")


class CreateRunRequest(Request):
    name: Name | None = None
    params: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    job_id: Name | None = None


class MetricPointIn(Request):
    """One metric point as sent. ``value`` is loose on purpose: a value the service cannot store
    (a string, a boolean, null) is rejected on its own and named in the response's ``rejected``,
    and the rest of the batch is stored."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")

    key: str = Field(description="1-250 printable characters.")
    value: float | bool | str | None = Field(
        description='A number, or "NaN", "Infinity", "-Infinity" (JSON has no NaN).'
    )
    step: int = Field(default=0, ge=0, le=MAX_INT64)
    timestamp: float


class LogBatchRequest(Request):
    metrics: list[MetricPointIn] = Field(default_factory=list)
    params: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)


class LogBatchResponse(BaseModel):
    stored: int = Field(ge=0)
    rejected: list[RejectedPoint] = Field(default_factory=list)


class FinishRunRequest(Request):
    status: RunStatus = RunStatus.FINISHED


class LogArtifactRequest(Request):
    path: RelPath
    digest: Digest
    size: Size
    # A job's declared outputs, sent from a node without our store (the Ray executor's worker)
    # with the job's token: its ended run still takes a path it does not hold yet.
    after_end: bool = False


class RecordCheckpointRequest(Request):
    """Record uploaded blobs as the run's next checkpoint (``tracking.checkpoints``)."""

    files: list[NewFile] = Field(min_length=1, max_length=1_000_000)
    kind: CheckpointKind = CheckpointKind.FOLDER
    step: int | None = Field(default=None, ge=0, le=MAX_INT64)
    attempt: int = Field(default=1, ge=1, le=MAX_VERSION)


class AddRunInputRequest(Request):
    """The run read ``version`` of ``dataset`` (a dataset of the run's project)."""

    dataset: Name
    version: Version


class RegisterModelVersionRequest(Request):
    run_id: Name | None = None
    artifact_path: RelPath | None = None
    digest: Digest | None = None
    format: Annotated[str, Field(max_length=32)] = "onnx"
    description: str = Field(default="", max_length=100_000)
    # a few rows of input and the SDK's parity check of a model it converted (tracking.convert)
    example: list[ModelExampleTensor] | None = Field(default=None, max_length=64)
    parity: ModelParity | None = None


def _version_or_ref(value: int | str) -> int | str:
    """A version number in 1..2^31-1, or a reference string (the bound is checked here, not by
    a union, so an error names the field ``version`` rather than a branch of the union; the
    registry resolves the string)."""
    if isinstance(value, int) and not 1 <= value <= MAX_VERSION:
        raise ValueError(f"a version number is 1..{MAX_VERSION}, got {value}")
    return value


VersionOrRef = Annotated[
    int | str,
    AfterValidator(_version_or_ref),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": MAX_VERSION},
                {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": NAME_MAX_LEN,
                    "pattern": REF_PATTERN,
                },
            ],
            "description": "A version number, 'vN', 'latest', or an alias.",
        }
    ),
]


class SetAliasRequest(Request):
    version: VersionOrRef


class SubmitJobRequest(Request):
    spec: JobSpec
    code_digest: Digest | None = None
    run_id: Name | None = None


class JobLogsResponse(BaseModel):
    data: str  # UTF-8 text, undecodable bytes replaced
    offset: int = Field(ge=0)
    finished: bool


class CreateDeploymentRequest(Request):
    """Either ``spec`` (targets, replicas, resources, batching), or the one-target shorthand
    ``ref`` (default ``production``) with ``max_batch_size``/``max_wait_ms``."""

    name: Name
    model: Name
    ref: Ref | None = None
    max_batch_size: int | None = Field(default=None, ge=1, le=4096)
    max_wait_ms: float | None = Field(default=None, ge=0, le=10_000)
    spec: DeploymentSpec | None = None


class UpdateDeploymentRequest(Request):
    """The parts of a deployment's spec to change; the rest stays. ``autoscaling``: a policy
    to set, or ``null`` to turn autoscaling off (absent: unchanged)."""

    targets: list[DeploymentTarget] | None = Field(default=None, max_length=8)
    replicas: ReplicaBounds | None = None
    resources: ReplicaResources | None = None
    batching: BatchingSpec | None = None
    autoscaling: AutoscalingSpec | None = None


class ScaleDeploymentRequest(Request):
    min: int = Field(ge=0, le=64)  # 0 only with autoscaling (checked with the spec)
    max: int | None = Field(default=None, ge=1, le=64)


class DatasetDiff(BaseModel):
    added: list[str]
    removed: list[str]
    modified: list[str]


class Health(BaseModel):
    status: str
    version: str
