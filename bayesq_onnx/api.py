"""The Python API: compile your own PyTorch model with the same pipeline as ``bayesq compile``."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import torch

from .config import CompileConfig
from .models.python_module import module_bundle
from .pipeline import CompileResult, compile_model
from .progress import Reporter


def compile(model: torch.nn.Module, calibration: Iterable[Any], *, example_inputs: Any = None,
            config: CompileConfig | None = None, metric: Callable[[np.ndarray, np.ndarray], dict] | None = None,
            headline: str | None = None, evaluation: Iterable[Any] | None = None,
            input_names: list[str] | None = None, output_names: list[str] | None = None,
            dynamic_axes: dict[str, dict[int, str]] | None = None, likelihood: str = "gaussian",
            targets: Iterable[Any] | None = None, progress: bool = False) -> CompileResult:
    """Quantize ``model`` at ``config.bits`` all-in bits into ``config.out``; returns the artifact path, the
    report (as in ``report.json``) and the plan.

    ``calibration`` (and ``evaluation``, ``example_inputs``) batches are a tensor, a tuple of tensors
    (``forward``'s positional arguments) or a mapping name → tensor; without ``evaluation`` the last quarter
    of the calibration batches is held out. ``metric(reference_outputs, quantized_outputs) -> dict`` scores
    the first output on the evaluation batches (default: cosine/relative-L2 fidelity to FP32), ``headline``
    naming its key to report (default: the first). ``likelihood`` is the output's likelihood for the Fisher
    (``"categorical"`` for class logits); ``targets`` are labels per calibration batch for
    ``config.fisher="empirical"``.
    """
    config = config or CompileConfig()
    bundle = module_bundle(model, calibration, example_inputs=example_inputs, evaluation=evaluation,
                           input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                           metric=metric, headline=headline, likelihood=likelihood, targets=targets,
                           name=type(model).__name__)
    if progress:
        with Reporter() as reporter:
            return compile_model(config, reporter, bundle=bundle)
    return compile_model(config, bundle=bundle)
