"""200,000 files: commit, no-change status and checkout, each in a fresh process, with its peak
memory (the issue's bound: under 1 GB) and time.

The files are generated once (``--files`` x ``--file-bytes``, 1,000 to a folder); each step runs
as ``python -c`` in a child process so ``ru_maxrss`` is that step's own peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, progress, write_result

LIMIT_MB = 1024

STEP = """
import json, resource, sys, time
from pathlib import Path
from shipyard.client import Client
step, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
client = Client()
started = time.perf_counter()
if step == "commit":
    client.datasets.commit(data, name="scale")
elif step == "status":
    status = client.datasets.status(data, name="scale")
    assert status.clean, status
elif step == "checkout":
    client.datasets.checkout("scale", out, 1)
took = time.perf_counter() - started
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"s": took, "peak_mb": peak_mb}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--file-bytes", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result: dict[str, Any] = {"machine": machine(), "files": args.files}
    result["file_bytes"] = args.file_bytes
    with tempfile.TemporaryDirectory(prefix="bench-data-scale-") as tmp:
        work = Path(tmp)
        data = work / "data"
        started = time.perf_counter()
        payload = os.urandom(args.file_bytes)
        for i in range(args.files):
            if i % 1000 == 0:
                (data / f"d{i // 1000:04d}").mkdir(parents=True)
            (data / f"d{i // 1000:04d}" / f"f{i:07d}").write_bytes(i.to_bytes(8, "big") + payload)
        progress(f"generated {args.files} files in {time.perf_counter() - started:.1f} s")
        env = {**os.environ, "SHIPYARD_HOME": str(work / "home")}
        env.pop("SHIPYARD_URL", None)
        steps: dict[str, Any] = {}
        for step in ("commit", "status", "checkout"):
            done = subprocess.run(
                [sys.executable, "-c", STEP, step, str(data), str(work / "out")],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise SystemExit(f"{step} failed:\n{done.stderr[-3000:]}")
            steps[step] = json.loads(done.stdout.strip().splitlines()[-1])
            steps[step]["under_limit"] = steps[step]["peak_mb"] < LIMIT_MB
            progress(f"{step}: {steps[step]['s']:.1f} s, peak {steps[step]['peak_mb']:.0f} MB")
    result["steps"] = steps
    result["limit_mb"] = LIMIT_MB
    write_result("data_scale", result, args.out)


if __name__ == "__main__":
    main()
