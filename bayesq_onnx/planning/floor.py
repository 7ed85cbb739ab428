"""The floor: a bayesq compile ships a plan at least as good as GPTQ's at the same all-in budget.

BayesQ beats GPTQ on every model measured at 3–4 bits, but not everywhere (digits-resnet at 2.5 bits), and a
user's model is one nobody measured. So the compile also plans GPTQ (:class:`~bayesq_onnx.planning.gptq.PlanGPTQ`)
at the same all-in budget, from the same posteriors' input second moments ``A`` (GPTQ's ``H``; no second
pass over the data), scores both plans on calibration batches that neither posterior fit saw, and ships the
better one, saying which and by how much in the report.

The score is label-free and lower is better: for class scores the mean KL(FP32 ‖ plan) of the softmax outputs
(every position of a sequence output), for other outputs 1 − the mean cosine to the FP32 outputs, item by item.
GPTQ replaces the plan only when it scores strictly better on the held-out batches.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import UserError
from ..models.metrics import kl_divergence, output_fidelity
from ..plan import CODE_BITS, Plan
from ..weights import WeightInfo, WeightPosterior, graph_order
from .gptq import PlanGPTQ

HELD_OUT_SHARE = 8  # one calibration batch in eight (at least one) is held out of the fits for the comparison


def held_out_split(batches: list, share: int = HELD_OUT_SHARE) -> tuple[list, list]:
    """``(fit, held)``: the last ⌈n / share⌉ batches held out; with a single batch nothing can be held out
    and ``held`` is empty."""
    if len(batches) < 2:
        return list(batches), []
    cut = len(batches) - max(1, len(batches) // share)
    return list(batches[:cut]), list(batches[cut:])


def gptq_at_budget(budget: float, weights: dict[str, WeightInfo], posteriors: dict[str, WeightPosterior],
                   progress: Callable | None = None) -> Plan | None:
    """GPTQ's plan at ``budget`` *all-in* bits (codes and FP16 scales and zero points), or ``None`` where it
    cannot meet it. The posteriors' K-FAC input factors ``A`` are GPTQ's ``H``; a weight without one (a Gather
    table, a depthwise conv) is rounded to nearest, as GPTQ does. A budget equal to a code width mixes that width with the next narrower one (the scales
    take the rest), as the knapsack on GPTQ's own layer errors decides."""
    bits = budget - 1e-9 if budget in CODE_BITS else budget
    if not CODE_BITS[0] < bits < CODE_BITS[-1]:
        return None
    try:
        plan = PlanGPTQ(bits, posteriors, order=graph_order(weights), progress=progress)(weights)
    except UserError:  # a budget GPTQ's two widths cannot meet on this model: no floor to compare with
        return None
    return plan if plan.all_in_bits <= budget + 1e-9 else None


def floor_score(reference: np.ndarray, candidate: np.ndarray, categorical: bool) -> float:
    """Lower is better: mean KL(FP32 ‖ candidate) for class scores, else 1 − mean cosine (module docstring)."""
    if categorical:
        return float(kl_divergence(reference, candidate).mean())
    return 1.0 - output_fidelity(reference, candidate)["cosine_mean"]


def ship_the_better(plan: Plan, gptq: Plan, reference: np.ndarray, run: Callable[[Plan], np.ndarray],
                    categorical: bool) -> tuple[Plan, dict]:
    """``plan`` or ``gptq``, whichever scores better on the held-out batches (``reference``: the FP32 outputs
    on them; ``run(plan)``: a plan's outputs on them), and the report's ``floor`` section."""
    ours, theirs = (floor_score(reference, run(p), categorical) for p in (plan, gptq))
    shipped = gptq if theirs < ours else plan
    return shipped, {"score": "kl_mean" if categorical else "1 - cosine_mean", "items": int(len(reference)),
                     "bayesq": {"all_in_bits": plan.all_in_bits, "score": ours},
                     "gptq": {"all_in_bits": gptq.all_in_bits, "score": theirs},
                     "shipped": shipped.method}
