"""The Open Inference Protocol's binary tensor data extension (what ``tritonclient.http`` sends).

A request with binary tensors is a JSON header of ``Inference-Header-Content-Length`` bytes, then
the raw bytes of every input whose ``parameters.binary_data_size`` is set, in the order of the
header's ``inputs``. Raw bytes are the tensor's elements in row-major order, little-endian; a
BYTES tensor is its elements one after another, each a 4-byte little-endian length and then that
many bytes (decoded as UTF-8 into ``str``: ONNX Runtime's string tensors take text, and would
turn ``bytes`` into their ``repr``). The same raw form carries the gRPC service's
``raw_input_contents`` and ``raw_output_contents``, so :func:`tensor_from_bytes` and
:func:`tensor_to_bytes` serve both.

A response carries an output in binary when the request asks for it: the output's own
``parameters.binary_data`` (``true``/``false``), or else the request's
``parameters.binary_data_output``. :func:`encode_response` then returns the JSON header followed
by the outputs' bytes, and the header's length for the ``Inference-Header-Content-Length``
response header.

Everything here is checked before it reaches the model: the header length against the body,
every ``binary_data_size`` against the bytes left, the bytes against the shape and datatype, the
shape and datatype against the model's signature. Each error is an :class:`InvalidInputError`
naming the tensor and the mismatch (the replica answers it with 400, the gRPC service with
``INVALID_ARGUMENT``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from shipyard.errors import InvalidInputError, ShipyardError
from shipyard.serving.runtime import NUMPY_DTYPES, OIP_DATATYPES, TensorSpec

HEADER_LENGTH = "Inference-Header-Content-Length"
CONTENT_TYPE = "application/octet-stream"

_OIP_BY_DTYPE: dict[np.dtype, str] = {
    dtype: name for name, dtype in NUMPY_DTYPES.items() if name != "BYTES"
}
_LENGTH = struct.Struct("<I")

__all__ = [
    "CONTENT_TYPE",
    "HEADER_LENGTH",
    "BinaryRequest",
    "binary_outputs",
    "check_datatype",
    "check_shape",
    "datatype_of",
    "decode_request",
    "encode_response",
    "parse_header_length",
    "tensor_from_bytes",
    "tensor_to_bytes",
]


@dataclass(frozen=True)
class BinaryRequest:
    """A checked request: arrays by input name, the outputs asked for (in order) and which of
    them go back as binary."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str]
    binary_outputs: frozenset[str]
    parameters: dict[str, Any] = field(default_factory=dict)


def parse_header_length(value: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header as a number; None when it is absent."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit():
        raise InvalidInputError(
            f"the {HEADER_LENGTH} header must be a non-negative whole number of bytes, "
            f"got {value!r}",
            field=HEADER_LENGTH,
        )
    return int(text)


def decode_request(
    body: bytes,
    *,
    header_length: int | None,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
) -> BinaryRequest:
    """Decode and check a request that may carry binary tensors.

    ``header_length`` is the parsed ``Inference-Header-Content-Length`` (None: the whole body is
    the JSON header, and no input may declare ``binary_data_size``). Inputs given as JSON
    ``data`` are accepted next to binary ones. Raises :class:`InvalidInputError` naming the
    tensor or field at fault.
    """
    view = memoryview(body)
    if header_length is None:
        header_length = len(body)
    elif header_length > len(body):
        raise InvalidInputError(
            f"the {HEADER_LENGTH} header says the JSON header has {header_length} bytes, but "
            f"the whole body has only {len(body)}",
            field=HEADER_LENGTH,
        )
    header = _parse_header(view[:header_length])
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInputError(
            "'inputs' must be a non-empty list of {name, shape, datatype} objects",
            field="inputs",
        )
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInputError("'id' must be a string", field="id")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInputError("'parameters' must be a JSON object", field="parameters")

    specs = {spec.name: spec for spec in inputs}
    arrays: dict[str, np.ndarray] = {}
    offset = header_length
    for index, raw in enumerate(raw_inputs):
        spec, datatype, shape = _tensor_header(raw, index, specs)
        if spec.name in arrays:
            raise InvalidInputError(
                f"input {spec.name!r} is given twice", field=f"inputs.{spec.name}"
            )
        size = _binary_size(raw, spec.name)
        if size is None:
            arrays[spec.name] = _json_tensor(raw, spec, datatype, shape)
            continue
        if offset + size > len(body):
            raise InvalidInputError(
                f"input {spec.name!r} declares binary_data_size {size}, but only "
                f"{len(body) - offset} bytes of the body are left after the header and the "
                "inputs before it",
                field=f"inputs.{spec.name}.parameters.binary_data_size",
            )
        arrays[spec.name] = tensor_from_bytes(
            view[offset : offset + size], name=spec.name, datatype=datatype, shape=shape
        )
        offset += size
    if offset != len(body):
        raise InvalidInputError(
            f"the body has {len(body) - offset} bytes after the last binary input; the "
            f"{HEADER_LENGTH} header and the inputs' binary_data_size must add up to the body",
            field="body",
        )
    missing = [name for name in specs if name not in arrays]
    if missing:
        raise InvalidInputError(
            f"input {missing[0]!r} is missing; the model needs inputs {list(specs)}",
            field=f"inputs.{missing[0]}",
        )
    names = [spec.name for spec in outputs]
    requested = _requested_outputs(header.get("outputs"), names)
    return BinaryRequest(
        id=request_id,
        inputs=arrays,
        outputs=requested,
        binary_outputs=binary_outputs(header, requested),
        parameters=parameters,
    )


def binary_outputs(header: Mapping[str, Any], names: Sequence[str]) -> frozenset[str]:
    """Which of the outputs ``names`` the request (its JSON header, parsed) wants in binary.

    An output's own ``parameters.binary_data`` decides; without it the request's
    ``parameters.binary_data_output`` does (default: JSON). Works on plain JSON requests too.
    """
    parameters = header.get("parameters")
    default = isinstance(parameters, dict) and parameters.get("binary_data_output") is True
    chosen = {name: default for name in names}
    raw_outputs = header.get("outputs")
    if isinstance(raw_outputs, list):
        for item in raw_outputs:
            if not isinstance(item, dict) or item.get("name") not in chosen:
                continue
            own = item.get("parameters")
            if isinstance(own, dict) and isinstance(own.get("binary_data"), bool):
                chosen[item["name"]] = own["binary_data"]
    return frozenset(name for name, binary in chosen.items() if binary)


def encode_response(
    outputs: Mapping[str, np.ndarray],
    *,
    model_name: str,
    model_version: str,
    request_id: str | None = None,
    binary: Collection[str] = (),
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """The response body for ``outputs`` (in their order), and the JSON header's length.

    Outputs named in ``binary`` go as raw bytes after the header; the rest as JSON ``data``. The
    length is None when nothing is binary: the body is then plain JSON, sent without the
    ``Inference-Header-Content-Length`` header (and as ``application/json``).
    """
    described: list[dict[str, Any]] = []
    chunks: list[bytes | memoryview] = []
    for name, value in outputs.items():
        array = np.asarray(value)
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array),
            "shape": list(array.shape),
        }
        if name in binary:
            raw = _raw_view(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_data(array)
        described.append(entry)
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id:
        header["id"] = request_id
    if parameters:
        header["parameters"] = dict(parameters)
    header["outputs"] = described
    text = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return text, None
    return b"".join([text, *chunks]), len(text)


def tensor_from_bytes(
    data: bytes | memoryview, *, name: str, datatype: str, shape: Sequence[int]
) -> np.ndarray:
    """An array of ``shape`` from its raw bytes; InvalidInputError when the size is wrong."""
    elements = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_tensor(memoryview(data), name=name, elements=elements).reshape(shape)
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInputError(
            f"input {name!r}: datatype {datatype} is not supported by this server "
            f"(supported: {', '.join(NUMPY_DTYPES)})",
            field=f"inputs.{name}.datatype",
        )
    expected = elements * dtype.itemsize
    if len(data) != expected:
        raise InvalidInputError(
            f"input {name!r} has {len(data)} bytes of binary data, but shape {list(shape)} of "
            f"{datatype} needs {expected} ({elements} elements of {dtype.itemsize} bytes)",
            field=f"inputs.{name}.parameters.binary_data_size",
        )
    if datatype == "BOOL":
        flags: np.ndarray = np.frombuffer(data, dtype=np.uint8) != 0
        return flags.reshape(shape)
    array = np.frombuffer(data, dtype=dtype.newbyteorder("<"))
    if not array.dtype.isnative or not array.flags.aligned:
        array = array.astype(dtype)  # a big-endian host, or bytes at an odd offset in the body
    return array.reshape(shape)


def tensor_to_bytes(array: np.ndarray) -> bytes:
    """The raw (binary extension / gRPC ``raw_*_contents``) form of ``array``."""
    return bytes(_raw_view(np.asarray(array)))


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype of an array; text and object arrays are BYTES."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    try:
        return _OIP_BY_DTYPE[array.dtype]
    except KeyError:
        raise ShipyardError(
            f"the model produced an array of dtype {array.dtype}, which has no Open Inference "
            "Protocol datatype"
        ) from None


def check_datatype(datatype: Any, spec: TensorSpec) -> str:
    """``datatype`` if it is the OIP datatype the model expects for ``spec``."""
    name = spec.name
    if not isinstance(datatype, str) or not datatype:
        raise InvalidInputError(
            f"input {name!r} has no 'datatype' (one of {', '.join(OIP_DATATYPES)})",
            field=f"inputs.{name}.datatype",
        )
    if datatype not in OIP_DATATYPES:
        raise InvalidInputError(
            f"input {name!r}: datatype {datatype!r} is not an Open Inference Protocol datatype "
            f"(one of {', '.join(OIP_DATATYPES)})",
            field=f"inputs.{name}.datatype",
        )
    if datatype != spec.datatype:
        raise InvalidInputError(
            f"input {name!r} has datatype {datatype} but the model expects {spec.datatype}",
            field=f"inputs.{name}.datatype",
        )
    return datatype


def check_shape(shape: Any, spec: TensorSpec) -> tuple[int, ...]:
    """``shape`` as a tuple if it is a list of non-negative integers that fits ``spec`` (where
    ``-1`` in the signature takes any size)."""
    name = spec.name
    where = f"inputs.{name}.shape"
    if not isinstance(shape, list | tuple) or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape
    ):
        raise InvalidInputError(
            f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}",
            field=where,
        )
    got = tuple(shape)
    if spec.shape is None:
        return got
    expected = list(spec.shape)
    if len(got) != len(expected):
        raise InvalidInputError(
            f"input {name!r} has shape {list(got)} (rank {len(got)}) but the model expects "
            f"rank {len(expected)}: {expected} (-1 = any size)",
            field=where,
        )
    for axis, (size, want) in enumerate(zip(got, expected, strict=True)):
        if want != -1 and size != want:
            raise InvalidInputError(
                f"input {name!r} has shape {list(got)} but the model expects {expected}: "
                f"dimension {axis} is {size}, expected {want}",
                field=where,
            )
    return got


# --- helpers ------------------------------------------------------------------------------------


def _parse_header(raw: memoryview) -> dict[str, Any]:
    try:
        header = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInputError(
            f"the JSON header (the first {len(raw)} bytes of the body, as "
            f"{HEADER_LENGTH} says) is not valid JSON: {exc}",
            field="body",
        ) from None
    if not isinstance(header, dict):
        raise InvalidInputError(
            "the JSON header must be an object with an 'inputs' list", field="body"
        )
    return header


def _tensor_header(
    raw: Any, index: int, specs: Mapping[str, TensorSpec]
) -> tuple[TensorSpec, str, tuple[int, ...]]:
    if not isinstance(raw, dict):
        raise InvalidInputError(
            f"inputs[{index}] must be an object with name, shape and datatype",
            field=f"inputs[{index}]",
        )
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInputError(
            f"inputs[{index}] has no 'name' (a string)", field=f"inputs[{index}].name"
        )
    spec = specs.get(name)
    if spec is None:
        raise InvalidInputError(
            f"unknown input {name!r}; the model's inputs are {sorted(specs)}",
            field=f"inputs.{name}",
        )
    params = raw.get("parameters")
    if isinstance(params, dict) and "shared_memory_region" in params:
        raise InvalidInputError(
            f"input {name!r} refers to a shared memory region, which this server does not "
            "support; send the tensor as binary data or JSON",
            field=f"inputs.{name}.parameters.shared_memory_region",
        )
    datatype = check_datatype(raw.get("datatype"), spec)
    return spec, datatype, check_shape(raw.get("shape"), spec)


def _binary_size(raw: dict[str, Any], name: str) -> int | None:
    params = raw.get("parameters")
    if params is None:
        return None
    if not isinstance(params, dict):
        raise InvalidInputError(
            f"input {name!r}: 'parameters' must be a JSON object", field=f"inputs.{name}"
        )
    if "binary_data_size" not in params:
        return None
    size = params["binary_data_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidInputError(
            f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}",
            field=f"inputs.{name}.parameters.binary_data_size",
        )
    if "data" in raw:
        raise InvalidInputError(
            f"input {name!r} has both binary_data_size and JSON 'data'; send one of them",
            field=f"inputs.{name}.data",
        )
    return size


def _bytes_tensor(data: memoryview, *, name: str, elements: int) -> np.ndarray:
    values: list[str] = []
    offset, end = 0, len(data)
    for index in range(elements):
        if offset + 4 > end:
            raise InvalidInputError(
                f"input {name!r}: BYTES data ends before element {index} of {elements} (each "
                "element is a 4-byte little-endian length, then that many bytes)",
                field=f"inputs.{name}.parameters.binary_data_size",
            )
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInputError(
                f"input {name!r}: BYTES element {index} declares {length} bytes but only "
                f"{end - offset} are left",
                field=f"inputs.{name}.parameters.binary_data_size",
            )
        try:
            values.append(str(data[offset : offset + length], "utf-8"))
        except UnicodeDecodeError:
            raise InvalidInputError(
                f"input {name!r}: BYTES element {index} is not valid UTF-8 (ONNX Runtime's "
                "string tensors hold text)",
                field=f"inputs.{name}",
            ) from None
        offset += length
    if offset != end:
        raise InvalidInputError(
            f"input {name!r}: {end - offset} bytes are left after its {elements} BYTES elements; "
            "the shape and the data do not match",
            field=f"inputs.{name}.parameters.binary_data_size",
        )
    array = np.empty(elements, dtype=object)
    array[:] = values
    return array


def _json_tensor(
    raw: dict[str, Any], spec: TensorSpec, datatype: str, shape: tuple[int, ...]
) -> np.ndarray:
    """An input sent as JSON ``data`` inside a binary request (tritonclient's
    ``binary_data=False``)."""
    name = spec.name
    where = f"inputs.{name}.data"
    if "data" not in raw:
        raise InvalidInputError(
            f"input {name!r} has neither 'data' nor parameters.binary_data_size", field=where
        )
    flat = _flatten(raw["data"])
    expected = math.prod(shape)
    if len(flat) != expected:
        raise InvalidInputError(
            f"input {name!r}: data has {len(flat)} values but shape {list(shape)} needs {expected}",
            field=where,
        )
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise InvalidInputError(f"input {name!r}: BYTES data must be strings", field=where)
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
        return array.reshape(shape)
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInputError(
            f"input {name!r}: datatype {datatype} must be sent as binary data", field=where
        )
    want_bool = datatype == "BOOL"
    if any(isinstance(v, bool) != want_bool or not isinstance(v, int | float) for v in flat):
        kind = "true/false values" if want_bool else "numbers"
        raise InvalidInputError(f"input {name!r}: datatype {datatype} needs {kind}", field=where)
    if dtype.kind in "iu" and any(isinstance(v, float) and not v.is_integer() for v in flat):
        raise InvalidInputError(f"input {name!r}: datatype {datatype} needs integers", field=where)
    try:
        return np.array(flat, dtype=dtype).reshape(shape)
    except OverflowError:
        raise InvalidInputError(
            f"input {name!r}: a value is outside the range of {datatype}", field=where
        ) from None


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _requested_outputs(raw: Any, names: list[str]) -> list[str]:
    if raw is None:
        return names
    if not isinstance(raw, list):
        raise InvalidInputError("'outputs' must be a list of {name} objects", field="outputs")
    requested: list[str] = []
    for index, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            raise InvalidInputError(
                f"outputs[{index}] must be an object with a 'name'", field=f"outputs[{index}]"
            )
        if name not in names:
            raise InvalidInputError(
                f"unknown output {name!r}; the model's outputs are {names}",
                field=f"outputs.{name}",
            )
        params = item.get("parameters")
        if isinstance(params, dict) and params.get("classification"):
            raise InvalidInputError(
                f"output {name!r} asks for the classification extension, which this server "
                "does not support; request the raw output",
                field=f"outputs.{name}.parameters.classification",
            )
        if name not in requested:
            requested.append(name)
    return requested or names


def _raw_view(array: np.ndarray) -> bytes | memoryview:
    if array.dtype.kind in "OSU":
        parts: list[bytes] = []
        for value in array.ravel().tolist():
            data = value if isinstance(value, bytes) else str(value).encode()
            parts.append(_LENGTH.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    datatype_of(array)  # refuses dtypes the protocol cannot name
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return little.reshape(-1).view(np.uint8).data


def _json_data(array: np.ndarray) -> list[Any]:
    if array.dtype.kind in "OSU":
        return [
            v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
            for v in array.ravel().tolist()
        ]
    datatype_of(array)
    return list(array.ravel().tolist())
