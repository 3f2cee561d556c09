"""Batch inference rows/s: ``shipyard batch`` (workers=1) against raw ONNX Runtime, on one core.

The model is an MLP 64 -> 256 ReLU -> 256 ReLU -> 10 softmax (``probabilities``, plus its
``label``); the data a dataset version of one Parquet table (an ``id`` and 64 FP32 feature
columns, 200,000 rows; ``--quick``: 50,000). Every variant runs in a process of its own pinned to
CPU 0 (``taskset -c 0``), so the worker process and the driver share that one core, and rounds
alternate between the variants; the figures are medians over the rounds.

- ``raw``: one process, ONNX Runtime with intra_op=1, ``session.run`` on slices of 256 rows of a
  numpy array already in memory (the table read before the clock starts): the limit.
- ``api``: ``Client().models.batch_predict(..., workers=1, batch_rows=256)`` in a fresh process,
  timed around the call: resolving the model and the version, loading and verifying the model,
  reading, predicting (in that process: one worker runs no pool), writing Parquet, storing,
  committing, lineage.
- ``cli``: ``shipyard batch MODEL --input ... --here --workers 1`` as a user runs it, timed from
  outside: ``api`` plus the interpreter and the CLI's imports (seconds on a small machine).

A second, larger table (``--large``, default 1,000,000 rows; none with ``--quick``) is run
with ``raw`` and ``api`` only, so the fixed costs of a batch job (imports, model load, registry
lookups, commit) weigh as they do on a real one; from the two sizes comes the marginal rate,
``(large - small) rows / (large - small) seconds``, of each variant. The headline is api / raw
at the small size (target >= 0.8); the large and marginal ratios and cli / raw are beside it.
"""

from __future__ import annotations

import argparse
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

import itertools

from _common import (
    SHIPYARD_ENV,
    loadavg,
    machine,
    progress,
    ratio,
    write_result,
)

NAME = "batch_inference"
FEATURES = 64
BATCH = 256
MODEL = "mlp"
DATASET = "features"


def mlp_bytes(seed: int = 0) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dims = [FEATURES, 256, 256, 10]
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        weights = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        inits += [
            numpy_helper.from_array(weights, f"W{i}"),
            numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}"),
        ]
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"b{i}"], [f"h{i}"]))
        prev = f"h{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Softmax", [prev], ["probabilities"], axis=1))
    nodes.append(helper.make_node("ArgMax", [prev], ["label"], axis=1, keepdims=0))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", FEATURES])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 10]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["n"]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def prepare(home: Path, rows: int) -> Path:
    """The model registered (alias production) and the table committed, in ``home``; returns
    the table's local copy (the raw variant reads it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shipyard.client import Client
    from shipyard.settings import Settings

    folder = home.parent / "source"
    folder.mkdir()
    x = np.random.default_rng(1).standard_normal((rows, FEATURES)).astype(np.float32)
    columns: dict[str, Any] = {"id": pa.array(np.arange(rows, dtype=np.int64))}
    columns.update({f"f{j:02d}": pa.array(x[:, j]) for j in range(FEATURES)})
    table_path = folder / "part-0.parquet"
    # Float features without dictionary encoding: pyarrow's default tries a dictionary per
    # column, which random floats defeat (a file 50% larger, read 3x slower).
    pq.write_table(pa.table(columns), table_path, use_dictionary=["id"])
    model_path = home.parent / "mlp.onnx"
    model_path.write_bytes(mlp_bytes())
    with Client(settings=Settings(home=home)) as client:
        client.datasets.commit(folder, name=DATASET)
        run = client.backend.create_run(project=client.project, name="train")
        client.backend.log_artifact(
            run.id, path="model.onnx", local_file=model_path, project=client.project
        )
        version = client.models.register(MODEL, run_id=run.id, artifact_path="model.onnx")
        client.models.set_alias(MODEL, "production", version.version)
    return table_path


# --- the variants, each in a process of its own on CPU 0 ------------------------------------


def child_raw(table_path: Path, model_path: Path) -> float:
    """Seconds of the raw loop over rows already in memory."""
    import onnxruntime as ort
    import pyarrow.parquet as pq

    table = pq.read_table(table_path)
    x = np.column_stack([table.column(f"f{j:02d}").to_numpy() for j in range(FEATURES)]).astype(
        np.float32
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        model_path.read_bytes(), sess_options=options, providers=["CPUExecutionProvider"]
    )
    started = time.perf_counter()
    for start in range(0, len(x), BATCH):
        session.run(None, {"x": x[start : start + BATCH]})
    return time.perf_counter() - started


def child_api(home: Path) -> float:
    """Seconds of one ``batch_predict`` call (workers=1)."""
    from shipyard.client import Client
    from shipyard.settings import Settings

    with Client(settings=Settings(home=home)) as client:
        started = time.perf_counter()
        client.models.batch_predict(
            f"{MODEL}@production",
            input=DATASET,
            output="scores",
            keep=["id"],
            workers=1,
            batch_rows=BATCH,
        )
        return time.perf_counter() - started


def pinned(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Run ``argv`` on CPU 0; (wall seconds from outside, its stdout)."""
    started = time.perf_counter()
    done = subprocess.run(
        ["taskset", "-c", "0", *argv], env=env, capture_output=True, text=True, timeout=900
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall, done.stdout


def run_large(*, rows: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of ``raw`` and ``api`` over a table of ``rows`` rows, alternating."""
    with tempfile.TemporaryDirectory(prefix="bench-batch-large-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        progress(f"preparing {rows:,} rows x {FEATURES} features (large)")
        table_path = prepare(home, rows)
        model_path = Path(tmp) / "mlp.onnx"
        env = {k: v for k, v in os.environ.items() if k not in SHIPYARD_ENV}
        env.update(SHIPYARD_HOME=str(home), OMP_NUM_THREADS="1")
        me = [sys.executable, str(Path(__file__).resolve())]
        times: dict[str, list[float]] = {"raw": [], "api": []}
        for r in range(rounds):
            for variant in ["raw", "api"] if r % 2 == 0 else ["api", "raw"]:
                args = [str(table_path), str(model_path)] if variant == "raw" else [str(home)]
                _, out = pinned([*me, "--child", variant, *args], env)
                seconds = float(out.strip().splitlines()[-1])
                times[variant].append(seconds)
                progress(f"large round {r + 1}/{rounds} {variant}: {rows / seconds:,.0f} rows/s")
    return times


def run(*, rows: int, rounds: int, large: int) -> dict[str, Any]:
    if shutil.which("taskset") is None:
        raise SystemExit("benchmarks/batch_inference.py needs taskset (util-linux)")
    start_load = loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        progress(f"preparing {rows:,} rows x {FEATURES} features and the MLP")
        table_path = prepare(home, rows)
        model_path = Path(tmp) / "mlp.onnx"
        env = {k: v for k, v in os.environ.items() if k not in SHIPYARD_ENV}
        env.update(SHIPYARD_HOME=str(home), OMP_NUM_THREADS="1")
        me = [sys.executable, str(Path(__file__).resolve())]
        shipyard = [sys.executable, "-m", "shipyard.cli", "batch", f"{MODEL}@production"]
        cli = [*shipyard, "--input", DATASET, "--output", "scores", "--keep", "id"]
        cli += ["--workers", "1", "--batch-rows", str(BATCH), "--here"]
        times: dict[str, list[float]] = {"raw": [], "api": [], "cli": []}
        for r in range(rounds):
            order = ["raw", "api", "cli"] if r % 2 == 0 else ["cli", "api", "raw"]
            for variant in order:
                if variant == "raw":
                    _, out = pinned([*me, "--child", "raw", str(table_path), str(model_path)], env)
                    seconds = float(out.strip().splitlines()[-1])
                elif variant == "api":
                    _, out = pinned([*me, "--child", "api", str(home)], env)
                    seconds = float(out.strip().splitlines()[-1])
                else:
                    seconds, _ = pinned(cli, env)
                times[variant].append(seconds)
                progress(f"round {r + 1}/{rounds} {variant}: {rows / seconds:,.0f} rows/s")
    med = {k: statistics.median(v) for k, v in times.items()}
    rps = {k: round(rows / v) for k, v in med.items()}
    api_ratio, cli_ratio = ratio(rps["api"], rps["raw"]), ratio(rps["cli"], rps["raw"])
    big: dict[str, Any] = {}
    if large > rows:
        big_times = run_large(rows=large, rounds=max(2, rounds - 1))
        big_med = {k: statistics.median(v) for k, v in big_times.items()}
        big_rps = {k: round(large / v) for k, v in big_med.items()}
        marginal = {k: round((large - rows) / (big_med[k] - med[k])) for k in big_med}
        big = {
            "large": {
                "rows": large,
                "seconds": {k: [round(s, 3) for s in v] for k, v in big_times.items()},
                "rows_per_s": big_rps,
                "ratio_api_vs_raw": ratio(big_rps["api"], big_rps["raw"]),
            },
            "marginal": {
                "what": f"(rows {large:,} - {rows:,}) / (median seconds at {large:,} - at "
                f"{rows:,}), per variant: the rate once the fixed costs are paid",
                "rows_per_s": marginal,
                "ratio_api_vs_raw": ratio(marginal["api"], marginal["raw"]),
            },
        }
    return {
        "name": NAME,
        "machine": machine(),
        "workload": {
            "rows": rows,
            "features": FEATURES,
            "model": "MLP 64-256-256-10 (Gemm+ReLU, softmax + argmax), FP32",
            "batch_rows": BATCH,
            "workers": 1,
            "cpu": "taskset -c 0 for every variant",
            "rounds": rounds,
        },
        "seconds": {k: [round(s, 3) for s in v] for k, v in times.items()},
        "rows_per_s": rps,
        "ratio_api_vs_raw": api_ratio,
        "ratio_cli_vs_raw": cli_ratio,
        **big,
        "target": 0.8,
        "headline": [
            {
                "name": "batch_predict (workers=1) / raw ONNX Runtime rows/s, one core",
                "value": api_ratio,
                "unit": "x",
                "detail": f"shipyard {rps['api']:,} rows/s end to end (pool start, read, "
                f"predict, write, commit); raw session.run loop {rps['raw']:,} rows/s; target 0.8",
            },
            *(
                [
                    {
                        "name": f"batch_predict / raw rows/s at {large:,} rows, one core",
                        "value": big["large"]["ratio_api_vs_raw"],
                        "unit": "x",
                        "detail": f"shipyard {big['large']['rows_per_s']['api']:,} rows/s, raw "
                        f"{big['large']['rows_per_s']['raw']:,}; marginal (fixed costs paid) "
                        f"{big['marginal']['rows_per_s']['api']:,} vs "
                        f"{big['marginal']['rows_per_s']['raw']:,} = "
                        f"{big['marginal']['ratio_api_vs_raw']}x",
                    }
                ]
                if big
                else []
            ),
            {
                "name": "shipyard batch --here CLI / raw ONNX Runtime rows/s, one core",
                "value": cli_ratio,
                "unit": "x",
                "detail": f"{rps['cli']:,} rows/s including interpreter start and CLI imports",
            },
        ],
        "loadavg_start": start_load,
        "loadavg_after": loadavg(),
        "caveats": [
            "Medians of alternating rounds, wall-clock time on a shared machine: other work on "
            "CPU 0 (see loadavg) slows every variant; compare the ratios within one run.",
            "raw times only the session.run loop over rows already in memory (no import, no "
            "model load, no reading or writing); api times the whole call in a fresh process: "
            "its first imports, resolving and verifying the model and the table (BLAKE3), "
            "loading the model, decoding the Parquet table, stacking its columns, predicting, "
            "writing Parquet, storing it, committing and lineage.",
            "The marginal rates come from two table sizes in separate homes, medians each; a "
            "noisy round moves them more than the end-to-end ratios.",
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rows", type=int, help="rows (default 200,000; 50,000 quick)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 3, 1 quick)")
    parser.add_argument(
        "--large", type=int, help="rows of the large run (default 1,000,000; 0 quick: none)"
    )
    parser.add_argument("--out", type=Path, help="result file (default results/NAME.json)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        seconds = (
            child_raw(Path(rest[0]), Path(rest[1])) if kind == "raw" else child_api(Path(rest[0]))
        )
        print(f"{seconds:.6f}")
        return 0
    for key in SHIPYARD_ENV:
        os.environ.pop(key, None)
    result = run(
        rows=args.rows or (50_000 if args.quick else 200_000),
        rounds=args.rounds or (1 if args.quick else 3),
        large=args.large if args.large is not None else (0 if args.quick else 1_000_000),
    )
    write_result(NAME, result, args.out)
    print(f"api/raw {result['ratio_api_vs_raw']}  cli/raw {result['ratio_cli_vs_raw']}")
    if "large" in result:
        print(
            f"at {result['large']['rows']:,} rows api/raw {result['large']['ratio_api_vs_raw']}"
            f"  marginal {result['marginal']['ratio_api_vs_raw']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
