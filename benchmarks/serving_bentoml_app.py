"""A peer of ``benchmarks/serving.py``: the same ONNX model behind BentoML (issue 8).

A ``@bentoml.service`` with one worker holding one ONNX Runtime session (one thread) and one
``@bentoml.api`` at the Open Inference Protocol v2 path; BentoML's adaptive batching off (the
API is not ``batchable``), access log off. BentoML builds the request model from the method's
parameters, so the body's top-level keys (``inputs``, ``id``) are the parameters, and the
answer is the same JSON as ``serving_fastapi_app.py``'s. An ``async def`` API, as the FastAPI
baseline's route (no thread hop). Run it with the BentoML environment's ``bentoml``:
``SERVING_BASELINE_MODEL=model.onnx bentoml serve serving_bentoml_app:DigitsService
--host 127.0.0.1 --port PORT`` from this folder (health: ``GET /readyz``).
"""

from __future__ import annotations

import os
import uuid

import bentoml
import numpy as np
import onnxruntime as ort
from pydantic import BaseModel

MODEL_NAME = "digits"
_DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class DigitsService:
    def __init__(self) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            os.environ["SERVING_BASELINE_MODEL"], options, providers=["CPUExecutionProvider"]
        )
        self.output_names = [meta.name for meta in self.session.get_outputs()]

    @bentoml.api(route=f"/v2/models/{MODEL_NAME}/infer")
    async def infer(self, inputs: list[Tensor], id: str | None = None) -> dict[str, object]:
        feeds = {
            t.name: np.asarray(t.data, dtype=_DTYPES[t.datatype]).reshape(t.shape) for t in inputs
        }
        results = self.session.run(None, feeds)
        outputs = [
            {"name": name, "shape": list(r.shape), "datatype": "FP32", "data": r.ravel().tolist()}
            for name, r in zip(self.output_names, results, strict=True)
        ]
        return {"model_name": MODEL_NAME, "id": id or uuid.uuid4().hex, "outputs": outputs}
