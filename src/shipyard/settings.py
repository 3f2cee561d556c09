"""Settings read from the environment, with the embedded defaults.

``SHIPYARD_HOME`` (default ``~/.shipyard``) holds the SQLite file, the blob folder, job folders
and logs. ``SHIPYARD_URL`` switches the SDK and CLI to a server. ``SHIPYARD_DB`` and
``SHIPYARD_BLOBS`` pick other backends (``postgresql://…``, ``s3://…``). ``SHIPYARD_CPUS``,
``SHIPYARD_MEMORY_MB`` and ``SHIPYARD_GPUS`` declare what the local executor may hand out, like
``ray start --num-cpus``; by default they are read off the machine.
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
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.home / 'shipyard.db'}"

    @property
    def blob_url(self) -> str:
        return self.blobs_url or f"file://{self.home / 'blobs'}"

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
        )


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
