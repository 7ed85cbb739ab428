"""Train the ``digits-resnet`` model on CPU, deterministically, and write its package data.

    python scripts/train_digits_resnet.py [--epochs 40] [--seed 0] [--out bayesq_onnx/models/data]

Writes ``digits_resnet.safetensors`` (the state dict, BatchNorm unfolded) and ``digits_resnet.json`` (recipe,
split, FP32 held-out top-1/NLL/ECE, parameter count, sha256 of the weights), each atomically. The same
seed, epochs and library versions give the same weights bit for bit: training runs on one thread, so
the machine's core count does not change the order of floating-point sums.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from bayesq_onnx.models import digits_resnet as dr
from bayesq_onnx.models.metrics import expected_calibration_error, negative_log_likelihood, top_k_accuracy

EPOCHS = 40
SEED = 0
RECIPE = {"optimizer": "SGD", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "schedule": "one-cycle",
          "max_lr": 0.1, "batch": 64, "drop_last": True, "loss": "cross-entropy",
          "augmentation": "random shift by -1, 0 or +1 pixel in each direction (zero fill)"}


def shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by an independent random offset in {-1, 0, 1}² (vacated pixels are background 0)."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    oy, ox = torch.randint(0, 3, (2, n), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


def evaluate(module: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1, NLL and ECE of ``module`` on one split, batched as the model source evaluates."""
    logits = dr.predict(module, images)
    return {"top1": top_k_accuracy(logits, labels), "nll": negative_log_likelihood(logits, labels),
            "ece": expected_calibration_error(logits, labels), "items": len(labels)}


def train(epochs: int = EPOCHS, seed: int = SEED) -> tuple[dict[str, torch.Tensor], dict]:
    """Train :class:`DigitsResNet` on the fixed train split; return its state dict and the held-out metrics
    of the shipped (BatchNorm-folded) form, on one CPU thread. Leaves the caller's RNG, thread count and
    determinism settings as they were."""
    split = dr.digits_split()
    x = torch.from_numpy(split.train_images)
    y = torch.from_numpy(split.train_labels)
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    # one thread: reproducible on any machine, and as fast as more for a model this small (and far faster
    # than spinning OpenMP threads on busy cores)
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            model = dr.DigitsResNet()
            model.pixel_mean.fill_(float(split.train_images.mean()))
            model.pixel_std.fill_(float(split.train_images.std()))
            steps = len(y) // RECIPE["batch"]
            opt = torch.optim.SGD(model.parameters(), lr=RECIPE["max_lr"], momentum=RECIPE["momentum"],
                                  nesterov=RECIPE["nesterov"], weight_decay=RECIPE["weight_decay"])
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=RECIPE["max_lr"], total_steps=epochs * steps)
            model.train()
            for _ in range(epochs):
                order = torch.randperm(len(y), generator=generator)
                for i in range(steps):
                    idx = order[i * RECIPE["batch"]:(i + 1) * RECIPE["batch"]]
                    loss = torch.nn.functional.cross_entropy(model(shift(x[idx], generator)), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
            model.eval()
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, evaluate(dr.with_batchnorm_folded(model), split.test_images, split.test_labels)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o644)  # package data: world-readable, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write(state: dict[str, torch.Tensor], metrics: dict, out: Path, *, epochs: int, seed: int) -> dict:
    """Write the weights and their record into ``out``; returns the record."""
    out.mkdir(parents=True, exist_ok=True)
    weights = safetensors.torch.save(state)
    split = dr.digits_split()
    record = {
        "model": "digits-resnet",
        "architecture": {"class": "bayesq_onnx.models.digits_resnet.DigitsResNet", "widths": list(dr.WIDTHS),
                         "blocks": list(dr.BLOCKS), "input": "pixels float32 [B,1,8,8], sklearn values / 16",
                         "output": "logits [B,10]"},
        "parameters": sum(p.numel() for p in dr.DigitsResNet().parameters()),
        "pixel_mean": float(state["pixel_mean"]), "pixel_std": float(state["pixel_std"]),
        "split": {"dataset": "sklearn.datasets.load_digits", "stratified": True, "test_fraction": dr.TEST_FRACTION,
                  "random_state": dr.SPLIT_SEED, "train": len(split.train_labels), "test": len(split.test_labels)},
        "training": {"script": dr.TRAIN_SCRIPT, "seed": seed, "epochs": epochs, "device": "cpu", "threads": 1,
                     "torch": torch.__version__, **RECIPE},
        "fp32_test": metrics,
        "weights_file": dr.WEIGHTS.name,
        "weights_bytes": len(weights),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    _write_atomic(out / dr.WEIGHTS.name, weights)
    _write_atomic(out / dr.RECORD.name, (json.dumps(record, indent=2) + "\n").encode())
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=dr.DATA_DIR)
    args = parser.parse_args()
    state, metrics = train(args.epochs, args.seed)
    record = write(state, metrics, args.out, epochs=args.epochs, seed=args.seed)
    print(f"{args.out / dr.WEIGHTS.name}: {record['parameters']} parameters, {record['weights_bytes']} bytes; "
          f"held-out top-1 {metrics['top1']:.4f}, NLL {metrics['nll']:.4f}, ECE {metrics['ece']:.4f}")


if __name__ == "__main__":
    main()
