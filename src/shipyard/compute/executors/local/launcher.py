"""Starting a job's detached supervisor on this machine, and the environment it starts with.

``start_supervisor`` runs ``python -m shipyard.compute.executors.local.supervisor JOB_ID`` in its
own session, its output in ``jobs/<id>/supervisor.log``, and returns the executor reference the
pipeline stores: the supervisor's pid and start time (so a reused pid never passes for it) and
this host.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Any

from shipyard.children import Children
from shipyard.compute.processes import create_time
from shipyard.compute.records import SUPERVISOR_LOG_FILE, job_dir
from shipyard.compute.sandbox import ENV_ATTEMPT, ENV_GPU_FRACTION
from shipyard.context import Context
from shipyard.settings import (
    ENV_BLOBS,
    ENV_CPUS,
    ENV_DB,
    ENV_EXECUTOR,
    ENV_GPU_MEMORY_MB,
    ENV_GPU_MODEL,
    ENV_GPUS,
    ENV_HOME,
    ENV_JOB_ID,
    ENV_JOB_ROOT,
    ENV_JOB_USER,
    ENV_MEMORY_MB,
    ENV_PREEMPT_GRACE_S,
    ENV_PROJECT,
    ENV_RUN_ID,
    ENV_SERVER_URL,
    ENV_TOKEN,
    ENV_URL,
)

SUPERVISOR_MODULE = "shipyard.compute.executors.local.supervisor"
# The attempt's job token (issued by the pipeline when a server launches the job) travels to the
# supervisor in its environment (readable by our user only); the supervisor takes it out at once.
ENV_LAUNCH_TOKEN = "SHIPYARD_LAUNCH_TOKEN"
# ``LocalExecutor.stop`` sends this to a supervisor: look at the job's row now.
LOOK_SIGNAL = signal.SIGUSR1
# How long stopped jobs get between SIGTERM and SIGKILL.
KILL_GRACE_S = 5.0

# Supervisors this process started, reaped now and then (they are detached, but still our
# children until they exit).
children = Children()


def start_supervisor(
    ctx: Context, job_id: str, *, attempt: int | None = None, token: str | None = None
) -> dict[str, Any]:
    """Start the supervisor of ``attempt`` of the job (it exits at once when the job is at
    another attempt); its executor reference. Raises OSError when it cannot."""
    children.reap_exited()
    folder = job_dir(ctx, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-P", "-m", SUPERVISOR_MODULE, job_id]
    if attempt is not None:
        command.append(str(attempt))
    env = supervisor_env(ctx)
    if token:
        env[ENV_LAUNCH_TOKEN] = token
    with open(folder / SUPERVISOR_LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            command,
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    children.add(proc)
    # None if it is already gone: then observe reports it lost
    return {
        "supervisor_pid": proc.pid,
        "supervisor_started": create_time(proc.pid),
        "host": socket.gethostname(),
    }


def supervisor_env(ctx: Context) -> dict[str, str]:
    """The environment a supervisor starts with: ours, plus where the metadata and blobs live
    and what the machine offers (its own admission steps need both), plus - from a server - its
    URL and job user (so the job is launched as a server's, see ``compute.sandbox``), minus any
    job identity we run under (a job that submits jobs must not hand its own id down)."""
    settings = ctx.settings
    env = dict(os.environ)
    for key in (
        ENV_JOB_ID,
        ENV_RUN_ID,
        ENV_PROJECT,
        ENV_URL,
        ENV_TOKEN,
        ENV_CPUS,
        ENV_MEMORY_MB,
        ENV_GPUS,
        ENV_GPU_MODEL,
        ENV_GPU_MEMORY_MB,
        ENV_SERVER_URL,
        ENV_JOB_USER,
        ENV_JOB_ROOT,
        ENV_EXECUTOR,
        ENV_PREEMPT_GRACE_S,
        ENV_LAUNCH_TOKEN,
        ENV_ATTEMPT,
        ENV_GPU_FRACTION,
    ):
        env.pop(key, None)
    env[ENV_HOME] = str(settings.home)
    env[ENV_DB] = settings.database_url
    env[ENV_BLOBS] = settings.blob_url
    for key, value in (
        (ENV_CPUS, settings.cpus),
        (ENV_MEMORY_MB, settings.memory_mb),
        (ENV_GPUS, settings.gpus),
        (ENV_GPU_MODEL, settings.gpu_model),
        (ENV_GPU_MEMORY_MB, settings.gpu_memory_mb),
        (ENV_URL, settings.url),
        (ENV_TOKEN, settings.token),
        (ENV_SERVER_URL, settings.server_url),
        (ENV_JOB_USER, settings.job_user),
        (ENV_JOB_ROOT, settings.job_root),
        (ENV_EXECUTOR, settings.executor),
        (ENV_PREEMPT_GRACE_S, settings.preempt_grace_s),
    ):
        if value is not None:
            env[key] = str(value)
    return env
