"""The one interface every model source implements: a module to export, data, and a metric."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class SourceOptions:
    """What a model source may take from the user besides its spec (CLI flags of the same names)."""

    weights: Path | None = None   # a state dict (torchvision:, module:)
    data: Path | None = None      # evaluation data (ImageFolder dir, GLUE task dir)
    calib: Path | None = None     # calibration data (ImageFolder dir, .npz of named inputs)
    task: str | None = None       # hf: glue:<name>
    calib_size: int = 256
    eval_size: int = 1024
    latency_batch: int = 8
    latency_seq: int = 128
    seed: int = 0                 # data-sampling seed (fixed splits use their own)


@dataclass
class ModelBundle:
    """Everything the pipeline needs from a model source.

    ``module`` is exported to ONNX, or, for a source that is already ONNX, ``onnx_file`` is the FP32 model
    and ``module`` is ``None``. ``calibration`` feeds the analysis (and the export check); ``evaluation`` is
    held out and only used to compare the artifact with the FP32 model; ``metric(reference, candidate)`` maps
    the two models' concatenated outputs on ``evaluation`` to named figures, ``headline`` naming the one to
    optimize.
    """

    name: str
    module: torch.nn.Module | None                      # None for an ONNX input (onnx_file)
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    calibration: list[Batch]
    evaluation: list[Batch]
    latency_feed: Batch
    metric: Callable[[np.ndarray, np.ndarray], dict]
    headline: str
    info: dict = field(default_factory=dict)
    likelihood: str = "gaussian"                        # the output's likelihood for the Fisher: gaussian | categorical
    calibration_targets: list[np.ndarray] | None = None  # labels, for the empirical Fisher
    onnx_file: Path | None = None                       # the FP32 ONNX model itself, when there is no module
    example: Batch | None = None                        # export example (default: the first calibration batch)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        first = self.example if self.example is not None else self.calibration[0]
        return tuple(torch.from_numpy(first[n]) for n in self.input_names)


def embedding_fidelity(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> dict:
    """Fidelity of embeddings ``candidate`` to ``reference`` (rows are items).

    cosine_mean / cosine_p5: mean and 5th percentile over items of cos(e_ref, e_cand);
    top{k}_overlap: mean over items of |kNN_ref ∩ kNN_cand| / k, where kNN are the k most cosine-similar
    *other* items of the same set (retrieval behaviour preserved).
    """
    a = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    b = candidate / np.linalg.norm(candidate, axis=1, keepdims=True)
    cos = np.sum(a * b, axis=1)
    k = min(k, len(a) - 1)
    out = {"cosine_mean": float(cos.mean()), "cosine_p5": float(np.percentile(cos, 5)),
           "cosine_min": float(cos.min()), "items": int(len(a))}
    if k >= 1:
        def knn(e):
            s = e @ e.T
            np.fill_diagonal(s, -np.inf)
            return np.argpartition(-s, k, axis=1)[:, :k]
        na, nb = knn(a), knn(b)
        overlap = [len(np.intersect1d(x, y, assume_unique=True)) / k for x, y in zip(na, nb)]
        out[f"top{k}_overlap"] = float(np.mean(overlap))
    return out
