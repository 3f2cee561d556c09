"""The baseline of ``benchmarks/serving.py``: a plain FastAPI app serving one ONNX model.

What a user would write in 40 lines: pydantic models for the Open Inference Protocol (v2)
request, ``session.run`` in an ``async def`` route (no thread hop: the fastest plain FastAPI
form for a small model), a dict answer. Run it as
``SERVING_BASELINE_MODEL=model.onnx uvicorn serving_fastapi_app:app`` (uvicorn picks httptools
and uvloop when they are installed, as here).
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

_DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}

options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(
    os.environ["SERVING_BASELINE_MODEL"], options, providers=["CPUExecutionProvider"]
)
app = FastAPI()


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[Tensor]


@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: InferRequest) -> dict[str, object]:
    try:
        feeds = {
            t.name: np.asarray(t.data, dtype=_DTYPES[t.datatype]).reshape(t.shape)
            for t in request.inputs
        }
        results = session.run(None, feeds)
    except Exception as exc:
        raise HTTPException(400, str(exc)) from None
    outputs = [
        {"name": meta.name, "shape": list(r.shape), "datatype": "FP32", "data": r.ravel().tolist()}
        for meta, r in zip(session.get_outputs(), results, strict=True)
    ]
    return {"model_name": name, "id": request.id or uuid.uuid4().hex, "outputs": outputs}
