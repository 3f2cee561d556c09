"""Settings read from the environment, with the embedded defaults.

``SHIPYARD_HOME`` (default ``~/.shipyard``) holds the SQLite file, the blob folder, job folders
and logs. ``SHIPYARD_URL`` switches the SDK and CLI to a server. ``SHIPYARD_DB`` and
``SHIPYARD_BLOBS`` pick other backends (``postgresql://…``, ``s3://…``). ``SHIPYARD_CPUS``,
``SHIPYARD_MEMORY_MB`` and ``SHIPYARD_GPUS`` declare what the local executor may hand out, like
``ray start --num-cpus``; by default they are read off the machine (GPUs with NVML).
``SHIPYARD_GPU_MODEL`` and ``SHIPYARD_GPU_MEMORY_MB`` name the model and memory of declared GPUs.
A server sets ``SHIPYARD_SERVER_URL`` for its job supervisors; ``SHIPYARD_JOB_USER`` (default
``nobody``) and ``SHIPYARD_JOB_ROOT`` say who a server running as root runs jobs as, and where
their folders go.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from shipyard.errors import InvalidInputError

T = TypeVar("T", int, float)

ENV_HOME = "SHIPYARD_HOME"
ENV_URL = "SHIPYARD_URL"
ENV_TOKEN = "SHIPYARD_TOKEN"
ENV_DB = "SHIPYARD_DB"
ENV_BLOBS = "SHIPYARD_BLOBS"
ENV_PROJECT = "SHIPYARD_PROJECT"
ENV_RUN_ID = "SHIPYARD_RUN_ID"
ENV_JOB_ID = "SHIPYARD_JOB_ID"
ENV_CPUS = "SHIPYARD_CPUS"
ENV_MEMORY_MB = "SHIPYARD_MEMORY_MB"
ENV_GPUS = "SHIPYARD_GPUS"
# The model name and memory of GPUs declared with SHIPYARD_GPUS (shown by `shipyard nodes`).
ENV_GPU_MODEL = "SHIPYARD_GPU_MODEL"
ENV_GPU_MEMORY_MB = "SHIPYARD_GPU_MEMORY_MB"
DEFAULT_GPU_MODEL = "declared"
ENV_AUDIT_KEY_FILE = "SHIPYARD_AUDIT_KEY_FILE"
ENV_AUDIT_HEAD_FILE = "SHIPYARD_AUDIT_HEAD_FILE"
# Set by a server for the job supervisors it starts: the URL its jobs reach it on.
ENV_SERVER_URL = "SHIPYARD_SERVER_URL"
# The unprivileged user a server running as root runs jobs as, and where their folders live.
ENV_JOB_USER = "SHIPYARD_JOB_USER"
ENV_JOB_ROOT = "SHIPYARD_JOB_ROOT"
# Where admitted jobs run: "local" (this machine) or "ray://HOST:PORT" (shipyard.wiring).
ENV_EXECUTOR = "SHIPYARD_EXECUTOR"
DEFAULT_EXECUTOR = "local"
# Seconds a preempted job gets between SIGTERM and SIGKILL (to save a checkpoint).
ENV_PREEMPT_GRACE_S = "SHIPYARD_PREEMPT_GRACE_S"
DEFAULT_PREEMPT_GRACE_S = 30.0
DEFAULT_JOB_USER = "nobody"

DEFAULT_PROJECT = "default"


@dataclass(frozen=True, kw_only=True)
class Settings:
    home: Path
    url: str | None = None
    token: str | None = None
    db_url: str | None = None
    blobs_url: str | None = None
    project: str = DEFAULT_PROJECT
    cpus: float | None = None
    memory_mb: int | None = None
    gpus: int | None = None
    gpu_model: str = DEFAULT_GPU_MODEL  # of the GPUs ``gpus`` declares
    gpu_memory_mb: int = 0
    # Where the audit chain's HMAC key and head anchor live (outside the database; jobs launched
    # by a server never see either). Default: $SHIPYARD_HOME/keys/audit.key and audit.head.
    audit_key_file: Path | None = None
    audit_head_file: Path | None = None
    # The URL of the server this process is (or works for); None in embedded mode. Jobs launched
    # while it is set get an allowlisted environment and a job token instead of our own.
    server_url: str | None = None
    job_user: str = DEFAULT_JOB_USER
    job_root: Path | None = None
    executor: str = DEFAULT_EXECUTOR
    preempt_grace_s: float = DEFAULT_PREEMPT_GRACE_S
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.home / 'shipyard.db'}"

    @property
    def blob_url(self) -> str:
        return self.blobs_url or f"file://{self.home / 'blobs'}"

    @property
    def audit_key_path(self) -> Path:
        """The audit chain's HMAC key: outside the database, 0600, created on first use."""
        return self.audit_key_file or self.home / "keys" / "audit.key"

    @property
    def audit_head_path(self) -> Path:
        """The audit chain's head anchor (seq + hash, HMAC'd), rewritten on every append."""
        return self.audit_head_file or self.audit_key_path.with_name("audit.head")

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    @property
    def deployments_dir(self) -> Path:
        return self.home / "deployments"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        home = Path(env.get(ENV_HOME) or Path.home() / ".shipyard").expanduser().absolute()
        grace = _number(env, ENV_PREEMPT_GRACE_S, float)
        return cls(
            home=home,
            url=(env.get(ENV_URL) or None),
            token=(env.get(ENV_TOKEN) or None),
            db_url=(env.get(ENV_DB) or None),
            blobs_url=(env.get(ENV_BLOBS) or None),
            project=env.get(ENV_PROJECT) or DEFAULT_PROJECT,
            cpus=_number(env, ENV_CPUS, float),
            memory_mb=_number(env, ENV_MEMORY_MB, int),
            gpus=_number(env, ENV_GPUS, int),
            gpu_model=(env.get(ENV_GPU_MODEL) or "").strip() or DEFAULT_GPU_MODEL,
            gpu_memory_mb=_number(env, ENV_GPU_MEMORY_MB, int) or 0,
            audit_key_file=_path(env, ENV_AUDIT_KEY_FILE),
            audit_head_file=_path(env, ENV_AUDIT_HEAD_FILE),
            server_url=(env.get(ENV_SERVER_URL) or None),
            job_user=env.get(ENV_JOB_USER) or DEFAULT_JOB_USER,
            job_root=Path(env[ENV_JOB_ROOT]).absolute() if env.get(ENV_JOB_ROOT) else None,
            executor=(env.get(ENV_EXECUTOR) or "").strip() or DEFAULT_EXECUTOR,
            preempt_grace_s=DEFAULT_PREEMPT_GRACE_S if grace is None else grace,
        )


def _path(env: dict[str, str], key: str) -> Path | None:
    raw = env.get(key)
    return Path(raw).expanduser().absolute() if raw else None


def _number(env: dict[str, str], key: str, kind: type[T]) -> T | None:
    raw = env.get(key)
    if raw in (None, ""):
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise InvalidInputError(f"{key}={raw!r} is not a number", field=key) from None
    if value < 0:
        raise InvalidInputError(f"{key}={raw!r} must not be negative", field=key)
    return value
