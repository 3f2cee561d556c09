"""``data transform`` on Ray: the batches run as tasks on a real one-node Ray cluster on this
machine (reached through Ray Client, as a user's ``--ray-address ray://HEAD:10001``); the result,
lineage and cache are those of a local run."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard.context import Context
from shipyard.data import datasets, lineage, transform
from shipyard.domain.models import DatasetVersion
from shipyard.errors import BackendError, InvalidInputError
from tests.compute.executors.conftest import _check_client, _client_port, _node_args
from tests.conftest import free_port
from tests.data.test_transform import EX, P, _commit, _nothing_written, _read


@pytest.fixture(scope="module")
def ray_url() -> Iterator[str]:
    """A Ray head node (2 CPUs) with its Ray Client server; gone after this file's tests."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from shipyard.compute.executors import ray as ray_executor

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    port = _client_port()
    cluster = Cluster()
    executor = None
    try:
        cluster.add_node(**_node_args(include_dashboard=False, ray_client_server_port=port))
        cluster.wait_for_nodes()
        url = f"ray://127.0.0.1:{port}"
        executor = _check_client(url, cluster)  # waits for Ray Client; keeps the connection
        yield url
    finally:
        if executor is not None:
            executor.close()
        ray_executor.disconnect()
        cluster.shutdown()  # type: ignore[no-untyped-call]


def _files(ctx: Context, name: str, version: int) -> dict[str, str]:
    files = datasets.list_files(ctx, project=P, name=name, version=version)
    return {f.path: f.digest for f in files}


def test_rows_on_ray_give_the_local_result_and_share_its_cache(
    ctx: Context, tmp_path: Path, ray_url: str
) -> None:
    source = _commit(ctx, tmp_path / "src")
    marks = tmp_path / "marks"
    marks.mkdir()

    def counted(on: transform.On, to: str = "copy") -> DatasetVersion:
        return transform.transform(
            ctx,
            project=P,
            source=source,
            fn=f"{EX}:counted",
            to=to,
            params={"marks": str(marks)},
            batch_rows=4,
            on=on,
            ray_address=ray_url,
        )

    first = counted("ray")
    assert len(list(marks.iterdir())) == 3 + 1  # every batch ran, on the cluster's workers
    assert counted("local") == first  # the same key whichever ran it: not run again
    assert counted("ray") == first
    assert len(list(marks.iterdir())) == 4
    local_first = counted("local", to="copy2")  # the other way round
    assert counted("ray", to="copy2") == local_first
    assert len(list(marks.iterdir())) == 2 * 4

    def scale(to: str, on: transform.On) -> DatasetVersion:
        return transform.transform(
            ctx,
            project=P,
            source=source,
            fn=f"{EX}:scale",
            to=to,
            params={"column": "x", "factor": 2},
            batch_rows=3,
            on=on,
            ray_address=ray_url,
        )

    local, on_ray = scale("local", "local"), scale("remote", "ray")
    assert _files(ctx, "remote", on_ray.version) == _files(ctx, "local", local.version)
    table = _read(ctx, "remote", on_ray.version, "t.parquet")
    assert table.column("id").to_pylist() == list(range(10))  # batch order kept
    assert table.column("x_scaled").to_pylist() == [i * 3.0 for i in range(10)]
    assert transform.cache_key_of(on_ray) == transform.cache_key_of(local)
    src = datasets.get_version(ctx, project=P, name="raw", version=1)
    edges = lineage.lineage(ctx, kind="dataset_version", id=on_ray.id, project=P)
    assert [(e.source_id, e.relation) for e in edges] == [(src.id, "transform")]


def test_a_module_in_a_folder_is_shipped_to_the_cluster(
    ctx: Context, tmp_path: Path, ray_url: str
) -> None:
    source = _commit(ctx, tmp_path / "src")
    code = tmp_path / "code"
    code.mkdir()
    (code / "tf_ray_shipped.py").write_text(
        "import pyarrow as pa\n"
        "def tag(batch):\n"
        "    return batch.append_column('k', pa.array(['shipped'] * batch.num_rows))\n"
    )
    out = transform.transform(
        ctx,
        project=P,
        source=source,
        fn="tf_ray_shipped:tag",
        to="tagged",
        search_path=[code],
        on="ray",
        ray_address=ray_url,
    )
    assert set(_read(ctx, "tagged", out.version, "t.parquet").column("k").to_pylist()) == {
        "shipped"
    }


def test_a_batch_that_raises_on_ray_is_named_and_nothing_is_committed(
    ctx: Context, tmp_path: Path, ray_url: str
) -> None:
    source = _commit(ctx, tmp_path / "src")
    with pytest.raises(InvalidInputError) as info:
        transform.transform(
            ctx,
            project=P,
            source=source,
            fn=f"{EX}:fail_on",
            to="broken",
            params={"column": "id", "value": 7},
            batch_rows=3,
            on="ray",
            ray_address=ray_url,
        )
    message = info.value.message
    assert "table 't.parquet' batch 2" in message  # rows 6..8
    assert "ValueError: bad value 7 in id" in message
    assert "nothing was committed" in message
    assert "fail_on" in info.value.details["traceback"]
    _nothing_written(ctx, "broken")


def test_a_worker_that_dies_on_ray_is_named(ctx: Context, tmp_path: Path, ray_url: str) -> None:
    source = _commit(ctx, tmp_path / "src")
    with pytest.raises(InvalidInputError, match="Ray worker process died") as info:
        transform.transform(
            ctx,
            project=P,
            source=source,
            fn=f"{EX}:die",
            to="broken",
            on="ray",
            ray_address=ray_url,
        )
    assert "batch 0" in info.value.message
    _nothing_written(ctx, "broken")


# --- no cluster (these need no Ray) ---------------------------------------------------------------


def test_an_unreachable_cluster_is_named_with_what_to_do(ctx: Context, tmp_path: Path) -> None:
    source = _commit(ctx, tmp_path / "src")
    address = f"ray://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(BackendError) as info:
        transform.transform(
            ctx, project=P, source=source, fn=f"{EX}:scale", to="out", on="ray", ray_address=address
        )
    message = info.value.message
    assert address in message and "nothing answers there" in message
    assert "--ray-address" in message and "--on local" in message
    _nothing_written(ctx, "out")
    # by default: the Ray executor's address (SHIPYARD_EXECUTOR)
    configured = f"ray://127.0.0.1:{free_port()}"
    settings = dataclasses.replace(ctx.settings, executor=configured)
    with pytest.raises(BackendError, match=configured):
        transform.transform(
            dataclasses.replace(ctx, settings=settings),
            project=P,
            source=source,
            fn=f"{EX}:scale",
            to="out",
            on="ray",
        )
    _nothing_written(ctx, "out")


@pytest.mark.parametrize(
    ("on", "address", "expected"),
    [
        ("ray", None, "needs the cluster's address: pass --ray-address"),
        ("ray", "http://127.0.0.1:1", "is not a Ray address"),
        ("mars", None, "on 'mars' is not one of local, ray"),
    ],
)
def test_a_missing_or_bad_address_is_refused_before_running(
    ctx: Context, tmp_path: Path, on: str, address: str | None, expected: str
) -> None:
    source = _commit(ctx, tmp_path / "src")
    assert ctx.settings.executor == "local"
    with pytest.raises(InvalidInputError, match=expected):
        transform.transform(
            ctx,
            project=P,
            source=source,
            fn=f"{EX}:scale",
            to="out",
            on=on,  # type: ignore[arg-type]
            ray_address=address,
        )
    _nothing_written(ctx, "out")
