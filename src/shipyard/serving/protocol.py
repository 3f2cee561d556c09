"""Open Inference Protocol (v2) JSON payloads: decode and check a request, encode the outputs.

Requests are checked against the model's signature before they reach the batcher, so a bad
request is answered with a 400 naming the input and the reason (unknown or missing input, wrong
datatype, a shape that does not match the signature, data whose length does not match its shape,
non-numeric data) instead of an ONNX Runtime error, and never joins a batch. Tensor data may be
flat (row-major, as the protocol specifies) or nested lists of the declared shape.

:func:`parse_json` reads the raw body. It refuses JSON nested deeper than
:data:`MAX_JSON_DEPTH` arrays/objects *before* parsing (a body of 60 KB of ``[`` would otherwise
exhaust the recursion limit of the JSON decoder and of everything that walks the result).
Bodies are parsed with orjson; one that orjson refuses is read again with the standard
library's decoder, which also accepts ``NaN``/``Infinity`` and lone surrogates, and whose error
message is the one reported. orjson reads an integer beyond 64 bits as a float, so such a value
is refused as out of range for an integer input.

:func:`encode_response` writes the response body with orjson straight from the numpy outputs;
one holding NaN or infinity is written with the standard library (``NaN``, ``Infinity``), which
Python and most clients read back.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from shipyard.errors import InvalidInputError
from shipyard.serving.runtime import NUMPY_DTYPES, OIP_DATATYPES, TensorSpec

_OIP_BY_DTYPE: dict[np.dtype, str] = {dtype: name for name, dtype in NUMPY_DTYPES.items()}

# Arrays/objects nested inside each other. An OIP body needs 4 levels plus the rank of a nested
# tensor (numpy has at most 64 dimensions), so 64 leaves room and keeps every recursion shallow.
MAX_JSON_DEPTH = 64
# For the depth scan only brackets, quotes and what may follow a backslash in a JSON string
# matter; everything else (the digits of a tensor) is deleted first, in C.
_DEPTH_KEEP = b'[]{}"\\/bfnrtu'
_DEPTH_DROP = bytes(b for b in range(256) if b not in _DEPTH_KEEP)
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


@dataclass(frozen=True)
class InferenceRequest:
    """A checked request: arrays keyed by input name, and the outputs the caller asked for."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str]  # requested output names, in the model's order when none were named
    parameters: dict[str, Any] = field(default_factory=dict)


def parse_json(body: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse a request body; :class:`InvalidInputError` (``field="body"``) when it is not JSON
    or nests arrays/objects deeper than ``max_depth``. NaN and Infinity are accepted."""
    depth = json_depth(body, limit=max_depth)
    if depth > max_depth:
        raise InvalidInputError(
            f"the request body nests JSON arrays/objects {depth} levels deep; at most "
            f"{max_depth} are accepted (send tensor data flat, row-major, with its 'shape')",
            field="body",
        )
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass  # NaN, Infinity, a lone surrogate, or not JSON: let the standard decoder decide
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(
            f"the request body is not valid JSON: {exc}", field="body"
        ) from None
    except RecursionError:  # only for invalid JSON the scan misjudged; never a 500
        raise InvalidInputError(
            f"the request body nests JSON arrays/objects deeper than {max_depth} levels",
            field="body",
        ) from None


def json_depth(body: bytes, *, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep arrays/objects nest in ``body`` (brackets inside strings do not count).

    Any value up to ``limit`` may be returned for a body that nests no deeper than ``limit``
    (a body with at most ``limit`` opening brackets is not scanned at all). Linear time, in C
    and numpy: about 25 ms for a 26 MB tensor body.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return 0
    skeleton = _JSON_STRING.sub(b"", body.translate(None, _DEPTH_DROP))
    chars = np.frombuffer(skeleton, dtype=np.uint8)
    if chars.size == 0:
        return 0
    opens = (chars == ord("[")) | (chars == ord("{"))
    closes = (chars == ord("]")) | (chars == ord("}"))
    return int(np.cumsum(opens.astype(np.int64) - closes).max())


def decode_request(
    body: Any, *, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> InferenceRequest:
    """Check an OIP v2 inference request body against a signature and build numpy arrays.

    Raises :class:`InvalidInputError` whose message names the offending input or field.
    """
    if not isinstance(body, dict):
        raise InvalidInputError(
            "the request body must be a JSON object with an 'inputs' list", field="body"
        )
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInputError("'id' must be a string", field="id")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInputError("'parameters' must be a JSON object", field="parameters")

    raw_inputs = body.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInputError(
            "'inputs' must be a non-empty list of {name, shape, datatype, data} objects",
            field="inputs",
        )
    specs = {spec.name: spec for spec in inputs}
    arrays: dict[str, np.ndarray] = {}
    for index, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict):
            raise InvalidInputError(
                f"inputs[{index}] must be an object with name, shape, datatype and data",
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
        if name in arrays:
            raise InvalidInputError(f"input {name!r} is given twice", field=f"inputs.{name}")
        arrays[name] = _decode_tensor(raw, spec)
    missing = [name for name in specs if name not in arrays]
    if missing:
        raise InvalidInputError(
            f"input {missing[0]!r} is missing; the model needs inputs {list(specs)}",
            field=f"inputs.{missing[0]}",
        )
    return InferenceRequest(
        id=request_id,
        inputs=arrays,
        outputs=_requested_outputs(body.get("outputs"), outputs),
        parameters=parameters,
    )


def encode_output(name: str, array: np.ndarray, *, datatype: str | None = None) -> dict[str, Any]:
    """One OIP output tensor: name, shape, datatype and flat row-major data."""
    array = np.asarray(array)
    oip = _OIP_BY_DTYPE.get(array.dtype) or datatype or "BYTES"
    if array.dtype.kind in "OSU":
        data: list[Any] = [_text(value) for value in array.ravel().tolist()]
        oip = "BYTES"
    else:
        data = array.ravel().tolist()
    return {"name": name, "shape": list(array.shape), "datatype": oip, "data": data}


def encode_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: dict[str, np.ndarray],
    names: Sequence[str],
    datatypes: dict[str, str],
) -> bytes:
    """The OIP response body (JSON bytes) for the outputs ``names``, in that order."""
    tensors = []
    finite = True
    for name in names:
        array = np.asarray(outputs[name])
        if array.dtype.kind in "OSU":
            tensors.append(encode_output(name, array, datatype=datatypes.get(name)))
            continue
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            finite = False
        oip = _OIP_BY_DTYPE.get(array.dtype) or datatypes.get(name) or "BYTES"
        flat = np.ascontiguousarray(array).ravel()
        tensors.append({"name": name, "shape": list(array.shape), "datatype": oip, "data": flat})
    content = {
        "model_name": model_name,
        "model_version": model_version,
        "id": request_id,
        "outputs": tensors,
    }
    if finite:
        try:
            return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
        except orjson.JSONEncodeError:
            pass  # a dtype orjson cannot write: the standard library below
    for tensor in tensors:
        if isinstance(tensor["data"], np.ndarray):
            tensor["data"] = tensor["data"].tolist()
    return json.dumps(content, allow_nan=True, separators=(",", ":")).encode()


# --- helpers ------------------------------------------------------------------------------------


def _decode_tensor(raw: dict[str, Any], spec: TensorSpec) -> np.ndarray:
    name = spec.name
    where = f"inputs.{name}"
    params = raw.get("parameters")
    if isinstance(params, dict) and "binary_data_size" in params:
        raise InvalidInputError(
            f"input {name!r} uses the binary tensor data extension, which this server does not "
            "support; send the values as JSON in 'data'",
            field=f"{where}.parameters",
        )

    datatype = raw.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidInputError(
            f"input {name!r} has no 'datatype' (one of {', '.join(OIP_DATATYPES)})",
            field=f"{where}.datatype",
        )
    if datatype not in OIP_DATATYPES:
        raise InvalidInputError(
            f"input {name!r}: datatype {datatype!r} is not an Open Inference Protocol datatype "
            f"(one of {', '.join(OIP_DATATYPES)})",
            field=f"{where}.datatype",
        )
    if datatype != spec.datatype:
        raise InvalidInputError(
            f"input {name!r} has datatype {datatype} but the model expects {spec.datatype}",
            field=f"{where}.datatype",
        )
    if datatype not in NUMPY_DTYPES:
        raise InvalidInputError(
            f"input {name!r}: datatype {datatype} cannot be sent as JSON data",
            field=f"{where}.datatype",
        )

    shape = _shape(raw.get("shape"), name=name, where=where)
    _check_shape(shape, spec)

    if "data" not in raw:
        raise InvalidInputError(f"input {name!r} has no 'data'", field=f"{where}.data")
    data = raw["data"]
    expected = math.prod(shape)
    array = (
        _bytes_array(data, name=name, where=where)
        if datatype == "BYTES"
        else _numeric_array(data, datatype, name=name, where=where)
    )
    if array.size != expected:
        raise InvalidInputError(
            f"input {name!r}: data has {array.size} values but shape {list(shape)} needs "
            f"{expected}",
            field=f"{where}.data",
        )
    return array.reshape(shape)


def _shape(raw: Any, *, name: str, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in raw
    ):
        raise InvalidInputError(
            f"input {name!r}: 'shape' must be a list of non-negative integers, got {raw!r}",
            field=f"{where}.shape",
        )
    return tuple(raw)


def _check_shape(shape: tuple[int, ...], spec: TensorSpec) -> None:
    if spec.shape is None:
        return
    expected = list(spec.shape)
    if len(shape) != len(expected):
        raise InvalidInputError(
            f"input {spec.name!r} has shape {list(shape)} (rank {len(shape)}) but the model "
            f"expects rank {len(expected)}: {expected} (-1 = any size)",
            field=f"inputs.{spec.name}.shape",
        )
    for axis, (got, want) in enumerate(zip(shape, expected, strict=True)):
        if want != -1 and got != want:
            raise InvalidInputError(
                f"input {spec.name!r} has shape {list(shape)} but the model expects {expected}: "
                f"dimension {axis} is {got}, expected {want}",
                field=f"inputs.{spec.name}.shape",
            )


def _numeric_array(data: Any, datatype: str, *, name: str, where: str) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    try:
        array = np.asarray(data)
    except ValueError:
        raise InvalidInputError(
            f"input {name!r}: 'data' is ragged (nested lists of different lengths)",
            field=f"{where}.data",
        ) from None
    kind = array.dtype.kind
    dtype = NUMPY_DTYPES[datatype]
    if array.size == 0:
        return array.astype(dtype)
    if kind in "USO":
        raise InvalidInputError(
            f"input {name!r}: 'data' must contain only numbers for datatype {datatype}, but it "
            "holds strings, nulls, objects or integers too large for 64 bits",
            field=f"{where}.data",
        )
    if datatype == "BOOL":
        if kind != "b":
            raise InvalidInputError(
                f"input {name!r}: datatype BOOL needs true/false values", field=f"{where}.data"
            )
        return array
    if kind == "b":
        raise InvalidInputError(
            f"input {name!r}: datatype {datatype} needs numbers, not true/false",
            field=f"{where}.data",
        )
    if dtype.kind in "iu":
        fractional = kind == "f" and (
            not np.all(np.isfinite(array)) or not np.all(array == np.trunc(array))
        )
        if fractional:
            raise InvalidInputError(
                f"input {name!r}: datatype {datatype} needs integers, but 'data' holds "
                "fractional or non-finite numbers",
                field=f"{where}.data",
            )
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInputError(
                f"input {name!r}: a value is outside the range of {datatype} "
                f"[{info.min}, {info.max}]",
                field=f"{where}.data",
            )
    return array.astype(dtype)


def _bytes_array(data: Any, *, name: str, where: str) -> np.ndarray:
    flat: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str):
            flat.append(value)
        else:
            raise InvalidInputError(
                f"input {name!r}: datatype BYTES needs strings, got {type(value).__name__}",
                field=f"{where}.data",
            )

    walk(data)
    return np.array(flat, dtype=object)


def _requested_outputs(raw: Any, outputs: Sequence[TensorSpec]) -> list[str]:
    names = [spec.name for spec in outputs]
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
        if name not in requested:
            requested.append(name)
    return requested or names


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
