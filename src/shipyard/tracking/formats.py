"""ONNX as a model format: its graph's signature in Open Inference Protocol (v2) terms.

The registry reads a version's signature from here when it is registered, and serving validates
requests against the same specs, so both agree on names, datatypes and shapes. Only the ``onnx``
protobuf reader is used: parsing a model never executes or unpickles anything.

Datatypes use the OIP names (``FP32``, ``INT64``, ``BOOL``, ...), and a dynamic dimension (a
``dim_param`` or an unknown size) is ``-1`` in a shape. A tensor whose rank the graph does not
declare gets the shape ``[]`` in the signature and is not shape-checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from shipyard.domain.models import ModelSignature, ModelSignatureTensor
from shipyard.errors import InvalidInputError

# ONNX element type -> OIP v2 datatype.
_ONNX_TO_OIP: dict[int, str] = {
    TensorProto.FLOAT: "FP32",
    TensorProto.DOUBLE: "FP64",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
    TensorProto.BOOL: "BOOL",
    TensorProto.STRING: "BYTES",
}

# OIP v2 datatype -> numpy dtype, for the datatypes that can travel as JSON and feed ONNX Runtime.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "FP16": np.dtype(np.float16),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
    "BYTES": np.dtype(object),
}

OIP_DATATYPES: tuple[str, ...] = (*NUMPY_DTYPES, "BF16")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as the runtime checks it; ``shape`` is None when the rank is unknown."""

    name: str
    datatype: str
    shape: tuple[int, ...] | None

    @property
    def dtype(self) -> np.dtype:
        return NUMPY_DTYPES[self.datatype]


def signature_from_onnx(model_bytes: bytes) -> ModelSignature:
    """The OIP signature (names, datatypes, shapes with -1 for dynamic dims) of a serialised model.

    Raises :class:`InvalidInputError` (field ``model``) when the bytes are not an ONNX model, or
    when an input or output is not a tensor (e.g. a scikit-learn ZipMap output), since such a
    model cannot be served over the Open Inference Protocol.
    """
    inputs, outputs = _specs(_parse(model_bytes))
    return ModelSignature(
        inputs=[_to_signature(t) for t in inputs], outputs=[_to_signature(t) for t in outputs]
    )


def parse_onnx(model_bytes: bytes) -> onnx.ModelProto:
    """The model's protobuf, or InvalidInputError (field ``model``) naming why it is not ONNX."""
    return _parse(model_bytes)


def tensor_specs(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs (initializers excluded) and outputs."""
    return _specs(model)


def to_signature(spec: TensorSpec) -> ModelSignatureTensor:
    return _to_signature(spec)


# --- helpers ------------------------------------------------------------------------------------


def _parse(model_bytes: bytes) -> onnx.ModelProto:
    if not isinstance(model_bytes, bytes | bytearray | memoryview) or len(model_bytes) == 0:
        raise InvalidInputError("the model is empty: expected serialised ONNX bytes", field="model")
    try:
        model = onnx.load_model_from_string(bytes(model_bytes))
    except (DecodeError, ValueError) as exc:
        raise InvalidInputError(
            f"the model is not a valid ONNX file ({_first_line(exc)})", field="model"
        ) from None
    if model.ir_version <= 0 or not model.graph.output:
        raise InvalidInputError(
            "the model is not a valid ONNX file: it has no IR version or no graph outputs",
            field="model",
        )
    return model


def _specs(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    initializers = {init.name for init in model.graph.initializer}
    inputs = [_spec(v, "input") for v in model.graph.input if v.name not in initializers]
    outputs = [_spec(v, "output") for v in model.graph.output]
    return inputs, outputs


def _spec(value: onnx.ValueInfoProto, kind: str) -> TensorSpec:
    if not value.type.HasField("tensor_type"):
        which = value.type.WhichOneof("value")
        raise InvalidInputError(
            f"model {kind} {value.name!r} is a {which}, not a tensor, so it cannot be served over "
            "the Open Inference Protocol; export the model with tensor outputs only "
            "(for skl2onnx classifiers: options={'zipmap': False})",
            field="model",
        )
    tensor = value.type.tensor_type
    datatype = _ONNX_TO_OIP.get(tensor.elem_type)
    if datatype is None:
        name = TensorProto.DataType.Name(tensor.elem_type) if tensor.elem_type else "UNDEFINED"
        raise InvalidInputError(
            f"model {kind} {value.name!r} has element type {name}, which the Open Inference "
            "Protocol cannot carry",
            field="model",
        )
    shape: tuple[int, ...] | None = None
    if tensor.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
            for d in tensor.shape.dim
        )
    return TensorSpec(name=value.name, datatype=datatype, shape=shape)


def _to_signature(spec: TensorSpec) -> ModelSignatureTensor:
    return ModelSignatureTensor(
        name=spec.name,
        datatype=spec.datatype,
        shape=list(spec.shape) if spec.shape is not None else [],
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
