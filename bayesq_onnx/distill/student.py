"""The distillation student: the FP32 module with every planned weight computed from the plan's codes and
trainable scales / levels on each forward, exactly as the artifact decodes it (package docstring)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ..export import ParameterBinding
from ..plan import Plan, QuantizedTensor
from ..quant import codebook, uniform


class DistillUnsupported(ValueError):
    """The student cannot reproduce the planned artifact exactly (the reason says which tensor and why)."""


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []))
_MIN_SCALE = 2.0**-24  # a scale must stay a positive float16 (uniform.round_scale's floor)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 (the stored value) with a straight-through gradient."""
    return x + (x.to(torch.float16).to(x.dtype) - x).detach()


def _rms(x: torch.Tensor, dim=None, floor: float = 1e-8) -> torch.Tensor:
    sq = x.float().pow(2)
    return (sq.mean() if dim is None else sq.mean(dim=dim, keepdim=True)).sqrt().clamp_min(floor)


class QuantWeight(nn.Module):
    """One planned tensor: its dequantized value (ONNX layout) from fixed codes and trainable scale/levels."""

    def __init__(self, qt: QuantizedTensor):
        super().__init__()
        c, lay = qt.candidate, qt.layout
        self.name, self.family, self.layout = qt.name, c.family, lay
        self.fp16 = c.family == "codebook" or c.scale_dtype == "float16"
        if c.family == "uniform":
            codes = torch.from_numpy(qt.codes.astype(np.float32))
            zero = torch.from_numpy(qt.zero.astype(np.float32))
            # (q − z), grouped [rows, n_groups, group]: integers, exact in float32
            self.register_buffer("qz", uniform.grouped(codes, c.group_size) - zero[..., None])
            self.register_buffer("scale0", torch.from_numpy(qt.scale.astype(np.float32)))
            self.log_gain = nn.Parameter(torch.zeros_like(self.scale0))
        elif c.family == "codebook":
            levels0 = torch.from_numpy(qt.levels.astype(np.float32))
            self.register_buffer("codes", torch.from_numpy(qt.codes.astype(np.int64)))
            self.rows_per_table = c.rows_per_table(lay)
            self.register_buffer("levels0", levels0)
            self.register_buffer("unit", _rms(levels0, dim=1))
            self.delta = nn.Parameter(torch.zeros_like(levels0))
        else:  # float16/32 keep: fixed
            self.register_buffer("value", torch.from_numpy(qt.dequantize()))

    def scale(self) -> torch.Tensor:
        """s = s₀·exp θ, floored and (FP16 scales) rounded as stored; float32 ``[rows, n_groups]``."""
        s = (self.scale0 * torch.exp(self.log_gain)).clamp_min(_MIN_SCALE)
        return _fp16(s) if self.fp16 else s

    def levels(self) -> torch.Tensor:
        """ℓ = fp16(ℓ₀ + ρ·δ); float32 ``[n_tables, 2^b]``."""
        return _fp16(self.levels0 + self.unit * self.delta)

    def forward(self) -> torch.Tensor:
        if self.family == "uniform":
            w = (self.qz * self.scale()[..., None]).reshape(self.layout.rows, self.layout.cols)
        elif self.family == "codebook":
            w = codebook.dequantize(self.codes, self.levels(), self.rows_per_table)
        else:
            return self.value
        return self.layout.from_canonical(w)

    def stored(self, qt: QuantizedTensor) -> QuantizedTensor:
        """``qt`` with this module's current scale / levels, in the plan's dtypes."""
        with torch.no_grad():
            if self.family == "uniform":
                return dataclasses.replace(qt, scale=self.scale().numpy().astype(np.float32))
            if self.family == "codebook":
                return dataclasses.replace(qt, levels=self.levels().numpy().astype(np.float16))
        return qt


class FloatParam(nn.Module):
    """A trainable bias / norm parameter ``p = p₀ + ρ·δ`` (δ = 0 at the start: p = p₀ exactly)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.register_buffer("value0", value.detach().float().clone())
        # ρ: the tensor's RMS, floored so an all-zero bias can still move (by ~1e-3 per unit of δ)
        self.register_buffer("unit", _rms(value, floor=1e-3))
        self.delta = nn.Parameter(torch.zeros_like(self.value0))

    def forward(self) -> torch.Tensor:
        return self.value0 + self.unit * self.delta


def _is_trainable_float(module: nn.Module, pname: str) -> bool:
    owner, _, leaf = pname.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    is_norm = isinstance(sub, _NORMS) or "norm" in type(sub).__name__.lower()
    return leaf == "bias" or (is_norm and leaf in ("weight", "bias"))


class Student(nn.Module):
    """The planned quantized model in PyTorch (see the module docstring)."""

    def __init__(self, module: nn.Module, plan: Plan, bindings: dict[str, ParameterBinding]):
        super().__init__()
        self.module = copy.deepcopy(module).eval()
        self.module.requires_grad_(False)
        params = dict(self.module.named_parameters())  # one name per (tied) tensor
        canonical = {alias: name for name in params for alias in _aliases(name, bindings)}
        holders: dict[str, list[str]] = {}  # parameter -> initializers holding it
        for init, b in bindings.items():
            holders.setdefault(canonical.get(b.parameter, b.parameter), []).append(init)

        self.weights = nn.ModuleList()
        self.targets: list[tuple[str, bool]] = []   # per planned weight: (parameter, transposed)
        self.plan = plan
        for name in sorted(plan.tensors):
            qt = plan.tensors[name]
            if qt.candidate.family == "float" and qt.candidate.bits == 32:
                continue  # stored as is: the module already holds it
            b = bindings.get(name)
            if b is None:
                raise DistillUnsupported(f"{name} is not a PyTorch parameter (the exporter computed it)")
            pname = canonical.get(b.parameter, b.parameter)
            if len(holders[pname]) > 1:
                raise DistillUnsupported(f"parameter {pname} is held by several initializers "
                                         f"({', '.join(sorted(holders[pname]))}); quantized apart they hold "
                                         f"different values, which one PyTorch parameter cannot")
            self.weights.append(QuantWeight(qt))
            self.targets.append((pname, b.transposed))
        planned = {p for p, _ in self.targets}

        self.floats = nn.ModuleList()
        self.float_names: list[str] = []
        self.float_bindings: list[list[ParameterBinding]] = []
        for pname, p in params.items():
            if pname in planned or pname not in holders or not _is_trainable_float(self.module, pname):
                continue  # frozen: not a bias/norm parameter, or not in the graph as an initializer
            self.floats.append(FloatParam(p))
            self.float_names.append(pname)
            self.float_bindings.append([bindings[i] for i in holders[pname]])
        self._shapes = {n: tuple(p.shape) for n, p in params.items()}

    def overrides(self) -> dict[str, torch.Tensor]:
        """Parameter name -> the value the student computes (planned weights and trained floats)."""
        out = {}
        for (pname, transposed), w in zip(self.targets, self.weights):
            value = w()
            out[pname] = (value.T if transposed else value).reshape(self._shapes[pname])
        for pname, fp in zip(self.float_names, self.floats):
            out[pname] = fp()
        return out

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return _first(functional_call(self.module, self.overrides(), inputs))

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"scales": [w.log_gain for w in self.weights if w.family == "uniform"],
                "levels": [w.delta for w in self.weights if w.family == "codebook"],
                "floats": [f.delta for f in self.floats]}

    def export(self) -> tuple[Plan, dict[str, np.ndarray]]:
        """The plan with the current scales / levels, and every trained float initializer's new value."""
        tensors = dict(self.plan.tensors)
        for w in self.weights:
            tensors[w.name] = w.stored(tensors[w.name])
        inits = {}
        with torch.no_grad():
            for fp, binds in zip(self.floats, self.float_bindings):
                value = fp()
                for b in binds:
                    v = value.T if b.transposed else value
                    inits[b.initializer] = np.ascontiguousarray(v.numpy().astype(np.float32))
        return Plan(self.plan.method, tensors, dict(self.plan.settings)), inits


def _aliases(name: str, bindings: dict[str, ParameterBinding]) -> tuple[str, ...]:
    for b in bindings.values():
        if name in b.aliases:
            return b.aliases
    return (name,)


def _first(out):
    return (out[0] if isinstance(out, (tuple, list)) else out).float()
