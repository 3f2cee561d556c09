"""ONNX models as servable objects: a signature read from the graph and a thread-safe ``predict``.

Models are loaded from bytes that the blob store has already verified against their BLAKE3
digest, straight into ONNX Runtime; nothing is ever unpickled. A model whose tensors refer to
external data files is refused before ONNX Runtime sees it, whatever the registry let through:
such a reference is a path ONNX Runtime would open on this host (relative ones from the
process's working directory). ONNX Runtime releases the GIL
while it runs, so ``predict`` is meant to be called from worker threads (see ``batcher``).

Datatypes use the Open Inference Protocol (v2) names (``FP32``, ``INT64``, ``BOOL``, ...), and a
dynamic dimension (a ``dim_param`` or an unknown size) is ``-1`` in a shape. A tensor whose rank
the graph does not declare gets the shape ``[]`` in the signature and is not shape-checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as _OrtInvalidArgument

from shipyard.blobs.store import BlobStore
from shipyard.domain.models import ModelSignature
from shipyard.errors import InvalidInputError, ShipyardError
from shipyard.tracking.formats import (
    NUMPY_DTYPES,
    OIP_DATATYPES,
    TensorSpec,
    parse_onnx,
    refuse_external_data,
    signature_from_onnx,
    tensor_specs,
    to_signature,
)

PLATFORM = "onnxruntime_onnx"

__all__ = [
    "NUMPY_DTYPES",
    "OIP_DATATYPES",
    "PLATFORM",
    "OnnxModel",
    "TensorSpec",
    "default_providers",
    "load_model",
    "load_model_from_blobs",
    "signature_from_onnx",
]


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

    def warm_up(self) -> bool:
        """Run the model once on zeros (batch 1) so the first real request does not pay for ONNX
        Runtime's lazy initialisation; returns False when an input's shape is not fully known."""
        feeds: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            if spec.shape is None or spec.datatype == "BYTES":
                return False
            shape = tuple(1 if dim < 0 else dim for dim in spec.shape)
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        try:
            self.predict(feeds)
        except ShipyardError:
            return False  # the graph wants values zeros cannot give; serving is unaffected
        return True

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


def load_model(
    model_bytes: bytes,
    *,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
) -> OnnxModel:
    """An :class:`OnnxModel` from serialised ONNX bytes (CUDA first when available, then CPU).

    Raises InvalidInputError (field ``model``) when the bytes are not ONNX, when any tensor keeps
    its data in an external file, or when ONNX Runtime cannot load the model.
    """
    model = parse_onnx(model_bytes)
    refuse_external_data(model, field="model")  # before ORT could open a path the model names
    inputs, outputs = tensor_specs(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; ORT's warnings would drown the replica log
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    # ORT's pool threads spin between calls by default: on a small machine they burn the CPU the
    # replica needs for HTTP and JSON (measured: ~660 us of CPU for a batch-8 call, ~70 without).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
        inputs=[to_signature(t) for t in inputs], outputs=[to_signature(t) for t in outputs]
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
