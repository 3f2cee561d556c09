"""A model file must not read the host (issue 5, item 6): each layer on its own.

- the runtime refuses external data before ONNX Runtime sees the model (handed bytes directly,
  bypassing the registry);
- ONNX Runtime itself (the version floor) refuses absolute and ``../`` locations;
- a replica runs in an empty private working directory, not in the deployer's.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import pytest
from packaging.version import Version

from shipyard.context import Context
from shipyard.errors import BackendError, InvalidInputError
from shipyard.serving import launcher
from shipyard.serving.runtime import load_model, load_model_from_blobs
from tests.conftest import wait_for
from tests.onnx_models import EXTERNAL_PLACES, external_data_model, linear_model

SECRET_VALUES = np.array([7, 7, 7, 7], dtype=np.float32)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def secret_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory holds ``secret.bin``, and so does its parent."""
    work = tmp_path / "work"
    work.mkdir()
    for folder in (work, tmp_path):
        (folder / "secret.bin").write_bytes(SECRET_VALUES.tobytes())
    monkeypatch.chdir(work)
    return work


@pytest.fixture(autouse=True)
def no_stray_replicas() -> Iterator[None]:
    yield
    for child in psutil.Process().children(recursive=True):
        try:
            if "shipyard.serving.replica" in " ".join(child.cmdline()):
                launcher.stop_process_group(child.pid, child.create_time(), grace=2)
        except psutil.NoSuchProcess:
            pass


def _locations(work: Path) -> list[str]:
    return ["secret.bin", str(work / "secret.bin"), "../secret.bin"]


def _feeds(where: str) -> dict[str, np.ndarray]:
    feeds = {"x": np.zeros(4, np.float32)}
    if where == "subgraph":
        feeds["cond"] = np.array(True)
    return feeds


# --- layer: the runtime's own check -------------------------------------------------------


@pytest.mark.parametrize("where", EXTERNAL_PLACES)
def test_runtime_refuses_external_data_handed_directly(
    ctx: Context, secret_dir: Path, where: str
) -> None:
    for location in _locations(secret_dir):
        data = external_data_model(location, where=where)
        with pytest.raises(InvalidInputError, match="keeps tensor data outside the file") as e:
            load_model(data, providers=["CPUExecutionProvider"])
        assert e.value.field == "model"
        assert repr(location) in e.value.message
        digest = ctx.blobs.put_bytes(data).digest  # as a replica loads it
        with pytest.raises(InvalidInputError, match="outside the file"):
            load_model_from_blobs(ctx.blobs, digest, providers=["CPUExecutionProvider"])


def test_the_runtime_check_is_needed_onnxruntime_reads_a_relative_location(
    secret_dir: Path,
) -> None:
    """Why the check exists: ONNX Runtime alone serves the bytes of a file in its working dir."""
    data = external_data_model("secret.bin", where="subgraph")
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (y,) = session.run(["y"], _feeds("subgraph"))
    np.testing.assert_array_equal(y, SECRET_VALUES)


# --- layer: the onnxruntime floor -------------------------------------------------------------


def test_onnxruntime_floor_refuses_absolute_and_parent_locations(secret_dir: Path) -> None:
    """With shipyard's checks bypassed, the onnxruntime that pyproject allows still refuses
    absolute and ``../`` locations (1.25 is the first release that refuses both, and symlinks out,
    for a model loaded from bytes; 1.24.2 serves ``../`` and 1.24.4 follows a symlink)."""
    (secret_dir / "link.bin").symlink_to(secret_dir.parent / "secret.bin")
    options = ort.SessionOptions()
    options.log_severity_level = 4
    # no graph optimisations: nothing but the path check stands between the model and the file
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for where in EXTERNAL_PLACES:
        for location in (str(secret_dir / "secret.bin"), "../secret.bin", "link.bin"):
            data = external_data_model(location, where=where)
            with pytest.raises(Exception) as e:  # ORT raises its own pybind types
                session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
                session.run(["y"], _feeds(where))
            message = str(e.value)
            assert "external" in message.lower() or location in message, message


def test_pyproject_requires_an_onnxruntime_that_refuses_escaping_paths() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = [
        m.group(1)
        for dep in project["dependencies"]
        if (m := re.fullmatch(r"onnxruntime>=([0-9.]+)", dep.replace(" ", "")))
    ]
    assert floors, "pyproject must require onnxruntime>=..."
    assert Version(floors[0]) >= Version("1.25")
    assert Version(ort.__version__) >= Version(floors[0])


# --- layer: the replica's working directory ---------------------------------------------------


def test_a_replica_runs_in_an_empty_private_directory_removed_when_it_stops(
    ctx: Context, secret_dir: Path
) -> None:
    digest = ctx.blobs.put_bytes(linear_model().data).digest
    replica = launcher.spawn_replica(ctx, name="web", digest=digest, version=1)
    launcher.wait_until_ready(replica, timeout=60)
    process = psutil.Process(replica.pid)
    workdir = Path(process.cwd())
    assert workdir == replica.workdir
    assert workdir != secret_dir and secret_dir not in workdir.parents
    assert workdir.name.startswith(launcher.WORKDIR_PREFIX)
    assert list(workdir.iterdir()) == []
    assert stat.S_IMODE(workdir.stat().st_mode) == 0o700
    assert "shipyard.serving.replica" in " ".join(process.cmdline())

    assert launcher.stop_process_group(replica.pid, replica.create_time)
    assert not workdir.exists()  # removed by the replica on its way out


def test_a_replica_that_fails_to_start_removes_its_directory(
    ctx: Context, secret_dir: Path
) -> None:
    replica = launcher.spawn_replica(ctx, name="web", digest="0" * 64, version=1)
    assert replica.workdir is not None and replica.workdir.parent != secret_dir
    with pytest.raises(BackendError, match="exited with status 1"):
        launcher.wait_until_ready(replica, timeout=60)
    assert not replica.workdir.exists()


def test_the_directory_of_a_replica_killed_outright_is_swept(
    ctx: Context, secret_dir: Path
) -> None:
    digest = ctx.blobs.put_bytes(linear_model().data).digest
    killed = launcher.spawn_replica(ctx, name="killed", digest=digest, version=1)
    alive = launcher.spawn_replica(ctx, name="alive", digest=digest, version=1)
    for replica in (killed, alive):
        launcher.wait_until_ready(replica, timeout=60)
    assert killed.workdir is not None and alive.workdir is not None
    os.killpg(killed.pid, signal.SIGKILL)  # no chance to clean up
    wait_for(lambda: launcher.exit_code(killed.pid) is not None, timeout=10, what="kill -9")
    assert killed.workdir.exists()
    removed = launcher.sweep_workdirs(min_age_s=0)
    assert killed.workdir in removed and not killed.workdir.exists()
    assert alive.workdir.exists()  # in use by a live replica: kept
    assert launcher.stop_process_group(alive.pid, alive.create_time)
    assert not alive.workdir.exists()


def test_the_entry_point_runs_only_in_the_directory_made_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / f"{launcher.WORKDIR_PREFIX}x"
    other.mkdir()
    (other / "keep.txt").write_text("not the replica's")
    assert launcher.run_in_workdir(["--workdir", str(other), "shipyard.serving.replica"]) == 2
    assert launcher.run_in_workdir(["--workdir", str(other), "os"]) == 2
    monkeypatch.chdir(tmp_path)
    assert launcher.run_in_workdir(["--workdir", str(tmp_path), "shipyard.serving.replica"]) == 2
    assert (other / "keep.txt").exists() and (tmp_path / f"{launcher.WORKDIR_PREFIX}x").exists()
    assert "must be the working directory" in capsys.readouterr().err
    assert sys.argv[0] != "shipyard.serving.replica"  # nothing ran
