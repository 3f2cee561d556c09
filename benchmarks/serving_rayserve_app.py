"""A peer of ``benchmarks/serving.py``: the same ONNX model behind Ray Serve (issue 8).

A Ray Serve deployment, ``num_replicas=1`` and ``num_cpus=1``, holding one ONNX Runtime
session (one thread), reached through Serve's HTTP proxy at the Open Inference Protocol v2
path; Serve's batching (``@serve.batch``) not used. ``__call__`` takes the Starlette request
(Serve's plainest HTTP form, no FastAPI ingress), access log off, and answers the same JSON as
``serving_fastapi_app.py``. This script starts a local Ray instance of one CPU (no
dashboard), runs the application and waits until SIGTERM; the benchmark pins it, and so every
process Ray starts (GCS, raylet, proxy, controller, replica), to one core. Run it with the Ray
Serve environment's python:
``python serving_rayserve_app.py --model model.onnx --port PORT --temp-dir DIR``
(health: ``GET /-/healthz``, routes: ``GET /-/routes``).
"""

from __future__ import annotations

import argparse
import signal
import threading
import uuid
from typing import Any

import numpy as np
import onnxruntime as ort
import ray
from ray import serve
from starlette.requests import Request

MODEL_NAME = "digits"
ROUTE = f"/v2/models/{MODEL_NAME}/infer"
_DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


@serve.deployment(
    num_replicas=1,
    ray_actor_options={"num_cpus": 1},
    # Serve's default (5) would queue c=64 in the proxy's router rather than at the replica.
    max_ongoing_requests=256,
)
class Digits:
    def __init__(self, model_path: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        self.output_names = [meta.name for meta in self.session.get_outputs()]

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        feeds = {
            t["name"]: np.asarray(t["data"], dtype=_DTYPES[t["datatype"]]).reshape(t["shape"])
            for t in body["inputs"]
        }
        results = self.session.run(None, feeds)
        outputs = [
            {"name": name, "shape": list(r.shape), "datatype": "FP32", "data": r.ravel().tolist()}
            for name, r in zip(self.output_names, results, strict=True)
        ]
        return {
            "model_name": MODEL_NAME,
            "id": body.get("id") or uuid.uuid4().hex,
            "outputs": outputs,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the .onnx file")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--temp-dir", required=True, help="Ray's session folder (a short path)")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        _temp_dir=args.temp_dir,
        configure_logging=False,
        log_to_driver=False,
    )
    try:
        quiet = {"enable_access_log": False, "log_level": "WARNING"}  # as the FastAPI baseline
        serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config=quiet)
        serve.run(
            Digits.bind(args.model),
            name=MODEL_NAME,
            route_prefix=ROUTE,
            blocking=False,
            logging_config=quiet,
        )
        print(f"ray serve: {ROUTE} on 127.0.0.1:{args.port}", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
