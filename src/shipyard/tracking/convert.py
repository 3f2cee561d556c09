"""Models shipyard turns into ONNX itself, each checked against its source before it is stored.

``run.log_model(obj, name=..., example=...)`` accepts, besides an ONNX file:

- a fitted scikit-learn estimator or Pipeline: converted with skl2onnx, the input type inferred
  from ``example`` (float32 stays float32, float64 stays float64, other numbers become float32),
  classifiers without ZipMap so every output is a plain tensor;
- a ``torch.export.ExportedProgram``, or a path to one saved with ``torch.export.save`` (a
  ``.pt2`` archive): converted with ``torch.onnx.export(..., dynamo=True)``; the program keeps
  the shapes it was exported with (export with a ``Dim`` on axis 0 to free the batch size);
- a ``torch.nn.Module`` in eval mode with ``example``: exported with ``torch.export`` first, with
  axis 0 of every input dynamic (``Dim.AUTO``), so the served model takes any batch size.

The ONNX model is then run with ONNX Runtime on the example and compared with the source model
(``predict``/``predict_proba``/``transform``, or the program's own forward): a conversion that
differs by more than ``atol + rtol * |source|`` anywhere, or that changes a class label, is
refused, naming the largest difference and the tolerance. Nothing is stored before that check
passes, and no pickle is written or read: a ``.pt2`` archive is opened only when every tensor in
it is raw bytes and its sample inputs load with ``torch.load(weights_only=True)`` (torch itself
would fall back to full unpickling for the other cases).

skl2onnx, torch and ONNX Runtime are imported here on first use only: the CLI, the server and
the SDK load this module without paying for them.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shipyard.domain.models import ModelExampleTensor, ModelParity, ModelSignature
from shipyard.errors import InvalidInputError
from shipyard.tracking.formats import NUMPY_DTYPES, signature_from_onnx

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
MAX_EXAMPLE_ROWS = 8  # rows of the example stored with the version (all rows are checked)
MAX_EXAMPLE_VALUES = 4096  # values of the stored example, all inputs together
MAX_PARITY_ROWS = 10_000

SUPPORTED_KINDS = (
    "an ONNX file (.onnx) or an onnx.ModelProto",
    "a torch.export archive (.pt2, from torch.export.save)",
    "a torch.export.ExportedProgram",
    "a torch.nn.Module in eval mode (with example=)",
    "a fitted scikit-learn estimator or Pipeline that skl2onnx supports (with example=)",
)

_OIP_OF_DTYPE = {dtype: name for name, dtype in NUMPY_DTYPES.items() if name != "BYTES"}


@dataclass(frozen=True)
class ConvertedModel:
    """A self-contained ONNX model, the example it was checked on, and how that went."""

    content: bytes
    signature: ModelSignature  # inputs, outputs, example and parity
    parity: ModelParity | None


def is_convertible(model: object) -> bool:
    """Whether ``model`` is an object (or a ``.pt2`` path) that :func:`convert_model` handles,
    rather than an ONNX file for the ordinary path."""
    if isinstance(model, str | Path):
        return Path(model).suffix == ".pt2"
    return True


def convert_model(
    model: object,
    *,
    example: Any = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> ConvertedModel:
    """Convert ``model`` to ONNX and check it against the source on ``example``.

    Raises :class:`InvalidInputError` naming the problem: an unsupported object (listing the
    supported kinds), a missing example, a conversion or export that fails (with the library's
    first line), or a parity check over tolerance.
    """
    _check_tolerance(atol, "atol")
    _check_tolerance(rtol, "rtol")
    if isinstance(model, str | Path) and Path(model).suffix == ".pt2":
        return _from_program(load_exported_program(model), example, atol, rtol, "torch.export")
    if _is_onnx_proto(model):
        content = model.SerializeToString()  # type: ignore[attr-defined]
        return ConvertedModel(
            content=content, signature=with_example(content, example), parity=None
        )
    if _is_sklearn(model):
        return _from_sklearn(model, example, atol, rtol)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.export.ExportedProgram):
        return _from_program(model, example, atol, rtol, "torch.export")
    if torch is not None and isinstance(model, torch.nn.Module):
        return _from_module(model, example, atol, rtol)
    raise InvalidInputError(
        f"shipyard cannot turn a {_type_name(model)} into a servable model; log_model accepts "
        f"{'; '.join(SUPPORTED_KINDS)}",
        field="model",
    )


def with_example(content: bytes, example: Any) -> ModelSignature:
    """The signature of ONNX ``content``, with ``example`` (checked to run) when one is given."""
    signature = signature_from_onnx(content)
    if example is None:
        return signature
    arrays = _as_arrays(example, field="example")
    feeds = _feeds(signature, arrays)
    _run_onnx(content, feeds, what="the ONNX model")
    return signature.model_copy(update={"example": example_tensors(feeds)})


def load_exported_program(path: str | Path) -> Any:
    """The ``torch.export.ExportedProgram`` saved at ``path``, opened without unpickling.

    ``torch.export.load`` unpickles (``weights_only=False``) any tensor the archive marks as
    pickled, custom and opaque objects, legacy ``.pt`` weight files, and sample inputs that the
    safe loader refuses; such an archive is refused here before torch opens it.
    """
    archive = Path(path)
    if not archive.is_file():
        raise InvalidInputError(f"{archive} is not a file", field="model")
    _refuse_pickled_archive(archive)
    import torch

    try:
        with _quiet():
            return torch.export.load(str(archive))
    except Exception as exc:
        raise InvalidInputError(
            f"torch.export.load cannot read {archive.name}: {_first_line(exc)}; save the program "
            "with torch.export.save(exported_program, path)",
            field="model",
        ) from None


def example_tensors(feeds: dict[str, np.ndarray]) -> list[ModelExampleTensor] | None:
    """The first rows of ``feeds`` as OIP tensors small enough to keep inline with a version
    (at most ``MAX_EXAMPLE_ROWS`` rows and ``MAX_EXAMPLE_VALUES`` values), or None when not even
    one row fits."""
    arrays = list(feeds.values())
    batched = all(a.ndim >= 1 for a in arrays) and len({a.shape[0] for a in arrays}) == 1
    if batched:
        per_row = sum(math.prod(a.shape[1:]) for a in arrays)
        rows = min(arrays[0].shape[0], MAX_EXAMPLE_ROWS, MAX_EXAMPLE_VALUES // max(per_row, 1))
        if rows < 1:
            return None
        arrays = [a[:rows] for a in arrays]
    elif sum(a.size for a in arrays) > MAX_EXAMPLE_VALUES:
        return None
    return [
        ModelExampleTensor(
            name=name,
            datatype=_oip_datatype(a),
            shape=list(a.shape),
            data=[_json_value(v) for v in a.reshape(-1).tolist()],
        )
        for name, a in zip(feeds, arrays, strict=True)
    ]


def check_example(signature: ModelSignature, example: Sequence[ModelExampleTensor]) -> None:
    """Raise InvalidInputError (field ``example``) unless ``example`` fits the model's inputs:
    the same names in order, the same datatypes, shapes of the declared rank and sizes, and as
    many values as the shape holds."""
    names = [t.name for t in signature.inputs]
    given = [t.name for t in example]
    values = sum(len(t.data) for t in example)
    if values > MAX_EXAMPLE_VALUES:
        raise InvalidInputError(
            f"the example holds {values} values, more than the {MAX_EXAMPLE_VALUES} kept with a "
            "version; send a few rows",
            field="example",
        )
    if given != names:
        raise InvalidInputError(
            f"the example has inputs {given}, the model takes {names}", field="example"
        )
    for spec, tensor in zip(signature.inputs, example, strict=True):
        where = f"example input {tensor.name!r}"
        if tensor.datatype != spec.datatype:
            raise InvalidInputError(
                f"{where} is {tensor.datatype}, the model takes {spec.datatype}", field="example"
            )
        if any(d < 0 for d in tensor.shape) or math.prod(tensor.shape) != len(tensor.data):
            raise InvalidInputError(
                f"{where} has shape {tensor.shape} and {len(tensor.data)} values", field="example"
            )
        if spec.shape and (
            len(spec.shape) != len(tensor.shape)
            or any(s not in (-1, d) for s, d in zip(spec.shape, tensor.shape, strict=True))
        ):
            raise InvalidInputError(
                f"{where} has shape {tensor.shape}, the model takes {spec.shape}", field="example"
            )


# --- scikit-learn -------------------------------------------------------------------------------


def _from_sklearn(model: Any, example: Any, atol: float, rtol: float) -> ConvertedModel:
    from sklearn.base import is_classifier
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    kind = _type_name(model)
    if example is None:
        raise _needs_example(f"a scikit-learn {kind}")
    try:
        check_is_fitted(model)
    except NotFittedError:
        raise InvalidInputError(
            f"the {kind} is not fitted; call fit() before logging it", field="model"
        ) from None
    example = example[:MAX_PARITY_ROWS]
    source = _example_matrix(example)
    x = source if source.dtype in (np.float32, np.float64) else source.astype(np.float32)
    options = {id(est): {"zipmap": False} for est in _classifiers(model, is_classifier)}
    content = _skl2onnx(model, x, options, kind)
    session = _session(content, what=f"the skl2onnx conversion of {kind}", quiet_fail=True)
    if session is None and x.dtype == np.float64:
        # Some converters (tree ensembles) emit FP64 graphs ONNX Runtime cannot load; FP32 ones do.
        x = x.astype(np.float32)
        content = _skl2onnx(model, x, options, kind)
    signature = signature_from_onnx(content)  # tensors only: ZipMap is off
    feeds = {signature.inputs[0].name: x}
    actual = _run_onnx(content, feeds, what=f"the skl2onnx conversion of {kind}")
    references = _sklearn_references(model, example, is_classifier(model))
    parity = _parity(
        signature,
        actual,
        references,
        source="sklearn",
        source_type=_qualified(model),
        rows=x.shape[0],
        atol=atol,
        rtol=rtol,
    )
    return _converted(content, signature, feeds, parity)


def _skl2onnx(model: Any, x: np.ndarray, options: dict[int, Any], kind: str) -> bytes:
    from skl2onnx import to_onnx

    try:
        with _quiet():
            onx = to_onnx(model, x[:1], options=options or None)
    except Exception as exc:
        raise InvalidInputError(
            f"skl2onnx cannot convert the {kind} ({type(exc).__name__}: {_first_line(exc)}); "
            "convert it to ONNX yourself (skl2onnx with a custom converter, or another exporter) "
            "and log the .onnx file",
            field="model",
        ) from None
    return bytes(onx.SerializeToString())


def _classifiers(model: Any, is_classifier: Any) -> Iterator[Any]:
    """The estimators whose ZipMap output is turned off: the model, or a Pipeline's last step."""
    steps = getattr(model, "steps", None)
    if isinstance(steps, list) and steps:
        yield from _classifiers(steps[-1][1], is_classifier)
    elif is_classifier(model):
        yield model


def _sklearn_references(model: Any, example: Any, classifier: bool) -> list[tuple[Any, bool]]:
    """What the estimator itself computes on the example, in the ONNX outputs' order; each with
    whether it holds labels (compared for equality) rather than numbers."""
    if classifier:
        refs: list[tuple[Any, bool]] = [(model.predict(example), True)]
        if hasattr(model, "predict_proba"):
            refs.append((model.predict_proba(example), False))
        elif hasattr(model, "decision_function"):
            refs.append((model.decision_function(example), False))
        return refs
    if hasattr(model, "predict"):
        return [(model.predict(example), False)]
    return [(model.transform(example), False)]


def _example_matrix(example: Any) -> np.ndarray:
    values = example.to_numpy() if hasattr(example, "to_numpy") else example
    try:
        x = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"the example is not an array of numbers ({_first_line(exc)})", field="example"
        ) from None
    if x.ndim != 2 or x.shape[0] == 0 or x.dtype.kind not in "biuf":
        raise InvalidInputError(
            f"the example must be a non-empty 2-D array of numbers (rows x features), got shape "
            f"{list(x.shape)} of {x.dtype}",
            field="example",
        )
    return x


# --- torch --------------------------------------------------------------------------------------


def _from_module(module: Any, example: Any, atol: float, rtol: float) -> ConvertedModel:
    import torch

    kind = _type_name(module)
    if example is None:
        raise _needs_example(f"a torch module ({kind})")
    if module.training:
        raise InvalidInputError(
            f"the {kind} is in training mode (dropout and batch norm would behave as in "
            "training); call module.eval() before logging it",
            field="model",
        )
    args = _torch_args(example)
    # torch.export specialises a dimension of size 1, so a one-row example is traced twice over.
    trace = tuple(torch.cat([a, a]) if a.ndim >= 1 and a.shape[0] == 1 else a for a in args)
    dynamic = tuple({0: torch.export.Dim.AUTO} if a.ndim >= 1 else None for a in trace)
    try:
        with _quiet():
            program = torch.export.export(module, trace, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        raise InvalidInputError(
            f"torch.export cannot export the {kind} ({type(exc).__name__}: {_first_line(exc)}); "
            "make its forward() exportable (no data-dependent Python control flow; see "
            "torch.export's docs) or export it to ONNX yourself and log the .onnx file",
            field="model",
        ) from None
    return _convert_program(
        program, module, args, trace, atol, rtol, source="torch.nn.Module", kind=kind
    )


def _from_program(
    program: Any, example: Any, atol: float, rtol: float, source: str
) -> ConvertedModel:
    if example is None:
        stored = getattr(program, "example_inputs", None)
        if not stored or stored[1]:
            raise _needs_example("this ExportedProgram (it holds no positional example inputs)")
        example = tuple(stored[0])
    args = _torch_args(example)
    return _convert_program(
        program, program.module(), args, args, atol, rtol, source=source, kind="ExportedProgram"
    )


def _convert_program(
    program: Any,
    forward: Any,
    args: tuple[Any, ...],
    trace: tuple[Any, ...],
    atol: float,
    rtol: float,
    *,
    source: str,
    kind: str,
) -> ConvertedModel:
    import torch

    try:
        with torch.no_grad():
            expected = _leaves(forward(*args))
    except Exception as exc:
        raise InvalidInputError(
            f"the {kind} fails on the example ({type(exc).__name__}: {_first_line(exc)})",
            field="example",
        ) from None
    names = ["output"] if len(expected) == 1 else [f"output_{i}" for i in range(len(expected))]
    try:
        with _quiet():
            onnx_program = torch.onnx.export(
                program,
                trace,
                dynamo=True,
                external_data=False,
                verbose=False,
                output_names=names,
            )
            if onnx_program is None:  # only the legacy (dynamo=False) exporter returns None
                raise RuntimeError("torch.onnx.export returned no program")
            content = bytes(onnx_program.model_proto.SerializeToString())
    except Exception as exc:
        raise InvalidInputError(
            f"torch.onnx.export cannot convert the {kind} ({type(exc).__name__}: "
            f"{_first_line(exc)}); export it to ONNX yourself and log the .onnx file",
            field="model",
        ) from None
    signature = signature_from_onnx(content)
    feeds = _feeds(signature, [a.detach().cpu().numpy() for a in args])
    actual = _run_onnx(content, feeds, what=f"the ONNX export of the {kind}")
    parity = _parity(
        signature,
        actual,
        [(e, False) for e in expected],
        source=source,
        source_type=_qualified(getattr(forward, "_orig_mod", forward))
        if source != "torch.export"
        else "torch.export.ExportedProgram",
        rows=_rows(feeds),
        atol=atol,
        rtol=rtol,
    )
    return _converted(content, signature, feeds, parity)


def _torch_args(example: Any) -> tuple[Any, ...]:
    import torch

    items = tuple(example) if isinstance(example, tuple | list) else (example,)
    args = []
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(item)
        if not isinstance(item, torch.Tensor):
            raise InvalidInputError(
                f"example input {i} is a {_type_name(item)}; a torch model's example is a "
                "tensor (or numpy array), or a tuple of them, one per forward() argument",
                field="example",
            )
        args.append(item)
    return tuple(args)


def _leaves(output: Any) -> list[np.ndarray]:
    import torch
    from torch.utils._pytree import tree_leaves

    leaves = [leaf for leaf in tree_leaves(output) if isinstance(leaf, torch.Tensor)]
    return [leaf.detach().cpu().numpy() for leaf in leaves]


def _refuse_pickled_archive(archive: Path) -> None:
    from torch.export.pt2_archive import constants as c

    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            root = names[0].split("/", 1)[0] + "/" if names else ""
            inner = {n[len(root) :]: n for n in names if n.startswith(root)}
            models = [
                n[len(c.MODELS_DIR) : -len(".json")]
                for n in inner
                if n.startswith(c.MODELS_DIR) and n.endswith(".json")
            ]
            if not models:
                raise InvalidInputError(
                    f"{archive.name} holds no exported program; save one with torch.export.save",
                    field="model",
                )
            for name in models:
                for problem in _pickled_parts(zf, inner, name, c):
                    raise InvalidInputError(
                        f"{archive.name} keeps {problem}, which torch.export.load would unpickle "
                        "(that runs arbitrary code), so shipyard does not open it; re-save a "
                        "program of plain tensors with torch.export.save",
                        field="model",
                    )
    except zipfile.BadZipFile:
        raise InvalidInputError(
            f"{archive.name} is not a torch.export archive (not a zip file); save the program "
            "with torch.export.save(exported_program, path)",
            field="model",
        ) from None


def _pickled_parts(zf: zipfile.ZipFile, inner: dict[str, str], name: str, c: Any) -> Iterator[str]:
    for legacy in (f"{c.WEIGHTS_DIR}{name}.pt", f"{c.CONSTANTS_DIR}{name}.pt"):
        if legacy in inner:
            yield f"legacy pickled tensors ({legacy})"
    for config_name in (
        c.WEIGHTS_CONFIG_FILENAME_FORMAT.format(name),
        c.CONSTANTS_CONFIG_FILENAME_FORMAT.format(name),
    ):
        if config_name not in inner:
            continue
        try:
            entries = json.loads(zf.read(inner[config_name]))["config"]
        except (ValueError, KeyError, TypeError):
            yield f"an unreadable {config_name}"
            continue
        for fqn, meta in entries.items():
            path = str(meta.get("path_name", ""))
            if meta.get("use_pickle") or not path.startswith(
                (c.WEIGHT_FILENAME_PREFIX, c.TENSOR_CONSTANT_FILENAME_PREFIX)
            ):
                yield f"{fqn!r} as a pickled object ({path})"
    samples = c.SAMPLE_INPUTS_FILENAME_FORMAT.format(name)
    if samples in inner:
        import io

        import torch

        try:
            torch.load(io.BytesIO(zf.read(inner[samples])), weights_only=True)
        except Exception:
            yield f"sample inputs ({samples}) that are not plain tensors"


# --- comparing ----------------------------------------------------------------------------------


def _parity(
    signature: ModelSignature,
    actual: list[np.ndarray],
    references: list[tuple[Any, bool]],
    *,
    source: str,
    source_type: str,
    rows: int,
    atol: float,
    rtol: float,
) -> ModelParity:
    names = [t.name for t in signature.outputs]
    if len(actual) < len(references):
        raise InvalidInputError(
            f"the ONNX model has {len(actual)} output(s) {names}, the {source_type} gives "
            f"{len(references)}; nothing was stored",
            field="model",
        )
    per_output: dict[str, float] = {}
    mismatches = 0
    problems: list[str] = []
    for name, got, (expected, labels) in zip(names, actual, references, strict=False):
        ref = np.asarray(expected)
        got = np.asarray(got)
        if ref.size != got.size and ref.ndim == 1 and got.ndim == 2 and got.shape[1] == 2:
            got = got[:, 1]  # a binary classifier's one score against ONNX's two columns
        if ref.size != got.size:
            problems.append(
                f"output {name!r} has shape {list(got.shape)}, the source {list(ref.shape)}"
            )
            continue
        ref = ref.reshape(got.shape)
        if labels or ref.dtype.kind not in "biuf" or got.dtype.kind not in "biuf":
            wrong = int(np.sum(ref.astype(str) != got.astype(str)))
            mismatches += wrong
            if wrong:
                problems.append(f"output {name!r} has {wrong} of {ref.size} labels different")
            continue
        diff, outside = _difference(got, ref, atol, rtol)
        per_output[name] = diff
        if outside:
            problems.append(
                f"output {name!r} differs by up to {diff:.3g} ({outside} of {ref.size} values "
                "outside the tolerance)"
            )
    max_diff = max(per_output.values(), default=0.0)
    if problems:
        raise InvalidInputError(
            f"the ONNX conversion of the {source_type} does not reproduce it on the example "
            f"({rows} rows): {'; '.join(problems)}; max abs difference {max_diff:.3g}, tolerance "
            f"atol={atol:g} + rtol={rtol:g} x |value|. Nothing was stored; if the difference is "
            "acceptable pass log_model(atol=..., rtol=...), or convert the model yourself",
            field="model",
        )
    return ModelParity(
        source=source,
        source_type=source_type,
        max_abs_diff=max_diff,
        atol=atol,
        rtol=rtol,
        checked_rows=rows,
        outputs=per_output,
        label_mismatches=mismatches,
    )


def _difference(got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> tuple[float, int]:
    """The largest absolute difference (NaN where both are NaN counts as equal) and how many
    elements lie outside the tolerance."""
    a, b = got.astype(np.float64), ref.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    with np.errstate(invalid="ignore"):
        diff = np.where(both_nan | (a == b), 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    outside = int(np.sum(diff > atol + rtol * np.abs(np.nan_to_num(b))))
    return (float(diff.max()) if diff.size else 0.0), outside


# --- ONNX Runtime -------------------------------------------------------------------------------


def _session(content: bytes, *, what: str, quiet_fail: bool = False) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(content, providers=["CPUExecutionProvider"])
    except Exception as exc:
        if quiet_fail:
            return None
        raise InvalidInputError(
            f"ONNX Runtime cannot load {what} ({_first_line(exc)}); convert the model yourself "
            "and log the .onnx file",
            field="model",
        ) from None


def _run_onnx(content: bytes, feeds: dict[str, np.ndarray], *, what: str) -> list[np.ndarray]:
    session = _session(content, what=what)
    try:
        return list(session.run(None, feeds))
    except Exception as exc:
        raise InvalidInputError(
            f"ONNX Runtime cannot run {what} on the example ({_first_line(exc)})",
            field="example",
        ) from None


def _feeds(signature: ModelSignature, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    names = [t.name for t in signature.inputs]
    if len(arrays) != len(names):
        raise InvalidInputError(
            f"the example has {len(arrays)} input(s), the ONNX model takes {len(names)} {names}",
            field="example",
        )
    feeds: dict[str, np.ndarray] = {}
    for spec, array in zip(signature.inputs, arrays, strict=True):
        want = NUMPY_DTYPES.get(spec.datatype)
        feeds[spec.name] = array.astype(want) if want is not None and want != array.dtype else array
    return feeds


def _as_arrays(example: Any, *, field: str) -> list[np.ndarray]:
    items = list(example) if isinstance(example, tuple | list) else [example]
    arrays = []
    for item in items:
        if hasattr(item, "detach"):
            item = item.detach().cpu().numpy()
        try:
            arrays.append(np.asarray(item))
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(
                f"the example is not an array ({_first_line(exc)})", field=field
            ) from None
    return arrays


def _rows(feeds: dict[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim >= 1 else 1


# --- small helpers ------------------------------------------------------------------------------


def _converted(
    content: bytes, signature: ModelSignature, feeds: dict[str, np.ndarray], parity: ModelParity
) -> ConvertedModel:
    example = example_tensors(feeds)
    return ConvertedModel(
        content=content,
        signature=signature.model_copy(update={"example": example, "parity": parity}),
        parity=parity,
    )


def _is_sklearn(model: object) -> bool:
    base = sys.modules.get("sklearn.base")
    return base is not None and isinstance(model, base.BaseEstimator)


def _is_onnx_proto(model: object) -> bool:
    onnx = sys.modules.get("onnx")
    return onnx is not None and isinstance(model, onnx.ModelProto)


def _needs_example(what: str) -> InvalidInputError:
    return InvalidInputError(
        f"{what} needs example= (a few rows of real input, e.g. X[:8]): shipyard infers the "
        "ONNX input type from it and checks the converted model against the source on it",
        field="example",
    )


def _check_tolerance(value: float, field: str) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise InvalidInputError(f"{field} must be a finite number >= 0, got {value!r}", field=field)


def _oip_datatype(array: np.ndarray) -> str:
    if array.dtype.kind in "OUS":
        return "BYTES"
    name = _OIP_OF_DTYPE.get(array.dtype)
    if name is None:
        raise InvalidInputError(
            f"the example has dtype {array.dtype}, which the Open Inference Protocol cannot carry",
            field="example",
        )
    return name


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _type_name(obj: object) -> str:
    return type(obj).__name__


def _qualified(obj: object) -> str:
    cls = type(obj)
    module = cls.__module__
    # sklearn's classes live in private modules (sklearn.linear_model._logistic): drop those parts
    parts = [p for p in module.split(".") if not p.startswith("_")]
    return ".".join([*parts, cls.__qualname__])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' own deprecation chatter while they run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
