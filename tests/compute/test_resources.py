"""Machine capacity: read off the machine, overridden by settings."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import psutil
import pytest

from shipyard.compute.executors.local.resources import (
    detect_cpus,
    detect_gpus,
    detect_memory_mb,
    machine_capacity,
)
from shipyard.settings import Settings


def test_defaults_come_from_the_machine(settings: Settings) -> None:
    cap = machine_capacity(dataclasses.replace(settings, gpus=None))
    assert cap.cpus == detect_cpus() >= 1
    assert cap.cpus <= (os.cpu_count() or 1)
    assert cap.memory_mb == detect_memory_mb()
    assert abs(cap.memory_mb - psutil.virtual_memory().total / 2**20) < 1
    assert all(isinstance(i, int) for i in cap.gpus)


def test_settings_override_each_resource(settings: Settings) -> None:
    cap = machine_capacity(dataclasses.replace(settings, cpus=2.5, memory_mb=1234, gpus=3))
    assert (cap.cpus, cap.memory_mb, cap.gpus) == (2.5, 1234, (0, 1, 2))


def test_gpus_zero_hides_the_machines_gpus(settings: Settings) -> None:
    assert machine_capacity(dataclasses.replace(settings, gpus=0)).gpus == ()


def test_environment_variables_reach_the_capacity() -> None:
    env = {
        "SHIPYARD_HOME": "/tmp/x",
        "SHIPYARD_CPUS": "3",
        "SHIPYARD_MEMORY_MB": "2048",
        "SHIPYARD_GPUS": "2",
    }
    cap = machine_capacity(Settings.from_env(env))
    assert (cap.cpus, cap.memory_mb, cap.gpus) == (3.0, 2048, (0, 1))


def test_gpu_indices_are_read_from_nvidia_smi(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No GPU here, so a stand-in ``nvidia-smi`` answers the query the way the real one does."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(
        '#!/bin/sh\n[ "$1" = "--query-gpu=index" ] && [ "$2" = "--format=csv,noheader" ] '
        '|| exit 9\nprintf "0\\n1\\n3\\n"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    detect_gpus.cache_clear()
    try:
        assert machine_capacity(dataclasses.replace(settings, gpus=None)).gpus == (0, 1, 3)
        assert machine_capacity(dataclasses.replace(settings, gpus=1)).gpus == (0,)
        fake.write_text("#!/bin/sh\nexit 1\n")  # a driver error: no GPUs, not a crash
        detect_gpus.cache_clear()
        assert detect_gpus() == ()
    finally:
        detect_gpus.cache_clear()
