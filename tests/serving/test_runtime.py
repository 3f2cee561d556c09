from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shipyard.blobs.store import BlobStore
from shipyard.context import Context
from shipyard.domain.models import ModelSignatureTensor
from shipyard.errors import IntegrityError, InvalidInputError, NotFoundError
from shipyard.serving.runtime import (
    PLATFORM,
    load_model,
    load_model_from_blobs,
    signature_from_onnx,
)
from tests.onnx_models import (
    linear_model,
    sequence_output_model,
    two_input_model,
    typed_model,
)


def test_signature_of_a_linear_model_has_dynamic_batch() -> None:
    signature = signature_from_onnx(linear_model().data)
    assert signature.inputs == [ModelSignatureTensor(name="x", datatype="FP32", shape=[-1, 64])]
    assert signature.outputs == [ModelSignatureTensor(name="y", datatype="FP32", shape=[-1, 10])]


def test_signature_maps_onnx_types_to_oip_datatypes() -> None:
    signature = signature_from_onnx(typed_model())
    assert [(t.name, t.datatype, t.shape) for t in signature.inputs] == [
        ("ids", "INT64", [-1, 3]),
        ("mask", "BOOL", [-1, 3]),
        ("ids32", "INT32", [-1]),
    ]
    assert [t.datatype for t in signature.outputs] == ["INT64", "BOOL", "INT32"]
    assert signature_from_onnx(two_input_model()).inputs[0].datatype == "FP64"


def test_fixed_dimensions_are_kept_and_initializers_are_not_inputs() -> None:
    signature = signature_from_onnx(linear_model(batch=1, features=8).data)
    assert [t.name for t in signature.inputs] == ["x"]  # W and b are initializers
    assert signature.inputs[0].shape == [1, 8]


@pytest.mark.parametrize(
    ("data", "phrase"),
    [
        (b"", "empty"),
        (b"\x00\x01 definitely not a protobuf \xff\xfe", "not a valid ONNX"),
        (b"\x08\x07", "no IR version or no graph outputs"),  # a valid but empty ModelProto
    ],
)
def test_signature_of_non_onnx_bytes_is_a_clear_error(data: bytes, phrase: str) -> None:
    with pytest.raises(InvalidInputError, match=phrase) as info:
        signature_from_onnx(data)
    assert info.value.field == "model"


def test_non_tensor_outputs_are_refused_with_a_hint() -> None:
    with pytest.raises(InvalidInputError, match="'seq' is a sequence_type, not a tensor") as info:
        signature_from_onnx(sequence_output_model())
    assert "zipmap" in info.value.message


def test_predict_matches_numpy_and_is_batchable() -> None:
    model = linear_model()
    loaded = load_model(model.data)
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    out = loaded.predict({"x": x})
    np.testing.assert_allclose(out["y"], x @ model.weights + model.bias, rtol=1e-5, atol=1e-5)
    assert loaded.batchable
    assert "CPUExecutionProvider" in loaded.providers
    assert PLATFORM == "onnxruntime_onnx"
    assert not load_model(linear_model(batch=1).data).batchable


def test_predict_with_a_bad_shape_raises_invalid_input() -> None:
    loaded = load_model(linear_model().data)
    with pytest.raises(InvalidInputError, match="the model rejected the inputs"):
        loaded.predict({"x": np.zeros((2, 63), dtype=np.float32)})


def test_load_from_blobs_verifies_the_hash(ctx: Context) -> None:
    model = linear_model()
    digest = ctx.blobs.put_bytes(model.data).digest
    assert load_model_from_blobs(BlobStore(ctx.blobs.url), digest).input_names == ["x"]

    path = Path(ctx.blobs.root) / digest[:2] / digest[2:4] / digest
    path.write_bytes(model.data[:-1] + b"\x00")
    with pytest.raises(IntegrityError, match="corrupted"):
        load_model_from_blobs(ctx.blobs, digest)

    missing = "0" * 64
    with pytest.raises(NotFoundError, match="not in the store"):
        load_model_from_blobs(ctx.blobs, missing)


def test_a_blob_that_is_not_onnx_is_refused(ctx: Context) -> None:
    digest = ctx.blobs.put_bytes(b"import os; os.system('echo pwned')").digest
    with pytest.raises(InvalidInputError) as info:
        load_model_from_blobs(ctx.blobs, digest)
    assert info.value.field == "model"


def test_warm_up_runs_the_model_once_on_zeros() -> None:
    model = load_model(linear_model(features=5, classes=2).data)
    assert model.warm_up() is True
    fixed = load_model(linear_model(features=5, classes=2, batch=3).data)
    assert fixed.warm_up() is True  # a fixed batch dim is used as is
