"""End to end: a real ``shipyard server --executor ray://...`` process, the SDK over HTTP, and the
Ray cluster of this session (tests/compute/executors/conftest.py).

The server reaches Ray through a TCP relay the test controls, so "Ray is unreachable" is real
(nothing listens at the address) and "Ray is back" is real too (the relay starts listening).
The job's declared outputs travel from its Ray node to the server over HTTP.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray")

from shipyard.blobs import hash_bytes
from shipyard.client import Client
from shipyard.domain.models import JobStatus
from shipyard.settings import Settings
from tests.conftest import LiveServer, free_port, wait_for

TRAIN = """\
import os
for epoch in range(3):
    print(f"epoch {epoch} on attempt {os.environ['SHIPYARD_ATTEMPT']}", flush=True)
print("url", os.environ["SHIPYARD_URL"])
os.mkdir("ckpt")
open("ckpt/last.bin", "wb").write(b"x")
open("model.pt", "wb").write(b"weights" * 10)
open("scratch.txt", "w").write("not declared")
"""


class Relay:
    """Forwards TCP connections from ``127.0.0.1:port`` to ``target`` once started."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port))
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        if self._server is not None:
            self._server.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def test_a_ray_server_queues_while_ray_is_down_then_runs_logs_and_cancels(
    ray_cluster: Any, tmp_path: Path
) -> None:
    relay = Relay(("127.0.0.1", ray_cluster.port))
    home = tmp_path / "server-home"
    home.mkdir()
    address = f"ray://127.0.0.1:{relay.port}"
    server = LiveServer(home, env={"SHIPYARD_EXECUTOR": address})
    try:
        client = Client(settings=Settings(home=tmp_path / "unused", url=server.url))
        code = tmp_path / "code"
        code.mkdir()
        (code / "train.py").write_text(TRAIN)

        # Ray unreachable at submit: the job is stored, QUEUED, saying why.
        job = client.jobs.submit(
            [sys.executable, "train.py"], code_dir=code, name="train", outputs=["model.pt", "ckpt"]
        )
        job = wait_for(
            lambda: (j := client.jobs.get(job.id)).message and j, what="the waiting reason"
        )
        assert job.status is JobStatus.QUEUED
        assert "executor unavailable" in job.message and address in job.message, job.message

        # Ray is back: the server's pipeline connects, launches the job and it runs to the end;
        # rank 0's worker uploads the declared outputs to the server as artifacts of its run.
        relay.start()
        try:
            # generous: a CI run on a machine loaded far past its 2 cores took more than 90 s
            done = wait_for(
                lambda: (j := client.jobs.get(job.id)).status.finished and j,
                timeout=180,
                what="the job on Ray",
            )
        except pytest.fail.Exception:
            seen = client.jobs.get(job.id)
            pytest.fail(
                f"job {job.id} is {seen.status.value} after 180 s: {seen.message!r}; "
                f"log: {client.jobs.logs(job.id)[0][-2000:]!r}"
            )
        text, _, finished = client.jobs.logs(job.id)
        assert done.status is JobStatus.SUCCEEDED, (done.message, text)
        assert done.executor == "ray" and done.attempt == 1 and finished
        assert text.splitlines() == [
            "epoch 0 on attempt 1",
            "epoch 1 on attempt 1",
            "epoch 2 on attempt 1",
            f"url {server.url}",
            f"shipyard: stored 2 declared output files (0.1 KB) as artifacts of run "
            f"{done.run_id}: model.pt, ckpt/last.bin",
            "shipyard: 1 file the job wrote outside its declared outputs were discarded with "
            "its folder: scratch.txt; declare them (--output PATH) to keep them as artifacts of "
            "the run",
        ]
        assert done.run_id is not None
        run = client.runs.get(done.run_id)
        assert {a.path: (a.size, a.digest) for a in run.artifacts} == {
            "model.pt": (70, hash_bytes(b"weights" * 10)),
            "ckpt/last.bin": (1, hash_bytes(b"x")),
        }
        assert sorted(done.outputs) == ["ckpt/last.bin", "model.pt"]  # the job's record too

        # Logs while it runs, then cancel.
        slow = client.jobs.submit(
            [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"]
        )
        wait_for(lambda: "started" in client.jobs.logs(slow.id)[0], timeout=60, what="its log")
        client.jobs.cancel(slow.id)
        slow = wait_for(lambda: (j := client.jobs.get(slow.id)).status.finished and j, timeout=60)
        assert slow.status is JobStatus.CANCELLED, slow.message
    finally:
        server.stop()
        relay.stop()
