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

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..choices import TEACHERS
from ..export import ParameterBinding
from ..plan import Plan
from ..weights import WeightPosterior
from .student import DistillUnsupported, QuantWeight, Student, _first
from .teacher import PosteriorNoise, sampled_weights, teacher_targets

__all__ = ["Agreement", "DistillOptions", "DistillResult", "DistillUnsupported", "PosteriorNoise", "QuantWeight", "Student", "TEACHERS", "distill"]


@dataclass
class DistillResult:
    plan: Plan                              # same candidates, codes and zero points; new scales / levels
    initializers: dict[str, np.ndarray]     # float initializer name -> new value (its ONNX layout, float32)
    stats: dict
    student_output: np.ndarray              # the distilled student's output on the first calibration batch


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


class Agreement:
    """:func:`agreement` accumulated one batch at a time (counts, and sums in float64), so that comparing
    two models over the calibration set holds one batch of their outputs at a time."""

    def __init__(self, categorical: bool):
        self.categorical, self.rows, self.hits, self.total = categorical, 0, 0, 0.0

    def add(self, target: torch.Tensor, output: torch.Tensor) -> None:
        if self.categorical:  # rows: items (and positions)
            t, o = target.reshape(-1, target.shape[-1]), output.reshape(-1, output.shape[-1])
            logq = torch.log_softmax(o, dim=-1)
            self.hits += int((t.argmax(-1) == o.argmax(-1)).sum())
            self.total += float((t.exp() * (t - logq)).sum(-1).double().sum())
        else:  # rows: items
            t, o = target.reshape(len(target), -1), output.reshape(len(output), -1)
            self.total += float(F.cosine_similarity(o, t, dim=-1, eps=1e-12).double().sum())
        self.rows += int(t.shape[0])

    def result(self) -> dict:
        n = max(self.rows, 1)
        if self.categorical:
            return {"agreement": self.hits / n, "kl": self.total / n}
        return {"cosine_mean": self.total / n}


def agreement(targets: list[torch.Tensor], outputs: list[torch.Tensor], categorical: bool) -> dict:
    """How closely ``outputs`` follow ``targets`` (teacher form, e.g. the FP32 model's): categorical: argmax
    agreement and mean KL(p ‖ softmax(output)) with ``targets = log p`` over rows (items and positions);
    otherwise the mean cosine over items. Compares the teacher and the undistilled student with the FP32
    model, without labels."""
    acc = Agreement(categorical)
    for t, o in zip(targets, outputs):
        acc.add(t, o)
    return acc.result()


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


@dataclass(frozen=True)
class DistillOptions:
    """How :func:`distill` trains (see its docstring for ``lr``, ``patience`` and ``guard``)."""

    teacher: str = "posterior"   # posterior: the posterior predictive; fp: the FP32 model
    samples: int = 4             # posterior draws averaged by the teacher
    steps: int = 300             # most Adam steps
    lr: float = 1e-3
    holdout: float = 0.2         # share of the calibration batches held out for early stopping
    patience: int = 5
    guard: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}")


def distill(module: nn.Module, plan: Plan, bindings: dict[str, ParameterBinding], calibration: list[dict],
            input_names: list[str], *, likelihood: str, options: DistillOptions = DistillOptions(),
            posteriors: dict[str, WeightPosterior] | None = None, progress: Callable | None = None) -> DistillResult:
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
    teacher, samples, steps, lr, seed = options.teacher, options.samples, options.steps, options.lr, options.seed
    if teacher == "posterior" and not posteriors:
        raise ValueError("teacher 'posterior' needs fitted posteriors")
    start = time.perf_counter()
    categorical = likelihood == "categorical"
    student = Student(module, plan, bindings)
    batches = [tuple(torch.from_numpy(np.ascontiguousarray(b[n])) for n in input_names) for b in calibration]
    train, held = split_batches(batches, options.holdout)
    weights = sampled_weights(student.module, plan, posteriors, bindings) if teacher == "posterior" else []
    targets, fallback, teacher_vs_fp, student_vs_fp = _guarded_targets(
        student, train + held, weights, categorical=categorical, samples=samples, seed=seed, guard=options.guard,
        progress=progress)
    teacher_s = time.perf_counter() - start

    groups = student.trainable_groups()
    run = _train(student, [p for ps in groups.values() for p in ps], train, held, targets[:len(train)],
                 targets[len(train):], categorical=categorical, steps=steps, lr=lr, patience=options.patience, seed=seed,
                 progress=progress)
    new_plan, inits = student.export()
    with torch.no_grad():
        first = student(*batches[0]).numpy()
    stats = {
        "teacher": "fp" if fallback else teacher, "teacher_samples": samples if weights and not fallback else 1,
        **({"teacher_fallback": fallback} if fallback else {}),
        "sampled_weights": len(weights),
        "loss": "KL(teacher || student)" if categorical else "(1 - cos) + |o - t|^2 / |t|^2",
        "lr": lr, "max_steps": steps, "steps": run.steps, "best_step": run.best_step,
        "stopped_early": run.trained and run.steps < steps, "heldout_measurements": run.measured,
        "train_batches": len(train), "heldout_batches": len(held),
        "heldout_loss_before": run.before, "heldout_loss_after": run.best,
        "train_loss_first": run.train_losses[0] if run.train_losses else None,
        "train_loss_last": run.train_losses[-1] if run.train_losses else None,
        "trainable": {k: int(sum(p.numel() for p in ps)) for k, ps in groups.items()},
        "trainable_tensors": {k: len(ps) for k, ps in groups.items()},
        "teacher_vs_fp": teacher_vs_fp, "undistilled_vs_fp": student_vs_fp,
        "teacher_seconds": round(teacher_s, 3), "seconds": round(time.perf_counter() - start, 3)}
    return DistillResult(new_plan, inits, stats, first)


def _guarded_targets(student: Student, batches: list, weights: list, *, categorical: bool, samples: int, seed: int,
                     guard: bool, progress: Callable | None) -> tuple[list, str | None, dict | None, dict]:
    """The teacher's targets on ``batches`` (posterior predictive over ``weights``' samples, or the FP32 model
    when there are none), with ``guard`` the FP32 model's instead where the posterior teacher is farther from
    it than the undistilled student is. Returns the targets, why the guard replaced them (``None``: it did
    not), and the label-free figures it compared: the teacher and the undistilled student against the FP32
    model (the teacher's ``None`` without sampled weights)."""
    # the one copy of outputs over the calibration set that distillation keeps: every training step reads its
    # batch's targets, and a posterior teacher costs `samples` forwards per batch to recompute (items × the
    # output's size: an LM's tokens × vocabulary). The comparisons below stream, a batch at a time.
    targets = teacher_targets(student.module, batches, categorical=categorical, weights=weights,
                              samples=samples, seed=seed, progress=progress)

    def fp_target(x):  # the FP32 model's output in teacher form
        out = _first(student.module(*x))
        return torch.log_softmax(out, -1) if categorical else out

    student_acc, teacher_acc = Agreement(categorical), Agreement(categorical)
    with torch.no_grad():
        for x, t in zip(batches, targets):
            fp = fp_target(x)
            student_acc.add(fp, student(*x))
            if weights:
                teacher_acc.add(fp, t)  # log p̄ as logits
    student_vs_fp, teacher_vs_fp = student_acc.result(), teacher_acc.result() if weights else None
    fallback, key = None, "agreement" if categorical else "cosine_mean"
    if guard and teacher_vs_fp is not None and teacher_vs_fp[key] < student_vs_fp[key]:
        fallback = (f"the posterior-predictive teacher is farther from the FP32 model than the undistilled plan "
                    f"({key} {teacher_vs_fp[key]:.4f} vs {student_vs_fp[key]:.4f} on calibration): its samples "
                    f"are too wide to distill toward; the FP32 model is the teacher")
        with torch.no_grad():  # recomputed (one forward per batch) rather than kept beside the teacher's
            for i, x in enumerate(batches):
                targets[i] = None
                targets[i] = fp_target(x)
    return targets, fallback, teacher_vs_fp, student_vs_fp


@dataclass(frozen=True)
class _Run:
    """What :func:`_train` did."""

    trained: bool              # there was something to train
    steps: int                 # Adam steps taken
    before: float              # held-out loss of the undistilled plan
    best: float                # the best held-out loss measured (the state kept)
    best_step: int             # after how many steps it was measured (0: the undistilled plan)
    measured: int              # held-out measurements
    train_losses: list[float]


def _train(student: Student, trainable: list[torch.Tensor], train: list, held: list, t_train: list, t_held: list,
           *, categorical: bool, steps: int, lr: float, patience: int, seed: int, progress: Callable | None) -> _Run:
    """Adam on ``trainable`` toward the targets, one training batch per step in a seeded random order per
    epoch, the held-out loss measured after each epoch and the last step; stops after ``patience``
    measurements without improvement and leaves the best measured state (the initial one included) in place."""
    def held_loss() -> float:
        with torch.no_grad():
            losses = [float(distill_loss(student(*x), t, categorical)) * len(x[0]) for x, t in zip(held, t_held)]
        return sum(losses) / sum(len(x[0]) for x in held)

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
    return _Run(bool(trainable), step + 1 if trainable else 0, before, best, best_step, measured, train_losses)
