"""The Ray executor on a real Ray cluster (tests/compute/executors/conftest.py): what only Ray
has - its address, its nodes, a node that dies - and the executor's own API."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

pytest.importorskip("ray")

from shipyard import wiring
from shipyard.compute import admission, jobs
from shipyard.compute.executors.base import ExecutorUnavailableError, Launch, Observation
from shipyard.compute.executors.ray import RayExecutor
from shipyard.compute.policy.base import Placement, WorkerPlacement
from shipyard.context import Context, new_id
from shipyard.domain.models import Job, JobSpec, JobStatus
from tests.conftest import free_port, wait_for


def _launch(spec: JobSpec, *, attempt: int = 1) -> Launch:
    job_id = new_id()
    workers = getattr(spec, "workers", 1)
    return Launch(
        job_id=job_id,
        project="demo",
        attempt=attempt,
        spec=spec,
        placement=Placement(
            job_id=job_id, workers=tuple(WorkerPlacement(node_id="any") for _ in range(workers))
        ),
        code_digest=None,
        run_id=None,
    )


def _run(
    executor: Any, ctx: Context, launch: Launch, timeout: float = 60
) -> tuple[dict, Observation]:
    ref = executor.launch(ctx, launch)

    def done() -> Observation | None:
        seen = executor.observe(ctx, {launch.job_id: ref}).get(launch.job_id)
        return seen if seen is not None and seen.state != "running" else None

    return ref, wait_for(done, timeout=timeout, interval=0.1, what="the Ray job to end")


def test_a_job_runs_to_success_with_its_log(ray_executor: Any, ctx: Context) -> None:
    spec = JobSpec(command=[sys.executable, "-c", "print('hello from ray')"])
    launch = _launch(spec)
    ref, seen = _run(ray_executor, ctx, launch)
    assert seen.state == "finished" and seen.status == JobStatus.SUCCEEDED, seen
    data, size = ray_executor.read_logs(ctx, launch.job_id, ref, offset=0, limit=10_000)
    assert data == b"hello from ray\n" and size == len(data)


def test_unreachable_address_names_it(ctx: Context) -> None:
    port = free_port()
    executor = RayExecutor(f"ray://127.0.0.1:{port}")
    with pytest.raises(ExecutorUnavailableError, match=f"127.0.0.1:{port}"):
        executor.nodes()
    with pytest.raises(ExecutorUnavailableError, match=f"127.0.0.1:{port}"):
        executor.launch(ctx, _launch(JobSpec(command=["true"])))


def test_nodes_lists_the_declared_gpus(ray_executor: Any) -> None:
    infos = [info for info in ray_executor.nodes() if info.node.healthy]
    assert len(infos) >= 3
    by_gpus = sorted(
        infos, key=lambda i: (len(i.node.gpus), i.node.gpus[0].model if i.node.gpus else "")
    )
    head = by_gpus[0]
    assert head.node.gpus == () and head.node.cpus == 2 and head.gpu_source == "none"
    models = sorted(gpu.model for info in infos for gpu in info.node.gpus)
    assert models[:4] == ["A100", "A100", "declared", "declared"]
    a100 = next(i for i in infos if i.node.gpus and i.node.gpus[0].model == "A100")
    assert [g.index for g in a100.node.gpus] == [0, 1]
    assert a100.gpu_source == "declared" and a100.node.memory_mb == 4096 and a100.address
    assert len(a100.node.id) == 56  # Ray's node id (hex)


@pytest.mark.parametrize(
    "url", ["ray://", "ray://head:notaport", "ray://head:0", "ray://:10001", "http://head:10001"]
)
def test_a_bad_ray_address_is_refused_naming_the_field(url: str) -> None:
    from shipyard.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="ray://HOST:PORT") as info:
        wiring.open_executor(url) if url.startswith("ray") else RayExecutor(url)
    assert info.value.field == "executor"


def _drive(ctx: Context, job_id: str, until: Any, *, timeout: float = 120) -> Job:
    def look() -> Job | None:
        admission.step(ctx)
        job = jobs.get_job(ctx, job_id=job_id)
        return job if until(job) else None

    try:
        return wait_for(look, timeout=timeout, interval=0.1, what=f"job {job_id}")
    except pytest.fail.Exception:
        job = jobs.get_job(ctx, job_id=job_id)
        pytest.fail(
            f"job {job_id} is {job.status.value} (attempt {job.attempt}): {job.message!r}; "
            f"log: {_log(ctx, job_id)!r}"
        )


def _log(ctx: Context, job_id: str) -> str:
    return jobs.read_logs(ctx, job_id=job_id, limit=1_000_000)[0].decode()


def test_ray_is_imported_only_when_the_executor_connects() -> None:
    import subprocess

    code = (
        "import sys, shipyard\n"
        "from shipyard import wiring\n"
        "from shipyard.compute import admission, jobs\n"
        "executor = wiring.open_executor('ray://127.0.0.1:1')\n"
        "assert executor.name == 'ray'\n"
        "assert 'ray' not in sys.modules, 'ray imported before use'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_loopback_ray_address_bypasses_a_proxy_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from shipyard.compute.executors import ray as ray_executor

    for name in ("grpc_proxy", "https_proxy", "http_proxy", "no_grpc_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    ray_executor._no_proxy_for_loopback("127.0.0.1")  # no proxy: nothing to change
    assert "no_grpc_proxy" not in os.environ
    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "example.org")
    ray_executor._no_proxy_for_loopback("10.0.0.5")  # a remote head may need the proxy
    assert "no_grpc_proxy" not in os.environ
    ray_executor._no_proxy_for_loopback("127.0.0.1")
    ray_executor._no_proxy_for_loopback("127.0.0.1")  # named once
    assert os.environ["no_grpc_proxy"] == "example.org,127.0.0.1"  # noqa: SIM112
