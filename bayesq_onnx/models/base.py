"""The one interface every model source implements: a module to export, data, and a metric."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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
    output: str | int | None = None  # module: which of forward's outputs is compiled (default: the first tensor)


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
    higher_is_better: bool = True                       # the headline's direction (the verdict reads it)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        first = self.example if self.example is not None else self.calibration[0]
        return tuple(torch.from_numpy(first[n]) for n in self.input_names)


def first_tensor(out: Any) -> torch.Tensor | None:
    """The first tensor in ``out``, walking containers depth first in their own order: a mapping (a dict,
    a HuggingFace ``ModelOutput``) in insertion order, a tuple/list (a named tuple) by position, a dataclass
    by field; ``None`` when it holds none."""
    if torch.is_tensor(out):
        return out
    if isinstance(out, Mapping):
        items = out.values()
    elif isinstance(out, (tuple, list)):
        items = out
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        items = (getattr(out, f.name) for f in dataclasses.fields(out))
    else:
        return None
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def select_output(out: Any, output: str | int | None = None, prefer: str | None = None) -> torch.Tensor:
    """The tensor of a ``forward``'s output ``out`` that a compile quantizes for (:func:`first_tensor` of it).

    ``output`` picks it: a key of a mapping (a dict, a ``ModelOutput``) or an attribute, or a position
    (an ``int``, or digits) in a tuple/list or in a mapping's order; ``"a.b"`` / ``"logits.0"`` steps into
    nested containers, and a container picked is walked for its first tensor. Without ``output``, the entry
    named ``prefer`` (the graph output's name) if ``out`` is a mapping holding it, else the first tensor.
    A step that does not exist is a one-line :class:`~bayesq_onnx.errors.UserError` naming what there is.
    """
    from ..errors import UserError

    if output is None:
        picked = out[prefer] if prefer is not None and isinstance(out, Mapping) and prefer in out else out
    else:
        picked = out
        steps = [output] if isinstance(output, int) else str(output).split(".")
        for step in steps:
            picked = _step(picked, step, lambda why: UserError(
                f"`output` {output!r}: {why}; forward returns {describe_output(out)}"))
    found = first_tensor(picked)
    if found is None:
        what = "forward returns no tensor" if output is None else f"`output` {output!r} holds no tensor"
        raise UserError(f"{what} ({describe_output(out)}); compile a module whose forward returns tensors")
    return found


def _step(value: Any, step: str | int, error: Callable[[str], Exception]) -> Any:
    """``value[step]`` for one step of an output path (a key, an attribute, or a position)."""
    index = step if isinstance(step, int) else int(step) if str(step).lstrip("-").isdigit() else None
    if isinstance(value, Mapping):
        if step in value:
            return value[step]
        if isinstance(step, str) and index is None:
            raise error(f"no entry {step!r}")
        values = list(value.values())
    elif isinstance(value, (tuple, list)):
        if index is None:
            if hasattr(value, "_fields") and step in value._fields:  # a named tuple
                return getattr(value, step)
            raise error(f"{step!r} is not a position in a {type(value).__name__}")
        values = list(value)
    elif dataclasses.is_dataclass(value) and index is None and hasattr(value, str(step)):
        return getattr(value, str(step))
    else:
        raise error(f"{step!r} cannot be looked up in a {type(value).__name__}")
    if not -len(values) <= index < len(values):
        raise error(f"position {index} is out of range")
    return values[index]


def describe_output(out: Any, depth: int = 0) -> str:
    """A one-line sketch of an output's structure: ``dict(logits: Tensor[8, 10], features: Tensor[8, 64])``."""
    if torch.is_tensor(out):
        return f"Tensor[{', '.join(str(d) if isinstance(d, int) else '?' for d in out.shape)}]"  # ?: traced
    if depth >= 2:
        return type(out).__name__
    if isinstance(out, Mapping):
        return f"{type(out).__name__}({', '.join(f'{k}: {describe_output(v, depth + 1)}' for k, v in out.items())})"
    if isinstance(out, (tuple, list)):
        return f"{type(out).__name__}({', '.join(describe_output(v, depth + 1) for v in out)})"
    return type(out).__name__


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
