"""An S3-compatible server for the blob store's S3 tests: moto's standalone server, a real HTTP
server on 127.0.0.1 in a subprocess, with authentication on (a real access key is made for the
tests, so wrong credentials are refused as on AWS)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

S3_MISSING = next(
    (name for name in ("moto", "s3fs", "boto3", "flask") if importlib.util.find_spec(name) is None),
    None,
)
BUCKET = "shipyard-test"


@dataclass
class MotoServer:
    endpoint: str
    port: int
    key: str
    secret: str
    proc: subprocess.Popen[bytes] | None
    log: Path

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_moto(port: int, log: Path, *, auth: bool = True) -> subprocess.Popen[bytes]:
    """moto's server on 127.0.0.1:``port``; with ``auth``, requests are authenticated after the
    first three (the fixture's set-up). Without it, any credentials are accepted: moto cannot
    check query-string (presigned) signatures while authentication is on."""
    env = {**os.environ, "MOTO_PORT": str(port)}
    if auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start within 30 s")


@pytest.fixture
def moto_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    if S3_MISSING is not None:
        pytest.skip(f"{S3_MISSING} is not installed: pip install 'shipyard[s3]' 'moto[server]'")
    import boto3

    port = free_port()
    log = tmp_path / "moto.log"
    proc = start_moto(port, log)
    endpoint = f"http://127.0.0.1:{port}"
    boot = {"endpoint_url": endpoint, "region_name": "us-east-1"}
    boot |= {"aws_access_key_id": "boot", "aws_secret_access_key": "boot"}
    iam = boto3.client("iam", **boot)
    iam.create_user(UserName="shipyard")  # the unauthenticated requests moto allows first
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName="shipyard", PolicyName="all", PolicyDocument=json.dumps(policy))
    made = iam.create_access_key(UserName="shipyard")["AccessKey"]
    server = MotoServer(endpoint, port, made["AccessKeyId"], made["SecretAccessKey"], proc, log)
    server.client().create_bucket(Bucket=BUCKET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield server
    server.stop()


class Proxy:
    """A TCP relay on 127.0.0.1 in front of the S3 server: ``down()`` kills it (listener and
    every open connection, as a server that dies), ``up()`` starts it again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
            listener, self._listener = self._listener, None
        for sock in [*socks, *([listener] if listener else [])]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
