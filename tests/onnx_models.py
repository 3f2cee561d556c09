"""Small ONNX models built in-process with ``onnx.helper`` (no torch, no downloads)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


@dataclass(frozen=True)
class LinearModel:
    data: bytes
    weights: np.ndarray
    bias: np.ndarray
    input_name: str = "x"
    output_name: str = "y"

    def session(self) -> ort.InferenceSession:
        return ort.InferenceSession(self.data, providers=["CPUExecutionProvider"])

    def reference(self, x: np.ndarray) -> np.ndarray:
        """What ONNX Runtime itself answers for ``x`` (run directly, no batching)."""
        return self.session().run([self.output_name], {self.input_name: x.astype(np.float32)})[0]


def _model(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def linear_model(
    features: int = 64,
    classes: int = 10,
    *,
    seed: int = 0,
    batch: str | int = "batch",
    input_name: str = "x",
    output_name: str = "y",
) -> LinearModel:
    """y = x @ W + b, x: FP32 [batch, features] (dynamic batch unless ``batch`` is an int)."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((features, classes)).astype(np.float32)
    bias = rng.standard_normal(classes).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [input_name, "W"], ["h"]),
            helper.make_node("Add", ["h", "b"], [output_name]),
        ],
        "linear",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, classes])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    return LinearModel(
        data=_model(graph),
        weights=weights,
        bias=bias,
        input_name=input_name,
        output_name=output_name,
    )


def two_input_model() -> bytes:
    """sum = a + b, diff = a - b; a, b: FP64 [n, 3]."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Sub", ["a", "b"], ["diff"]),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.DOUBLE, ["n", 3]),
            helper.make_tensor_value_info("b", TensorProto.DOUBLE, ["n", 3]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.DOUBLE, ["n", 3]),
            helper.make_tensor_value_info("diff", TensorProto.DOUBLE, ["n", 3]),
        ],
    )
    return _model(graph)


def typed_model() -> bytes:
    """ids_out = ids (INT64 [n, 3]), flipped = not mask (BOOL [n, 3]), small = ids32 (INT32 [n])."""
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["ids"], ["ids_out"]),
            helper.make_node("Not", ["mask"], ["flipped"]),
            helper.make_node("Identity", ["ids32"], ["small"]),
        ],
        "typed",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 3]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["n", 3]),
            helper.make_tensor_value_info("ids32", TensorProto.INT32, ["n"]),
        ],
        [
            helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["n", 3]),
            helper.make_tensor_value_info("flipped", TensorProto.BOOL, ["n", 3]),
            helper.make_tensor_value_info("small", TensorProto.INT32, ["n"]),
        ],
    )
    return _model(graph)


def sequence_output_model() -> bytes:
    """An output that is a sequence of tensors, like a scikit-learn ZipMap: not servable."""
    graph = helper.make_graph(
        [helper.make_node("SequenceConstruct", ["x"], ["seq"])],
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, ["n", 2])],
    )
    return _model(graph)


def total_sum_model() -> bytes:
    """total = sum of every element of x (FP32 [n, 4]): the output has no batch dimension."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0)],
        "total",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])],
    )
    return _model(graph)


EXTERNAL_PLACES = ("initializer", "attribute", "subgraph")


def external_tensor(name: str, location: str, *, size: int = 4) -> onnx.TensorProto:
    """An FP32 [size] tensor whose data is declared to be in the file ``location``."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[size])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(4 * size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def external_data_model(location: str, *, where: str = "initializer", size: int = 4) -> bytes:
    """y = x + W (x: FP32 [size]) where W's bytes are declared to sit in the file ``location``.

    ``where`` places the external tensor: a graph ``initializer``, the tensor ``attribute`` of a
    Constant node, or a Constant inside the ``subgraph`` of an If (then-branch; a second input
    ``cond`` picks it). Not checked with onnx.checker, which would look for the file.
    """
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [size])
    inputs, initializers = [x], []
    if where == "initializer":
        nodes = [helper.make_node("Add", ["x", "W"], ["y"])]
        initializers = [external_tensor("W", location, size=size)]
    elif where == "attribute":
        nodes = [
            helper.make_node(
                "Constant", [], ["W"], value=external_tensor("Wc", location, size=size)
            ),
            helper.make_node("Add", ["x", "W"], ["y"]),
        ]
    elif where == "subgraph":
        out = helper.make_tensor_value_info("branch", TensorProto.FLOAT, [size])
        then_branch = helper.make_graph(
            [
                helper.make_node(
                    "Constant", [], ["branch"], value=external_tensor("Wt", location, size=size)
                )
            ],
            "then",
            [],
            [out],
        )
        else_branch = helper.make_graph(
            [
                helper.make_node(
                    "Constant",
                    [],
                    ["branch"],
                    value=numpy_helper.from_array(np.zeros(size, np.float32), "We"),
                )
            ],
            "else",
            [],
            [out],
        )
        nodes = [
            helper.make_node(
                "If", ["cond"], ["W"], then_branch=then_branch, else_branch=else_branch
            ),
            helper.make_node("Add", ["x", "W"], ["y"]),
        ]
        inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    else:
        raise ValueError(f"where must be one of {EXTERNAL_PLACES}")
    graph = helper.make_graph(nodes, f"external_{where}", inputs, [y], initializers)
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 9
    return model.SerializeToString()
