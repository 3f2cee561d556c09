"""A small deterministic training job that survives preemption (a fixture script).

Fits ``y = 3x - 1`` with plain SGD in pure Python, one mini-batch per step; the batch of step
``i`` is drawn from a generator seeded with ``i``, so a run restored at step ``k`` computes
exactly what an uninterrupted run computes from there. Each step sleeps ``STEP_S`` seconds (so a
test can preempt it mid-way), logs ``loss``, and every ``EVERY`` steps saves the weights and the
next step as a checkpoint. On start it restores the run's latest checkpoint when there is one,
and prints ``attempt A resumed from step K``; after each step it prints ``logged N`` (N: the
points it logged so far); at the end it logs ``final_loss`` and prints ``final <repr>``. In a
job it installs a SIGTERM handler of its own before ``shipyard.init()`` (the SDK chains it).

Environment: ``STEPS`` (100), ``STEP_S`` (0.03), ``EVERY`` (10), ``FLUSH_S`` (the SDK's flush
interval, 1.0), ``WORKDIR`` (where it writes, default the current folder).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

BATCH = 8
LR = 0.05


def batch(step: int) -> list[tuple[float, float]]:
    rng = random.Random(step)
    xs = [rng.uniform(-1.0, 1.0) for _ in range(BATCH)]
    return [(x, 3.0 * x - 1.0 + rng.gauss(0.0, 0.1)) for x in xs]


def train_step(w: float, b: float, step: int) -> tuple[float, float, float]:
    """One SGD step on batch ``step``; returns the new weights and the batch's loss."""
    data = batch(step)
    loss = sum((w * x + b - y) ** 2 for x, y in data) / len(data)
    gw = sum(2 * (w * x + b - y) * x for x, y in data) / len(data)
    gb = sum(2 * (w * x + b - y) for x, y in data) / len(data)
    return w - LR * gw, b - LR * gb, loss


def reference_final(steps: int = 100) -> float:
    """The final loss of an uninterrupted run (no SDK, no sleeping)."""
    w, b, loss = 0.0, 0.0, float("nan")
    for step in range(steps):
        w, b, loss = train_step(w, b, step)
    return loss


def main() -> int:
    import shipyard

    steps = int(os.environ.get("STEPS", "100"))
    pause = float(os.environ.get("STEP_S", "0.03"))
    every = int(os.environ.get("EVERY", "10"))
    workdir = Path(os.environ.get("WORKDIR", "."))
    if os.environ.get("SHIPYARD_JOB_ID"):
        # a handler of the script's own, installed first: the SDK's calls it after flushing
        signal.signal(signal.SIGTERM, lambda *_: print("own SIGTERM handler ran", flush=True))
    run = shipyard.init(name="resumable", flush_interval=float(os.environ.get("FLUSH_S", "1.0")))
    w, b, start = 0.0, 0.0, 0
    restored = run.latest_checkpoint(workdir / f"restored-{run.attempt}")
    if restored is not None:
        state = json.loads((restored / "state.json").read_text())
        w, b, start = state["w"], state["b"], state["step"]
    print(f"attempt {run.attempt} resumed from step {start}", flush=True)
    loss = float("nan")
    for logged, step in enumerate(range(start, steps), start=1):
        w, b, loss = train_step(w, b, step)
        run.log({"loss": loss})
        print(f"logged {logged}", flush=True)
        if (step + 1) % every == 0:
            folder = workdir / "checkpoint"
            folder.mkdir(parents=True, exist_ok=True)
            # repr round-trips a float exactly, so the restored run continues bit for bit
            (folder / "state.json").write_text(json.dumps({"w": w, "b": b, "step": step + 1}))
            run.save_checkpoint(folder, step=step + 1)
        time.sleep(pause)
    run.log({"final_loss": loss})
    run.finish()
    print(f"final {loss!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
