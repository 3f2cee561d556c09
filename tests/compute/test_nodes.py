"""Nodes: the executor's nodes joined with the RUNNING jobs' placements (CPUs, memory, GPU
indices and shares, job ids), unknown node ids, and an executor that cannot be reached."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard.compute import nodes
from shipyard.context import Context, open_context
from shipyard.domain.models import JobStatus
from shipyard.domain.principals import Role
from shipyard.errors import NotFoundError, ResourceUnavailableError
from shipyard.settings import Settings
from shipyard.store.engine import forget_database
from tests.compute.test_queues import add_job, viewer
from tests.conftest import free_port


@pytest.fixture
def gpu_ctx(tmp_path: Path) -> Iterator[Context]:
    settings = Settings(
        home=tmp_path / "gpu-home", cpus=16, memory_mb=64_000, gpus=4, gpu_model="A100"
    )
    context = open_context(settings, actor="tester")
    yield context
    forget_database(settings.database_url)


def test_a_node_shows_what_it_has_and_what_is_allocated_to_which_jobs(gpu_ctx: Context) -> None:
    here = socket.gethostname()
    whole = add_job(
        gpu_ctx,
        project="vision",
        gpus=2,
        cpus=4,
        memory_mb=8000,
        placement=[{"node_id": here, "gpus": [0, 1], "gpu_share": 0.0}],
    )
    quarter = add_job(
        gpu_ctx,
        project="vision",
        cpus=1,
        memory_mb=1000,
        placement=[{"node_id": here, "gpus": [2], "gpu_share": 0.25}],
    )
    half = add_job(
        gpu_ctx,
        project="nlp",
        cpus=0.5,
        memory_mb=500,
        placement=[{"node_id": here, "gpus": [2], "gpu_share": 0.5}],
    )
    add_job(gpu_ctx, project="nlp", status=JobStatus.QUEUED, gpus=1)  # not placed
    add_job(
        gpu_ctx,
        project="nlp",
        status=JobStatus.SUCCEEDED,
        placement=[{"node_id": here, "gpus": [3], "gpu_share": 0.0}],
    )
    add_job(  # a worker on another node of the cluster is not counted here
        gpu_ctx, project="nlp", placement=[{"node_id": "elsewhere", "gpus": [3]}]
    )

    [node] = nodes.list_nodes(gpu_ctx)

    assert node.id == here and node.healthy and node.gpu_source == "declared"
    assert (node.cpus, node.memory_mb) == (16.0, 64_000)
    assert (node.allocated_cpus, node.allocated_memory_mb) == (5.5, 9500)
    assert node.jobs == [whole, quarter, half]
    by_index = {g.index: g for g in node.gpus}
    assert [g.model for g in node.gpus] == ["A100"] * 4
    assert (by_index[0].allocated, by_index[0].jobs) == (1.0, [whole])
    assert (by_index[1].allocated, by_index[1].jobs) == (1.0, [whole])
    assert (by_index[2].allocated, by_index[2].jobs) == (0.75, [quarter, half])
    assert (by_index[3].allocated, by_index[3].jobs) == (0.0, [])
    assert nodes.get_node(gpu_ctx, node_id=here) == node


def test_a_gang_counts_every_worker_placed_on_the_node(gpu_ctx: Context) -> None:
    here = socket.gethostname()
    gang = add_job(
        gpu_ctx,
        project="vision",
        gpus=1,
        cpus=2,
        memory_mb=1000,
        workers=2,
        placement=[{"node_id": here, "gpus": [0]}, {"node_id": here, "gpus": [1]}],
    )

    node = nodes.get_node(gpu_ctx, node_id=here)

    assert (node.allocated_cpus, node.allocated_memory_mb, node.jobs) == (4.0, 2000, [gang])
    assert [g.allocated for g in node.gpus] == [1.0, 1.0, 0.0, 0.0]


def test_job_ids_of_projects_the_caller_cannot_see_are_left_out(gpu_ctx: Context) -> None:
    here = socket.gethostname()
    mine = add_job(gpu_ctx, project="alpha", gpus=1, placement=[{"node_id": here, "gpus": [0]}])
    add_job(gpu_ctx, project="beta", gpus=1, placement=[{"node_id": here, "gpus": [1]}])

    [node] = nodes.list_nodes(viewer(gpu_ctx, alpha=Role.VIEWER))

    assert node.jobs == [mine]
    assert [g.jobs for g in node.gpus[:2]] == [[mine], []]
    assert [g.allocated for g in node.gpus[:2]] == [1.0, 1.0]  # the amounts count both


def test_an_unknown_node_is_not_found_naming_the_nodes(ctx: Context) -> None:
    with pytest.raises(NotFoundError) as caught:
        nodes.get_node(ctx, node_id="gpu-box-9")

    assert caught.value.field == "node_id"
    assert f"the nodes are: {socket.gethostname()}" in caught.value.message


def test_an_unreachable_executor_is_a_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    settings = Settings(home=tmp_path / "ray-home", executor=f"ray://127.0.0.1:{free_port()}")
    context = open_context(settings, actor="tester")
    try:
        with pytest.raises(ResourceUnavailableError) as caught:
            nodes.list_nodes(context)
    finally:
        forget_database(settings.database_url)

    assert caught.value.field == "executor"
    assert "cannot list the nodes: the executor is unreachable" in caught.value.message
