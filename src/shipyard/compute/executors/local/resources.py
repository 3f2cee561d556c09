"""What this machine offers the local executor: CPUs, memory and GPU indices.

Read off the machine by default; ``Settings.cpus``, ``memory_mb`` and ``gpus`` override each one,
like ``ray start --num-cpus/--memory/--num-gpus``. ``gpus=N`` declares indices ``0..N-1`` (and
``gpus=0`` hides the machine's GPUs). What a job asks for is both its admission budget and its
limit: ``compute.limits`` enforces memory and CPU on the running job.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass

import psutil

from shipyard.settings import Settings

_NVIDIA_SMI_TIMEOUT_S = 10.0


@dataclass(frozen=True, kw_only=True)
class Capacity:
    """What the local executor may hand out on this machine."""

    cpus: float
    memory_mb: int
    gpus: tuple[int, ...] = ()


def machine_capacity(settings: Settings) -> Capacity:
    """The capacity the local executor hands out, with the settings' overrides applied."""
    cpus = settings.cpus if settings.cpus is not None else detect_cpus()
    memory_mb = settings.memory_mb if settings.memory_mb is not None else detect_memory_mb()
    gpus = tuple(range(settings.gpus)) if settings.gpus is not None else detect_gpus()
    return Capacity(cpus=float(cpus), memory_mb=int(memory_mb), gpus=gpus)


def detect_cpus() -> int:
    """CPUs this process may run on (the affinity mask, which containers narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, psutil.cpu_count(logical=True) or os.cpu_count() or 1)


def detect_memory_mb() -> int:
    return int(psutil.virtual_memory().total // (1024 * 1024))


@functools.lru_cache(maxsize=1)
def detect_gpus() -> tuple[int, ...]:
    """NVIDIA GPU indices from ``nvidia-smi``; none when it is missing or fails.

    Cached for the life of the process: the scheduler asks every second and GPUs do not come and
    go under a running server.
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        result = subprocess.run(
            [exe, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=_NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    if result.returncode != 0:
        return ()
    indices: list[int] = []
    for line in result.stdout.splitlines():
        line = line.strip()
        if line.isdigit():
            indices.append(int(line))
    return tuple(sorted(set(indices)))
