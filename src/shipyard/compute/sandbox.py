"""What a job launched by a server gets, and what it does not.

In **embedded mode** (``Settings.server_url`` is None) a job is the user's own process on the
user's own home, as it always was: it inherits our environment and reaches the home directly.

When a **server** launches a job, the job is somebody else's code running on the server's
machine, so it gets:

- an allowlisted environment (:func:`job_env`): ``PATH``, the locale (``LANG``, ``LANGUAGE``,
  ``LC_*``), ``TZ``, its own ``HOME`` and ``TMPDIR``, what its spec names, and shipyard's
  ``SHIPYARD_URL``, ``SHIPYARD_TOKEN`` (a job-scoped token, revoked when the job ends),
  ``SHIPYARD_JOB_ID``, ``SHIPYARD_RUN_ID``, ``SHIPYARD_PROJECT``, ``SHIPYARD_ATTEMPT`` (and,
  for a share of a GPU, ``SHIPYARD_GPU_FRACTION`` / ``SHIPYARD_GPU_MEMORY_MB``) - never the
  server's own variables (cloud credentials, ``SHIPYARD_DB``, ``SHIPYARD_HOME``,
  ``SHIPYARD_BLOBS``);
- when the server runs as root, an unprivileged user (``SHIPYARD_JOB_USER``, default
  ``nobody``; :func:`resolve_job_user`) and a folder of its own outside the server's home
  (``SHIPYARD_JOB_ROOT``, default ``$TMPDIR/shipyard-jobs-<uid>``, mode 0711 so no job can list
  the others), since the home - database and blobs included - is readable by the server's user
  only. Its output log stays in the server's home: the supervisor copies the job's output pipes
  into it, so the job can write its log without being able to read anything else there.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shipyard.errors import InvalidInputError, InvalidStateError
from shipyard.settings import (
    ENV_AUDIT_HEAD_FILE,
    ENV_AUDIT_KEY_FILE,
    ENV_BLOBS,
    ENV_DB,
    ENV_GPU_MEMORY_MB,
    ENV_HOME,
    ENV_JOB_ID,
    ENV_JOB_ROOT,
    ENV_JOB_USER,
    ENV_PROJECT,
    ENV_RUN_ID,
    ENV_SERVER_URL,
    ENV_TOKEN,
    ENV_URL,
    Settings,
)

# Inherited from the server by a job it launches; everything else is left behind.
PASSED_VARIABLES = ("PATH", "LANG", "LANGUAGE", "TZ")
PASSED_PREFIXES = ("LC_",)
# shipyard's own settings, which a server job never gets (not even when its spec names them).
SERVER_ONLY = (
    ENV_HOME,
    ENV_DB,
    ENV_BLOBS,
    ENV_SERVER_URL,
    ENV_JOB_USER,
    ENV_JOB_ROOT,
    ENV_AUDIT_KEY_FILE,
    ENV_AUDIT_HEAD_FILE,
)
# Set for every job: which attempt of it this is; and for a job holding a share of a GPU.
ENV_ATTEMPT = "SHIPYARD_ATTEMPT"
ENV_GPU_FRACTION = "SHIPYARD_GPU_FRACTION"
JOB_ROOT_MODE = 0o711
JOB_DIR_MODE = 0o700


@dataclass(frozen=True, kw_only=True)
class LaunchedJob:
    """Who a job is, as its environment tells it."""

    job_id: str
    project: str
    run_id: str | None
    gpus: list[int]
    attempt: int = 1  # SHIPYARD_ATTEMPT: 1 for the first start, +1 after each requeue
    # A share of one GPU (its device in ``gpus``): SHIPYARD_GPU_FRACTION / SHIPYARD_GPU_MEMORY_MB.
    gpu_fraction: float | None = None
    gpu_memory_mb: int | None = None


@dataclass(frozen=True, kw_only=True)
class JobUser:
    name: str
    uid: int
    gid: int


def job_env(
    job: LaunchedJob,
    spec_env: Mapping[str, str],
    *,
    shipyard_url: str | None,
    token: str | None,
    settings: Settings,
    home: Path | None = None,
    tmpdir: Path | None = None,
    user: JobUser | None = None,
    parent_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a job's process (see the module docstring).

    ``shipyard_url`` is the server's URL for a job a server launches (None in embedded mode);
    ``token`` its job-scoped token. ``home`` and ``tmpdir`` are the job's own folders.
    """
    parent = dict(os.environ if parent_env is None else parent_env)
    if shipyard_url is None:
        env = _embedded_env(parent, spec_env, settings)
    else:
        env = {
            key: value
            for key, value in parent.items()
            if key in PASSED_VARIABLES or key.startswith(PASSED_PREFIXES)
        }
        env.setdefault("PATH", os.defpath)
        env.update(spec_env)
        for key in (*SERVER_ONLY, ENV_URL, ENV_TOKEN):
            env.pop(key, None)
        env[ENV_URL] = shipyard_url
        if token:
            env[ENV_TOKEN] = token
        if home is not None:
            env["HOME"] = str(home)
        if tmpdir is not None:
            env["TMPDIR"] = str(tmpdir)
        if user is not None:
            env["USER"] = env["LOGNAME"] = user.name
    env[ENV_JOB_ID] = job.job_id
    env[ENV_PROJECT] = job.project
    if job.run_id is not None:
        env[ENV_RUN_ID] = job.run_id
    else:
        env.pop(ENV_RUN_ID, None)
    env[ENV_ATTEMPT] = str(job.attempt)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in job.gpus)
    # Only a job holding a share of a GPU gets these (never our own declared device memory).
    env.pop(ENV_GPU_FRACTION, None)
    env.pop(ENV_GPU_MEMORY_MB, None)
    if job.gpu_fraction:
        env[ENV_GPU_FRACTION] = f"{job.gpu_fraction:g}"
        env[ENV_GPU_MEMORY_MB] = str(job.gpu_memory_mb or 0)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def resolve_job_user(settings: Settings) -> JobUser | None:
    """The user a server job runs as: ``settings.job_user`` when we are a server running as root;
    None (run as ourselves) in embedded mode or when we are not root (we could not switch)."""
    if settings.server_url is None or os.geteuid() != 0:
        return None
    name = settings.job_user
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise InvalidInputError(
            f"job user {name!r} does not exist on this machine; create it "
            f"(useradd --system --no-create-home {name}) or set {ENV_JOB_USER} to an "
            "unprivileged user",
            field=ENV_JOB_USER,
        ) from None
    if entry.pw_uid == 0:
        raise InvalidInputError(
            f"{ENV_JOB_USER}={name!r} is root; a server running as root runs jobs as an "
            "unprivileged user: set it to one (e.g. nobody)",
            field=ENV_JOB_USER,
        )
    return JobUser(name=name, uid=entry.pw_uid, gid=entry.pw_gid)


def sandbox_dir(settings: Settings, job_id: str, user: JobUser | None) -> Path:
    """The folder the job's code, working directory, HOME and TMPDIR live in.

    The job's folder in our home, unless the job runs as another user: then a folder under the
    job root, which that user can reach.
    """
    if user is None:
        return settings.jobs_dir / job_id
    root = settings.job_root or Path(tempfile.gettempdir()) / f"shipyard-jobs-{os.geteuid()}"
    _ensure_job_root(root)
    return root / job_id


def fresh_dir(folder: Path) -> None:
    """Create ``folder`` empty (mode 0700), removing what an earlier attempt left there - which,
    in a job user's folder, the job could have filled with links pointing anywhere."""
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(folder)
        else:
            folder.unlink()
    folder.mkdir(mode=JOB_DIR_MODE, parents=True)
    os.chmod(folder, JOB_DIR_MODE)


def hand_over(folder: Path, user: JobUser) -> None:
    """Make ``folder`` and everything in it the job user's (links themselves, never followed)."""
    os.lchown(folder, user.uid, user.gid)
    for parent, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            os.lchown(os.path.join(parent, name), user.uid, user.gid)


# --- helpers -----------------------------------------------------------------------------------


def _embedded_env(
    parent: dict[str, str], spec_env: Mapping[str, str], settings: Settings
) -> dict[str, str]:
    """Our environment + the spec's + where the home is (which the spec cannot override)."""
    env = dict(parent)
    env.update(spec_env)
    if settings.url:
        env[ENV_URL] = settings.url
        if settings.token:
            env[ENV_TOKEN] = settings.token
        for key in (ENV_HOME, ENV_DB, ENV_BLOBS):
            env.pop(key, None)
    else:
        env[ENV_HOME] = str(settings.home)
        env[ENV_DB] = settings.database_url
        env[ENV_BLOBS] = settings.blob_url
        env.pop(ENV_URL, None)
        env.pop(ENV_TOKEN, None)
    for key in (ENV_SERVER_URL, ENV_JOB_USER, ENV_JOB_ROOT):
        env.pop(key, None)
    return env


def _ensure_job_root(root: Path) -> None:
    """The job root: ours, a real folder (not a link), traversable but not listable by others."""
    root.mkdir(mode=JOB_ROOT_MODE, parents=True, exist_ok=True)
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise InvalidStateError(
            f"job root {str(root)!r} is not a folder owned by this server's user; remove it or "
            f"set {ENV_JOB_ROOT} to a folder of its own",
            field=ENV_JOB_ROOT,
        )
    if stat.S_IMODE(info.st_mode) != JOB_ROOT_MODE:
        os.chmod(root, JOB_ROOT_MODE)
