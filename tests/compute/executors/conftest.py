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


@pytest.fixture(scope="package")
def ray_cluster() -> Iterator[RayCluster]:
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if _failed:  # pytest sets a failed package fixture up again for every test: fail at once
        pytest.fail(f"the Ray cluster could not start: {_failed[0]}", pytrace=False)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    began = time.monotonic()
    port = free_port()
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
        except Exception as exc:
            _failed.append(repr(exc))
            raise
        print(f"ray cluster: 3 nodes started in {time.monotonic() - began:.1f}s")  # with -s
        yield RayCluster(
            cluster=cluster,
            url=f"ray://127.0.0.1:{port}",
            port=port,
            started_s=time.monotonic() - began,
            a100_node=a100,
            plain_node=plain,
        )
    finally:
        from shipyard.compute.executors import ray as ray_executor

        ray_executor.disconnect()
        cluster.shutdown()


@pytest.fixture(scope="package")
def ray_executor(ray_cluster: RayCluster) -> Any:
    from shipyard.compute.executors.ray import RayExecutor

    return RayExecutor(ray_cluster.url)
