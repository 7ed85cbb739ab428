"""Trace a PyTorch model (``torch.export``), fold its BatchNorm on the traced graph, export that program to
ONNX (``torch.onnx.export(dynamo=True)``), and map parameters to initializers.

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
import onnx
import onnx_ir as ir
import torch

from .errors import UserError
from .models.base import Batch, ModelBundle, select_output
from .traced import export_program, fold_batchnorm


@dataclass(frozen=True)
class ParameterBinding:
    """Which torch parameter an initializer holds."""

    initializer: str
    parameter: str
    transposed: bool                # the initializer holds parameterᵀ
    aliases: tuple[str, ...] = ()   # every parameter name sharing this tensor (tied weights)


def traced_program(bundle: ModelBundle) -> torch.fx.GraphModule:
    """The ``torch.export`` program of ``bundle.module`` (dynamic axes as the bundle says), as a runnable
    module; the module itself when it already is one. A model ``torch.export`` cannot trace is a
    :class:`UserError` naming why, in one line."""
    if isinstance(bundle.module, torch.fx.GraphModule):
        return bundle.module
    example, dynamic_shapes = _example(bundle, named=False)
    try:
        with _quiet():
            return export_program(bundle.module, example, dynamic_shapes)
    except UserError:  # the model's own output selection (models.base.select_output) already says it in one line
        raise
    except Exception as exc:  # noqa: BLE001 - any tracing failure is the model's: say which, in one line
        raise UserError(f"torch.export cannot trace {bundle.name}: {_one_line(exc)}") from exc


def fp32_model(bundle: ModelBundle) -> tuple[ir.Model, dict]:
    """The FP32 ONNX model every compile starts from, and its initializer → PyTorch parameter bindings
    (none for an ONNX input).

    A PyTorch module is traced once (:func:`traced_program`), its convolution → BatchNorm pairs are folded on
    the traced graph (:func:`~bayesq_onnx.traced.fold_batchnorm`, so it works for any exportable model), and
    the bundle's module becomes that program: the analysis and the ONNX export then see the same ops and the
    same weights. ``bundle.info["batchnorm"]`` says what the fold did; a later call on the same bundle
    exports the program as it is.
    """
    if bundle.module is None:
        # onnx.load pulls external data in, so the model is self-contained from here on
        return ir.serde.deserialize_model(onnx.load(str(bundle.onnx_file))), {}
    if "batchnorm" not in bundle.info:
        program = traced_program(bundle)
        folded, total = fold_batchnorm(program)
        bundle.module = program
        bundle.info["batchnorm"] = (f"{folded} of {total} BatchNorm folded into their convs" if total
                                    else "no BatchNorm")
    model = export_model(bundle)
    return model, map_parameters(bundle.module, model)


def _example(bundle: ModelBundle, named: bool = True) -> tuple[tuple[torch.Tensor, ...], tuple]:
    """The export example and its dynamic shapes, by position (``forward``'s argument names need not match
    ``input_names``). An example with length 1 on a dynamic axis is doubled along it first: torch.export
    specializes size-1 dims. ``named``: the bundle's axis names (the ONNX file's dimension names);
    otherwise ``Dim.DYNAMIC``, whose range torch.export infers from the model (a sequence axis bounded by
    a position table), for the traced program the analysis runs micro-batches of any size through."""
    dims: dict[str, torch.export.Dim] = {}
    example = []
    dynamic_shapes = []
    for name, tensor in zip(bundle.input_names, bundle.example_inputs()):
        axes = bundle.dynamic_axes.get(name, {})
        for axis in axes:
            if tensor.shape[axis] < 2:
                tensor = torch.cat([tensor, tensor], dim=axis)
        example.append(tensor)
        dynamic_shapes.append({axis: dims.setdefault(label, torch.export.Dim(label)) if named else torch.export.Dim.DYNAMIC
                               for axis, label in axes.items()} or None)
    return tuple(example), tuple(dynamic_shapes)


def export_model(bundle: ModelBundle) -> ir.Model:
    """Export ``bundle.module`` with dynamic axes; returns the optimized onnx_ir model."""
    example, dynamic_shapes = _example(bundle)
    try:
        with _quiet():
            program = torch.onnx.export(
                bundle.module, example, dynamo=True, input_names=bundle.input_names,
                output_names=bundle.output_names, dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - an op the ONNX exporter cannot translate: name it in one line
        raise UserError(f"the ONNX export of {bundle.name} failed: {_one_line(exc)}") from exc
    return _without_debug_info(program.model)


def _without_debug_info(model: ir.Model) -> ir.Model:
    """``model`` without the exporter's per-node debug records (stack traces with the absolute paths of the
    source files, class hierarchies, FX node text: 177 KB in EfficientNet-Lite1's export). They would ship in
    every artifact, and a path makes the same model on two checkouts give two different files."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()
    for function in model.functions.values():
        for node in ir.traversal.RecursiveGraphIterator(function):
            node.metadata_props.clear()
    return model


def _one_line(exc: Exception) -> str:
    """An exporter exception as one line: its type and the first non-empty line of its message."""
    first = next((line for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first[:300]}"


def map_parameters(module: torch.nn.Module, model: ir.Model, *, rename: bool = True) -> dict[str, ParameterBinding]:
    """Bind float initializers to the torch parameter they hold; keyed by (final) initializer name.

    An initializer whose name is a parameter's name binds to it directly. Otherwise it binds by exact
    content (SHA-1 of shape and bytes), as is or transposed, so the exporter's constant folding
    (``Transpose(weight)`` becomes a new initializer) does not matter. Tied parameters (one tensor under
    several names) bind together: ``aliases`` lists them, and a tied weight that the graph holds twice
    (as is for a Gather, transposed for a MatMul) yields two bindings. With ``rename``, initializers with
    generated names (``val_*``) take their parameter's name, or ``<name>.T`` if that name is taken.
    """
    by_name: dict[str, list[str]] = {}
    by_digest: dict[str, list[str]] = {}
    by_digest_t: dict[str, list[str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for pname, param in module.named_parameters(remove_duplicate=False):
        tensors[pname] = param
        data = param.detach().cpu().float().numpy()
        by_digest.setdefault(_digest(data), []).append(pname)
        if data.ndim == 2:
            by_digest_t.setdefault(_digest(data.T), []).append(pname)
    for pname, param in tensors.items():  # aliases: same storage
        by_name[pname] = [q for q, t in tensors.items() if t is param or (
            t.data_ptr() == param.data_ptr() and t.shape == param.shape)]

    bindings: dict[str, ParameterBinding] = {}
    for name, value in model.graph.initializers.items():
        if value.const_value is None or value.dtype != ir.DataType.FLOAT:
            continue
        data = value.const_value.numpy()
        if name in by_name:  # the exporter kept the parameter's name; still check what it holds
            p = tensors[name].detach().cpu().float().numpy()
            for transposed, ref in ((False, p), (True, p.T if p.ndim == 2 else None)):
                if ref is not None and ref.shape == data.shape and np.array_equal(ref, data):
                    bindings[name] = ParameterBinding(name, name, transposed, tuple(by_name[name]))
                    break
            if name in bindings:
                continue
        for table, transposed in ((by_digest, False), (by_digest_t, True)):
            names = table.get(_digest(data))
            # Several *distinct* parameters with equal values (e.g. freshly initialized biases) are
            # ambiguous; only bind when they are all one tied tensor.
            if names and all(n in by_name[names[0]] for n in names):
                bindings[name] = ParameterBinding(name, names[0], transposed, tuple(by_name[names[0]]))
                break
    return _rename(model, bindings) if rename else bindings


def _rename(model: ir.Model, bindings: dict[str, ParameterBinding]) -> dict[str, ParameterBinding]:
    taken = {v.name for v in model.graph.inputs} | {v.name for v in model.graph.outputs}
    taken |= {out.name for node in model.graph for out in node.outputs}
    taken |= set(model.graph.initializers)
    out: dict[str, ParameterBinding] = {}
    for name in sorted(bindings):
        b = bindings[name]
        new = name
        if name.startswith("val_"):
            for option in (b.parameter, f"{b.parameter}.T"):
                if option not in taken:
                    value = model.graph.initializers.pop(name)
                    value.name = option
                    model.graph.register_initializer(value)
                    taken.add(option)
                    new = option
                    break
        out[new] = ParameterBinding(new, b.parameter, b.transposed, b.aliases)
    return out


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha1(repr(a.shape).encode() + a.tobytes()).hexdigest()


def torch_outputs(module: torch.nn.Module, batches: list[Batch], input_names: list[str]) -> np.ndarray:
    """The compiled output (the first tensor: :func:`~bayesq_onnx.models.base.select_output`) of ``module``
    on each batch, concatenated (as ``run_batches`` does for ORT)."""
    from .runtime.session import concat_items

    outs = []
    with torch.inference_mode():
        for b in batches:
            out = module(*(torch.from_numpy(b[n]) for n in input_names))
            outs.append(select_output(out).float().numpy())
    return concat_items(outs)


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
