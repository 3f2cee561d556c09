"""Models shipyard converts to ONNX itself (issue 8, item 7).

``run.log_model(obj, name=..., example=...)`` turns a fitted scikit-learn estimator (skl2onnx), a
``torch.nn.Module``, a ``torch.export.ExportedProgram`` or a ``.pt2`` archive into ONNX, checks
it against the source model on the example, and stores ONNX + signature + example + parity with
the version; whatever is refused leaves no artifact, no blob and no version behind. Real models
throughout: scikit-learn estimators fitted on load_digits / load_diabetes, a small torch MLP,
real ONNX Runtime, a real server process and the real CLI.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.datasets import load_diabetes, load_digits
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import shipyard
from shipyard.client import Client, LocalBackend
from shipyard.context import Context
from shipyard.domain.models import ModelExampleTensor
from shipyard.errors import InvalidInputError, NotFoundError
from shipyard.serving.runtime import load_model
from shipyard.settings import Settings
from shipyard.tracking import registry
from shipyard.tracking.convert import MAX_EXAMPLE_ROWS, convert_model
from tests.conftest import LiveServer

DIGITS_X, DIGITS_Y = load_digits(return_X_y=True)
DIABETES_X, DIABETES_Y = load_diabetes(return_X_y=True)
FIT = 600  # rows the estimators are fitted on: enough for real models, cheap to fit


@pytest.fixture
def client(ctx: Context) -> Client:
    return Client(settings=ctx.settings, backend=LocalBackend(ctx))


@pytest.fixture(scope="module")
def fitted() -> dict[str, Any]:
    return {
        "logreg": LogisticRegression(max_iter=200).fit(DIGITS_X[:FIT], DIGITS_Y[:FIT]),
        "forest": RandomForestClassifier(n_estimators=8, random_state=0).fit(
            DIGITS_X[:FIT], DIGITS_Y[:FIT]
        ),
        "pipeline": make_pipeline(StandardScaler(), LogisticRegression(max_iter=200)).fit(
            DIGITS_X[:FIT], DIGITS_Y[:FIT]
        ),
        "ridge": Ridge().fit(DIABETES_X, DIABETES_Y),
        "forest_regressor": RandomForestRegressor(n_estimators=8, random_state=0).fit(
            DIABETES_X, DIABETES_Y
        ),
    }


def _nothing_stored(ctx: Context, client: Client, run_id: str, model: str = "m") -> None:
    assert client.runs.get(run_id, project="p").artifacts == []
    with pytest.raises(NotFoundError):
        registry.get_model(ctx, project="p", model=model)


# --- scikit-learn -------------------------------------------------------------------------------


def test_a_classifier_is_converted_checked_and_registered_with_example_and_parity(
    ctx: Context, client: Client, fitted: dict[str, Any]
) -> None:
    model = fitted["logreg"]
    with shipyard.init(project="p", client=client) as run:
        mv = run.log_model(model, name="digits", example=DIGITS_X[:20])
    assert mv is not None and mv.version == 1
    # only the ONNX model is stored: no pickle of the estimator, no second artifact
    assert [a.path for a in client.runs.get(run.id, project="p").artifacts] == ["model.onnx"]
    stored = ctx.blobs.get_bytes(mv.artifact_digest)
    assert stored[:1] != b"\x80"  # not a pickle stream
    sig = client.models.get("digits", 1, project="p").signature
    assert [(t.name, t.datatype, t.shape) for t in sig.inputs] == [("X", "FP64", [-1, 64])]
    assert [(t.name, t.datatype) for t in sig.outputs] == [
        ("label", "INT64"),
        ("probabilities", "FP64"),
    ]
    assert sig.parity is not None
    assert sig.parity.source == "sklearn"
    assert sig.parity.source_type == "sklearn.linear_model.LogisticRegression"
    assert sig.parity.checked_rows == 20  # every row is checked; the first few are kept
    assert 0 <= sig.parity.max_abs_diff < 1e-9
    assert sig.parity.label_mismatches == 0
    assert sig.example is not None and sig.example[0].shape == [MAX_EXAMPLE_ROWS, 64]
    assert sig.example[0].data == DIGITS_X[:MAX_EXAMPLE_ROWS].ravel().tolist()
    # the stored model, served by the replica's runtime, predicts what the estimator predicts
    served = load_model(stored, providers=["CPUExecutionProvider"])
    out = served.predict({"X": DIGITS_X[100:140]})
    np.testing.assert_array_equal(out["label"], model.predict(DIGITS_X[100:140]))
    np.testing.assert_allclose(
        out["probabilities"], model.predict_proba(DIGITS_X[100:140]), atol=1e-9
    )


@pytest.mark.parametrize(
    ("key", "x", "dtype", "datatype"),
    [
        ("forest", DIGITS_X, np.float32, "FP32"),
        ("pipeline", DIGITS_X, np.float32, "FP32"),
        ("ridge", DIABETES_X, np.float64, "FP64"),
        # skl2onnx's FP64 tree ensemble does not load in ONNX Runtime: FP32 is used instead
        ("forest_regressor", DIABETES_X, np.float64, "FP32"),
    ],
)
def test_estimators_and_pipelines_convert_within_tolerance(
    fitted: dict[str, Any], key: str, x: np.ndarray, dtype: type, datatype: str
) -> None:
    model = fitted[key]
    example = x[:32].astype(dtype)
    converted = convert_model(model, example=example)
    sig = converted.signature
    assert sig.inputs[0].datatype == datatype and sig.inputs[0].shape == [-1, x.shape[1]]
    assert converted.parity is not None and converted.parity.checked_rows == 32
    assert converted.parity.max_abs_diff <= 1e-4 + 1e-3 * float(np.abs(model.predict(x)).max())
    served = load_model(converted.content, providers=["CPUExecutionProvider"])
    got = served.predict({sig.inputs[0].name: x[200:260].astype(np.dtype(served.inputs[0].dtype))})
    first = np.asarray(next(iter(got.values()))).ravel()
    if hasattr(model, "predict_proba"):
        np.testing.assert_array_equal(first, model.predict(x[200:260]))
    else:
        np.testing.assert_allclose(first, model.predict(x[200:260]), rtol=1e-4, atol=1e-3)


class Unconvertible(ClassifierMixin, BaseEstimator):
    """A fitted estimator skl2onnx has no converter for."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> Unconvertible:
        self.classes_ = np.unique(y)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.zeros(len(x), dtype=np.int64)


def test_an_estimator_skl2onnx_cannot_convert_is_refused_naming_it(
    ctx: Context, client: Client
) -> None:
    model = Unconvertible().fit(DIGITS_X, DIGITS_Y)
    with shipyard.init(project="p", client=client) as run, pytest.raises(InvalidInputError) as e:
        run.log_model(model, name="m", example=DIGITS_X[:4])
    assert e.value.field == "model"
    assert "skl2onnx cannot convert the Unconvertible" in e.value.message
    assert "convert it to ONNX yourself" in e.value.message and ".onnx file" in e.value.message
    _nothing_stored(ctx, client, run.id)


def test_a_conversion_over_tolerance_is_refused_naming_the_difference(
    ctx: Context, client: Client, fitted: dict[str, Any]
) -> None:
    # FP32 ONNX against sklearn's FP64 arithmetic differs by ~1e-7: a zero tolerance refuses it
    with shipyard.init(project="p", client=client) as run:
        with pytest.raises(InvalidInputError) as e:
            run.log_model(
                fitted["logreg"],
                name="m",
                example=DIGITS_X[:16].astype(np.float32),
                atol=0.0,
                rtol=0.0,
            )
        mv = run.log_model(fitted["logreg"], name="ok", example=DIGITS_X[:16].astype(np.float32))
    message = e.value.message
    assert e.value.field == "model"
    assert "does not reproduce it on the example (16 rows)" in message
    assert "output 'probabilities' differs by up to" in message
    assert "max abs difference" in message and "atol=0 + rtol=0" in message
    assert "Nothing was stored" in message
    assert mv is not None and mv.signature.parity is not None
    assert 0 < mv.signature.parity.max_abs_diff < 1e-4  # the same conversion, default tolerance
    with pytest.raises(NotFoundError):
        registry.get_model(ctx, project="p", model="m")


def test_missing_example_unfitted_estimator_and_plain_objects_get_clear_errors(
    ctx: Context, client: Client, fitted: dict[str, Any]
) -> None:
    with shipyard.init(project="p", client=client) as run:
        with pytest.raises(InvalidInputError) as missing:
            run.log_model(fitted["ridge"], name="m")
        with pytest.raises(InvalidInputError) as unfitted:
            run.log_model(Ridge(), name="m", example=DIABETES_X[:4])
        with pytest.raises(InvalidInputError) as function:
            run.log_model(lambda x: x * 2, name="m", example=DIABETES_X[:4])
        with pytest.raises(InvalidInputError) as one_d:
            run.log_model(fitted["ridge"], name="m", example=DIABETES_X[0])
        with pytest.raises(InvalidInputError) as tolerance:
            run.log_model(fitted["ridge"], name="m", example=DIABETES_X[:4], atol=-1)
    assert missing.value.field == "example" and "needs example=" in missing.value.message
    assert unfitted.value.field == "model" and "not fitted" in unfitted.value.message
    assert function.value.field == "model"
    assert "cannot turn a function into a servable model" in function.value.message
    for kind in ("ONNX file", ".pt2", "ExportedProgram", "torch.nn.Module", "scikit-learn"):
        assert kind in function.value.message
    assert one_d.value.field == "example" and "2-D array" in one_d.value.message
    assert tolerance.value.field == "atol"
    _nothing_stored(ctx, client, run.id)


def test_the_registry_checks_an_example_against_the_model_inputs(
    ctx: Context, client: Client, fitted: dict[str, Any]
) -> None:
    converted = convert_model(fitted["ridge"], example=DIABETES_X[:4])
    digest = ctx.blobs.put_bytes(converted.content).digest
    bad = [
        [ModelExampleTensor(name="x", datatype="FP64", shape=[1, 10], data=[0.0] * 10)],
        [ModelExampleTensor(name="X", datatype="FP32", shape=[1, 10], data=[0.0] * 10)],
        [ModelExampleTensor(name="X", datatype="FP64", shape=[1, 9], data=[0.0] * 9)],
        [ModelExampleTensor(name="X", datatype="FP64", shape=[2, 10], data=[0.0] * 10)],
    ]
    with ctx.db.transaction() as s:  # the blob must be one of the project's
        from shipyard.security.blobrefs import add_refs
        from shipyard.store.queries import project_id

        add_refs(s, project_pk=project_id(s, "p", create=True), digests=[digest])
    for example in bad:
        with pytest.raises(InvalidInputError) as e:
            registry.register_version(ctx, project="p", model="m", digest=digest, example=example)
        assert e.value.field == "example", e.value.message
    with pytest.raises(NotFoundError):
        registry.get_model(ctx, project="p", model="m")
    mv = registry.register_version(
        ctx,
        project="p",
        model="m",
        digest=digest,
        example=converted.signature.example,
        parity=converted.parity,
    )
    assert mv.signature == converted.signature


def test_log_model_through_a_server_shows_example_and_parity_over_rest(
    tmp_path: Path, live_server: LiveServer, fitted: dict[str, Any]
) -> None:
    remote = Client(settings=Settings(home=tmp_path / "unused", url=live_server.url))
    with shipyard.init(project="default", client=remote) as run:
        with pytest.raises(InvalidInputError):
            run.log_model(Unconvertible().fit(DIGITS_X, DIGITS_Y), name="m", example=DIGITS_X[:4])
        mv = run.log_model(fitted["pipeline"], name="digits", example=DIGITS_X[:5])
    assert mv is not None
    body = httpx.get(
        f"{live_server.url}/api/v1/projects/default/models/digits/versions/1", timeout=10
    ).json()
    assert body["signature"]["parity"]["source"] == "sklearn"
    assert body["signature"]["parity"]["source_type"] == "sklearn.pipeline.Pipeline"
    assert body["signature"]["parity"]["checked_rows"] == 5
    assert body["signature"]["example"][0]["shape"] == [5, 64]
    assert remote.models.get("digits", 1).signature == mv.signature
    assert [m.name for m in remote.models.list()] == ["digits"]  # the refused one left nothing


def test_cli_models_show_a_version_prints_signature_parity_and_example(
    ctx: Context, client: Client, fitted: dict[str, Any], home: Path
) -> None:
    with shipyard.init(project="default", client=client) as run:
        run.log_model(fitted["ridge"], name="diabetes", example=DIABETES_X[:3])
    env = {**os.environ, "SHIPYARD_HOME": str(home), "COLUMNS": "200"}
    env.pop("SHIPYARD_URL", None)
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['shipyard', 'models', 'show', 'diabetes@1']\n"
        "try:\n"
        "    runpy.run_module('shipyard.cli', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "import shipyard.server.app\n"
        "heavy = sorted({'torch', 'skl2onnx', 'sklearn', 'onnxscript'} & set(sys.modules))\n"
        "print('heavy imports:', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "diabetes v1 (onnx" in out.stdout
    assert "input" in out.stdout and "FP64" in out.stdout and "[-1, 10]" in out.stdout
    assert "parity vs sklearn (sklearn.linear_model.Ridge): max abs diff" in out.stdout
    assert "on 3 rows" in out.stdout
    assert "example X [3, 10]:" in out.stdout
    # neither the CLI nor the server imports a converter (ONNX Runtime they load anyway)
    assert "heavy imports: []" in out.stdout


# --- torch --------------------------------------------------------------------------------------


class Net:
    """Built lazily so collecting the module does not import torch."""

    @staticmethod
    def build() -> Any:
        import torch

        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
        ).eval()


@pytest.fixture(scope="module")
def torch_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One MLP, its ExportedProgram with a dynamic batch, and that program saved as ``.pt2``."""
    torch = pytest.importorskip("torch")
    net = Net.build()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    program = torch.export.export(
        net, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},)
    )
    folder = tmp_path_factory.mktemp("pt2")
    path = folder / "net.pt2"
    torch.export.save(program, str(path))
    yield {"net": net, "x": x, "program": program, "pt2": path, "torch": torch}


def test_a_torch_module_is_exported_with_a_free_batch_and_served(
    ctx: Context, client: Client, torch_models: dict[str, Any]
) -> None:
    torch, net = torch_models["torch"], torch_models["net"]
    one_row = torch_models["x"][:1]  # a one-row example still gives a dynamic batch axis
    with shipyard.init(project="p", client=client) as run:
        mv = run.log_model(net, name="net", example=one_row)
    assert mv is not None
    sig = mv.signature
    assert [(t.name, t.datatype, t.shape) for t in sig.inputs] == [("input", "FP32", [-1, 8])]
    assert [(t.name, t.shape) for t in sig.outputs] == [("output", [-1, 3])]
    assert sig.parity is not None and sig.parity.source == "torch.nn.Module"
    assert sig.parity.source_type == "torch.nn.modules.container.Sequential"
    assert sig.parity.checked_rows == 1 and sig.parity.max_abs_diff < 1e-5
    assert sig.example is not None and sig.example[0].shape == [1, 8]
    served = load_model(ctx.blobs.get_bytes(mv.artifact_digest), providers=["CPUExecutionProvider"])
    batch = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = net(batch).numpy()
    got = served.predict({"input": batch.numpy()})["output"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_an_exported_program_and_its_pt2_file_register_without_an_example(
    ctx: Context, client: Client, torch_models: dict[str, Any]
) -> None:
    with shipyard.init(project="p", client=client) as run:
        from_program = run.log_model(torch_models["program"], name="net")
        from_file = run.log_model(torch_models["pt2"], name="net")
    assert from_program is not None and from_file is not None
    for mv in (from_program, from_file):
        assert mv.signature.parity is not None
        assert mv.signature.parity.source == "torch.export"
        assert mv.signature.parity.checked_rows == 4  # the program's own example inputs
        assert mv.signature.inputs[0].shape == [-1, 8]  # the program's Dim("batch")
    # the same program, in memory or from the archive, converts to the same graph
    assert from_program.artifact_digest == from_file.artifact_digest
    assert [v.version for v in client.models.versions("net", project="p")] == [1, 2]


class _Boom:
    """Unpickling this writes a marker file: proof that something was unpickled."""

    marker = ""

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (Path.write_text, (Path(self.marker), "unpickled"))


def _tampered(source: Path, target: Path, member: str, edit: Any) -> Path:
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith(member):
                data = edit(data)
            zout.writestr(info, data)
    return target


def test_a_pt2_archive_that_would_unpickle_is_refused_before_torch_opens_it(
    ctx: Context, client: Client, torch_models: dict[str, Any], tmp_path: Path
) -> None:
    torch = torch_models["torch"]
    marker = tmp_path / "marker"
    boom = _Boom()
    boom.marker = str(marker)

    def pickled_weight(data: bytes) -> bytes:
        config = json.loads(data)
        next(iter(config["config"].values()))["use_pickle"] = True
        return json.dumps(config).encode()

    def pickled_samples(data: bytes) -> bytes:
        buffer = io.BytesIO()
        torch.save(boom, buffer)  # what torch.export.load would load with weights_only=False
        return buffer.getvalue()

    weights = _tampered(
        torch_models["pt2"], tmp_path / "w.pt2", "model_weights_config.json", pickled_weight
    )
    samples = _tampered(
        torch_models["pt2"], tmp_path / "s.pt2", "sample_inputs/model.pt", pickled_samples
    )
    not_zip = tmp_path / "n.pt2"
    not_zip.write_bytes(b"not a zip")
    with shipyard.init(project="p", client=client) as run:
        for path, problem in ((weights, "as a pickled object"), (samples, "sample inputs")):
            with pytest.raises(InvalidInputError) as e:
                run.log_model(path, name="m")
            assert e.value.field == "model"
            assert problem in e.value.message and "would unpickle" in e.value.message
        with pytest.raises(InvalidInputError) as e:
            run.log_model(not_zip, name="m")
        assert "not a torch.export archive" in e.value.message
    assert not marker.exists()
    _nothing_stored(ctx, client, run.id)


def test_torch_modules_that_cannot_be_exported_are_refused_with_torch_s_reason(
    ctx: Context, client: Client, torch_models: dict[str, Any]
) -> None:
    torch = torch_models["torch"]

    class DataDependent(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            if x.sum() > 0:  # Python control flow on a tensor's value: not exportable
                return x
            return -x

    training = Net.build().train()
    with shipyard.init(project="p", client=client) as run:
        with pytest.raises(InvalidInputError) as export:
            run.log_model(DataDependent().eval(), name="m", example=torch_models["x"])
        with pytest.raises(InvalidInputError) as train:
            run.log_model(training, name="m", example=torch_models["x"])
        with pytest.raises(InvalidInputError) as missing:
            run.log_model(Net.build(), name="m")
        with pytest.raises(InvalidInputError) as wrong_example:
            run.log_model(Net.build(), name="m", example="not a tensor")
    assert export.value.field == "model"
    assert "torch.export cannot export the DataDependent" in export.value.message
    assert "data-dependent" in export.value.message  # torch's own first line
    assert train.value.field == "model" and "module.eval()" in train.value.message
    assert missing.value.field == "example" and "needs example=" in missing.value.message
    assert wrong_example.value.field == "example" and "is a str" in wrong_example.value.message
    _nothing_stored(ctx, client, run.id)
