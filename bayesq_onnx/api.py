"""The Python API: compile your own PyTorch model with the same pipeline as ``bayesq compile``."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .config import CompileConfig
from .errors import BayesQWarning, VerdictFailure
from .models.python_module import module_bundle
from .pipeline import CompileResult, compile_model
from .progress import Reporter
from .verdict import at_least


def compile(model: torch.nn.Module, calibration: Iterable[Any], *, example_inputs: Any = None,
            config: CompileConfig | None = None, metric: Callable[[np.ndarray, np.ndarray], dict] | None = None,
            headline: str | None = None, evaluation: Iterable[Any] | None = None,
            input_names: list[str] | None = None, output_names: list[str] | None = None,
            dynamic_axes: dict[str, dict[int, str]] | None = None, likelihood: str = "gaussian",
            targets: Iterable[Any] | None = None, higher_is_better: bool = True,
            progress: bool = False, output: str | int | None = None) -> CompileResult:
    """Quantize ``model`` at ``config.bits`` all-in bits into ``config.out``; returns the artifact path, the
    report (as in ``report.json``) and the plan.

    ``calibration`` (and ``evaluation``, ``example_inputs``) batches are a tensor, a tuple of tensors
    (``forward``'s positional arguments) or a mapping name → tensor; without ``evaluation`` the last quarter
    of the calibration batches is held out. ``metric(reference_outputs, quantized_outputs) -> dict`` scores
    the first output on the evaluation batches (default: cosine/relative-L2 fidelity to FP32), ``headline``
    naming its key to report (default: the first), ``higher_is_better`` its direction (the verdict reads
    it). Each of the report's warnings (the verdict when it does not hold, weights left in float) is raised
    as a :class:`~bayesq_onnx.errors.BayesQWarning`; with ``config.fail_on`` a verdict that bad raises
    :class:`~bayesq_onnx.errors.VerdictFailure` after the artifact is written. ``likelihood`` is the
    output's likelihood for the Fisher (``"categorical"`` for class logits); ``targets`` are labels per calibration batch for
    ``config.fisher="empirical"``.

    ``forward`` may return a tensor, a tuple, a dict or a HuggingFace ``ModelOutput``: the compiled output
    (quantized for, validated, the artifact's one output) is the first tensor in it, or the one ``output``
    names (a key, a position, or a dotted path such as ``"hidden_states.2"``); ``output_names[0]`` names
    it in the artifact.
    """
    config = config or CompileConfig()
    bundle = module_bundle(model, calibration, example_inputs=example_inputs, evaluation=evaluation,
                           input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                           metric=metric, headline=headline, higher_is_better=higher_is_better,
                           likelihood=likelihood, targets=targets,
                           name=type(model).__name__, output=output)
    if progress:
        with Reporter() as reporter:
            result = compile_model(config, reporter, bundle=bundle)
    else:
        result = compile_model(config, bundle=bundle)
    for warning in result.report["warnings"]:
        warnings.warn(warning, BayesQWarning, stacklevel=2)
    verdict = result.report["verdict"]
    if config.fail_on and at_least(verdict["verdict"], config.fail_on):
        raise VerdictFailure(f"{verdict['line']} (`fail_on` {config.fail_on}; the artifact and its report are in "
                             f"{result.artifact.parent})", result)
    return result
