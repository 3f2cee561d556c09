"""A peer of ``benchmarks/serving.py``: the same ONNX model behind LitServe (issue 8).

A ``litserve.LitAPI`` holding one ONNX Runtime session (one thread), LitServe's batching off
(``max_batch_size=1``), one inference worker and one API server process, ZeroMQ between them
(``fast_queue=True``, LitServe's advice above 100 requests/s), access log off. It answers the
same Open Inference Protocol v2 JSON as ``serving_fastapi_app.py`` at the same path. Run it
with the LitServe environment's python:
``python serving_litserve_app.py --model model.onnx --port PORT`` (health: ``GET /health``).
"""

from __future__ import annotations

import argparse
import uuid
from typing import Any

import litserve as ls
import numpy as np
import onnxruntime as ort

MODEL_NAME = "digits"
_DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


class OnnxAPI(ls.LitAPI):
    def __init__(self, model_path: str) -> None:
        super().__init__(max_batch_size=1, api_path=f"/v2/models/{MODEL_NAME}/infer")
        self.model_path = model_path

    def setup(self, device: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            self.model_path, options, providers=["CPUExecutionProvider"]
        )
        self.output_names = [meta.name for meta in self.session.get_outputs()]

    # No annotation on ``request`` or on encode_response's return: LitServe hands such a route the
    # parsed JSON and sends back the dict as JSON (an annotation would become a FastAPI type).
    def decode_request(self, request, **kwargs: Any) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        feeds = {
            t["name"]: np.asarray(t["data"], dtype=_DTYPES[t["datatype"]]).reshape(t["shape"])
            for t in request["inputs"]
        }
        return {"id": request.get("id"), "feeds": feeds}

    def predict(self, x: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {"id": x["id"], "results": self.session.run(None, x["feeds"])}

    def encode_response(self, output: dict[str, Any], **kwargs: Any):  # type: ignore[no-untyped-def]
        outputs = [
            {"name": name, "shape": list(r.shape), "datatype": "FP32", "data": r.ravel().tolist()}
            for name, r in zip(self.output_names, output["results"], strict=True)
        ]
        return {
            "model_name": MODEL_NAME,
            "id": output["id"] or uuid.uuid4().hex,
            "outputs": outputs,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the .onnx file")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = ls.LitServer(
        OnnxAPI(args.model),
        accelerator="cpu",
        devices=1,
        workers_per_device=1,
        fast_queue=True,
        timeout=60,
    )
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
        access_log=False,
    )


if __name__ == "__main__":
    main()
