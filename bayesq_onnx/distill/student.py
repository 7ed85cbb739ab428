"""The distillation student: the FP32 module with every planned weight computed from the plan's codes and
trainable scales / levels on each forward, exactly as the artifact decodes it (package docstring)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch import fx, nn
from torch.func import functional_call

from ..export import ParameterBinding
from ..models.base import select_output
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
    """The planned quantized model in PyTorch (see the module docstring).

    A tensor shared by several ops (tied weights: an embedding table that is also the output projection) is
    one PyTorch parameter under several names. Held by *one* initializer (the graph reads one tensor for
    every use), it is one :class:`QuantWeight`, with one set of trainable scales / levels, and every name of
    the parameter gets its decoded value, so every use sees the same values, as in the artifact. Held by
    *several* initializers (the exporter folded a ``Transpose`` of it into a second, transposed copy for a
    MatMul, and each copy is planned on its own, so the artifact's uses read different decodes), the
    traced program's uses are split (:func:`_split_tied_uses`): each op reads the copy the ONNX graph
    gives its counterpart, an embedding the table as is, any other op the transposed copy, and each copy
    is its own :class:`QuantWeight` (or stays the float parameter, if it is not quantized).
    """

    def __init__(self, module: nn.Module, plan: Plan, bindings: dict[str, ParameterBinding]):
        super().__init__()
        self.module = copy.deepcopy(module).eval()
        self.module.requires_grad_(False)
        params = dict(self.module.named_parameters())  # one name per (tied) tensor
        canonical = {alias: name for name in params for alias in _aliases(name, bindings)}
        holders: dict[str, list[str]] = {}  # parameter -> initializers holding it
        for init, b in bindings.items():
            holders.setdefault(canonical.get(b.parameter, b.parameter), []).append(init)
        uses = {}  # initializer -> the parameter names its uses read (all of them unless a tied tensor is split)
        for pname, inits in holders.items():
            if len(inits) > 1 and any(_stored_differently(plan, i) for i in inits):
                uses.update(_split_tied_uses(self.module, pname, {i: bindings[i] for i in inits}))
        names = _names_by_tensor(self.module)  # every name of each tensor (after the split: none of its own)

        self.weights = nn.ModuleList()
        self.targets: list[tuple[tuple[str, ...], bool]] = []   # per planned weight: (names it sets, transposed)
        self.plan = plan
        for name in sorted(plan.tensors):
            if not _stored_differently(plan, name):
                continue  # stored as is: the module already holds it
            b = bindings.get(name)
            if b is None:
                raise DistillUnsupported(f"{name} is not a PyTorch parameter (the exporter computed it)")
            pname = canonical.get(b.parameter, b.parameter)
            self.weights.append(QuantWeight(plan.tensors[name]))
            self.targets.append((uses[name] if name in uses else names[pname], b.transposed))
        planned = {canonical.get(bindings[n].parameter, bindings[n].parameter) for n in plan.tensors
                   if _stored_differently(plan, n) and n in bindings}

        self.floats = nn.ModuleList()
        self.float_names: list[tuple[str, ...]] = []
        self.float_bindings: list[list[ParameterBinding]] = []
        for pname, p in params.items():
            if pname in planned or pname not in holders or not _is_trainable_float(self.module, pname):
                continue  # frozen: not a bias/norm parameter, or not in the graph as an initializer
            self.floats.append(FloatParam(p))
            self.float_names.append(names[pname])
            self.float_bindings.append([bindings[i] for i in holders[pname]])
        self._shapes = {n: tuple(p.shape) for n, p in self.module.named_parameters(remove_duplicate=False)}

    def overrides(self) -> dict[str, torch.Tensor]:
        """Parameter name -> the value the student computes (planned weights and trained floats), under every
        name that reads it (tied names are set one by one: a split tensor's uses take different values)."""
        out = {}
        for (pnames, transposed), w in zip(self.targets, self.weights):
            if not pnames:
                continue  # a copy of a tied tensor that no op of the program reads
            value = w()
            value = (value.T if transposed else value).reshape(self._shapes[pnames[0]])
            out.update(dict.fromkeys(pnames, value))
        for pnames, fp in zip(self.float_names, self.floats):
            out.update(dict.fromkeys(pnames, fp()))
        return out

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return _first(functional_call(self.module, self.overrides(), inputs, tie_weights=False))

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


def _stored_differently(plan: Plan, name: str) -> bool:
    """Whether the artifact stores initializer ``name`` as other values than the float parameter (planned,
    and not kept in float32)."""
    qt = plan.tensors.get(name)
    return qt is not None and not (qt.candidate.family == "float" and qt.candidate.bits == 32)


def _names_by_tensor(module: nn.Module) -> dict[str, tuple[str, ...]]:
    """Each parameter name -> every name of the same tensor (tied parameters share one tuple)."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {name: tuple(group) for group in groups.values() for name in group}


def _split_tied_uses(program: nn.Module, pname: str, holders: dict[str, ParameterBinding]) -> dict[str, tuple[str, ...]]:
    """Give each initializer of a tied parameter its own uses in the traced ``program`` (in place): every op
    reading the parameter reads instead a new name of it, one per initializer (registered beside the
    parameter, after it, so it stays the tensor's first name), chosen as the ONNX graph holds it for that op:
    an embedding reads the table as is, any other op (a linear, matmul) the transposed copy the exporter
    folded for its MatMul (the as-is one if there is none). Returns initializer -> the names its uses read."""
    if not isinstance(program, fx.GraphModule):
        raise DistillUnsupported(f"parameter {pname} is held by several initializers ({', '.join(sorted(holders))}), "
                                 f"quantized apart; only a traced program's uses of it can be told apart")
    param = program.get_parameter(pname)
    owner_name, _, leaf = pname.rpartition(".")
    owner = program.get_submodule(owner_name)
    tied = {n for n, p in program.named_parameters(remove_duplicate=False) if p is param}
    by_orientation = {b.transposed: init for init, b in sorted(holders.items())}
    graph = program.graph
    use_names: dict[str, str] = {}
    for node in list(graph.nodes):
        if node.op != "get_attr" or node.target not in tied:
            continue
        for user in list(node.users):
            transposed = user.target not in _EMBEDDING and True in by_orientation
            init = by_orientation.get(transposed, next(iter(by_orientation.values())))
            if init not in use_names:
                use_names[init] = f"{leaf}__{len(use_names) + 1}"
                owner.register_parameter(use_names[init], param)
            with graph.inserting_before(user):
                read = graph.get_attr(f"{owner_name}.{use_names[init]}" if owner_name else use_names[init])
            user.replace_input_with(node, read)
    graph.eliminate_dead_code()
    program.recompile()
    prefix = f"{owner_name}." if owner_name else ""
    return {init: (prefix + use_names[init],) if init in use_names else () for init in holders}


_EMBEDDING = (torch.ops.aten.embedding.default,)


def _aliases(name: str, bindings: dict[str, ParameterBinding]) -> tuple[str, ...]:
    for b in bindings.values():
        if name in b.aliases:
            return b.aliases
    return (name,)


def _first(out):
    """The compiled output of a forward (its first tensor, :func:`~bayesq_onnx.models.base.select_output`)."""
    return select_output(out).float()
