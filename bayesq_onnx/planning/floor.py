"""The floor: a bayesq compile ships a plan at least as good as GPTQ's at the same all-in budget.

BayesQ beats GPTQ on every model measured at 3–4 bits, but not everywhere (digits-resnet at 2.5 bits), and a
user's model is one nobody measured. So the compile also plans GPTQ (:class:`~bayesq_onnx.planning.gptq.PlanGPTQ`)
at the same all-in budget, from the same posteriors' input second moments ``A`` (GPTQ's ``H``; no second
pass over the data), scores both plans on calibration batches that neither posterior fit saw, and ships the
better one, saying which and by how much in the report.

The score is label-free and lower is better: for class scores the mean KL(FP32 ‖ plan) of the softmax outputs
(every position of a sequence output), for other outputs 1 − the mean cosine to the FP32 outputs, item by item.
GPTQ replaces the plan only when it is better beyond the noise of which items were held out: the lower 95 %
bound of a paired bootstrap of its lead over items is above zero. A few held-out items rarely show that, so
bayesq's plan ships unless GPTQ wins item after item.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from ..errors import UserError
from ..models.base import ModelBundle
from ..models.metrics import kl_divergence
from ..plan import Candidate, Plan
from ..weights import WeightInfo, WeightPosterior, graph_order
from .gptq import PlanGPTQ

HELD_OUT_SHARE = 8  # one calibration batch in eight (at least one) is held out of the fits for the comparison
LEAST_BATCHES = 4   # with fewer calibration batches, holding one out costs the fit too much: no floor


def held_out_split(batches: list, share: int = HELD_OUT_SHARE) -> tuple[list, list]:
    """``(fit, held)``: the last max(1, ⌊n / share⌋) batches held out; with fewer than
    :data:`LEAST_BATCHES` batches nothing is held out and ``held`` is empty."""
    if len(batches) < LEAST_BATCHES:
        return list(batches), []
    cut = len(batches) - max(1, len(batches) // share)
    return list(batches[:cut]), list(batches[cut:])


def without_held_out(bundle: ModelBundle) -> ModelBundle:
    """The bundle the fits and the planners see: its calibration without the held-out batches (and their
    labels); ``bundle`` itself when nothing can be held out."""
    batches, held = held_out_split(bundle.calibration)
    if not held:
        return bundle
    targets = bundle.calibration_targets[:len(batches)] if bundle.calibration_targets is not None else None
    return dataclasses.replace(bundle, calibration=batches, calibration_targets=targets)


def gptq_at_budget(budget: float, weights: dict[str, WeightInfo], posteriors: dict[str, WeightPosterior],
                   allowed: dict[str, list[Candidate]], progress: Callable | None = None) -> Plan | None:
    """GPTQ's plan at ``budget`` *all-in* bits (codes and FP16 scales and zero points) in the forms bayesq may
    use (``allowed``, its candidates per weight: the target's contract, e.g. MatMul weights packed under
    `size`), or ``None`` where it cannot meet the budget. Per weight, GPTQ's min-max grids at the widest
    allowed code width below the budget and the narrowest at or above it, each at the coarsest grouping
    allowed (per row where it may), mixed by the knapsack on GPTQ's own layer errors. The posteriors' K-FAC
    input factors ``A`` are GPTQ's ``H``; a weight without one (a Gather table, a depthwise conv) is rounded to
    nearest, as GPTQ does."""
    forms = {name: _gptq_forms(allowed.get(name, []), budget) for name in weights}
    if not all(forms.values()):
        return None  # a weight with no uniform grid allowed (a target of codebooks only): nothing to compare
    low, high = min(c.bits for f in forms.values() for c in f), max(c.bits for f in forms.values() for c in f)
    bits = min(max(budget, low + 1e-9), high)
    try:
        plan = PlanGPTQ(bits if low < high else float(low), posteriors, order=graph_order(weights),
                        progress=progress, forms=forms)(weights)
    except UserError:  # a budget GPTQ's widths cannot meet on this model: no floor to compare with
        return None
    return plan if plan.all_in_bits <= budget + 1e-9 else None


def _gptq_forms(allowed: list[Candidate], budget: float) -> list[Candidate]:
    """GPTQ's grids among ``allowed``: asymmetric uniform, per row or per group; the widest width below
    ``budget`` and the narrowest at or above it, each at its coarsest grouping (0 = per row first)."""
    grids = [c for c in allowed if c.family == "uniform" and not c.symmetric and not c.per_tensor]
    widths = sorted({c.bits for c in grids})
    below = [b for b in widths if b < budget]
    above = [b for b in widths if b >= budget]
    chosen = ([below[-1]] if below else []) + ([above[0]] if above else [])

    def coarsest(bits: int) -> Candidate:
        same = [c for c in grids if c.bits == bits]
        return min(same, key=lambda c: (c.group_size != 0, -c.group_size, c.kernel))

    return [coarsest(b) for b in chosen]


def item_scores(reference: np.ndarray, candidate: np.ndarray, categorical: bool) -> np.ndarray:
    """Per evaluation item, lower is better: KL(FP32 ‖ candidate) for class scores (averaged over an item's
    positions), else 1 − cosine to the FP32 output (module docstring)."""
    if categorical:
        return kl_divergence(reference, candidate).reshape(len(reference), -1).mean(1)
    r = reference.reshape(len(reference), -1).astype(np.float64)
    c = candidate.reshape(len(candidate), -1).astype(np.float64)
    norms = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
    return 1.0 - np.where(norms > 0, np.sum(r * c, axis=1) / np.maximum(norms, 1e-300), 1.0)


def clearly_better(theirs: np.ndarray, ours: np.ndarray, level: float = 0.95, samples: int = 2000,
                   seed: int = 0) -> tuple[bool, float]:
    """Whether ``theirs`` is lower than ``ours`` beyond the noise of which items were held out: the
    ``1 − level`` quantile of a paired bootstrap of mean(ours − theirs) over items is above 0. Also returns
    that quantile."""
    d = np.asarray(ours, np.float64) - np.asarray(theirs, np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (samples, len(d)))].mean(1)
    low = float(np.quantile(means, 1 - level))
    return low > 0, low


def ship_the_better(plan: Plan, gptq: Plan, reference: np.ndarray, run: Callable[[Plan], np.ndarray],
                    categorical: bool, seed: int = 0) -> tuple[Plan, dict]:
    """``gptq`` if it is closer to FP32 on the held-out batches beyond their noise (:func:`clearly_better`),
    else ``plan`` (``reference``: the FP32 outputs on them; ``run(plan)``: a plan's outputs on them); and the
    report's ``floor`` section."""
    ours, theirs = (item_scores(reference, run(p), categorical) for p in (plan, gptq))
    better, low = clearly_better(theirs, ours, seed=seed)
    shipped = gptq if better else plan
    return shipped, {"score": "kl_mean" if categorical else "1 - cosine_mean", "items": int(len(reference)),
                     "bayesq": {"all_in_bits": plan.all_in_bits, "score": float(ours.mean())},
                     "gptq": {"all_in_bits": gptq.all_in_bits, "score": float(theirs.mean())},
                     "gptq_lead_low95": low, "shipped": shipped.method}
