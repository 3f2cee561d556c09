"""GPU inventory: declared GPUs from the settings, NVML read through nvidia-ml-py, and no GPU
(this machine has none: NVML fails to load) with the reason kept for the node's message."""

from __future__ import annotations

import socket
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard.compute import gpus
from shipyard.compute.policy.base import Gpu
from shipyard.errors import InvalidInputError
from shipyard.settings import ENV_GPU_MEMORY_MB, ENV_GPU_MODEL, ENV_GPUS, Settings

# A stand-in for the pynvml module of a machine with two GPUs: the same functions and shapes
# (names as bytes, as older bindings return them, and memory info with a ``total`` in bytes).
FAKE_PYNVML = textwrap.dedent(
    """
    class NVMLError(Exception):
        pass

    class _Memory:
        def __init__(self, total):
            self.total = total

    _DEVICES = [
        (b"NVIDIA A100-SXM4-80GB", 80 * 1024**3),
        ("NVIDIA H100 80GB HBM3", 81559 * 1024**2),
    ]
    calls = []

    def nvmlInit():
        calls.append("init")

    def nvmlShutdown():
        calls.append("shutdown")

    def nvmlDeviceGetCount():
        return len(_DEVICES)

    def nvmlDeviceGetHandleByIndex(index):
        return index

    def _check(handle):
        if handle >= len(_DEVICES):
            raise NVMLError("Invalid Argument")

    def nvmlDeviceGetName(handle):
        _check(handle)
        return _DEVICES[handle][0]

    def nvmlDeviceGetMemoryInfo(handle):
        _check(handle)
        return _Memory(_DEVICES[handle][1])
    """
)


@pytest.fixture
def fresh_detection() -> Iterator[None]:
    gpus.detection.cache_clear()
    yield
    gpus.detection.cache_clear()


@pytest.fixture
def fake_pynvml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_detection: None) -> Path:
    folder = tmp_path / "fake-nvml"
    folder.mkdir()
    (folder / "pynvml.py").write_text(FAKE_PYNVML)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    return folder


def test_declared_gpus_override_detection(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "SHIPYARD_HOME": str(tmp_path),
            ENV_GPUS: "3",
            ENV_GPU_MODEL: "A100",
            ENV_GPU_MEMORY_MB: "40960",
        }
    )

    node = gpus.local_node(settings)

    assert node.gpu_source == "declared"
    assert node.node.gpus == tuple(Gpu(index=i, model="A100", memory_mb=40960) for i in range(3))
    assert node.node.id == socket.gethostname() == node.hostname
    assert node.node.healthy and node.message == ""


def test_declared_defaults_and_cpu_memory_overrides(tmp_path: Path) -> None:
    node = gpus.local_node(Settings(home=tmp_path, gpus=1, cpus=3.5, memory_mb=2048))

    assert node.node.gpus == (Gpu(index=0, model="declared", memory_mb=0),)
    assert (node.node.cpus, node.node.memory_mb) == (3.5, 2048)


def test_gpus_zero_hides_the_machines_gpus(tmp_path: Path, fake_pynvml: Path) -> None:
    node = gpus.local_node(Settings(home=tmp_path, gpus=0))

    assert node.node.gpus == () and node.gpu_source == "none"
    assert "SHIPYARD_GPUS=0" in node.message


def test_the_real_nvml_gives_the_gpus_or_none_with_the_reason(
    tmp_path: Path, fresh_detection: None
) -> None:
    """Without an NVIDIA driver (this machine) the real pynvml cannot load libnvidia-ml: no GPUs,
    and the node says why. On a GPU machine every device is read, with its model and memory."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        has_gpu = False
    else:
        has_gpu = pynvml.nvmlDeviceGetCount() > 0
        pynvml.nvmlShutdown()

    node = gpus.local_node(Settings(home=tmp_path))

    assert node.node.cpus >= 1 and node.node.memory_mb > 0  # read off the machine
    if has_gpu:
        assert node.gpu_source == "nvml" and node.message == ""
        assert [g.index for g in node.node.gpus] == list(range(len(node.node.gpus)))
        assert all(g.model and g.memory_mb > 0 for g in node.node.gpus), node.node.gpus
    else:
        assert gpus.detect_gpus() == ()
        assert node.node.gpus == () and node.gpu_source == "none"
        assert node.message.startswith("no NVIDIA GPU found: NVML could not start")
        assert "NVMLError" in node.message


def test_nvml_devices_are_read_with_model_and_memory(tmp_path: Path, fake_pynvml: Path) -> None:
    node = gpus.local_node(Settings(home=tmp_path))

    assert node.gpu_source == "nvml" and node.message == ""
    assert node.node.gpus == (
        Gpu(index=0, model="NVIDIA A100-SXM4-80GB", memory_mb=81920),
        Gpu(index=1, model="NVIDIA H100 80GB HBM3", memory_mb=81559),
    )
    import pynvml

    assert pynvml.calls == ["init", "shutdown"]  # type: ignore[attr-defined]
    gpus.local_node(Settings(home=tmp_path))
    assert pynvml.calls == ["init", "shutdown"]  # type: ignore[attr-defined]  # cached


def test_an_nvml_error_while_listing_gives_none_with_the_reason(
    fake_pynvml: Path,
) -> None:
    (fake_pynvml / "pynvml.py").write_text(
        FAKE_PYNVML + "\ndef nvmlDeviceGetCount():\n    return 3\n"
    )

    found = gpus.detection()

    assert found.gpus == ()
    assert "NVML failed while listing the GPUs (NVMLError: Invalid Argument)" in found.reason
    import pynvml

    assert pynvml.calls[-1] == "shutdown"  # type: ignore[attr-defined]


def test_nvidia_ml_py_missing_is_no_gpu_with_how_to_install(
    monkeypatch: pytest.MonkeyPatch, fresh_detection: None
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError

    found = gpus.detection()

    assert found.gpus == () and "pip install nvidia-ml-py" in found.reason


def test_bad_gpu_memory_setting_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError) as caught:
        Settings.from_env({"SHIPYARD_HOME": str(tmp_path), ENV_GPU_MEMORY_MB: "-1"})
    assert caught.value.field == ENV_GPU_MEMORY_MB
