"""Batch inference (``shipyard batch``): a registered ONNX model over a dataset version's tables,
committed as a new version with lineage. Models are built here and registered through the SDK,
datasets committed through it; predictions are checked against ONNX Runtime run directly."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto, helper, numpy_helper

from shipyard.client import Client
from shipyard.client.http import HttpBackend
from shipyard.client.local import LocalBackend
from shipyard.context import Context
from shipyard.data import datasets, profile
from shipyard.domain.models import DatasetVersion, ModelVersion
from shipyard.errors import InvalidInputError, NotFoundError
from shipyard.serving import batch
from tests.data.test_transform_ray import ray_url  # noqa: F401 - the Ray cluster fixture
from tests.onnx_models import two_input_model

P = "default"
FEATURES = 8
CLASSES = 3
CLI = [sys.executable, "-m", "shipyard.cli", "batch"]


def classifier(features: int = FEATURES, *, seed: int = 0) -> bytes:
    """x: FP32 [n, features] -> probabilities (softmax of a 16-unit MLP, [n, 3]) and label
    (its argmax, INT64 [n])."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((features, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, CLASSES)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "W2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
            helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", features])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["n"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", CLASSES]),
        ],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def reference(model: bytes, x: np.ndarray) -> dict[str, np.ndarray]:
    """What ONNX Runtime answers when run directly on all rows at once."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"x": x.astype(np.float32)}), strict=True))


@pytest.fixture
def client(ctx: Context) -> Client:
    return Client(backend=LocalBackend(ctx))


def register(
    client: Client, tmp_path: Path, data: bytes, *, name: str = "clf", alias: str = "production"
) -> ModelVersion:
    """Log ``data`` as a run's artifact, register it and point ``alias`` at it (the SDK)."""
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(data)
    run = client.backend.create_run(project=P, name=f"train-{name}")
    client.backend.log_artifact(run.id, path="model.onnx", local_file=path, project=P)
    version = client.models.register(name, run_id=run.id, artifact_path="model.onnx")
    return client.models.set_alias(name, alias, version.version)


def commit(
    client: Client, folder: Path, name: str, tables: dict[str, pa.Table], extra: str = ""
) -> DatasetVersion:
    folder.mkdir(parents=True)
    for path, table in tables.items():
        if path.endswith(".csv"):
            pa_csv.write_csv(table, folder / path)
        else:
            pq.write_table(table, folder / path)
    if extra:
        (folder / "README.md").write_text(extra)
    return client.datasets.commit(folder, name=name)


def features_table(rows: int, *, seed: int = 1, features: int = FEATURES) -> pa.Table:
    x = np.random.default_rng(seed).standard_normal((rows, features))
    columns: dict[str, pa.Array] = {"id": pa.array(np.arange(rows) + 1000)}
    columns.update({f"f{j}": pa.array(x[:, j]) for j in range(features)})
    return pa.table(columns)


def matrix(table: pa.Table, features: int = FEATURES) -> np.ndarray:
    return np.column_stack([table.column(f"f{j}").to_numpy() for j in range(features)])


def probabilities(table: pa.Table) -> np.ndarray:
    column = table.column("probabilities").combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1)


def assert_profile_as_read_back(ctx: Context, out: DatasetVersion) -> None:
    """The profile batch inference recorded (from the tables it wrote, not read back by the
    commit) is the one profiling the committed files gives."""
    files = datasets.list_files(ctx, project=P, name=out.dataset, version=out.version)
    assert out.profile == profile.profile_files(ctx, files)
    assert len(out.profile.tables) == len([f for f in files if profile.is_table(f.path)])


def test_predictions_match_onnxruntime_table_by_table(
    client: Client, ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = classifier()
    register(client, tmp_path, model)
    first, second = features_table(1000, seed=1), features_table(37, seed=2)
    commit(
        client,
        tmp_path / "src",
        "features",
        {"a.parquet": first, "b.csv": second},
        extra="not a table",
    )
    monkeypatch.setattr(batch, "CHUNK_ROWS", 256)  # many tasks, two workers: order must hold
    seen: list[tuple[int, int]] = []
    out = client.models.batch_predict(
        "clf@production",
        input="features@1",
        output="scores",
        keep=["id"],
        workers=2,
        batch_rows=100,
        progress=lambda done, total, path: seen.append((done, total)),
    )
    assert (out.dataset, out.version) == ("scores", 1)
    assert [f.path for f in client.datasets.files("scores")] == ["a.parquet", "b.parquet"]
    for path, source in (("a.parquet", first), ("b.parquet", second)):
        got = client.datasets.read_table("scores", path)
        assert got.column_names == ["id", "label", "probabilities"]
        assert got.schema.field("probabilities").type == pa.list_(pa.float32(), CLASSES)
        expected = reference(model, matrix(source))
        assert got.column("id").to_pylist() == source.column("id").to_pylist()
        assert got.column("label").to_pylist() == expected["label"].tolist()
        np.testing.assert_allclose(probabilities(got), expected["probabilities"], rtol=1e-6)
    assert seen[-1] == (1037, 1037)
    assert_profile_as_read_back(ctx, out)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_list_columns_and_inputs_by_name(client: Client, tmp_path: Path) -> None:
    model = classifier()
    register(client, tmp_path, model)
    x = np.random.default_rng(3).standard_normal((50, FEATURES)).astype(np.float32)
    table = pa.table(
        {
            "key": pa.array([f"row{i}" for i in range(50)]),
            "features": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), FEATURES),
        }
    )
    commit(client, tmp_path / "src", "vectors", {"v.parquet": table})
    client.models.batch_predict("clf", input="vectors", output="auto", keep=["key"])
    chosen = client.models.batch_predict(
        "clf@v1", input="vectors@1", output="chosen", input_column="features", workers=1
    )
    expected = reference(model, x)
    for name in ("auto", "chosen"):
        got = client.datasets.read_table(name, "v.parquet")
        assert got.column("label").to_pylist() == expected["label"].tolist()
        np.testing.assert_allclose(probabilities(got), expected["probabilities"], rtol=1e-6)
    assert client.datasets.read_table("auto", "v.parquet").column("key")[49].as_py() == "row49"
    assert chosen.version == 1

    register(client, tmp_path, two_input_model(), name="pair")  # inputs a, b: FP64 [n, 3]
    a = np.arange(12, dtype=np.float64).reshape(4, 3)
    pairs = pa.table(
        {
            "b": pa.FixedSizeListArray.from_arrays(pa.array((a * 10).ravel()), 3),
            "a": pa.array(a.tolist(), type=pa.list_(pa.float64())),  # a variable-size list
        }
    )
    commit(client, tmp_path / "pairs", "pairs", {"p.parquet": pairs})
    client.models.batch_predict("pair", input="pairs", output="sums", workers=1)
    got = client.datasets.read_table("sums", "p.parquet")
    assert got.column_names == ["sum", "diff"]
    sums = got.column("sum").combine_chunks().flatten().to_numpy().reshape(4, 3)
    np.testing.assert_array_equal(sums, a * 11)


def test_lineage_and_audit_name_the_model_and_the_source(
    client: Client, ctx: Context, tmp_path: Path
) -> None:
    version = register(client, tmp_path, classifier())
    source = commit(client, tmp_path / "src", "features", {"t.parquet": features_table(10)})
    out = client.models.batch_predict(
        "clf", input="features", output="scores", keep=["id"], workers=1
    )
    edges = client.backend.lineage(kind="dataset_version", id=out.id, project=P)
    into = {(e.source_kind, e.source_id, e.relation) for e in edges if e.target_id == out.id}
    assert into == {
        ("dataset_version", source.id, "batch_inference"),
        ("model_version", version.id, "batch_inference"),
    }
    events = [
        e for e in client.backend.audit_events(limit=1000) if e.action == "model.batch_predict"
    ]
    assert len(events) == 1
    details = events[0].details
    assert details["model_digest"] == version.artifact_digest
    assert details["source"] == "features@v1" and details["rows"] == 10
    assert details["tables"] == {"t.parquet": {"x": [f"f{j}" for j in range(FEATURES)]}}
    assert client.backend.verify_audit().ok


def test_columns_that_do_not_fit_the_model_fail_before_any_work(
    client: Client, tmp_path: Path
) -> None:
    register(client, tmp_path, classifier())
    narrow = features_table(20, features=5).append_column("name", pa.array(["n"] * 20))
    narrow = narrow.append_column("label", pa.array(["cat"] * 20))
    commit(client, tmp_path / "src", "narrow", {"t.parquet": narrow})

    def attempt(**options: object) -> str:
        with pytest.raises(InvalidInputError) as caught:
            client.models.batch_predict("clf", input="narrow", output="scores", **options)  # type: ignore[arg-type]
        return caught.value.message

    message = attempt(keep=["id", "name"])
    assert "x (FP32 [-1, 8])" in message  # the model's inputs
    assert "f4: double" in message and "name: string" in message  # the table's columns
    assert "5 feature column(s)" in message
    assert "not numeric" in attempt(columns=["f0", "name"])
    assert "no column 'f9'" in attempt(columns=["f0", "f9"])
    assert "clash" in attempt(keep=["label"])
    with pytest.raises(NotFoundError):
        client.datasets.get("scores")  # nothing was committed


@pytest.mark.parametrize("workers", [1, 2], ids=["here", "pool"])
def test_a_failing_batch_is_named_and_nothing_is_committed(
    client: Client, tmp_path: Path, workers: int
) -> None:
    register(client, tmp_path, classifier())
    table = features_table(1000)
    holes = [None if 330 <= i < 335 else v for i, v in enumerate(table.column("f3").to_pylist())]
    table = table.set_column(4, "f3", pa.array(holes, pa.float64()))
    commit(client, tmp_path / "src", "holes", {"t.parquet": table})
    with pytest.raises(InvalidInputError) as caught:
        client.models.batch_predict(
            "clf", input="holes", output="scores", keep=["id"], batch_rows=100, workers=workers
        )
    message = caught.value.message
    assert "table 't.parquet' batch 3 (rows 300-399)" in message
    assert "column 'f3' has 5 missing value(s)" in message
    assert "nothing was committed" in message
    with pytest.raises(NotFoundError):
        client.datasets.get("scores")


def test_one_worker_runs_the_model_in_this_process(
    client: Client, ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """workers=1 starts no worker process (it would only add its start and the pickling of
    every chunk, on the same core) and predicts what ONNX Runtime does, chunk after chunk."""
    model = classifier()
    register(client, tmp_path, model)
    table = features_table(700)
    commit(client, tmp_path / "src", "features", {"t.parquet": table})
    monkeypatch.setattr(batch, "CHUNK_ROWS", 256)  # chunks of 200 rows, the last one short
    seen: list[tuple[int, int, list[int]]] = []

    def watch(done: int, total: int, path: str) -> None:
        seen.append((done, total, [p.pid or 0 for p in multiprocessing.active_children()]))

    out = batch.batch_predict(
        ctx,
        project=P,
        model="clf",
        source="features",
        to="scores",
        keep=["id"],
        workers=1,
        batch_rows=100,
        progress=watch,
    )
    assert seen == [(200, 700, []), (400, 700, []), (600, 700, []), (700, 700, [])]
    got = client.datasets.read_table("scores", "t.parquet", out.version)
    want = reference(model, matrix(table))
    assert got.column("id").to_pylist() == table.column("id").to_pylist()
    assert got.column("label").to_pylist() == want["label"].tolist()
    np.testing.assert_allclose(probabilities(got), want["probabilities"], rtol=1e-5, atol=1e-6)
    assert_profile_as_read_back(ctx, out)


def test_a_table_without_rows_gives_one_without_rows(
    client: Client, ctx: Context, tmp_path: Path
) -> None:
    register(client, tmp_path, classifier())
    commit(client, tmp_path / "src", "empty", {"t.parquet": features_table(0)})
    out = client.models.batch_predict("clf", input="empty", output="scores", keep=["id"])
    got = client.datasets.read_table("scores", "t.parquet", out.version)
    assert got.num_rows == 0
    assert got.column_names == ["id", "label", "probabilities"]
    assert got.schema.field("label").type == pa.int64()
    assert got.schema.field("probabilities").type == pa.list_(pa.float32(), CLASSES)
    assert_profile_as_read_back(ctx, out)


def test_unknown_model_alias_and_bad_options_are_refused(client: Client, tmp_path: Path) -> None:
    register(client, tmp_path, classifier())
    commit(client, tmp_path / "src", "features", {"t.parquet": features_table(5)})
    with pytest.raises(NotFoundError, match="no alias 'staging'"):
        client.models.batch_predict("clf@staging", input="features", output="scores")
    with pytest.raises(InvalidInputError, match="not both"):
        client.models.batch_predict(
            "clf", input="features", output="s", columns=["f0"], input_column="f0"
        )
    with pytest.raises(InvalidInputError, match="workers"):
        client.models.batch_predict("clf", input="features", output="s", workers=0)


def test_through_a_server_it_says_to_run_on_the_home() -> None:
    backend = HttpBackend("http://127.0.0.1:9")  # nothing is sent
    with pytest.raises(InvalidInputError, match="this machine's home"):
        backend.batch_predict(project=P, model="clf", source="features", to="scores")


def test_shipyard_batch_runs_as_a_job(client: Client, tmp_path: Path, home: Path) -> None:
    model = classifier()
    register(client, tmp_path, model)
    source = features_table(300)
    commit(client, tmp_path / "src", "features", {"t.parquet": source})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
    env.update(SHIPYARD_HOME=str(home), SHIPYARD_TEST="1")
    options = ["--input", "features@1", "--output", "scores", "--keep", "id", "--workers", "1"]
    result = subprocess.run(
        [*CLI, "clf@production", *options],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "batch inference into scores" in result.stderr
    assert "succeeded" in result.stderr
    assert "dataset scores v1: 1 table(s)" in result.stdout  # the job's own log, followed
    [job] = client.jobs.list()
    assert "--here" in job.spec.command and job.spec.resources.cpus == 1
    got = client.datasets.read_table("scores", "t.parquet")
    assert got.column("label").to_pylist() == reference(model, matrix(source))["label"].tolist()

    result = subprocess.run(  # a mismatch fails the job, and the command, with the reason
        [*CLI, "clf", "--input", "features", "--output", "other", "--columns", "f0,f1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "2 feature column(s) (f0, f1) for input 'x', which takes 8" in result.stdout


# --- on Ray: a real one-node cluster reached through Ray Client (the transform tests' fixture) ---


def test_on_ray_an_actor_pool_gives_the_local_result(
    client: Client,
    tmp_path: Path,
    ray_url: str,  # noqa: F811 - the fixture imported above
) -> None:
    model = classifier()
    register(client, tmp_path, model)
    source = features_table(700)
    commit(client, tmp_path / "src", "features", {"t.parquet": source})
    out = client.models.batch_predict(
        "clf", input="features", output="scores", keep=["id"], workers=2, batch_rows=64,
        on="ray", ray_address=ray_url,
    )  # fmt: skip
    got = client.datasets.read_table("scores", "t.parquet", out.version)
    expected = reference(model, matrix(source))
    assert got.column("id").to_pylist() == source.column("id").to_pylist()
    assert got.column("label").to_pylist() == expected["label"].tolist()
    np.testing.assert_allclose(probabilities(got), expected["probabilities"], rtol=1e-6)

    table = source.set_column(4, "f3", pa.array([None] * 700, pa.float64()))
    commit(client, tmp_path / "holes", "holes", {"t.parquet": table})
    with pytest.raises(InvalidInputError, match=r"column 'f3' has .* missing value"):
        client.models.batch_predict(
            "clf", input="holes", output="bad", keep=["id"], on="ray", ray_address=ray_url
        )
    with pytest.raises(NotFoundError):
        client.datasets.get("bad")
