"""A small, deterministic PyTorch DDP training (gloo, CPU), for the tests and the benchmark.

    python ddp_train.py OUT_DIR [--steps N] [--batch GLOBAL_BATCH] [--hidden H] [--warmup W]
                        [--print-weights]

Started by torchrun, by shipyard (``shipyard run --workers 2 -- python ddp_train.py out``) or by
hand as one process: it reads the world from torchrun's variables (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``; one process when they are absent). Every rank trains the same
MLP (fixed seed) on its share of the same generated global batches (rank r takes the r-th slice
of each), so with gradient averaging the result equals one process training on the whole global
batch. Each rank writes ``OUT_DIR/rank{R}.json``: the final weights (and their SHA-256), the
initial weights' SHA-256, the last loss, and its throughput (samples/s of the global batch,
measured after ``--warmup`` steps, start-up excluded). Rank 0 also prints one line
``DDP_RESULT {json}``; with ``--print-weights`` every rank also prints its whole result, weights
included, as one line ``DDP_WEIGHTS {json}`` (for a job whose folder the caller cannot read).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

FEATURES = 16


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64, help="global batch (all ranks)")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--print-weights", action="store_true", help="print every rank's result")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    distributed = world > 1
    if distributed:
        dist.init_process_group("gloo")  # env:// - MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} is not divisible by the {world} ranks")
    local = args.batch // world

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 1))
    initial = _digest(model)
    trained: nn.Module = nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.SGD(trained.parameters(), lr=args.lr)
    data = torch.Generator().manual_seed(1)
    true_w = torch.randn(FEATURES, 1, generator=data)

    loss = torch.tensor(0.0)
    started, cpu_started = time.perf_counter(), time.process_time()
    for step in range(args.steps):
        if step == args.warmup:
            if distributed:
                dist.barrier()
            started, cpu_started = time.perf_counter(), time.process_time()
        x = torch.randn(args.batch, FEATURES, generator=data)  # the same on every rank
        y = torch.sin(x @ true_w)
        mine = slice(rank * local, (rank + 1) * local)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(trained(x[mine]), y[mine])
        loss.backward()  # DDP averages the gradients over the ranks
        optimizer.step()
    if distributed:
        dist.barrier()
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    loss = loss.detach()
    if distributed:  # the global batch's loss: the mean of the ranks' (equal-sized) shares
        dist.all_reduce(loss)
        loss /= world
    measured = args.steps - args.warmup
    result = {
        "rank": rank,
        "world_size": world,
        "steps": args.steps,
        "global_batch": args.batch,
        "initial_sha256": initial,
        "sha256": _digest(model),
        "weights": [float(v) for v in _flat(model)],
        "loss": float(loss),
        "samples_per_s": measured * args.batch / elapsed if measured > 0 and elapsed > 0 else 0.0,
        "elapsed_s": elapsed,
        # this rank's CPU time over the same steps: less sensitive to other load than wall time
        "samples_per_cpu_s": measured * args.batch / cpu if measured > 0 and cpu > 0 else 0.0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))
    if rank == 0:
        summary = {k: v for k, v in result.items() if k != "weights"}
        print("DDP_RESULT " + json.dumps(summary), flush=True)
    if args.print_weights:
        print("DDP_WEIGHTS " + json.dumps(result), flush=True)
    print(f"rank {rank} of {world}: loss {float(loss):.6f}", flush=True)
    if distributed:
        dist.destroy_process_group()
    return 0


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _digest(model: nn.Module) -> str:
    return hashlib.sha256(_flat(model).numpy().tobytes()).hexdigest()


if __name__ == "__main__":
    raise SystemExit(main())
