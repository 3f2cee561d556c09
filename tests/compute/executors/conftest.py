"""A real Ray cluster on this machine for the executor tests: started once for this folder and
stopped after its last test, so the rest of the suite does not share the CPUs with it.

``ray.cluster_utils.Cluster``: a head node (2 CPUs, no GPUs) and two worker nodes with 2 CPUs and
2 *declared* GPUs each (Ray hands out declared GPUs without hardware; one node's are "A100"), all
on this machine, the head with its Ray Client server - the same ``ray://`` address a user gives
``shipyard server --executor``. Everything it started is gone after the last test of this folder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

GIB = 1024**3
OBJECT_STORE = 80 * 1024 * 1024
# Quicker node-death detection than Ray's default: a killed node's raylet refuses at once, so
# five failed checks a second apart (~5 s) declare it dead. A check that merely times out takes
# 10 s, so a node that stalls on this busy 2-core machine (a freshly added one starting its
# workers) must stall for about a minute before it counts as dead: with a 3 s timeout, GCS
# declared a new node dead before its first job printed (seen once in a CI run).
SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 10000,
    "health_check_failure_threshold": 5,
}


_failed: list[str] = []


@dataclass
class RayCluster:
    cluster: Any  # ray.cluster_utils.Cluster
    url: str  # ray://127.0.0.1:PORT (Ray Client)
    port: int
    started_s: float  # how long the cluster took to start
    a100_node: Any
    plain_node: Any
    executor: Any  # the folder's RayExecutor, connected (see _check_client)

    def add_node(self, **kwargs: Any) -> Any:
        node = self.cluster.add_node(**_node_args(**kwargs))
        self.cluster.wait_for_nodes()  # registered and alive before anything is placed on it
        return node


def _node_args(**kwargs: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "num_cpus": 2,
        "num_gpus": 0,
        "memory": 4 * GIB,
        "object_store_memory": OBJECT_STORE,
    }
    args.update(kwargs)
    return args


def _client_port() -> int:
    """A free port for the head's Ray Client server outside the kernel's ephemeral range (where
    ``free_port`` draws): the head's own agents bind ephemeral ports while it starts, and one of
    them taking ours would leave Ray Client answering nothing (our probe reaching the agent). Also
    outside Ray's worker ports (10002-19999) and its client servers' (23000-23999)."""
    import random
    import socket

    for port in random.Random().sample(range(24_100, 31_000), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def _listener(port: int) -> str:
    """Which process listens on ``port`` (for the failure message), if ``ss`` can tell."""
    import subprocess

    try:
        out = subprocess.run(
            ["ss", "-ltnp"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (no ss)"
    lines = [line.split(None, 3)[-1] for line in out.splitlines() if f":{port} " in line]
    return "; ".join(lines) or "nothing"


class _ClientDown(Exception):
    """The cluster started but its Ray Client server does not take a connection."""


CLIENT_PATIENCE_S = 120.0


def _check_client(url: str, cluster: Any) -> Any:
    """The folder's executor, connected through Ray Client, waiting up to CLIENT_PATIENCE_S for a
    slow head; when it never answers, fail with what the head's client server logged (a CI run
    saw every connection time out while the cluster itself was up, and nothing more to go on).

    The connection stays open for the folder's tests (one connection is quicker; the one test
    that reconnects on purpose is test_a_node_dies.py)."""
    from shipyard.compute.executors.base import ExecutorUnavailableError
    from shipyard.compute.executors.ray import RayExecutor

    executor = RayExecutor(url)
    began = time.monotonic()
    errors: list[str] = []
    while time.monotonic() - began < CLIENT_PATIENCE_S:
        try:
            if executor.nodes():
                return executor
        except ExecutorUnavailableError as exc:
            errors.append(f"{time.monotonic() - began:.0f}s: {exc}")
        time.sleep(2.5)  # past the executor's fail-fast window
    executor.close()
    logs = Path(cluster.head_node.get_logs_dir_path())
    tails = []
    for path in sorted(logs.glob("ray_client_server*")):
        lines = path.read_text(errors="replace").splitlines()[-15:]
        if lines:
            tails.append(f"--- {path.name}\n" + "\n".join(lines))
    proxies = sorted(k for k in os.environ if "proxy" in k.lower())
    raise _ClientDown(
        f"the Ray cluster started, but Ray Client at {url} took no connection in "
        f"{CLIENT_PATIENCE_S:.0f}s; listening there: {_listener(int(url.rsplit(':', 1)[1]))}; "
        "proxy variables set: "
        f"{proxies or 'none'}; attempts:\n" + "\n".join(errors[-4:]) + "\n" + "\n".join(tails)
    )


@pytest.fixture(scope="package")
def ray_cluster() -> Iterator[RayCluster]:
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if _failed:  # pytest sets a failed package fixture up again for every test: fail at once
        pytest.fail(f"the Ray cluster could not start: {_failed[0]}", pytrace=False)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    began = time.monotonic()
    port = _client_port()
    cluster = Cluster()  # its processes end at our exit even if a start below fails
    try:
        try:
            cluster.add_node(
                **_node_args(
                    include_dashboard=False,
                    ray_client_server_port=port,
                    _system_config=SYSTEM_CONFIG,
                )
            )
            a100 = cluster.add_node(
                **_node_args(num_gpus=2, resources={"accelerator_type:A100": 1.0})
            )
            plain = cluster.add_node(**_node_args(num_gpus=2))
            cluster.wait_for_nodes()
            url = f"ray://127.0.0.1:{port}"
            executor = _check_client(url, cluster)
        except Exception as exc:
            _failed.append(str(exc) if isinstance(exc, _ClientDown) else repr(exc))
            raise
        print(f"ray cluster: 3 nodes started in {time.monotonic() - began:.1f}s")  # with -s
        yield RayCluster(
            cluster=cluster,
            url=url,
            port=port,
            started_s=time.monotonic() - began,
            a100_node=a100,
            plain_node=plain,
            executor=executor,
        )
    finally:
        from shipyard.compute.executors import ray as ray_executor

        ray_executor.disconnect()
        cluster.shutdown()


@pytest.fixture(scope="package")
def ray_executor(ray_cluster: RayCluster) -> Any:
    return ray_cluster.executor
