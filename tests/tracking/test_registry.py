from __future__ import annotations

import time

import pytest

from shipyard.context import Context
from shipyard.domain.models import MetricPoint
from shipyard.errors import InvalidInputError, NotFoundError
from shipyard.store.queries import edges_of
from shipyard.tracking import registry, runs
from tests.onnx_models import linear_model


def _run_with_model(ctx: Context, *, seed: int = 0) -> tuple[str, bytes]:
    run = runs.create_run(ctx, project="p")
    runs.log_batch(
        ctx,
        run_id=run.id,
        metrics=[MetricPoint(key="val_accuracy", value=0.97, step=1, timestamp=time.time())],
    )
    model_bytes = linear_model(seed=seed, input_name="input", output_name="logits").data
    blob = ctx.blobs.put_bytes(model_bytes)
    runs.log_artifact(ctx, run_id=run.id, path="model.onnx", digest=blob.digest, size=blob.size)
    return run.id, model_bytes


def test_register_version_reads_signature_and_metrics_and_records_lineage(ctx: Context) -> None:
    run_id, model_bytes = _run_with_model(ctx)
    mv = registry.register_version(
        ctx, project="p", model="digits", run_id=run_id, artifact_path="model.onnx"
    )
    assert mv.version == 1 and mv.format == "onnx" and mv.artifact_size == len(model_bytes)
    assert [(t.name, t.datatype, t.shape) for t in mv.signature.inputs] == [
        ("input", "FP32", [-1, 64])
    ]
    assert [(t.name, t.shape) for t in mv.signature.outputs] == [("logits", [-1, 10])]
    assert mv.metrics == {"val_accuracy": 0.97}
    with ctx.db.read() as s:
        edges = edges_of(s, kind="model_version", id=mv.id)
    assert [(e.source_kind, e.source_id, e.relation) for e in edges] == [("run", run_id, "output")]
    mv2 = registry.register_version(
        ctx, project="p", model="digits", run_id=run_id, artifact_path="model.onnx"
    )
    assert mv2.version == 2
    assert registry.get_model(ctx, project="p", model="digits").latest_version == 2


def test_aliases_move_with_history_and_resolve(ctx: Context) -> None:
    run_id, _ = _run_with_model(ctx)
    for _ in range(2):
        registry.register_version(
            ctx, project="p", model="m", run_id=run_id, artifact_path="model.onnx"
        )
    registry.set_alias(ctx, project="p", model="m", alias="production", version=1)
    moved = registry.set_alias(ctx, project="p", model="m", alias="production", version="v2")
    assert moved.version == 2 and moved.aliases == ["production"]
    assert registry.get_version(ctx, project="p", model="m", ref="production").version == 2
    assert registry.get_version(ctx, project="p", model="m", ref="1").aliases == []
    assert registry.get_version(ctx, project="p", model="m", ref="latest").version == 2
    history = registry.alias_history(ctx, project="p", model="m")
    assert [(e.previous_version, e.version, e.actor) for e in history] == [
        (None, 1, "tester"),
        (1, 2, "tester"),
    ]
    registry.delete_alias(ctx, project="p", model="m", alias="production")
    with pytest.raises(NotFoundError, match="production"):
        registry.get_version(ctx, project="p", model="m", ref="production")
    assert registry.alias_history(ctx, project="p", model="m")[-1].version is None


@pytest.mark.parametrize("alias", ["3", "v2", "latest", "../x", ""])
def test_bad_aliases_rejected(ctx: Context, alias: str) -> None:
    run_id, _ = _run_with_model(ctx)
    registry.register_version(
        ctx, project="p", model="m", run_id=run_id, artifact_path="model.onnx"
    )
    with pytest.raises(InvalidInputError) as info:
        registry.set_alias(ctx, project="p", model="m", alias=alias, version=1)
    assert info.value.field == "alias"
    assert registry.get_model(ctx, project="p", model="m").aliases == {}


def test_refuses_non_onnx_and_pickles(ctx: Context) -> None:
    import pickle

    run = runs.create_run(ctx, project="p")
    blob = ctx.blobs.put_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    runs.log_artifact(ctx, run_id=run.id, path="model.pkl", digest=blob.digest, size=blob.size)
    with pytest.raises(InvalidInputError, match="not a loadable onnx model"):
        registry.register_version(
            ctx, project="p", model="m", run_id=run.id, artifact_path="model.pkl"
        )
    with pytest.raises(InvalidInputError, match="pickled models are refused"):
        registry.register_version(
            ctx, project="p", model="m", run_id=run.id, artifact_path="model.pkl", format="pickle"
        )
    with pytest.raises(NotFoundError):
        registry.get_model(ctx, project="p", model="m")  # nothing half-registered


def test_unknown_refs(ctx: Context) -> None:
    run_id, _ = _run_with_model(ctx)
    with pytest.raises(NotFoundError, match="artifact"):
        registry.register_version(
            ctx, project="p", model="m", run_id=run_id, artifact_path="nope.onnx"
        )
    registry.register_version(
        ctx, project="p", model="m", run_id=run_id, artifact_path="model.onnx"
    )
    for ref in ("7", "staging"):
        with pytest.raises(NotFoundError):
            registry.get_version(ctx, project="p", model="m", ref=ref)
    with pytest.raises(NotFoundError, match="model 'other'"):
        registry.get_version(ctx, project="p", model="other", ref="1")
