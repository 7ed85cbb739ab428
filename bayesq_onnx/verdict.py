"""The compile's verdict on its artifact: holds / degraded / collapsed (pure numpy; docs/reliability.md#verdict).

One rule for every kind of output. A *measure* ``m(reference, candidate)`` scores how well a model's outputs
reproduce the FP32 ones on the evaluation items; from it,

    loss(candidate) = (m(r, r) − m(r, c)) / (m(r, r) − m(r, r[π]))        (signs flipped when lower is better)

where ``r`` are the FP32 outputs, ``c`` the artifact's and ``π`` a fixed derangement of the items: ``r[π]`` is
an output that is the model's own but belongs to another input, the chance level *of this model on these
data*. So loss is 0 for an artifact identical to FP32 and 1 for one no better than answering for another input;
it is on the same scale whatever the metric, and near-constant outputs or frequent classes cannot make a
broken artifact look good. The reference is the same model with every quantized weight rounded to 8 bits
per channel (min-max, round to nearest): the near-lossless point, which says how much of the loss the data's
own fragility (near-ties, sensitive outputs) causes.

    collapsed   loss ≥ 0.5                                  (less than half of what tells inputs apart is left)
    holds       loss ≤ max(0.05, 2 × the 8-bit reference's loss)
    degraded    otherwise

The measure: for class scores (a categorical likelihood: logits on the last axis) agreement on the items where
FP32 is confident (its top-1 logit exceeds its top-2 by ≥ 1, odds ≥ e : 1) — near-ties flip under any
perturbation, even 8-bit rounding, and should not decide the verdict; for every other output the bundle's
headline metric in its direction (cosine of embeddings, Pearson of regression scores, a user's metric).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .models.metrics import agreement_beyond_ties, bootstrap_interval, takes_rows_argument

VERDICTS = ("holds", "degraded", "collapsed")
HOLD_LOSS = 0.05        # 5 % of the way from FP32 to chance counts as holding, whatever the reference does
REFERENCE_FACTOR = 2.0  # ... or up to twice what 8-bit rounding loses on the same items
COLLAPSE_LOSS = 0.5     # past half-way to chance the artifact no longer behaves like the model


@dataclass(frozen=True)
class Measure:
    """What the verdict scores: ``score(reference, candidate, rows)`` (``rows``: the evaluation items the arrays
    hold, for a metric with labels of its own) and its direction."""

    name: str
    score: Callable[..., float]
    higher_is_better: bool = True


def measure_for(metric: Callable[..., dict], headline: str, *, categorical: bool,
                higher_is_better: bool = True) -> Measure:
    """Confident agreement for class scores; otherwise the headline of ``metric`` in its direction."""
    if categorical:
        return Measure("confident_agreement",
                       lambda r, c, rows=None: agreement_beyond_ties(r, c)["confident_agreement"])
    takes_rows = takes_rows_argument(metric)

    def score(r, c, rows=None):
        return float(metric(r, c, rows=rows)[headline] if takes_rows else metric(r, c)[headline])

    return Measure(headline, score, higher_is_better)


def derangement(n: int, seed: int) -> np.ndarray:
    """A permutation of ``range(n)`` with no fixed point (``n`` ≥ 2): a seeded shuffle rotated by one."""
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.roll(order, -1)
    return out


def judge(measure: Measure, reference: np.ndarray, candidate: np.ndarray, eight_bit: np.ndarray | None,
          seed: int = 0) -> dict:
    """The verdict (module docstring) with its figures: the measure for the artifact (and its 95 % bootstrap
    interval), FP32 itself, chance and the 8-bit reference; the losses; the rule's thresholds; one ``line``."""
    n = len(reference)
    sign = 1.0 if measure.higher_is_better else -1.0
    perfect = measure.score(reference, reference)
    chance = measure.score(reference, reference[derangement(n, seed)]) if n >= 2 else float("nan")
    value = measure.score(reference, candidate)
    span = sign * (perfect - chance)
    out = {"measure": measure.name, "higher_is_better": measure.higher_is_better, "value": value,
           "fp32": perfect, "chance": chance, "items": int(n)}
    out["ci95"] = list(bootstrap_interval(
        lambda r, c, rows=None: {"m": measure.score(r, c, rows=rows)}, reference, candidate, "m", seed=seed))
    if not np.isfinite(span) or span <= 1e-12:
        # FP32 answers the same for every item: nothing tells inputs apart, so no chance level to measure from
        out.update(verdict="unjudged", loss=None, line=(
            f"verdict: unjudged — FP32's {measure.name} is no better on the right items than on others "
            f"({perfect:.4g} vs {chance:.4g}), so fidelity cannot be told from chance on these evaluation items"))
        return out
    loss = sign * (perfect - value) / span
    out["loss"] = float(loss)
    tolerance = HOLD_LOSS
    if eight_bit is not None:
        ref_value = measure.score(reference, eight_bit)
        out["reference_8bit"] = {"value": ref_value, "loss": float(sign * (perfect - ref_value) / span)}
        tolerance = max(HOLD_LOSS, REFERENCE_FACTOR * out["reference_8bit"]["loss"])
    out["hold_loss"], out["collapse_loss"] = float(tolerance), COLLAPSE_LOSS
    out["verdict"] = "collapsed" if loss >= COLLAPSE_LOSS else "holds" if loss <= tolerance else "degraded"
    ref = (f", 8-bit reference {out['reference_8bit']['value']:.4f}" if "reference_8bit" in out else "")
    out["line"] = (f"verdict: {out['verdict']} — {measure.name} {value:.4f} (CI {out['ci95'][0]:.4f}–"
                   f"{out['ci95'][1]:.4f}; FP32 {perfect:.4f}, chance {chance:.4f}{ref}): loss {loss:.3f} of the "
                   f"way to chance (holds ≤ {tolerance:.3f}, collapsed ≥ {COLLAPSE_LOSS})")
    return out


def at_least(verdict: str, level: str) -> bool:
    """Whether ``verdict`` is ``level`` or worse (``unjudged`` is never)."""
    return verdict in VERDICTS and VERDICTS.index(verdict) >= VERDICTS.index(level)

