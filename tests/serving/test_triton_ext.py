"""Triton's extension payloads (model config, repository index, statistics), checked against the
real client's message schemas: every payload must parse into tritonclient's own protobuf
classes, so a client reading it finds the fields where Triton puts them."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2

from shipyard.serving import proto, triton
from shipyard.serving.runtime import OIP_DATATYPES, OnnxModel, load_model
from tests.onnx_models import linear_model, typed_model


def cpu_model(data: bytes) -> OnnxModel:
    return load_model(data, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def linear() -> OnnxModel:
    return cpu_model(linear_model(4, 3).data)


def test_config_of_a_batchable_model_drops_the_batch_dimension(linear: OnnxModel) -> None:
    config = triton.model_config(linear, name="lin", max_batch_size=16, max_queue_delay_us=5000)

    assert config["name"] == "lin"
    assert config["platform"] == "onnxruntime_onnx"
    assert config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == 16
    assert config["input"][0] == {
        "name": "x",
        "data_type": "TYPE_FP32",
        "format": "FORMAT_NONE",
        "dims": [4],
        "is_shape_tensor": False,
        "allow_ragged_batch": False,
        "optional": False,
    }
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
        ("y", "TYPE_FP32", [3])
    ]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 5000
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    parsed = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    assert parsed.max_batch_size == 16 and list(parsed.input[0].dims) == [4]
    assert parsed.input[0].data_type == model_config_pb2.TYPE_FP32


def test_config_of_a_fixed_batch_model_keeps_full_shapes() -> None:
    model = cpu_model(linear_model(4, 3, batch=2).data)

    config = triton.model_config(model, name="fixed", max_batch_size=16, max_queue_delay_us=10)

    assert config["max_batch_size"] == 0
    assert config["input"][0]["dims"] == [2, 4]
    assert config["output"][0]["dims"] == [2, 3]
    assert "dynamic_batching" not in config


def test_config_without_batching_reports_zero(linear: OnnxModel) -> None:
    config = triton.model_config(linear, name="lin", max_batch_size=1)

    assert config["max_batch_size"] == 0
    assert config["input"][0]["dims"] == [-1, 4]


def test_config_names_tritons_datatypes() -> None:
    model = cpu_model(typed_model())

    config = triton.model_config(model, name="typed", max_batch_size=8)

    assert {i["name"]: i["data_type"] for i in config["input"]} == {
        "ids": "TYPE_INT64",
        "mask": "TYPE_BOOL",
        "ids32": "TYPE_INT32",
    }
    assert config["input"][2]["dims"] == []  # ids32 is [n]: only the batch dimension
    json_format.ParseDict(config, model_config_pb2.ModelConfig())
    json_format.ParseDict(config, proto.ModelConfig())


def test_every_oip_datatype_has_a_triton_name() -> None:
    names = set(model_config_pb2.DataType.keys())
    for oip, name in triton.TRITON_DATATYPES.items():
        assert name in names, oip
    assert set(triton.TRITON_DATATYPES) == set(OIP_DATATYPES)


def test_repository_index_lists_states_and_filters_ready() -> None:
    entries = [
        triton.index_entry(name="a", version="1", loaded=True),
        triton.index_entry(name="b", version="2", loaded=False),
        triton.index_entry(name="c", version="3", loaded=False, load_error="not ONNX"),
    ]

    index = triton.repository_index(entries)

    assert index == [
        {"name": "a", "version": "1", "state": "READY"},
        {"name": "b", "version": "2", "state": "LOADING"},
        {"name": "c", "version": "3", "state": "UNAVAILABLE", "reason": "not ONNX"},
    ]
    assert triton.repository_index(entries, ready_only=True) == [index[0]]
    parsed = json_format.ParseDict({"models": index}, service_pb2.RepositoryIndexResponse())
    assert parsed.models[2].reason == "not ONNX"


def test_statistics_count_requests_rows_and_model_calls() -> None:
    stats = triton.InferenceStats(clock_ms=lambda: 1234)
    stats.observe_batch(3, 0.002)
    stats.observe_batch(1, 0.001)
    stats.observe_batch(3, 0.004)
    stats.record_request(
        rows=3,
        ok=True,
        total_ns=900,
        queue_ns=100,
        compute_input_ns=200,
        compute_infer_ns=500,
        compute_output_ns=100,
    )
    stats.record_request(rows=1, ok=True, total_ns=100)
    stats.record_request(rows=5, ok=False, total_ns=50)

    payload = triton.model_statistics([("lin", "2", stats.snapshot())])

    (entry,) = payload["model_stats"]
    assert entry["name"] == "lin" and entry["version"] == "2"
    assert entry["last_inference"] == 1234
    assert entry["inference_count"] == 4  # rows of successful requests
    assert entry["execution_count"] == 3  # model calls
    inference = entry["inference_stats"]
    assert inference["success"] == {"count": 2, "ns": 1000}
    assert inference["fail"] == {"count": 1, "ns": 50}
    assert inference["queue"] == {"count": 2, "ns": 100}
    assert inference["compute_input"] == {"count": 2, "ns": 200}
    assert inference["compute_infer"] == {"count": 2, "ns": 500}
    assert inference["compute_output"] == {"count": 2, "ns": 100}
    assert [(b["batch_size"], b["compute_infer"]) for b in entry["batch_stats"]] == [
        (1, {"count": 1, "ns": 1_000_000}),
        (3, {"count": 2, "ns": 6_000_000}),
    ]
    parsed = json_format.ParseDict(payload, service_pb2.ModelStatisticsResponse())
    assert parsed.model_stats[0].inference_stats.success.ns == 1000


def test_statistics_are_thread_safe() -> None:
    stats = triton.InferenceStats()

    def feed() -> None:
        for _ in range(2000):
            stats.record_request(rows=2, ok=True, total_ns=1)
            stats.observe_batch(2, 1e-9)

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    snapshot = stats.snapshot()
    assert snapshot.inference_count == 16000
    assert snapshot.success.count == 8000
    assert snapshot.execution_count == 8000
    assert snapshot.batches[2].count == 8000


def test_request_rows_counts_the_batch_dimension() -> None:
    inputs = {"x": np.zeros((5, 4)), "y": np.zeros((5,))}

    assert triton.request_rows(inputs, batchable=True) == 5
    assert triton.request_rows(inputs, batchable=False) == 1
    assert triton.request_rows({"s": np.zeros(())}, batchable=True) == 1


def test_server_metadata_lists_the_extensions() -> None:
    meta = triton.server_metadata(name="shipyard", version="1.0")

    assert meta == {
        "name": "shipyard",
        "version": "1.0",
        "extensions": [
            "binary_tensor_data",
            "model_configuration",
            "model_repository",
            "statistics",
        ],
    }
    json_format.ParseDict(meta, service_pb2.ServerMetadataResponse())
