"""ONNX as a model format: its graph's signature in Open Inference Protocol (v2) terms.

The registry reads a version's signature from here when it is registered, and serving validates
requests against the same specs, so both agree on names, datatypes and shapes. Only the ``onnx``
protobuf reader is used: parsing a model never executes or unpickles anything.

A servable model is self-contained: no tensor may keep its data in an external file
(``data_location=EXTERNAL``), since ONNX Runtime would read that file from wherever the
replica runs. :func:`bundle_onnx_file` folds a local export's ``.onnx.data`` sidecar back into the
model (the SDK does this before storing it), and :func:`refuse_external_data` is the check the
registry and the runtime apply to the bytes they are given.

Datatypes use the OIP names (``FP32``, ``INT64``, ``BOOL``, ...), and a dynamic dimension (a
``dim_param`` or an unknown size) is ``-1`` in a shape. A tensor whose rank the graph does not
declare gets the shape ``[]`` in the signature and is not shape-checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shipyard.domain.models import ModelSignature, ModelSignatureTensor
from shipyard.errors import InvalidInputError

if TYPE_CHECKING:
    import onnx

# onnx is imported on first use (``_onnx``): it costs ~1-2 s, and every SDK process (each job
# that calls shipyard.init()) imports this module through the client, mostly never to parse a
# model. The TensorProto.DataType / DataLocation numbers below are onnx's stable wire values.
_FLOAT, _UINT8, _INT8, _UINT16, _INT16, _INT32, _INT64, _STRING, _BOOL = 1, 2, 3, 4, 5, 6, 7, 8, 9
_FLOAT16, _DOUBLE, _UINT32, _UINT64, _BFLOAT16 = 10, 11, 12, 13, 16
_LOCATION_DEFAULT, _LOCATION_EXTERNAL = 0, 1


def _onnx() -> Any:
    import onnx

    return onnx


# ONNX element type -> OIP v2 datatype.
_ONNX_TO_OIP: dict[int, str] = {
    _FLOAT: "FP32",
    _DOUBLE: "FP64",
    _FLOAT16: "FP16",
    _BFLOAT16: "BF16",
    _INT8: "INT8",
    _INT16: "INT16",
    _INT32: "INT32",
    _INT64: "INT64",
    _UINT8: "UINT8",
    _UINT16: "UINT16",
    _UINT32: "UINT32",
    _UINT64: "UINT64",
    _BOOL: "BOOL",
    _STRING: "BYTES",
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

# Protobuf cannot serialise a message of 2 GiB or more, so a self-contained model must be smaller.
MAX_MODEL_BYTES = 2**31 - 1

EXPORT_HINT = (
    "export it self-contained, e.g. torch.onnx.export(..., external_data=False), or re-save it "
    "with onnx.save(onnx.load(path), path, save_as_external_data=False)"
)


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


def external_tensors(model: onnx.ModelProto) -> list[tuple[str, onnx.TensorProto]]:
    """Every tensor that keeps its data outside the model, with where it sits in the model.

    Looks at initializers, sparse initializers and tensor attributes of every node, in the main
    graph, in subgraphs (``If``/``Loop``/``Scan`` bodies), in local functions and training info.
    """
    return [
        (where, tensor)
        for where, tensor in _all_tensors(model)
        if tensor.data_location == _LOCATION_EXTERNAL or len(tensor.external_data) > 0
    ]


def refuse_external_data(model: onnx.ModelProto, *, field: str = "model") -> None:
    """Raise InvalidInputError when any tensor of ``model`` refers to data in an external file.

    Such a reference names a file path that ONNX Runtime would open on the serving host, so it is
    never registered nor loaded, whatever the path says.
    """
    external = external_tensors(model)
    if not external:
        return
    where, tensor = external[0]
    location = _external_info(tensor).get("location", "")
    raise InvalidInputError(
        f"the model keeps tensor data outside the file ({len(external)} tensor(s), e.g. "
        f"{where} {tensor.name!r} at location {location!r}); shipyard only stores and serves "
        f"self-contained ONNX models: log it with run.log_model() (which bundles a sidecar next "
        f"to the file) or {EXPORT_HINT}",
        field=field,
    )


def bundle_onnx_file(path: str | Path, *, field: str = "local_path") -> bytes:
    """The bytes of a servable, self-contained ONNX model read from the file at ``path``.

    A tensor whose data sits in an external file (torch's default ``model.onnx.data`` sidecar) is
    read from that file, which must lie inside the model's own folder (no absolute path, no
    ``..``, no symlink out of it), and the model is re-serialised self-contained. A file without
    external data is returned unchanged. Raises InvalidInputError (``field``) when the file is
    not a servable ONNX model, when a location escapes the folder or is missing, or when the
    bundled model would reach protobuf's 2 GB limit.
    """
    model_path = Path(path)
    if not model_path.is_file():
        raise InvalidInputError(f"{model_path} is not a file", field=field)
    content = model_path.read_bytes()
    try:
        model = _parse(content)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{model_path.name}: {exc.message}", field=field) from None
    external = external_tensors(model)
    if external:
        folder = model_path.resolve().parent
        total = len(content)
        reads: list[tuple[onnx.TensorProto, Path, int, int]] = []
        for where, tensor in external:
            source, offset, length = _external_source(tensor, where, folder, field=field)
            total += length
            reads.append((tensor, source, offset, length))
        if total >= MAX_MODEL_BYTES:
            raise InvalidInputError(
                f"{model_path.name} with its external data is {total} bytes, over the 2 GB a "
                f"self-contained ONNX model can hold, so it cannot be bundled; shipyard serves "
                f"self-contained models only: make the model smaller (e.g. FP16 weights) and "
                f"{EXPORT_HINT}",
                field=field,
            )
        for tensor, source, offset, length in reads:
            with open(source, "rb") as fh:
                fh.seek(offset)
                data = fh.read(length)
            if len(data) != length:
                raise InvalidInputError(
                    f"external data of tensor {tensor.name!r} in {source.name} is shorter than "
                    f"its declared {length} bytes at offset {offset}; re-export the model",
                    field=field,
                )
            tensor.raw_data = data
            del tensor.external_data[:]
            tensor.data_location = _LOCATION_DEFAULT
        content = model.SerializeToString()
    refuse_external_data(model, field=field)
    try:
        signature_from_onnx(content)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{model_path.name}: {exc.message}", field=field) from None
    return content


def tensor_specs(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs (initializers excluded) and outputs."""
    return _specs(model)


def to_signature(spec: TensorSpec) -> ModelSignatureTensor:
    return _to_signature(spec)


# --- helpers ------------------------------------------------------------------------------------


def _parse(model_bytes: bytes) -> onnx.ModelProto:
    if not isinstance(model_bytes, bytes | bytearray | memoryview) or len(model_bytes) == 0:
        raise InvalidInputError("the model is empty: expected serialised ONNX bytes", field="model")
    from google.protobuf.message import DecodeError

    try:
        model = _onnx().load_model_from_string(bytes(model_bytes))
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
        name = (
            _onnx().TensorProto.DataType.Name(tensor.elem_type) if tensor.elem_type else "UNDEFINED"
        )
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


def _all_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    graphs: list[onnx.GraphProto] = [model.graph]
    nodes: list[onnx.NodeProto] = []
    attributes: list[onnx.AttributeProto] = []
    for function in model.functions:
        nodes.extend(function.node)
        attributes.extend(function.attribute_proto)
    for info in model.training_info:
        graphs.extend([info.initialization, info.algorithm])
    while graphs or nodes or attributes:
        if graphs:
            graph = graphs.pop()
            for tensor in graph.initializer:
                yield "initializer", tensor
            for sparse in graph.sparse_initializer:
                yield "sparse initializer", sparse.values
                yield "sparse initializer", sparse.indices
            nodes.extend(graph.node)
        elif nodes:
            attributes.extend(nodes.pop().attribute)
        else:
            attribute = attributes.pop()
            where = f"attribute {attribute.name!r} tensor"
            if attribute.HasField("t"):
                yield where, attribute.t
            for tensor in attribute.tensors:
                yield where, tensor
            sparses = list(attribute.sparse_tensors)
            if attribute.HasField("sparse_tensor"):
                sparses.append(attribute.sparse_tensor)
            for sparse in sparses:
                yield where, sparse.values
                yield where, sparse.indices
            if attribute.HasField("g"):
                graphs.append(attribute.g)
            graphs.extend(attribute.graphs)


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _external_source(
    tensor: onnx.TensorProto, where: str, folder: Path, *, field: str
) -> tuple[Path, int, int]:
    """The file, offset and length of an external tensor's data, confined to ``folder``."""
    info = _external_info(tensor)
    location = info.get("location", "")
    name = f"{where} {tensor.name!r}"
    if not location or "\x00" in location:
        raise InvalidInputError(
            f"{name} is marked external but names no data file; re-export the model",
            field=field,
        )
    relative = Path(location)
    if relative.is_absolute() or ".." in relative.parts:
        raise InvalidInputError(
            f"{name} points at {location!r}, outside the model's folder; external data must sit "
            f"in a file next to the model (a relative path without '..')",
            field=field,
        )
    source = (folder / relative).resolve()
    if not source.is_relative_to(folder):
        raise InvalidInputError(
            f"{name} points at {location!r}, which resolves outside the model's folder (a "
            "symbolic link?); external data must sit in a file next to the model",
            field=field,
        )
    if not source.is_file():
        raise InvalidInputError(
            f"{name} needs its data from {location!r} next to the model, and there is no such "
            "file; keep the sidecar beside the .onnx file, or " + EXPORT_HINT,
            field=field,
        )
    size = source.stat().st_size
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else size - offset
    except ValueError:
        raise InvalidInputError(
            f"{name} has a non-numeric offset or length for its external data; re-export the model",
            field=field,
        ) from None
    if offset < 0 or length < 0 or offset + length > size:
        raise InvalidInputError(
            f"{name} wants bytes {offset}..{offset + length} of {location!r}, which has "
            f"{size}; the sidecar does not belong to this model: re-export it",
            field=field,
        )
    return source, offset, length


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
