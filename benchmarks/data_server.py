"""Datasets through a server against embedded, on the same data, in one run, alternating rounds.

Work (each round on fresh, identical, generated data): ``commit`` of 20,000 files x 4 KiB,
``commit_again`` with nothing changed (the client's stat cache: no file read, one request for
what the server lacks, which is nothing), and ``checkout`` of them into an empty folder. The
server is a real ``python -m shipyard.server`` on 127.0.0.1 with its own home; embedded runs in
this process against a home of its own. Medians over ``--rounds``; ``ratio`` is embedded's time
over the server's (the issue's target: >= 0.5, the server at least half the embedded speed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, progress, ratio, write_result

TARGET = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--file-kib", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2,000 files, 1 round")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.files, args.rounds = 2000, 1
    from shipyard.client import Client
    from shipyard.settings import Settings

    rows: dict[str, dict[str, list[float]]] = {"embedded": {}, "server": {}}
    with tempfile.TemporaryDirectory(prefix="bench-data-server-") as tmp:
        work = Path(tmp)
        server_home = work / "server-home"
        server_home.mkdir()
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "SHIPYARD_HOME": str(server_home)}
        env.pop("SHIPYARD_URL", None)
        with open(work / "server.log", "wb") as log:
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "shipyard.server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait(url)
            for i in range(args.rounds):
                order = ["embedded", "server"] if i % 2 == 0 else ["server", "embedded"]
                for way in order:
                    data = work / f"{way}-{i}" / "data"
                    _generate(data, files=args.files, kib=args.file_kib, seed=i)
                    home = work / f"{way}-{i}" / "home"
                    settings = (
                        Settings(home=home) if way == "embedded" else Settings(home=home, url=url)
                    )
                    client = Client(settings=settings)
                    name = f"r{i}"
                    took = _round(client, data, name, work / f"{way}-{i}" / "out")
                    client.close()
                    for key, value in took.items():
                        rows[way].setdefault(key, []).append(value)
                    progress(
                        f"round {i + 1} {way}: "
                        + ", ".join(f"{k} {v:.2f} s" for k, v in took.items())
                    )
                    shutil.rmtree(work / f"{way}-{i}")
        finally:
            server.terminate()
            server.wait(timeout=30)
    result: dict[str, Any] = {"machine": machine(), "files": args.files, "file_kib": args.file_kib}
    result["rounds"] = args.rounds
    result["work"] = {}
    for key in rows["embedded"]:
        ours = statistics.median(rows["server"][key])
        embedded = statistics.median(rows["embedded"][key])
        ratio_ = ratio(embedded, ours)
        result["work"][key] = {
            "embedded_s": embedded,
            "server_s": ours,
            "ratio": ratio_,
            "target": TARGET,
            "met": ratio_ is not None and ratio_ >= TARGET,
        }
    write_result("data_server", result, args.out)
    print(result["work"])


def _round(client: Any, data: Path, name: str, out: Path) -> dict[str, float]:
    took: dict[str, float] = {}
    started = time.perf_counter()
    client.datasets.commit(data, name=name)
    took["commit"] = time.perf_counter() - started
    started = time.perf_counter()
    client.datasets.commit(data, name=name)
    took["commit_again"] = time.perf_counter() - started
    started = time.perf_counter()
    result = client.datasets.checkout(name, out, 1)
    took["checkout"] = time.perf_counter() - started
    assert result.written > 0
    return took


def _generate(folder: Path, *, files: int, kib: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    blob = rng.bytes(files * kib * 1024)
    step = kib * 1024
    for i in range(files):
        part = folder / f"part-{i // 1000:03d}"
        if i % 1000 == 0:
            part.mkdir(parents=True, exist_ok=True)
        (part / f"f{i:06d}.bin").write_bytes(blob[i * step : (i + 1) * step])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server at {url} did not start")


if __name__ == "__main__":
    main()
