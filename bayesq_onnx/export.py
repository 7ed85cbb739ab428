"""Trace a PyTorch model to ONNX (``torch.onnx.export(dynamo=True)``), map parameters to initializers,
and check the export numerically against PyTorch.

The dynamo exporter constant-folds ``Transpose(weight)`` for Linear layers, so a Linear weight appears as
an initializer named ``val_123`` holding ``weightᵀ``. :func:`map_parameters` finds every parameter's
initializer by content (as is, or transposed) and names it after the parameter again, so plans and
reports speak the model's own names. Tied parameters map to one initializer.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from .models.base import Batch, ModelBundle


@dataclass(frozen=True)
class ParameterBinding:
    """Where a torch parameter lives in the ONNX graph."""

    parameter: str
    initializer: str
    transposed: bool  # initializer holds parameterᵀ


def export_model(bundle: ModelBundle) -> ir.Model:
    """Export ``bundle.module`` with dynamic axes; returns the optimized onnx_ir model."""
    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes = {
        name: {axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in axes.items()}
        for name, axes in bundle.dynamic_axes.items()
    }
    with _quiet():
        program = torch.onnx.export(
            bundle.module, bundle.example_inputs(), dynamo=True, input_names=bundle.input_names,
            output_names=bundle.output_names, dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
        )
    return program.model


def map_parameters(module: torch.nn.Module, model: ir.Model, *, rename: bool = True) -> dict[str, ParameterBinding]:
    """Bind every float parameter of ``module`` to the initializer holding it (or its transpose).

    Matching is by exact content (SHA-1 of shape and bytes), so constant folding and renaming by the
    exporter do not matter. With ``rename``, initializers with generated names take the parameter's name.
    Parameters the exporter folded into something else (no equal initializer) are absent from the result.
    """
    index: dict[str, str] = {}
    for name, value in model.graph.initializers.items():
        if value.const_value is not None and value.dtype == ir.DataType.FLOAT:
            index.setdefault(_digest(value.const_value.numpy()), name)
    bindings: dict[str, ParameterBinding] = {}
    for pname, param in module.named_parameters(remove_duplicate=False):
        data = param.detach().cpu().float().numpy()
        found = index.get(_digest(data))
        transposed = False
        if found is None and data.ndim == 2:
            found, transposed = index.get(_digest(data.T)), True
        if found is not None:
            bindings[pname] = ParameterBinding(pname, found, transposed)
    if rename:
        _rename(model, bindings)
    return bindings


def _rename(model: ir.Model, bindings: dict[str, ParameterBinding]) -> None:
    taken = {v.name for v in model.graph.inputs} | {v.name for v in model.graph.outputs}
    taken |= {out.name for node in model.graph for out in node.outputs}
    taken |= set(model.graph.initializers)
    renamed: dict[str, str] = {}
    for b in sorted(bindings.values(), key=lambda b: b.parameter):
        if b.initializer in renamed or not b.initializer.startswith("val_") or b.parameter in taken:
            continue
        value = model.graph.initializers.pop(b.initializer)
        value.name = b.parameter
        model.graph.register_initializer(value)
        renamed[b.initializer] = b.parameter
        taken.add(b.parameter)
    for key, b in list(bindings.items()):
        if b.initializer in renamed:
            bindings[key] = ParameterBinding(b.parameter, renamed[b.initializer], b.transposed)


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha1(repr(a.shape).encode() + a.tobytes()).hexdigest()


def torch_outputs(module: torch.nn.Module, batches: list[Batch], input_names: list[str]) -> np.ndarray:
    """First output of ``module`` on each batch, concatenated."""
    outs = []
    with torch.inference_mode():
        for b in batches:
            out = module(*(torch.from_numpy(b[n]) for n in input_names))
            outs.append((out[0] if isinstance(out, (tuple, list)) else out).float().numpy())
    return np.concatenate(outs)


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress and warnings for every export; keep the CLI's output readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
