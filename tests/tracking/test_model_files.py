"""Model files at the door (issue 5, items 5 and 6).

``run.log_model`` checks a file before it stores anything, and bundles a torch export's
``.onnx.data`` sidecar into a self-contained model; the registry refuses, on its own, any model
whose tensors refer to external data (relative, absolute or ``../`` locations alike).
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest

import shipyard
from shipyard.blobs.store import hash_bytes
from shipyard.client import Client, LocalBackend
from shipyard.context import Context
from shipyard.errors import InvalidInputError, NotFoundError
from shipyard.serving import reconciler
from shipyard.serving.deployments import deploy, stop_deployment
from shipyard.settings import Settings
from shipyard.tracking import registry, runs
from shipyard.tracking.formats import external_tensors, parse_onnx
from tests.conftest import LiveServer
from tests.onnx_models import (
    EXTERNAL_PLACES,
    external_data_model,
    external_tensor,
    sequence_output_model,
)

SECRET = np.array([7, 7, 7, 7], dtype=np.float32).tobytes()


@pytest.fixture
def client(ctx: Context) -> Client:
    return Client(settings=ctx.settings, backend=LocalBackend(ctx))


def _torch_export(folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A tiny MLP exported with torch 2.13's defaults: its weights land in ``model.onnx.data``.

    Returns the path, a batch of inputs and torch's own outputs for them.
    """
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    net.eval()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    with warnings.catch_warnings():  # torch's own deprecations inside its exporter
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            net,
            (torch.zeros(2, 64),),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_shapes=({0: "batch"},),
        )
    sidecar = folder / "model.onnx.data"
    assert sidecar.stat().st_size > 0, "torch wrote the weights inline: the test needs a sidecar"
    assert external_tensors(parse_onnx(path.read_bytes())), "the export has no external data"
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    return path, x, expected


def _nothing_stored(ctx: Context, client: Client, run_id: str, content: bytes) -> None:
    assert client.runs.get(run_id, project="p").artifacts == []
    assert not ctx.blobs.exists(hash_bytes(content))
    with pytest.raises(NotFoundError):
        registry.get_model(ctx, project="p", model="digits")


# --- item 5: validate first, store after ----------------------------------------------------


def test_a_refused_file_leaves_no_artifact_and_no_blob(
    ctx: Context, client: Client, tmp_path: Path
) -> None:
    pt = tmp_path / "model.pt"
    pt.write_bytes(pickle.dumps({"weights": [1.0, 2.0, 3.0]}))  # what torch.save writes
    zipmap = tmp_path / "zipmap.onnx"
    zipmap.write_bytes(sequence_output_model())  # ONNX, but not servable over OIP
    with shipyard.init(project="p", client=client) as run:
        with pytest.raises(
            InvalidInputError, match=r"model\.pt: the model is not a valid ONNX"
        ) as e:
            run.log_model(pt, name="digits")
        assert e.value.field == "local_path"
        with pytest.raises(InvalidInputError, match="not a tensor") as e:
            run.log_model(zipmap, name="digits")
        assert e.value.field == "local_path"
        with pytest.raises(InvalidInputError) as e:
            run.log_model(zipmap, name="../digits")
        assert e.value.field == "name"
    _nothing_stored(ctx, client, run.id, pt.read_bytes())
    assert not ctx.blobs.exists(hash_bytes(zipmap.read_bytes()))


def test_a_torch_sidecar_export_is_bundled_registered_and_served(
    ctx: Context, client: Client, tmp_path: Path
) -> None:
    path, x, expected = _torch_export(tmp_path / "export")
    with shipyard.init(project="p", client=client) as run:
        mv = run.log_model(path, name="digits")
    assert mv is not None and mv.version == 1
    assert [a.path for a in client.runs.get(run.id, project="p").artifacts] == ["model.onnx"]
    stored = ctx.blobs.get_bytes(mv.artifact_digest)
    assert external_tensors(parse_onnx(stored)) == []  # self-contained
    assert (
        mv.artifact_size == len(stored) > (tmp_path / "export" / "model.onnx.data").stat().st_size
    )
    assert [t.name for t in mv.signature.inputs] == ["x"]

    registry.set_alias(ctx, project="p", model="digits", alias="production", version=1)
    deploy(ctx, project="p", name="web", model="digits")
    try:
        deployment = reconciler.settle(ctx, project="p", name="web", timeout=60)
        assert deployment.url is not None, deployment.message
        payload = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                               "data": x.ravel().tolist()}]}  # fmt: skip
        response = httpx.post(f"{deployment.url}/v2/models/web/infer", json=payload, timeout=10)
        assert response.status_code == 200, response.text
        out = response.json()["outputs"][0]
        got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    finally:
        stop_deployment(ctx, project="p", name="web")


def test_log_model_through_a_server(tmp_path: Path, live_server: LiveServer) -> None:
    remote = Client(settings=Settings(home=tmp_path / "unused", url=live_server.url))
    path, _, _ = _torch_export(tmp_path / "export")
    pt = tmp_path / "model.pt"
    pt.write_bytes(pickle.dumps([1, 2, 3]))
    with shipyard.init(project="default", client=remote) as run:
        with pytest.raises(InvalidInputError) as e:
            run.log_model(pt, name="digits")
        assert e.value.field == "local_path"
        assert remote.runs.get(run.id).artifacts == []
        mv = run.log_model(path, name="digits")
    assert mv is not None and mv.version == 1
    assert remote.models.get("digits", 1).signature.inputs[0].name == "x"


def test_sidecars_that_escape_or_are_missing_are_refused(
    ctx: Context, client: Client, tmp_path: Path
) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    (folder / "link.bin").symlink_to(secret)
    cases = {
        "../secret.bin": "outside the model's folder",
        str(secret): "outside the model's folder",
        "link.bin": "resolves outside the model's folder",
        "missing.data": "no such file",
    }
    with shipyard.init(project="p", client=client) as run:
        for location, message in cases.items():
            for where in EXTERNAL_PLACES:
                path = folder / "model.onnx"
                path.write_bytes(external_data_model(location, where=where))
                with pytest.raises(InvalidInputError, match=message) as e:
                    run.log_model(path, name="digits")
                assert e.value.field == "local_path"
                assert not ctx.blobs.exists(hash_bytes(path.read_bytes()))
    _nothing_stored(ctx, client, run.id, SECRET)


def test_a_model_over_2gb_with_its_sidecar_is_refused_with_how_to_export(
    ctx: Context, client: Client, tmp_path: Path
) -> None:
    import onnx
    from onnx import TensorProto, helper

    size = 2**29  # FP32: 2 GiB of weights
    (tmp_path / "big.data").write_bytes(b"")
    os.truncate(tmp_path / "big.data", 4 * size)  # sparse: nothing is written
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size])],
        [external_tensor("W", "big.data", size=size)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "big.onnx"
    onnx.save_model(model, path)
    with shipyard.init(project="p", client=client) as run:
        with pytest.raises(InvalidInputError, match=r"over the 2 GB.*external_data=False") as e:
            run.log_model(path, name="digits")
        assert e.value.field == "local_path"
    _nothing_stored(ctx, client, run.id, path.read_bytes())


# --- item 6, registry layer: external data is refused at registration ------------------------


@pytest.mark.parametrize("where", EXTERNAL_PLACES)
def test_registry_refuses_external_data_wherever_it_points(
    ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "secret.bin").write_bytes(SECRET)
    (tmp_path / "secret.bin").write_bytes(SECRET)
    monkeypatch.chdir(work)  # where a relative location would be read from
    run = runs.create_run(ctx, project="p")
    for i, location in enumerate(("secret.bin", str(work / "secret.bin"), "../secret.bin")):
        blob = ctx.blobs.put_bytes(external_data_model(location, where=where))
        with pytest.raises(InvalidInputError, match="keeps tensor data outside the file") as e:
            registry.register_version(ctx, project="p", model="digits", digest=blob.digest)
        assert e.value.field == "digest"
        assert repr(location) in e.value.message
        path = f"m{i}.onnx"
        runs.log_artifact(ctx, run_id=run.id, path=path, digest=blob.digest, size=blob.size)
        with pytest.raises(InvalidInputError, match="cannot be served") as e:
            registry.register_version(
                ctx, project="p", model="digits", run_id=run.id, artifact_path=path
            )
        assert e.value.field == "artifact_path"
    with pytest.raises(NotFoundError):
        registry.get_model(ctx, project="p", model="digits")  # nothing half-registered
