"""This machine's GPUs and the node it makes: NVML where a GPU exists, the settings otherwise.

``detect_gpus`` reads the devices with NVML (``nvidia-ml-py``, imported lazily: index, model
name, memory). On a machine without an NVIDIA driver NVML fails to load: that is no GPUs, and
the reason is kept (``detection()``) so ``shipyard nodes`` can say why it sees none. Settings
override detection, like ``ray start --num-gpus``: ``gpus=N`` declares devices ``0..N-1`` of
model ``gpu_model`` (``SHIPYARD_GPU_MODEL``, default ``declared``) and ``gpu_memory_mb``
(``SHIPYARD_GPU_MEMORY_MB``, default 0); ``gpus=0`` hides the machine's GPUs.

``local_node(settings)`` is this machine as one executor node (the local executor's whole
cluster): id = hostname, CPUs and memory read off the machine unless the settings declare them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from dataclasses import dataclass
from typing import Any

import psutil

from shipyard.compute.executors.base import NodeInfo
from shipyard.compute.policy.base import Gpu, Node
from shipyard.settings import Settings

GPU_SOURCE_NVML = "nvml"
GPU_SOURCE_DECLARED = "declared"
GPU_SOURCE_NONE = "none"


@dataclass(frozen=True, slots=True)
class Detection:
    """What NVML found: the devices, or none and why."""

    gpus: tuple[Gpu, ...]
    reason: str = ""  # why there are none ("" when NVML answered)


def detect_gpus() -> tuple[Gpu, ...]:
    """The NVIDIA GPUs NVML reports (index, model, memory); none when NVML is missing or fails."""
    return detection().gpus


@functools.lru_cache(maxsize=1)
def detection() -> Detection:
    """NVML's answer, read once per process: GPUs do not come and go under a running server."""
    try:
        import pynvml
    except ImportError:
        return Detection((), "nvidia-ml-py is not installed (pip install nvidia-ml-py)")
    return read_nvml(pynvml)


def read_nvml(nvml: Any) -> Detection:
    """Read every device through the ``pynvml`` module ``nvml``; any NVML error -> none + reason."""
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        return Detection((), f"no NVIDIA GPU found: NVML could not start ({_text(exc)})")
    try:
        found: list[Gpu] = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):  # older bindings return bytes
                name = name.decode("utf-8", "replace")
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            found.append(
                Gpu(index=index, model=str(name), memory_mb=int(memory.total) // (1024 * 1024))
            )
    except Exception as exc:
        return Detection((), f"NVML failed while listing the GPUs ({_text(exc)})")
    finally:
        with contextlib.suppress(Exception):  # nothing to do about a failed shutdown
            nvml.nvmlShutdown()
    if not found:
        return Detection((), "NVML reports no GPU on this machine")
    return Detection(tuple(found))


def declared_gpus(settings: Settings) -> tuple[Gpu, ...] | None:
    """The GPUs the settings declare (``gpus=N``), or None when they leave it to detection."""
    if settings.gpus is None:
        return None
    return tuple(
        Gpu(index=i, model=settings.gpu_model, memory_mb=settings.gpu_memory_mb)
        for i in range(settings.gpus)
    )


def local_node(settings: Settings) -> NodeInfo:
    """This machine as a node: what the local executor hands out, with the overrides applied."""
    hostname = socket.gethostname() or "localhost"
    cpus = settings.cpus if settings.cpus is not None else detect_cpus()
    memory_mb = settings.memory_mb if settings.memory_mb is not None else detect_memory_mb()
    declared = declared_gpus(settings)
    message = ""
    if declared is not None:
        gpus, source = declared, GPU_SOURCE_DECLARED if declared else GPU_SOURCE_NONE
        if not declared:
            message = "GPUs hidden by the settings (SHIPYARD_GPUS=0)"
    else:
        found = detection()
        gpus = found.gpus
        source = GPU_SOURCE_NVML if gpus else GPU_SOURCE_NONE
        message = found.reason
    node = Node(id=hostname, cpus=float(cpus), memory_mb=int(memory_mb), gpus=gpus, healthy=True)
    return NodeInfo(
        node=node, hostname=hostname, address="127.0.0.1", gpu_source=source, message=message
    )


def detect_cpus() -> int:
    """CPUs this process may run on (the affinity mask, which containers narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, psutil.cpu_count(logical=True) or os.cpu_count() or 1)


def detect_memory_mb() -> int:
    return int(psutil.virtual_memory().total // (1024 * 1024))


def _text(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


__all__ = [
    "GPU_SOURCE_DECLARED",
    "GPU_SOURCE_NONE",
    "GPU_SOURCE_NVML",
    "Detection",
    "declared_gpus",
    "detect_cpus",
    "detect_gpus",
    "detect_memory_mb",
    "detection",
    "local_node",
    "read_nvml",
]
