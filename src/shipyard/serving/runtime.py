"""ONNX models as servable objects: a signature read from the graph and a thread-safe ``predict``.

Models are loaded from bytes that the blob store has already verified against their BLAKE3
digest, straight into ONNX Runtime; nothing is ever unpickled. ONNX Runtime releases the GIL
while it runs, so ``predict`` is meant to be called from worker threads (see ``batcher``).

Datatypes use the Open Inference Protocol (v2) names (``FP32``, ``INT64``, ``BOOL``, ...), and a
dynamic dimension (a ``dim_param`` or an unknown size) is ``-1`` in a shape. A tensor whose rank
the graph does not declare gets the shape ``[]`` in the signature and is not shape-checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import TensorProto
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as _OrtInvalidArgument

from shipyard.blobs.store import BlobStore
from shipyard.domain.models import ModelSignature, ModelSignatureTensor
from shipyard.errors import InvalidInputError, ShipyardError

PLATFORM = "onnxruntime_onnx"

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


class OnnxModel:
    """A loaded ONNX model. Build it with :func:`load_model`; ``predict`` is thread-safe."""

    def __init__(
        self,
        session: ort.InferenceSession,
        *,
        signature: ModelSignature,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
    ) -> None:
        self.session = session
        self.signature = signature
        self.inputs = inputs
        self.outputs = outputs
        self.input_names = [t.name for t in inputs]
        self.output_names = [t.name for t in outputs]

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    @property
    def batchable(self) -> bool:
        """Whether requests can be concatenated along axis 0: every input has a dynamic dim 0."""
        return all(
            t.shape is not None and len(t.shape) >= 1 and t.shape[0] == -1 for t in self.inputs
        )

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on numpy arrays keyed by input name; returns every output by name.

        Raises InvalidInputError when ONNX Runtime rejects the inputs, ShipyardError otherwise.
        """
        try:
            results = self.session.run(self.output_names, dict(inputs))
        except _OrtInvalidArgument as exc:
            raise InvalidInputError(
                f"the model rejected the inputs: {_first_line(exc)}", field="inputs"
            ) from None
        except Exception as exc:  # ORT's pybind exceptions share no useful base class
            raise ShipyardError(f"inference failed: {_first_line(exc)}") from None
        return {
            name: np.asarray(value) for name, value in zip(self.output_names, results, strict=True)
        }


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


def load_model(
    model_bytes: bytes,
    *,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
) -> OnnxModel:
    """An :class:`OnnxModel` from serialised ONNX bytes (CUDA first when available, then CPU)."""
    inputs, outputs = _specs(_parse(model_bytes))
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; ORT's warnings would drown the replica log
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    try:
        session = ort.InferenceSession(
            model_bytes, sess_options=options, providers=list(providers or default_providers())
        )
    except Exception as exc:  # ORT raises its own pybind exception types
        raise InvalidInputError(
            f"ONNX Runtime cannot load the model: {_first_line(exc)}", field="model"
        ) from None
    session_inputs = [i.name for i in session.get_inputs()]
    if sorted(session_inputs) != sorted(t.name for t in inputs):
        # The graph declares initializers as inputs in a way ORT treats differently; trust ORT.
        by_name = {t.name: t for t in inputs}
        inputs = [by_name[name] for name in session_inputs if name in by_name]
    signature = ModelSignature(
        inputs=[_to_signature(t) for t in inputs], outputs=[_to_signature(t) for t in outputs]
    )
    return OnnxModel(session, signature=signature, inputs=inputs, outputs=outputs)


def load_model_from_blobs(
    blobs: BlobStore,
    digest: str,
    *,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
) -> OnnxModel:
    """Load the model stored under ``digest``; the blob store verifies its hash first.

    Raises NotFoundError (no such blob), IntegrityError (content does not match its hash) or
    InvalidInputError (not a loadable ONNX model).
    """
    return load_model(
        blobs.get_bytes(digest), providers=providers, intra_op_threads=intra_op_threads
    )


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    chosen = [p for p in ("CUDAExecutionProvider",) if p in available]
    return [*chosen, "CPUExecutionProvider"]


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
