"""The binary tensor data extension, against the real ``tritonclient.http`` encoder and parser."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import serialize_byte_tensor

from shipyard.errors import InvalidInputError
from shipyard.serving import binary
from shipyard.serving.runtime import NUMPY_DTYPES, TensorSpec

LINEAR_IN = [TensorSpec("x", "FP32", (-1, 4))]
LINEAR_OUT = [TensorSpec("y", "FP32", (-1, 3))]
TYPED_IN = [
    TensorSpec("ids", "INT64", (-1, 3)),
    TensorSpec("mask", "BOOL", (-1, 3)),
    TensorSpec("ids32", "INT32", (-1,)),
]
TYPED_OUT = [
    TensorSpec("ids_out", "INT64", (-1, 3)),
    TensorSpec("flipped", "BOOL", (-1, 3)),
    TensorSpec("small", "INT32", (-1,)),
]
TEXT_IN = [TensorSpec("s", "BYTES", (-1,))]
TEXT_OUT = [TensorSpec("t", "BYTES", (-1,))]


def triton_body(*tensors: tuple[str, np.ndarray, str, bool], **kwargs):
    """(body, header length) as tritonclient.http builds them for these inputs."""
    inputs = []
    for name, array, datatype, as_binary in tensors:
        item = httpclient.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array, binary_data=as_binary)
        inputs.append(item)
    return httpclient.InferenceServerClient.generate_request_body(inputs, **kwargs)


def decode(body: bytes, length: int | None, inputs=LINEAR_IN, outputs=LINEAR_OUT):
    return binary.decode_request(body, header_length=length, inputs=inputs, outputs=outputs)


def raw_request(header: dict, *chunks: bytes) -> tuple[bytes, int]:
    text = json.dumps(header).encode()
    return text + b"".join(chunks), len(text)


def fp32_header(shape: list[int], size: int) -> dict:
    return {
        "inputs": [
            {
                "name": "x",
                "shape": shape,
                "datatype": "FP32",
                "parameters": {"binary_data_size": size},
            }
        ]
    }


# --- requests from tritonclient ---------------------------------------------------------------


def test_decodes_tritonclients_binary_fp32_request() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 3
    body, length = triton_body(("x", x, "FP32", True), request_id="r-1")
    assert length is not None and length < len(body)

    request = decode(body, length)

    assert request.id == "r-1"
    np.testing.assert_array_equal(request.inputs["x"], x)
    assert request.inputs["x"].dtype == np.float32
    assert request.outputs == ["y"]
    # no outputs named: tritonclient asks for every output in binary
    assert request.binary_outputs == {"y"}


def test_decodes_several_datatypes_and_a_json_input_in_one_request() -> None:
    ids = np.array([[1, -2, 2**40], [4, 5, 6]], dtype=np.int64)
    mask = np.array([[True, False, True], [False, False, True]])
    ids32 = np.array([7, -8], dtype=np.int32)
    body, length = triton_body(
        ("ids", ids, "INT64", True), ("mask", mask, "BOOL", False), ("ids32", ids32, "INT32", True)
    )

    request = decode(body, length, TYPED_IN, TYPED_OUT)

    np.testing.assert_array_equal(request.inputs["ids"], ids)
    np.testing.assert_array_equal(request.inputs["mask"], mask)
    np.testing.assert_array_equal(request.inputs["ids32"], ids32)
    assert [request.inputs[n].dtype for n in ("ids", "mask", "ids32")] == [
        np.int64,
        np.bool_,
        np.int32,
    ]


def test_decodes_bytes_tensor_as_text() -> None:
    text = np.array(["héllo", "", "wörld, longer"], dtype=object)
    body, length = triton_body(("s", text, "BYTES", True))

    request = decode(body, length, TEXT_IN, TEXT_OUT)

    assert request.inputs["s"].tolist() == ["héllo", "", "wörld, longer"]


def test_requested_outputs_choose_binary_or_json_each() -> None:
    x = np.ones((1, 4), dtype=np.float32)
    item = httpclient.InferInput("x", [1, 4], "FP32")
    item.set_data_from_numpy(x)
    outputs = [
        httpclient.InferRequestedOutput("ids_out", binary_data=False),
        httpclient.InferRequestedOutput("small", binary_data=True),
    ]
    body, length = httpclient.InferenceServerClient.generate_request_body([item], outputs=outputs)
    header = json.loads(body[:length])

    assert binary.binary_outputs(header, ["ids_out", "small", "flipped"]) == {"small"}
    assert binary.binary_outputs({"parameters": {"binary_data_output": True}}, ["a", "b"]) == {
        "a",
        "b",
    }
    assert binary.binary_outputs({"inputs": []}, ["a"]) == frozenset()


def test_decodes_plain_json_body_without_header_length() -> None:
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    ).encode()

    request = decode(body, None)

    np.testing.assert_array_equal(request.inputs["x"], [[1, 2, 3, 4]])
    assert request.binary_outputs == frozenset()


# --- responses to tritonclient ----------------------------------------------------------------


def test_tritonclient_parses_a_binary_response() -> None:
    y = np.arange(6, dtype=np.float32).reshape(2, 3) * 0.5
    small = np.array([1, 2], dtype=np.int32)
    body, length = binary.encode_response(
        {"y": y, "small": small},
        model_name="m",
        model_version="3",
        request_id="abc",
        binary={"y"},
    )
    assert length is not None

    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=length)

    np.testing.assert_array_equal(result.as_numpy("y"), y)
    np.testing.assert_array_equal(result.as_numpy("small"), small)
    response = result.get_response()
    assert response["model_name"] == "m" and response["model_version"] == "3"
    assert response["id"] == "abc"
    assert response["outputs"][0]["parameters"] == {"binary_data_size": y.nbytes}
    assert "parameters" not in response["outputs"][1]


def test_tritonclient_parses_binary_bytes_and_bool_outputs() -> None:
    text = np.array(["a", "ünïcode", ""], dtype=object)
    flags = np.array([[True, False]])
    body, length = binary.encode_response(
        {"t": text, "f": flags}, model_name="m", model_version="1", binary={"t", "f"}
    )

    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=length)

    assert result.as_numpy("t").tolist() == [b"a", "ünïcode".encode(), b""]
    np.testing.assert_array_equal(result.as_numpy("f"), flags)


def test_response_without_binary_outputs_is_plain_json() -> None:
    body, length = binary.encode_response(
        {"y": np.array([[1.5, 2.0]], dtype=np.float32)}, model_name="m", model_version="1"
    )

    assert length is None
    parsed = json.loads(body)
    assert parsed["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [1.5, 2.0]}
    ]
    result = httpclient.InferenceServerClient.parse_response_body(body)
    np.testing.assert_array_equal(result.as_numpy("y"), [[1.5, 2.0]])


# --- raw tensors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("FP32", [1.5, -2.25]),
        ("FP64", [1e300, -0.0]),
        ("FP16", [0.5, 2.0]),
        ("INT8", [-128, 127]),
        ("INT16", [-3, 3]),
        ("INT32", [-(2**31), 2**31 - 1]),
        ("INT64", [-(2**63), 2**63 - 1]),
        ("UINT8", [0, 255]),
        ("UINT16", [0, 65535]),
        ("UINT32", [0, 2**32 - 1]),
        ("UINT64", [0, 2**64 - 1]),
        ("BOOL", [True, False]),
    ],
)
def test_raw_round_trip_matches_numpy_little_endian(datatype: str, values: list) -> None:
    array = np.array(values, dtype=NUMPY_DTYPES[datatype])
    raw = binary.tensor_to_bytes(array)

    assert raw == array.astype(array.dtype.newbyteorder("<")).tobytes()
    back = binary.tensor_from_bytes(raw, name="t", datatype=datatype, shape=[2])
    np.testing.assert_array_equal(back, array)
    assert back.dtype == array.dtype


def test_bytes_raw_form_is_tritonclients() -> None:
    text = np.array([b"ab", b"", "ç".encode()], dtype=object)
    expected = serialize_byte_tensor(text).item()

    assert binary.tensor_to_bytes(np.array(["ab", "", "ç"], dtype=object)) == expected
    back = binary.tensor_from_bytes(expected, name="s", datatype="BYTES", shape=[3])
    assert back.tolist() == ["ab", "", "ç"]


def test_data_at_an_odd_offset_is_copied_aligned() -> None:
    raw = b"\x00" + np.arange(4, dtype=np.float64).tobytes()

    array = binary.tensor_from_bytes(memoryview(raw)[1:], name="t", datatype="FP64", shape=[2, 2])

    assert array.flags.aligned and array.ctypes.data % 8 == 0
    np.testing.assert_array_equal(array, [[0, 1], [2, 3]])


# --- bad requests: each names the tensor and the mismatch -------------------------------------


def test_binary_size_that_does_not_match_the_shape_is_refused() -> None:
    body, length = raw_request(fp32_header([2, 4], 28), b"\x00" * 28)

    with pytest.raises(InvalidInputError) as caught:
        decode(body, length)

    assert "input 'x' has 28 bytes of binary data" in caught.value.message
    assert "shape [2, 4] of FP32 needs 32" in caught.value.message
    assert caught.value.field == "inputs.x.parameters.binary_data_size"


def test_tritonclient_body_with_a_shape_that_lies_is_refused() -> None:
    item = httpclient.InferInput("x", [2, 4], "FP32")
    item.set_data_from_numpy(np.ones((2, 4), dtype=np.float32))
    item.set_shape([3, 4])  # the bytes are for [2, 4]
    body, length = httpclient.InferenceServerClient.generate_request_body([item])

    with pytest.raises(InvalidInputError, match=r"input 'x' has 32 bytes .* needs 48"):
        decode(body, length)


def test_header_length_beyond_the_body_is_refused() -> None:
    body, _ = raw_request(fp32_header([1, 4], 16), b"\x00" * 16)

    with pytest.raises(InvalidInputError, match=r"JSON header has 1000 bytes.*only") as caught:
        decode(body, 1000)
    assert caught.value.field == binary.HEADER_LENGTH


def test_header_length_that_cuts_the_json_is_refused() -> None:
    body, length = raw_request(fp32_header([1, 4], 16), b"\x00" * 16)

    with pytest.raises(InvalidInputError, match="not valid JSON"):
        decode(body, length - 3)


def test_binary_data_size_beyond_the_body_is_refused() -> None:
    body, length = raw_request(fp32_header([1, 4], 16), b"\x00" * 12)

    with pytest.raises(
        InvalidInputError, match="input 'x' declares binary_data_size 16, but only 12"
    ):
        decode(body, length)


def test_bytes_left_over_after_the_inputs_are_refused() -> None:
    body, length = raw_request(fp32_header([1, 4], 16), b"\x00" * 20)

    with pytest.raises(InvalidInputError, match="4 bytes after the last binary input"):
        decode(body, length)


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", ""])
def test_header_length_that_is_not_a_number_is_refused(value: str) -> None:
    with pytest.raises(InvalidInputError, match="Inference-Header-Content-Length"):
        binary.parse_header_length(value)


def test_header_length_parses() -> None:
    assert binary.parse_header_length(" 42 ") == 42
    assert binary.parse_header_length(None) is None


def test_unknown_datatype_is_refused() -> None:
    header = fp32_header([1, 4], 16)
    header["inputs"][0]["datatype"] = "FP8"
    body, length = raw_request(header, b"\x00" * 16)

    with pytest.raises(InvalidInputError, match="datatype 'FP8' is not an Open Inference"):
        decode(body, length)


def test_datatype_other_than_the_models_is_refused() -> None:
    header = fp32_header([1, 4], 32)
    header["inputs"][0]["datatype"] = "FP64"
    body, length = raw_request(header, b"\x00" * 32)

    with pytest.raises(
        InvalidInputError, match="input 'x' has datatype FP64 but the model expects"
    ):
        decode(body, length)


def test_unsupported_datatype_in_raw_form_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="BF16 is not supported"):
        binary.tensor_from_bytes(b"\x00\x00", name="h", datatype="BF16", shape=[1])


def test_shape_other_than_the_models_is_refused() -> None:
    body, length = raw_request(fp32_header([2, 5], 40), b"\x00" * 40)

    with pytest.raises(InvalidInputError, match="dimension 1 is 5, expected 4") as caught:
        decode(body, length)
    assert caught.value.field == "inputs.x.shape"


def _bytes_body(payload: bytes, count: int) -> tuple[bytes, int]:
    header = {
        "inputs": [
            {
                "name": "s",
                "shape": [count],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(payload)},
            }
        ]
    }
    return raw_request(header, payload)


@pytest.mark.parametrize(
    ("payload", "count", "message"),
    [
        (struct.pack("<I", 2) + b"ab" + b"\x01\x00", 2, "ends before element 1 of 2"),
        (struct.pack("<I", 9) + b"abc", 1, "element 0 declares 9 bytes but only 3"),
        (struct.pack("<I", 1) + b"a" + b"zz", 1, "2 bytes are left after its 1 BYTES elements"),
        (struct.pack("<I", 2) + b"\xff\xfe", 1, "element 0 is not valid UTF-8"),
    ],
)
def test_malformed_bytes_tensor_is_refused(payload: bytes, count: int, message: str) -> None:
    body, length = _bytes_body(payload, count)

    with pytest.raises(InvalidInputError, match=message) as caught:
        decode(body, length, TEXT_IN, TEXT_OUT)
    assert "input 's'" in caught.value.message


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"inputs": []}, "'inputs' must be a non-empty list"),
        ({"inputs": [{"name": "z", "shape": [1], "datatype": "FP32"}]}, "unknown input 'z'"),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
                ],
                "outputs": [{"name": "nope"}],
            },
            "unknown output 'nope'",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
                ],
                "outputs": [{"name": "y", "parameters": {"classification": 2}}],
            },
            "classification extension",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, "a", 3, 4]}
                ]
            },
            "FP32 needs numbers",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}]},
            "data has 3 values but shape",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1, 4],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": True},
                    }
                ]
            },
            "binary_data_size must be a non-negative integer",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1, 4],
                        "datatype": "FP32",
                        "parameters": {"shared_memory_region": "r"},
                    }
                ]
            },
            "shared memory",
        ),
        ([1, 2], "must be an object"),
    ],
)
def test_bad_headers_are_refused(header: object, message: str) -> None:
    body, length = raw_request(header)  # type: ignore[arg-type]

    with pytest.raises(InvalidInputError, match=message):
        decode(body, length)


def test_missing_input_is_refused() -> None:
    ids = np.zeros((1, 3), dtype=np.int64)
    body, length = triton_body(("ids", ids, "INT64", True))

    with pytest.raises(InvalidInputError, match="input 'mask' is missing"):
        decode(body, length, TYPED_IN, TYPED_OUT)


def test_input_given_twice_is_refused() -> None:
    x = np.zeros((1, 4), dtype=np.float32)
    body, length = triton_body(("x", x, "FP32", True), ("x", x, "FP32", True))

    with pytest.raises(InvalidInputError, match="input 'x' is given twice"):
        decode(body, length)
