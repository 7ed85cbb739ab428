"""Any PyTorch module as a model source: the Python API (:func:`bayesq_onnx.compile`) and
``module:<package.module>:<factory>`` on the command line.

A factory is called with no arguments (or, if it has a parameter named ``options``, with the
:class:`SourceOptions` of the command line: ``calib_size``, ``eval_size``, ``seed``, …, so that a bundle
can size its own data) and returns either a ready :class:`ModelBundle` (full control over data and metric) or an
``nn.Module``, whose calibration inputs then come from ``calib`` (an .npz, one array
per ``forward`` argument, items along the first axis) and evaluation inputs from ``data`` (an .npz) or a
held-out part of ``calib``; the metric is fidelity to the FP32 outputs.

``forward`` may return a tensor, a tuple/list, a dict or a HuggingFace ``ModelOutput`` (nested ones too):
the compiled output is its first tensor, or the one ``output`` names (``module_bundle(..., output=…)``,
``bayesq_onnx.compile(..., output=…)``, ``module:<package.module>:<factory>:<output>``). The module is
wrapped once (:class:`OutputSelect`) so that everything after (export, posterior, distillation,
validation) sees that one tensor, under the module's own parameter names.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from ..errors import UserError
from .base import Batch, ModelBundle, SourceOptions, select_output
from .metrics import output_fidelity
from .onnx_file import read_inputs
from .state_dict import load_weights

BATCH = 32


def load(argument: str, options: SourceOptions) -> ModelBundle:
    argument, output = _split_output(argument, options.output)
    factory = _import_factory(argument)
    try:
        made = factory(options=options) if _takes_options(factory) else factory()
    except Exception as exc:  # noqa: BLE001 - user code: report it in one line
        raise UserError(f"module:{argument}: the factory raised {type(exc).__name__}: {exc}") from exc
    if isinstance(made, ModelBundle):
        if options.weights is not None:
            load_weights(made.module, options.weights)
        if made.module is not None and not isinstance(made.module, torch.fx.GraphModule):
            made.module = OutputSelect.wrap(made.module, output, prefer=made.output_names[0] if made.output_names else None)
            made.output_names = made.output_names[:1] or [_output_name(output)]
        return made
    if not isinstance(made, torch.nn.Module):
        raise UserError(f"module:{argument} returned {type(made).__name__}; a factory returns a torch.nn.Module "
                        "or a bayesq_onnx ModelBundle")
    if options.weights is not None:
        load_weights(made, options.weights)
    names = forward_inputs(made)
    if options.calib is None:
        raise UserError(f"module:{argument} needs calibration inputs: `calib` FILE.npz with arrays named "
                        f"{', '.join(names)} (items along the first axis)")
    calib = read_inputs(options.calib, dict.fromkeys(names), "`calib`")
    if options.data is not None:
        evaluation = [read_inputs(options.data, dict.fromkeys(names), "`data`")]
        calibration = [calib]
    else:
        calibration, evaluation = [calib], None
    return module_bundle(made, _split_items(calibration, BATCH, options.calib_size), input_names=names,
                         evaluation=_split_items(evaluation, BATCH, options.eval_size) if evaluation else None,
                         output=output, name=f"module:{argument}", info={"source": f"module:{argument}",
                                                          "weights": str(options.weights) if options.weights else None})


def module_bundle(module: torch.nn.Module, calibration: Iterable[Any], *, example_inputs: Any = None,
                  evaluation: Iterable[Any] | None = None, input_names: list[str] | None = None,
                  output_names: list[str] | None = None, dynamic_axes: dict[str, dict[int, str]] | None = None,
                  metric: Callable[[np.ndarray, np.ndarray], dict] | None = None, headline: str | None = None,
                  higher_is_better: bool = True, likelihood: str = "gaussian", targets: Iterable[Any] | None = None,
                  name: str | None = None, info: dict | None = None,
                  output: str | int | None = None) -> ModelBundle:
    """A :class:`ModelBundle` for a user's module and data.

    Batches (calibration, evaluation, example) may be a tensor/array, a tuple of them (``forward``'s
    positional arguments) or a mapping name → tensor/array. Without ``evaluation`` the last quarter of the
    calibration batches is held out for it (at least one batch; with a single batch, evaluation reuses it and
    the report says so). Without ``dynamic_axes``, axis 0 of every input and every axis whose length varies
    across batches are dynamic. Without ``metric``, fidelity of the compiled output to the FP32 model.

    The compiled output is one tensor of what ``forward`` returns: the one ``output`` names (a key, an
    attribute, a position, or a dotted path into nested containers: :func:`~bayesq_onnx.models.base.select_output`),
    else the entry named ``output_names[0]`` of a returned mapping, else the first tensor (a dict's or
    ``ModelOutput``'s insertion order, a tuple's order, nested containers walked). The artifact's one output
    is named ``output_names[0]`` (default: ``output`` when it is a key, else "output").
    """
    if not isinstance(module, torch.fx.GraphModule):  # a traced program returns what it returns
        module = OutputSelect.wrap(module, output, prefer=output_names[0] if output_names else None)
    module = module.eval()
    names = input_names or forward_inputs(module)
    calib = [_as_batch(b, names) for b in calibration]
    if not calib:
        raise UserError("calibration is empty: give at least one batch of inputs")
    names = list(calib[0])
    info = dict(info or {})
    if evaluation is not None:
        held = [_as_batch(b, names) for b in evaluation]
        if not held:
            raise UserError("evaluation is empty: give at least one batch, or leave it out to hold out calibration data")
    elif len(calib) >= 2:
        cut = len(calib) - max(1, len(calib) // 4)
        calib, held = calib[:cut], calib[cut:]
        info["evaluation"] = f"last {len(held)} of the given calibration batches (held out)"
    else:
        held = calib
        info["evaluation"] = "the calibration batch itself (only one was given: pass evaluation= to hold data out)"
    example = _as_batch(example_inputs, names) if example_inputs is not None else None
    target_arrays = [np.asarray(t.detach().cpu() if torch.is_tensor(t) else t) for t in targets] if targets else None
    if target_arrays is not None and len(target_arrays) != len(calib):
        raise UserError(f"targets has {len(target_arrays)} batches for {len(calib)} calibration batches")
    return ModelBundle(
        name=name or type(module).__name__,
        module=module,
        input_names=names,
        output_names=list(output_names[:1]) if output_names else [_output_name(output)],
        dynamic_axes=dynamic_axes if dynamic_axes is not None else _varying_axes(calib + held),
        calibration=calib,
        evaluation=held,
        latency_feed=held[0],
        metric=metric or output_fidelity,
        headline=headline or ("cosine_mean" if metric is None else ""),
        higher_is_better=higher_is_better if metric is not None else True,
        info={"source": "Python API", **info, "calibration_batches": len(calib), "evaluation_batches": len(held)},
        likelihood=likelihood,
        calibration_targets=target_arrays,
        example=example,
    )


class OutputSelect(torch.nn.Module):
    """A user's module that returns one tensor of its output (:func:`~bayesq_onnx.models.base.select_output`).

    It *shares* the module's parameter, buffer and submodule tables rather than holding the module as a
    child, so every name (``named_parameters``, ``state_dict``, the traced program's, hence the plan's and
    the report's) is the module's own, with no prefix; ``forward`` has the module's signature (what
    ``torch.export`` binds the example inputs to) and calls the module itself, hooks and all. Attributes
    it does not have are looked up on the module (``model.config``).
    """

    def __init__(self, module: torch.nn.Module, output: str | int | None = None, prefer: str | None = None):
        super().__init__()
        object.__setattr__(self, "inner", module)  # not a child: no "inner." prefix on any name
        self._parameters, self._buffers, self._modules = module._parameters, module._buffers, module._modules
        self._non_persistent_buffers_set = module._non_persistent_buffers_set
        self.output, self.prefer = output, prefer
        self.training = module.training

    @classmethod
    def wrap(cls, module: torch.nn.Module, output: str | int | None = None,
             prefer: str | None = None) -> "OutputSelect":
        """``module`` wrapped (an :class:`OutputSelect` is re-wrapped around its module), ``forward`` with
        ``module.forward``'s signature."""
        if isinstance(module, OutputSelect):
            module = module.inner
        signature = inspect.signature(module.forward)
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)

        def forward(self, *args, **kwargs):
            return OutputSelect.forward(self, *args, **kwargs)

        forward.__signature__ = signature.replace(parameters=[self_param, *signature.parameters.values()])
        typed = type(cls.__name__, (cls,), {"forward": forward, "__qualname__": cls.__qualname__})
        return typed(module, output, prefer)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return select_output(self.inner(*args, **kwargs), self.output, self.prefer)

    def train(self, mode: bool = True) -> "OutputSelect":
        self.inner.train(mode)
        self.training = mode
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("inner")
            if inner is None:
                raise
            return getattr(inner, name)

    def __reduce_ex__(self, protocol):  # deepcopy/pickle: the dynamic subclass is rebuilt by wrap()
        return _rewrap, (self.inner, self.output, self.prefer, self.training)


def _rewrap(module: torch.nn.Module, output, prefer, training: bool) -> OutputSelect:
    return OutputSelect.wrap(module, output, prefer).train(training)


def _output_name(output: str | int | None) -> str:
    """The artifact's output name for an ``output`` selection: its last key, or "output"."""
    last = str(output).rsplit(".", 1)[-1] if output is not None else ""
    return last if last and not last.lstrip("-").isdigit() else "output"


def _split_output(argument: str, output: str | int | None) -> tuple[str, str | int | None]:
    """``pkg.mod:factory:logits`` → (``pkg.mod:factory``, ``"logits"``); a selection in the spec and in
    ``output`` must agree."""
    parts = argument.split(":")
    if len(parts) != 3:
        return argument, output
    if output is not None and str(output) != parts[2]:
        raise UserError(f"module:{argument}: the spec picks output {parts[2]!r} and `output` {output!r}; give one")
    return ":".join(parts[:2]), parts[2] or output


def forward_inputs(module: torch.nn.Module) -> list[str]:
    """Names of ``module.forward``'s positional arguments without defaults (the inputs to feed)."""
    params = inspect.signature(module.forward).parameters.values()
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return names or ["input"]


def _as_batch(batch: Any, names: list[str]) -> Batch:
    """One batch as name → contiguous numpy array, in ``names`` order for positional batches."""
    def arr(x):
        x = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
        return np.ascontiguousarray(x)

    if isinstance(batch, Mapping):
        return {k: arr(v) for k, v in batch.items()}
    items = list(batch) if isinstance(batch, (tuple, list)) else [batch]
    if len(items) > len(names):
        raise UserError(f"a batch has {len(items)} inputs but forward takes {len(names)} ({', '.join(names)})")
    return {n: arr(v) for n, v in zip(names, items)}


def _varying_axes(batches: list[Batch]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for name, first in batches[0].items():
        dims = {0: "batch"} if first.ndim else {}
        for axis in range(1, first.ndim):
            if len({b[name].shape[axis] for b in batches}) > 1:
                dims[axis] = f"{name}_dim{axis}"
        axes[name] = dims
    return axes


def _split_items(groups: list[dict[str, np.ndarray]], size: int, limit: int) -> list[Batch]:
    """Arrays of items → consecutive batches of ``size``, at most ``limit`` items in all."""
    out = []
    for arrays in groups:
        n = min(len(next(iter(arrays.values()))), limit)
        out += [{k: v[i:i + size] for k, v in arrays.items()} for i in range(0, n, size)]
    return out


def _takes_options(factory: Callable) -> bool:
    """Whether ``factory`` has a parameter named ``options`` (it then gets the :class:`SourceOptions`)."""
    try:
        return "options" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False


def _import_factory(argument: str) -> Callable:
    module_name, sep, attr = argument.rpartition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"module:{argument}: write module:<package.module>:<factory>, e.g. module:mypkg.models:build")
    try:
        mod = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"module:{argument}: cannot import {module_name!r} ({exc}); install it or add it to PYTHONPATH") from exc
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise UserError(f"module:{argument}: {module_name} has no callable {attr!r}")
    return factory
