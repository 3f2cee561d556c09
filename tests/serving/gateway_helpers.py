"""A real shipyard server (uvicorn, in a thread of the test process, so tests can reach its
reconciler's knobs), with auth on, tokens, and registered models; and a load generator."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import uvicorn

from shipyard.client import Client
from shipyard.client.http import HttpBackend
from shipyard.context import Context
from shipyard.security.tokens import create_token
from shipyard.server.app import create_app
from shipyard.settings import Settings
from tests.conftest import free_port, wait_for


class ThreadServer:
    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = Settings(home=home, server_url=self.url)
        self.app = create_app(self.settings, auth=True, host="127.0.0.1")
        self.ctx: Context = self.app.state.ctx
        _, self.admin_token = create_token(self.ctx, name="admin")
        _, self.reader_token = create_token(
            self.ctx, name="reader", project="default", role="viewer"
        )
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=60, what="the server to start")

    def client(self, token: str | None = None) -> Client:
        return Client(backend=HttpBackend(self.url, token=token or self.admin_token))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def request_body(x: np.ndarray) -> dict[str, object]:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip


@dataclass
class Load:
    """Threads that send inference requests through the gateway until stopped."""

    url: str
    token: str
    threads: int = 4
    ok: Counter[str] = field(default_factory=Counter)  # by the version that served
    failures: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)  # the serving version, in order
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for i in range(self.threads):
            worker = threading.Thread(target=self._run, args=(i,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(30)

    def total(self) -> int:
        with self._lock:
            return sum(self.ok.values()) + len(self.failures)

    def wait_for_more(self, n: int, timeout: float = 30.0) -> None:
        target = self.total() + n
        wait_for(lambda: self.total() >= target, timeout=timeout, what=f"{n} more requests")

    def _run(self, index: int) -> None:
        body = request_body(np.full((1, 64), 0.5, dtype=np.float32))
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(timeout=30, headers=headers, trust_env=False) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                request_id = f"load-{index}-{n}"
                try:
                    r = client.post(self.url, json=body, headers={"X-Request-Id": request_id})
                except httpx.HTTPError as exc:
                    self._record(None, f"{request_id}: {type(exc).__name__} {exc}")
                    continue
                if r.status_code != 200 or r.headers.get("x-request-id") != request_id:
                    self._record(None, f"{request_id}: {r.status_code} {r.text[:300]}")
                    continue
                version = r.headers["x-shipyard-model-version"]
                if r.json()["model_version"] != version:
                    self._record(None, f"{request_id}: header {version} != body")
                    continue
                self._record(version, None)
                time.sleep(0.002)

    def _record(self, version: str | None, failure: str | None) -> None:
        with self._lock:
            if failure is not None:
                self.failures.append(failure)
            elif version is not None:
                self.ok[version] += 1
                self.timeline.append(version)
