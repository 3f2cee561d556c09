"""The demo's training job: a PyTorch MLP on the digits dataset version, tracked by shipyard.

Runs as a shipyard job (``shipyard run -- python train_digits.py``): ``shipyard.init()`` attaches
to the run the scheduler created; the dataset version is recorded as the run's input; per-epoch
loss and accuracy are logged (batched, off the training loop's path); the trained network is
exported to ONNX with a dynamic batch dimension and logged as the run's ``model.onnx`` artifact.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn

import shipyard

FEATURES = 64
CLASSES = 10


def table_to_arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    x = np.column_stack([table.column(f"p{i}").to_numpy() for i in range(FEATURES)])
    y = table.column("label").to_numpy()
    return x.astype(np.float32), y.astype(np.int64)


def build_model(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(FEATURES, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, CLASSES),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--version", default="latest")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    params = {k: v for k, v in vars(args).items() if k not in ("dataset", "version")}
    with shipyard.init(params=params) as run:
        dataset = run.use_dataset(args.dataset, args.version)
        print(f"dataset {args.dataset} v{dataset.version}: {dataset.file_count} files", flush=True)
        table = run.client.datasets.read_table(args.dataset, "train.parquet", dataset.version)
        x, y = table_to_arrays(table)
        # The pixel range 0..16 is fixed by the data's definition; scale inside the model so the
        # served ONNX graph takes raw pixels.
        rng = np.random.default_rng(args.seed)
        order = rng.permutation(len(x))
        cut = int(len(x) * 0.85)
        train_idx, val_idx = order[:cut], order[cut:]
        xt, yt = torch.from_numpy(x[train_idx]), torch.from_numpy(y[train_idx])
        xv, yv = torch.from_numpy(x[val_idx]), torch.from_numpy(y[val_idx])

        net = build_model(args.hidden)
        model = nn.Sequential(Scale(1 / 16.0), net)
        optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
        loss_fn = nn.CrossEntropyLoss()
        started = time.time()
        for epoch in range(args.epochs):
            model.train()
            perm = torch.randperm(len(xt))
            total = 0.0
            for start in range(0, len(xt), args.batch_size):
                idx = perm[start : start + args.batch_size]
                optimiser.zero_grad()
                loss = loss_fn(model(xt[idx]), yt[idx])
                loss.backward()
                optimiser.step()
                total += loss.item() * len(idx)
            model.eval()
            with torch.no_grad():
                train_acc = (model(xt).argmax(1) == yt).float().mean().item()
                val_logits = model(xv)
                val_loss = loss_fn(val_logits, yv).item()
                val_acc = (val_logits.argmax(1) == yv).float().mean().item()
            run.log(
                {
                    "loss": total / len(xt),
                    "val_loss": val_loss,
                    "train_accuracy": train_acc,
                    "val_accuracy": val_acc,
                },
                step=epoch,
            )
            if epoch % 5 == 0 or epoch == args.epochs - 1:
                print(
                    f"epoch {epoch:3d}  loss {total / len(xt):.4f}  val_acc {val_acc:.4f}",
                    flush=True,
                )
        run.log({"train_seconds": time.time() - started}, step=args.epochs)

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            export_onnx(model, path)
            run.log_artifact(path, name="model.onnx")
        print(f"exported model.onnx; val_accuracy {val_acc:.4f}", flush=True)


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def export_onnx(model: nn.Module, path: Path) -> None:
    # The exporter logs about optional torchvision ops and its own deprecations; neither matters
    # for this model, and they would bury the job's log.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    model.eval()
    example = torch.zeros(2, FEATURES)
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        external_data=False,
        verbose=False,
    )


if __name__ == "__main__":
    main()
