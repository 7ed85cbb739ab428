"""Calibration-only distillation of the planned quantized model toward the posterior-predictive teacher
(docs/design.md §3 step 6). Pure PyTorch; no ONNX.

**Student.** The bundle's FP32 module with every planned weight *computed from the plan* on each forward:

    uniform   ŵ = fp16((q − z) · s),  s = fp16(s₀ · exp θ)         (fp16 roundings only for FP16 scales)
    codebook  ŵ[r, c] = fp16(ℓ₀ + ρ·δ)[table(r), q[r, c]]
    float16   ŵ = fp16(w) (fixed)

which is exactly what the artifact's uniform decode (``DequantizeAffine`` / ``DequantizeSymmetric`` in size
mode, ``DequantizeLinear`` for speed and cuda: FP16 scale, FP16 output, ``Cast`` to float) and
``CodebookLookup`` (FP16 levels) compute. Codes ``q`` and zero points ``z`` are fixed buffers. Every
rounding to float16 is taken on every forward with a straight-through estimator (value rounded, gradient
as if it were not), so what trains is what gets stored. Trainable:

* uniform scales, as a log-offset ``θ`` (init 0, so ``s = s₀`` bit for bit at the start): Adam's step is
  then a *relative* change of the scale, the right unit for scales that span orders of magnitude;
* codebook levels, as an offset ``δ`` (init 0) in units ``ρ`` = the RMS of each table's initial levels;
* biases and norm parameters (LayerNorm/BatchNorm/GroupNorm/RMSNorm weights and biases) that the ONNX graph
  holds as initializers, as ``p = p₀ + ρ·δ`` with ``ρ`` the tensor's RMS (floored);

everything else is frozen. Zero points stay fixed: the artifact stores them as integers of the code dtype
(as ``DequantizeLinear``'s ``x_zero_point``, which must have the type of ``x``), so a continuous zero offset could not
be written back exactly; a shift of the grid is, to first order, what a bias already absorbs.

**Teacher.** The posterior predictive: S models with the planned weights drawn from the fitted posterior
``N(μ, Λ⁻¹)`` (everything else at its trained value), outputs averaged — class probabilities for a
categorical output, the outputs themselves otherwise — computed once per calibration batch and cached.
Per weight (canonical ``[rows, cols]``, rows independent):

* K-FAC with a diagonal output factor, ``Λ_r = N·g_r·A + τ·I``: with ``A = V diag(a) Vᵀ``,
  ``w_r = μ_r + V (ε_r ⊙ (N·g_r·a + τ)^(−1/2))``;
* diagonal, ``w = μ + ε / √diag Λ``;
* diagonal + low rank, ``Λ = D + UUᵀ``: with ``D^(−1/2) U = P S Qᵀ``,
  ``w = μ + D^(−1/2) (ε + P ((1 + S²)^(−1/2) − 1) Pᵀ ε)``.

``teacher="fp"`` uses the FP32 model alone. Guard (label-free, calibration only): a posterior teacher
farther from the FP32 model than the undistilled student is replaced by the FP32 model, with the reason in
the stats. Measured: on digits-resnet (a confident classifier: its true Fisher is tiny, the empirical-Bayes
prior dominates) posterior draws are 4–13× the weights' norm and the 4-sample predictive agrees with the
FP32 model on ~9% of calibration items; distilling toward it took held-out top-1 from 99.3% to 30%.

**Loss** (calibration inputs only, no labels): categorical outputs ``KL(p̄ ‖ softmax(student))`` averaged
over items (and positions); any other output ``(1 − cos(t, o)) + ‖o − t‖² / ‖t‖²`` (cosine distance plus the
*relative* squared error, so the two terms are dimensionless whatever the output's scale), averaged over
items. Adam on the trainable offsets, one calibration batch per step, early stopping on a held-out tail of
the calibration batches: the returned values are those of the best held-out loss seen, the initial plan
included, so distillation never returns a student that is worse on the held-out calibration slice.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .export import ParameterBinding
from .weights import WeightPosterior
from .plan import Plan, QuantizedTensor
from .quant import codebook, uniform
from .quant.layout import WeightLayout

TEACHERS = ("posterior", "fp")
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []))
_MIN_SCALE = 2.0**-24  # a scale must stay a positive float16 (uniform.round_scale's floor)


class DistillUnsupported(ValueError):
    """The student cannot reproduce the planned artifact exactly (the reason says which tensor and why)."""


@dataclass
class DistillResult:
    plan: Plan                              # same candidates, codes and zero points; new scales / levels
    initializers: dict[str, np.ndarray]     # float initializer name -> new value (its ONNX layout, float32)
    stats: dict
    student_output: np.ndarray              # the distilled student's output on the first calibration batch


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 (the stored value) with a straight-through gradient."""
    return x + (x.to(torch.float16).to(x.dtype) - x).detach()


def _rms(x: torch.Tensor, dim=None, floor: float = 1e-8) -> torch.Tensor:
    sq = x.float().pow(2)
    return (sq.mean() if dim is None else sq.mean(dim=dim, keepdim=True)).sqrt().clamp_min(floor)


# ---- student ---------------------------------------------------------------------------------------------
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
            w = self.qz * self.scale()[..., None]
            w = (_fp16(w) if self.fp16 else w).reshape(self.layout.rows, self.layout.cols)
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


# ---- teacher ---------------------------------------------------------------------------------------------
class PosteriorNoise:
    """Draws ``ε ~ N(0, Λ⁻¹)`` for one weight, canonical ``[rows, cols]`` (forms in the module docstring)."""

    def __init__(self, post: WeightPosterior):
        self.shape = tuple(post.precision.shape)
        self.kind = "none"
        if post.n_data <= 0:  # placeholder posterior of an unbound tensor: no uncertainty to sample
            return
        tau, n = float(post.prior_precision), float(post.n_data)
        if post.A is not None and post.G_diag is not None:
            a, v = torch.linalg.eigh(post.A.double())
            self.kind, self.V = "kfac", v.float()
            lam = n * post.G_diag.double().clamp_min(0)[:, None] * a.clamp_min(0)[None, :] + tau
            self.std = lam.rsqrt().float()                                       # [rows, cols], eigenbasis
        elif post.U is not None:
            d = (post.precision - (post.U * post.U).sum(1).reshape(self.shape)).clamp_min(tau).double()
            w = post.U.double() / d.reshape(-1, 1).sqrt()
            p, s, _ = torch.linalg.svd(w, full_matrices=False)
            self.kind, self.P = "lowrank", p.float()
            self.shrink = ((1 + s * s).rsqrt() - 1).float()
            self.std = d.rsqrt().float()
        else:
            self.kind, self.std = "diag", post.precision.double().rsqrt().float()

    def __call__(self, gen: torch.Generator, n: int | None = None) -> torch.Tensor:
        """One draw ``[rows, cols]``, or ``n`` draws ``[n, rows, cols]``."""
        shape = self.shape if n is None else (n, *self.shape)
        if self.kind == "none":
            return torch.zeros(shape)
        eps = torch.randn(shape, generator=gen)
        if self.kind == "kfac":
            return (eps * self.std) @ self.V.T
        if self.kind == "lowrank":
            e = eps.reshape(-1, self.P.shape[0])
            e = e + ((e @ self.P) * self.shrink) @ self.P.T
            return e.reshape(shape) * self.std
        return eps * self.std


@dataclass
class SampledWeight:
    """A weight the teacher draws: its parameter, how the graph holds it, and its posterior noise."""

    parameter: str
    transposed: bool
    layout: WeightLayout
    noise: PosteriorNoise


def sampled_weights(module: nn.Module, plan: Plan, posteriors: dict[str, WeightPosterior],
                    bindings: dict[str, ParameterBinding]) -> list[SampledWeight]:
    """Every planned weight with a PyTorch parameter and a fitted posterior, in name order."""
    params = dict(module.named_parameters())
    out = []
    for name in sorted(plan.tensors):
        b, post = bindings.get(name), posteriors.get(name)
        if b is None or post is None or post.n_data <= 0:
            continue
        pname = next((a for a in b.aliases if a in params), b.parameter)
        out.append(SampledWeight(pname, b.transposed, plan.tensors[name].layout, PosteriorNoise(post)))
    return out


def teacher_targets(module: nn.Module, batches: list[tuple[torch.Tensor, ...]], *, categorical: bool,
                    weights: list[SampledWeight], samples: int, seed: int,
                    progress: Callable | None = None) -> list[torch.Tensor]:
    """Teacher targets per batch: log p̄ (categorical) or the mean output, p̄ / the mean over ``samples``
    posterior draws of ``weights`` (no ``weights``: the FP32 model, one pass).

    Draw s sets every sampled weight once and runs all batches with it, so one set of sampled weights is
    in memory at a time.
    """
    params = dict(module.named_parameters())
    draws = samples if weights else 1
    gen = torch.Generator().manual_seed(seed)
    total: list[torch.Tensor | None] = [None] * len(batches)
    runs = [(s, i) for s in range(draws) for i in range(len(batches))]
    label = f"teacher outputs ({draws} posterior samples)" if weights else "teacher outputs (FP32)"
    sampled: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for s, i in (progress(runs, label) if progress else runs):
            if i == 0:
                sampled = {}
                for sw in weights:
                    p = params[sw.parameter]
                    held = (p.T if sw.transposed else p).reshape(sw.layout.shape)   # as the graph holds it
                    w2 = sw.layout.to_canonical(held.float()) + sw.noise(gen)
                    value = sw.layout.from_canonical(w2)
                    sampled[sw.parameter] = (value.T if sw.transposed else value).reshape(p.shape)
            out = _first(functional_call(module, sampled, batches[i]))
            value = torch.softmax(out, dim=-1) if categorical else out
            total[i] = value if total[i] is None else total[i] + value
    means = [t / draws for t in total]
    return [m.clamp_min(1e-30).log() for m in means] if categorical else means


# ---- training --------------------------------------------------------------------------------------------
def distill_loss(out: torch.Tensor, target: torch.Tensor, categorical: bool) -> torch.Tensor:
    """KL(p̄ ‖ softmax(out)) with ``target = log p̄`` (categorical), else (1 − cos) + ‖o − t‖²/‖t‖²; mean
    over items (and positions)."""
    if categorical:
        logq = torch.log_softmax(out, dim=-1)
        return (target.exp() * (target - logq)).sum(-1).mean()
    o, t = out.reshape(len(out), -1), target.reshape(len(target), -1)
    cos = F.cosine_similarity(o, t, dim=-1, eps=1e-12)
    rel = ((o - t) ** 2).sum(-1).mean() / (t * t).sum(-1).mean().clamp_min(1e-30)
    return (1 - cos).mean() + rel


def agreement(targets: list[torch.Tensor], outputs: list[torch.Tensor], categorical: bool) -> dict:
    """How closely ``outputs`` follow ``targets`` (teacher form, e.g. the FP32 model's): categorical: argmax
    agreement and mean KL(p ‖ softmax(output)) with ``targets = log p``; otherwise the mean cosine. Compares
    the teacher and the undistilled student with the FP32 model, without labels."""
    def flat(xs):
        return torch.cat([x.reshape(-1, x.shape[-1]) if categorical else x.reshape(len(x), -1) for x in xs])

    t, o = flat(targets), flat(outputs)
    if categorical:
        logq = torch.log_softmax(o, dim=-1)
        return {"agreement": float((t.argmax(-1) == o.argmax(-1)).float().mean()),
                "kl": float((t.exp() * (t - logq)).sum(-1).mean())}
    return {"cosine_mean": float(F.cosine_similarity(o, t, dim=-1, eps=1e-12).mean())}


def split_batches(batches: list, holdout: float) -> tuple[list, list]:
    """Training batches and the held-out tail (``holdout`` of the batches, at least one); a single batch
    is split by items."""
    if len(batches) >= 2:
        k = min(max(1, round(holdout * len(batches))), len(batches) - 1)
        return batches[:-k], batches[-k:]
    (only,) = batches
    n = len(only[0])
    if n < 2:
        raise DistillUnsupported("distillation needs at least 2 calibration items (one is held out)")
    k = min(max(1, round(holdout * n)), n - 1)
    return [tuple(x[:-k] for x in only)], [tuple(x[-k:] for x in only)]


def distill(module: nn.Module, plan: Plan, bindings: dict[str, ParameterBinding], calibration: list[dict],
            input_names: list[str], *, likelihood: str, posteriors: dict[str, WeightPosterior] | None = None,
            teacher: str = "posterior", samples: int = 4, steps: int = 300, lr: float = 1e-3,
            holdout: float = 0.2, patience: int = 5, guard: bool = True, seed: int = 0,
            progress: Callable | None = None) -> DistillResult:
    """Distill the planned model toward the teacher on ``calibration`` (see the module docstring).

    ``lr``: Adam's step size in relative units (log-scale for scales, table / tensor RMS for levels and
    floats). The held-out loss is measured every epoch over the training batches; training stops after
    ``patience`` measurements without improvement or ``steps`` steps, and the best measured state is kept.
    Deterministic given ``seed``.

    ``guard``: a label-free check on the calibration batches. A posterior predictive should stay near the
    FP32 model it is fitted around; when the posterior teacher is farther from the FP32 model than the
    undistilled student itself (argmax agreement for a categorical output, else mean cosine), its samples
    are too wide to be a target (a Laplace posterior of a confident classifier can be: the true Fisher is
    tiny and the prior dominates), distilling toward it would pull the student away from the function it
    should keep, and the FP32 model is the teacher instead (``stats["teacher_fallback"]`` says why).
    """
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {TEACHERS}")
    if teacher == "posterior" and not posteriors:
        raise ValueError("teacher 'posterior' needs fitted posteriors")
    start = time.perf_counter()
    categorical = likelihood == "categorical"
    student = Student(module, plan, bindings)
    batches = [tuple(torch.from_numpy(np.ascontiguousarray(b[n])) for n in input_names) for b in calibration]
    train, held = split_batches(batches, holdout)
    weights = sampled_weights(student.module, plan, posteriors, bindings) if teacher == "posterior" else []
    targets = teacher_targets(student.module, train + held, categorical=categorical, weights=weights,
                              samples=samples, seed=seed, progress=progress)
    # Label-free figures on all calibration batches: the teacher and the undistilled student, each against
    # the FP32 model (``guard``).
    with torch.no_grad():
        fp_out = [_first(student.module(*x)) for x in train + held]
        fp_targets = [torch.log_softmax(o, -1) for o in fp_out] if categorical else fp_out
        student_vs_fp = agreement(fp_targets, [student(*x) for x in train + held], categorical)
        teacher_vs_fp = agreement(fp_targets, targets, categorical) if weights else None  # log p̄ as logits
    fallback, key = None, "agreement" if categorical else "cosine_mean"
    if guard and teacher_vs_fp is not None and teacher_vs_fp[key] < student_vs_fp[key]:
        fallback = (f"the posterior-predictive teacher is farther from the FP32 model than the undistilled plan "
                    f"({key} {teacher_vs_fp[key]:.4f} vs {student_vs_fp[key]:.4f} on calibration): its samples "
                    f"are too wide to distill toward; the FP32 model is the teacher")
        targets = fp_targets
    t_train, t_held = targets[:len(train)], targets[len(train):]
    teacher_s = time.perf_counter() - start

    def held_loss() -> float:
        with torch.no_grad():
            losses = [float(distill_loss(student(*x), t, categorical)) * len(x[0]) for x, t in zip(held, t_held)]
        return sum(losses) / sum(len(x[0]) for x in held)

    groups = student.trainable_groups()
    trainable = [p for ps in groups.values() for p in ps]
    best = before = held_loss()
    best_state = [p.detach().clone() for p in trainable]
    best_step, measured, since, step, train_losses = 0, 0, 0, 0, []
    if trainable:
        opt = torch.optim.Adam(trainable, lr=lr)
        gen = torch.Generator().manual_seed(seed + 1)
        order = []
        it = progress(range(steps), "distill steps") if progress else range(steps)
        for step in it:
            if not order:
                order = torch.randperm(len(train), generator=gen).tolist()
            i = order.pop()
            loss = distill_loss(student(*train[i]), t_train[i], categorical)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_losses.append(loss.item())
            if (step + 1) % len(train) == 0 or step + 1 == steps:
                h, measured = held_loss(), measured + 1
                if h < best:
                    best, best_step, since = h, step + 1, 0
                    best_state = [p.detach().clone() for p in trainable]
                else:
                    since += 1
                if since >= patience:
                    break
        if hasattr(it, "close"):
            it.close()
        with torch.no_grad():
            for p, v in zip(trainable, best_state):
                p.copy_(v)
    new_plan, inits = student.export()
    with torch.no_grad():
        first = student(*batches[0]).numpy()
    stats = {
        "teacher": "fp" if fallback else teacher, "teacher_samples": samples if weights and not fallback else 1,
        **({"teacher_fallback": fallback} if fallback else {}),
        "sampled_weights": len(weights),
        "loss": "KL(teacher || student)" if categorical else "(1 - cos) + |o - t|^2 / |t|^2",
        "lr": lr, "max_steps": steps, "steps": step + 1 if trainable else 0, "best_step": best_step,
        "stopped_early": bool(trainable) and step + 1 < steps, "heldout_measurements": measured,
        "train_batches": len(train), "heldout_batches": len(held),
        "heldout_loss_before": before, "heldout_loss_after": best,
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "trainable": {k: int(sum(p.numel() for p in ps)) for k, ps in groups.items()},
        "trainable_tensors": {k: len(ps) for k, ps in groups.items()},
        "teacher_vs_fp": teacher_vs_fp, "undistilled_vs_fp": student_vs_fp,
        "teacher_seconds": round(teacher_s, 3), "seconds": round(time.perf_counter() - start, 3)}
    return DistillResult(new_plan, inits, stats, first)
