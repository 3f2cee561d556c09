"""Datasets against DVC on the same data, in one run, alternating rounds.

Work (each round on fresh, identical, generated data; one copy per tool):

1. ``first_commit``: 20,000 files x 4 KiB (``dvc add data``);
2. ``status_no_change``: the same folder, nothing changed (``dvc status``);
3. ``one_changed``: one file rewritten, committed again (``dvc add data`` again);
4. ``checkout``: the 20,000 files into an empty folder (``dvc checkout`` after removing them);
5. ``big_file``: one 1 GiB file (``dvc add big.bin``);
6. ``big_region``: 1 MiB in its middle changed, committed again; the bytes the store grew by
   are recorded for both (``new_bytes_mib``).

Both tools are timed in-process through their Python APIs (shipyard's ``Client``, DVC's
``dvc.repo.Repo``), each in a driver process of its own so that neither pays for the other's
imports; the interpreter start is not timed for either. The CLI wall time of one no-change
status is recorded beside them (``cli_status_s``), start-up included. DVC runs from its own
environment (``--dvc-python``, default: ``dvc`` installed beside this interpreter; ``pip install
'shipyard[bench]'`` brings it): it is not a dependency of shipyard.

Medians over ``--rounds``; ``ratio`` is DVC's time over shipyard's (higher: shipyard faster).
Targets (issue 7): >= 10x, 10x, 10x, 5x (checkout), 4x (1 GiB); <= 2 MiB stored for the region.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, progress, ratio, write_result

TARGETS = {
    "first_commit": 10.0,
    "status_no_change": 10.0,
    "one_changed": 10.0,
    "checkout": 5.0,
    "big_file": 4.0,
}
MIB = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--file-kib", type=int, default=4)
    parser.add_argument("--big-mib", type=int, default=1024, help="the large file's size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2,000 files, 64 MiB, 1 round")
    parser.add_argument("--dvc-python", default="", help="a Python that can import dvc")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--driver", choices=["shipyard", "dvc"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        result = _drive(args.driver, args.work, big_mib=args.big_mib)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.quick:
        args.files, args.big_mib, args.rounds = 2_000, 64, 1
    dvc_python = args.dvc_python or _find_dvc_python()
    rounds: list[dict[str, dict[str, float]]] = []
    for i in range(args.rounds):
        order = ["shipyard", "dvc"] if i % 2 == 0 else ["dvc", "shipyard"]
        measured: dict[str, dict[str, float]] = {}
        for tool in order:
            if tool == "dvc" and not dvc_python:
                continue
            with tempfile.TemporaryDirectory(prefix=f"bench-data-{tool}-") as tmp:
                work = Path(tmp)
                _generate(work, files=args.files, kib=args.file_kib, big_mib=args.big_mib)
                python = dvc_python if tool == "dvc" else sys.executable
                progress(f"round {i + 1}/{args.rounds}: {tool}")
                measured[tool] = _run_driver(python, tool, work, big_mib=args.big_mib)
                measured[tool]["cli_status_s"] = _cli_status(python, tool, work)
        rounds.append(measured)
        progress(f"round {i + 1}: {json.dumps(measured)}")
    result = _summary(rounds, args=args, dvc_python=dvc_python)
    write_result("data", result, args.out)
    for name, row in result["results"].items():
        print(f"{name:18} {json.dumps(row)}")


# --- the parent ---------------------------------------------------------------------------------


def _find_dvc_python() -> str:
    for candidate in (Path(sys.executable).parent / "dvc", shutil.which("dvc")):
        if candidate and Path(candidate).exists():
            first = Path(candidate).read_text(errors="replace").splitlines()[0]
            if first.startswith("#!"):
                return first[2:].strip()
    progress("dvc not found (pip install 'shipyard[bench]' or --dvc-python): DVC skipped")
    return ""


def _generate(work: Path, *, files: int, kib: int, big_mib: int) -> None:
    """The same data for every tool and round: seeded."""
    rng = np.random.default_rng(42)
    data = work / "repo" / "data"
    per_folder = 1000
    blob = rng.bytes(files * kib * 1024)
    for i in range(files):
        folder = data / f"part-{i // per_folder:03d}"
        if i % per_folder == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i:06d}.bin").write_bytes(blob[i * kib * 1024 : (i + 1) * kib * 1024])
    big = work / "repo" / "big" / "big.bin"
    big.parent.mkdir(parents=True)
    with open(big, "wb") as fh:
        for _ in range(big_mib):
            fh.write(rng.bytes(MIB))
    os.sync()  # the generated data is on disk before either tool starts


def _run_driver(python: str, tool: str, work: Path, *, big_mib: int) -> dict[str, float]:
    argv = [python, __file__, "--driver", tool, "--work", str(work), "--big-mib", str(big_mib)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
    env["SHIPYARD_HOME"] = str(work / "home")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"the {tool} driver failed ({done.returncode}):\n{done.stderr[-4000:]}")
    measured: dict[str, float] = json.loads(line[len("RESULT ") :])
    return measured


def _cli_status(python: str, tool: str, work: Path) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
    env["SHIPYARD_HOME"] = str(work / "home")
    repo = work / "repo"
    if tool == "dvc":
        argv = [python, "-m", "dvc", "status"]
    else:
        argv = [python, "-m", "shipyard.cli", "data", "status", "data", "--dataset", "small"]
    started = time.perf_counter()
    subprocess.run(argv, cwd=repo, env=env, capture_output=True, timeout=600)
    return time.perf_counter() - started


def _summary(
    rounds: list[dict[str, dict[str, float]]], *, args: argparse.Namespace, dvc_python: str
) -> dict[str, Any]:
    def median(tool: str, key: str) -> float | None:
        values = [r[tool][key] for r in rounds if tool in r and key in r[tool]]
        return statistics.median(values) if values else None

    results: dict[str, Any] = {}
    for key in (*TARGETS, "cli_status_s"):
        ours, theirs = median("shipyard", key), median("dvc", key)
        row: dict[str, Any] = {"shipyard_s": ours, "dvc_s": theirs, "ratio": ratio(theirs, ours)}
        if key in TARGETS:
            row["target"] = TARGETS[key]
            row["met"] = row["ratio"] is not None and row["ratio"] >= TARGETS[key]
        results[key] = row
    ours_new = median("shipyard", "big_region_new_mib")
    results["big_region"] = {
        "shipyard_s": median("shipyard", "big_region"),
        "dvc_s": median("dvc", "big_region"),
        "shipyard_new_mib": ours_new,
        "dvc_new_mib": median("dvc", "big_region_new_mib"),
        "target_new_mib": 2.0,
        "met": ours_new is not None and ours_new <= 2.0,
    }
    return {
        "benchmark": "data",
        "workload": {
            "files": args.files,
            "file_kib": args.file_kib,
            "big_mib": args.big_mib,
            "rounds": args.rounds,
        },
        "peer": {"dvc_python": dvc_python or None},
        "machine": machine(),
        "results": results,
        "rounds": rounds,
    }


# --- the drivers (one process per tool and round) -----------------------------------------------


def _drive(tool: str, work: Path, *, big_mib: int) -> dict[str, float]:
    repo = work / "repo"
    data = repo / "data"
    big = repo / "big" / "big.bin"
    os.chdir(repo)
    ops = _ShipyardOps(repo) if tool == "shipyard" else _DvcOps(repo)
    out: dict[str, float] = {}
    out["first_commit"] = _timed(lambda: ops.commit(data, "small"))
    out["status_no_change"] = _timed(lambda: ops.status(data, "small"))
    one = data / "part-000" / "f000007.bin"
    one.write_bytes(b"changed!" + one.read_bytes()[8:])
    out["one_changed"] = _timed(lambda: ops.commit(data, "small"))
    shutil.rmtree(data)
    out["checkout"] = _timed(lambda: ops.checkout(data, "small"))
    assert len(list(data.rglob("*.bin"))) > 0
    out["big_file"] = _timed(lambda: ops.commit(big, "big"))
    before = ops.stored_bytes()
    with open(big, "r+b") as fh:
        fh.seek(big_mib * MIB // 2)
        fh.write(np.random.default_rng(7).bytes(MIB))
    out["big_region"] = _timed(lambda: ops.commit(big, "big"))
    out["big_region_new_mib"] = (ops.stored_bytes() - before) / MIB
    return out


def _timed(work: Any) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


class _ShipyardOps:
    def __init__(self, repo: Path) -> None:
        from shipyard.client import Client  # the driver imports only its own tool

        self.client = Client()
        self.home = Path(os.environ["SHIPYARD_HOME"])
        self.versions: dict[str, int] = {}

    def commit(self, path: Path, name: str) -> None:
        source = path if path.is_dir() else path.parent
        self.versions[name] = self.client.datasets.commit(source, name=name).version

    def status(self, path: Path, name: str) -> None:
        assert self.client.datasets.status(path, name=name).clean

    def checkout(self, path: Path, name: str) -> None:
        self.client.datasets.checkout(name, path, 1)

    def stored_bytes(self) -> int:
        return _du(self.home / "blobs")


class _DvcOps:
    def __init__(self, repo: Path) -> None:
        from dvc.repo import Repo

        self.repo = Repo.init(str(repo), no_scm=True)
        self.root = repo

    def commit(self, path: Path, name: str) -> None:
        self.repo.add(str(path.relative_to(self.root)))

    def status(self, path: Path, name: str) -> None:
        assert self.repo.status() == {}

    def checkout(self, path: Path, name: str) -> None:
        self.repo.checkout(str(path.relative_to(self.root)) + ".dvc")

    def stored_bytes(self) -> int:
        return _du(self.root / ".dvc" / "cache")


def _du(folder: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


if __name__ == "__main__":
    main()
