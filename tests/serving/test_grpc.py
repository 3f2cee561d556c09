"""The KServe v2 / Triton gRPC service, driven by the real ``tritonclient.grpc`` on real ports."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import uvloop
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from shipyard.errors import InvalidInputError
from shipyard.serving import proto
from shipyard.serving.batcher import Batcher
from shipyard.serving.grpc_server import GrpcServerThread, serve_grpc, start_grpc_server
from shipyard.serving.runtime import OnnxModel, load_model
from shipyard.serving.triton import InferenceStats
from tests.onnx_models import OPSET, LinearModel, linear_model, typed_model

LIMIT = 64 * 1024  # the linear server's message limit: 16 bytes a row in, 256 bytes a row out


def text_model() -> bytes:
    """t = s, both BYTES (ONNX strings) [n]."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])],
        "text",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def cpu_model(data: bytes) -> OnnxModel:
    return load_model(data, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def linear() -> LinearModel:
    return linear_model(4, 64)


@pytest.fixture(scope="module")
def linear_stats() -> InferenceStats:
    return InferenceStats()


@pytest.fixture(scope="module")
def linear_server(linear: LinearModel, linear_stats: InferenceStats) -> Iterator[GrpcServerThread]:
    with serve_grpc(
        cpu_model(linear.data),
        name="lin",
        version="1",
        stats=linear_stats,
        max_message_bytes=LIMIT,
        max_batch_size=8,
        max_wait_ms=2.0,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def client(linear_server: GrpcServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(f"127.0.0.1:{linear_server.port}") as c:
        yield c


@pytest.fixture(scope="module")
def typed_client() -> Iterator[grpcclient.InferenceServerClient]:
    with (
        serve_grpc(cpu_model(typed_model()), name="typed", version="7") as server,
        grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as c,
    ):
        yield c


@pytest.fixture(scope="module")
def text_client() -> Iterator[grpcclient.InferenceServerClient]:
    with (
        serve_grpc(cpu_model(text_model()), name="text", version="1") as server,
        grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as c,
    ):
        yield c


def fp32_input(array: np.ndarray, name: str = "x") -> grpcclient.InferInput:
    item = grpcclient.InferInput(name, list(array.shape), "FP32")
    item.set_data_from_numpy(array)
    return item


def refused(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return caught.value


# --- health and metadata ----------------------------------------------------------------------


def test_health(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("lin")
    assert client.is_model_ready("lin", "1")


def test_model_ready_for_an_unknown_model_is_not_found(
    client: grpcclient.InferenceServerClient,
) -> None:
    error = refused(client.is_model_ready, "nope")
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "model 'nope' is not served here" in error.message()

    error = refused(client.is_model_ready, "lin", "9")
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "version '9'" in error.message()


def test_server_metadata(client: grpcclient.InferenceServerClient) -> None:
    meta = client.get_server_metadata(as_json=True)

    assert meta["name"] == "shipyard"
    assert {"binary_tensor_data", "model_configuration", "statistics"} <= set(meta["extensions"])


def test_model_metadata(client: grpcclient.InferenceServerClient) -> None:
    meta = client.get_model_metadata("lin")

    assert meta.name == "lin" and list(meta.versions) == ["1"]
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("y", "FP32", [-1, 64])]


def test_model_config(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("lin").config

    assert config.name == "lin"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("x", grpcclient.model_config_pb2.TYPE_FP32, [4])
    ]
    assert list(config.output[0].dims) == [64]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000


def test_model_config_of_an_unbatched_model(typed_client: grpcclient.InferenceServerClient) -> None:
    config = typed_client.get_model_config("typed", as_json=True)["config"]

    assert config.get("max_batch_size", 0) == 0
    assert {i["name"]: i["data_type"] for i in config["input"]} == {
        "ids": "TYPE_INT64",
        "mask": "TYPE_BOOL",
        "ids32": "TYPE_INT32",
    }


def test_repository_index(client: grpcclient.InferenceServerClient) -> None:
    index = client.get_model_repository_index(as_json=True)

    assert index["models"] == [{"name": "lin", "version": "1", "state": "READY"}]


def test_repository_load_is_refused_clearly(client: grpcclient.InferenceServerClient) -> None:
    error = refused(client.load_model, "other")

    assert error.status() == "StatusCode.UNIMPLEMENTED"
    assert "serves 'lin' version 1 only" in error.message()


# --- inference --------------------------------------------------------------------------------


def test_infer_fp32(client: grpcclient.InferenceServerClient, linear: LinearModel) -> None:
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)

    result = client.infer("lin", [fp32_input(x)], request_id="req-7")

    np.testing.assert_allclose(result.as_numpy("y"), linear.reference(x), rtol=1e-6)
    assert result.get_response().id == "req-7"
    assert result.get_response().model_version == "1"


def test_infer_counts_in_the_statistics(
    client: grpcclient.InferenceServerClient, linear_stats: InferenceStats
) -> None:
    before = linear_stats.snapshot()

    client.infer("lin", [fp32_input(np.ones((5, 4), dtype=np.float32))])
    refused(client.infer, "lin", [fp32_input(np.ones((1, 3), dtype=np.float32))])

    stats = client.get_inference_statistics("lin").model_stats[0]
    assert stats.name == "lin" and stats.version == "1"
    assert stats.inference_count == before.inference_count + 5
    assert stats.execution_count == before.execution_count + 1
    assert stats.inference_stats.success.count == before.success.count + 1
    assert stats.inference_stats.fail.count == before.fail.count + 1
    assert stats.inference_stats.compute_infer.ns > before.compute_infer.ns
    assert any(b.batch_size == 5 for b in stats.batch_stats)
    all_models = client.get_inference_statistics()
    assert [s.name for s in all_models.model_stats] == ["lin"]


def test_infer_int64_bool_int32_and_one_output(
    typed_client: grpcclient.InferenceServerClient,
) -> None:
    ids = np.array([[1, 2**40, -3], [4, 5, 6]], dtype=np.int64)
    mask = np.array([[True, False, True], [False, True, False]])
    ids32 = np.array([7, -8], dtype=np.int32)
    inputs = []
    for name, array, datatype in (
        ("ids", ids, "INT64"),
        ("mask", mask, "BOOL"),
        ("ids32", ids32, "INT32"),
    ):
        item = grpcclient.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array)
        inputs.append(item)

    result = typed_client.infer("typed", inputs)
    np.testing.assert_array_equal(result.as_numpy("ids_out"), ids)
    np.testing.assert_array_equal(result.as_numpy("flipped"), ~mask)
    np.testing.assert_array_equal(result.as_numpy("small"), ids32)

    only = typed_client.infer("typed", inputs, outputs=[grpcclient.InferRequestedOutput("small")])
    assert [o.name for o in only.get_response().outputs] == ["small"]


def test_infer_bytes(text_client: grpcclient.InferenceServerClient) -> None:
    text = np.array([b"hello", "wörld".encode(), b""], dtype=object)
    item = grpcclient.InferInput("s", [3], "BYTES")
    item.set_data_from_numpy(text)

    result = text_client.infer("text", [item])

    assert result.as_numpy("t").tolist() == [b"hello", "wörld".encode(), b""]


def test_infer_with_typed_contents(linear_server: GrpcServerThread, linear: LinearModel) -> None:
    """KServe's clients may send ``contents.fp32_contents`` instead of raw bytes."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    request = service_pb2.ModelInferRequest(model_name="lin")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())

    with grpc.insecure_channel(f"127.0.0.1:{linear_server.port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request)
        wrong = service_pb2.ModelInferRequest(model_name="lin")
        bad = wrong.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        bad.contents.int64_contents.extend([1, 2, 3, 4])
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(wrong)

    y = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 64)
    np.testing.assert_allclose(y, linear.reference(x), rtol=1e-6)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "its data is in contents.int64_contents" in caught.value.details()


# --- bad requests -----------------------------------------------------------------------------


def test_message_over_the_limit_is_resource_exhausted(
    client: grpcclient.InferenceServerClient,
) -> None:
    big = np.zeros((LIMIT // 16 + 64, 4), dtype=np.float32)  # > LIMIT bytes of raw data

    error = refused(client.infer, "lin", [fp32_input(big)])

    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "larger than max" in error.message()
    assert str(LIMIT) in error.message()
    assert client.is_server_ready()  # and it still serves


def test_response_over_the_limit_says_what_to_change(
    client: grpcclient.InferenceServerClient,
) -> None:
    rows = LIMIT // 256 + 8  # the request is small, the response (256 bytes a row) is not

    error = refused(client.infer, "lin", [fp32_input(np.zeros((rows, 4), dtype=np.float32))])

    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert f"over this server's gRPC message limit of {LIMIT}" in error.message()
    assert "send fewer rows" in error.message()


def test_unknown_model_is_not_found(client: grpcclient.InferenceServerClient) -> None:
    error = refused(client.infer, "ghost", [fp32_input(np.ones((1, 4), dtype=np.float32))])

    assert error.status() == "StatusCode.NOT_FOUND"
    assert "model 'ghost' is not served here; this server serves 'lin'" in error.message()


def test_wrong_shape_is_invalid_argument_naming_the_input(
    client: grpcclient.InferenceServerClient,
) -> None:
    error = refused(client.infer, "lin", [fp32_input(np.ones((2, 5), dtype=np.float32))])

    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'x' has shape [2, 5]" in error.message()
    assert "dimension 1 is 5, expected 4" in error.message()


def test_raw_bytes_that_do_not_match_the_shape_are_refused(
    client: grpcclient.InferenceServerClient,
) -> None:
    item = fp32_input(np.ones((2, 4), dtype=np.float32))
    item.set_shape([3, 4])

    error = refused(client.infer, "lin", [item])

    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'x' has 32 bytes of binary data" in error.message()


def test_unknown_and_missing_inputs_are_refused(
    typed_client: grpcclient.InferenceServerClient,
) -> None:
    stray = grpcclient.InferInput("nope", [1], "INT32")
    stray.set_data_from_numpy(np.ones(1, dtype=np.int32))
    error = refused(typed_client.infer, "typed", [stray])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "unknown input 'nope'" in error.message()

    ids = grpcclient.InferInput("ids", [1, 3], "INT64")
    ids.set_data_from_numpy(np.ones((1, 3), dtype=np.int64))
    error = refused(typed_client.infer, "typed", [ids])
    assert "input 'mask' is missing" in error.message()


def test_unknown_output_is_refused(client: grpcclient.InferenceServerClient) -> None:
    outputs = [grpcclient.InferRequestedOutput("z")]

    error = refused(
        client.infer, "lin", [fp32_input(np.ones((1, 4), dtype=np.float32))], outputs=outputs
    )

    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "unknown output 'z'" in error.message()


def test_non_loopback_bind_is_refused(linear: LinearModel) -> None:
    with pytest.raises(InvalidInputError, match="not a loopback address"):
        serve_grpc(cpu_model(linear.data), name="lin", version="1", host="0.0.0.0")


def test_port_in_use_is_refused(linear: LinearModel, linear_server: GrpcServerThread) -> None:
    with pytest.raises(InvalidInputError, match="is the port in use"):
        serve_grpc(cpu_model(linear.data), name="lin", version="1", port=linear_server.port)


# --- in the replica's event loop --------------------------------------------------------------


def test_in_loop_server_loads_late_and_shares_a_batcher(linear: LinearModel) -> None:
    """How the replica runs it: in its own (uvloop) event loop, answering UNAVAILABLE until the
    model is handed over, then batching through the replica's batcher."""
    model = cpu_model(linear.data)
    stats = InferenceStats()
    x = np.random.default_rng(2).standard_normal((1, 4)).astype(np.float32)

    async def scenario() -> None:
        server = await start_grpc_server(None, name="lin", version="1", stats=stats)
        batcher = Batcher(model.predict, max_batch_size=8, on_batch=stats.observe_batch)
        async with aioclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client:
            try:
                assert not await client.is_server_ready()
                item = aioclient.InferInput("x", [1, 4], "FP32")
                item.set_data_from_numpy(x)
                with pytest.raises(InferenceServerException) as caught:
                    await client.infer("lin", [item])
                assert caught.value.status() == "StatusCode.UNAVAILABLE"
                assert "is loading" in caught.value.message()
                index = await client.get_model_repository_index(as_json=True)
                assert index["models"][0]["state"] == "LOADING"

                server.servicer.loading_failed("not an ONNX model")
                with pytest.raises(InferenceServerException) as caught:
                    await client.infer("lin", [item])
                assert "failed to load: not an ONNX model" in caught.value.message()
                index = await client.get_model_repository_index(as_json=True)
                assert index["models"][0] == {
                    "name": "lin",
                    "version": "1",
                    "state": "UNAVAILABLE",
                    "reason": "not an ONNX model",
                }

                await batcher.start()
                server.servicer.activate(model, batcher=batcher)
                assert await client.is_server_ready()
                config = (await client.get_model_config("lin")).config
                assert config.max_batch_size == 8
                assert config.dynamic_batching.max_queue_delay_microseconds == 5000
                results = await asyncio.gather(*(client.infer("lin", [item]) for _ in range(16)))
            finally:
                await server.stop()
                await batcher.stop()
        for result in results:
            np.testing.assert_allclose(result.as_numpy("y"), linear.reference(x), rtol=1e-6)
        snapshot = stats.snapshot()
        assert snapshot.inference_count == 16
        assert sum(size * calls.count for size, calls in snapshot.batches.items()) == 16
        assert sum(batcher.batch_sizes.values()) == snapshot.execution_count

    uvloop.run(scenario())


# --- the vendored descriptors -----------------------------------------------------------------


def test_vendored_service_matches_tritonclients_on_the_wire() -> None:
    """Every method and every field tritonclient knows has the same number and type in ours:
    messages are matched on the wire by field number only."""
    theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    ours = proto.POOL.FindServiceByName(proto.SERVICE)
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    for method in theirs.methods:
        mine = ours.methods_by_name[method.name]
        assert mine.input_type.full_name == method.input_type.full_name
        assert mine.output_type.full_name == method.output_type.full_name

    def fields(message, seen: set[str]) -> None:
        if message.full_name in seen:
            return
        seen.add(message.full_name)
        mine = proto.POOL.FindMessageTypeByName(message.full_name)
        for field in message.fields:
            counterpart = mine.fields_by_number[field.number]
            assert (counterpart.name, counterpart.type) == (field.name, field.type), field
            if field.message_type is not None:
                fields(field.message_type, seen)

    seen: set[str] = set()
    for method in theirs.methods:
        fields(method.input_type, seen)
        fields(method.output_type, seen)
    assert "inference.ModelConfig" in seen and len(seen) > 50
