"""``max_drop``: the least all-in budget whose validated headline metric drops by at most a given amount."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError
from ..models.base import ModelBundle
from ..plan import Plan
from ..progress import Reporter
from ..runtime.session import make_session, run_batches
from ..weights import WeightInfo
from .bayesq import PlanBayesQ


def search_budget(planner: PlanBayesQ, weights: dict[str, WeightInfo], bundle: ModelBundle,
                  fp_path: Path, rewrite: Callable[[Plan], bytes], providers: list[str], session_config: dict,
                  max_drop: float, rep: Reporter, tolerance: float = 0.05) -> tuple[Plan, dict, np.ndarray]:
    """Bisection over the all-in budget for the least one whose validated headline drop is ≤ ``max_drop``;
    returns the plan, the search record and the FP32 outputs on the evaluation set (validation reuses them).
    ``rewrite(plan)`` is the artifact's bytes for a plan; its sessions take ``session_config``.

    drop(b) = m(FP32, FP32) − m(FP32, Q_b) for the bundle's metric m and headline (so FP32's own score is the
    reference: 1 for a fidelity metric, its accuracy for a labelled one). The posterior and the risk table
    are built once; each step is a knapsack, the roundings it has not seen yet, a rewrite and one ORT run
    over the evaluation set. Stops when the bracket is narrower than ``tolerance`` bits.
    """
    planner.build_table(weights)
    lo, hi = planner.budget_range(weights)
    reference = run_batches(make_session(fp_path, providers)[0], bundle.evaluation)
    first = bundle.metric(reference, reference)
    headline = bundle.headline or next(iter(first))
    own = first[headline]
    tried: list[dict] = []

    def validated(budget: float) -> tuple[Plan, bool]:
        plan = planner.plan_at(budget, weights)
        session, _ = make_session(rewrite(plan), providers, session_config)
        score = bundle.metric(reference, run_batches(session, bundle.evaluation))[headline]
        ok = own - score <= max_drop
        tried.append({"budget": budget, "all_in_bits": plan.all_in_bits, headline: score, "drop": own - score,
                      "within": ok})
        rep.note(f"  budget {budget:.3f}: {headline} {score:.4f} (drop {own - score:.4f}) "
                 f"{'[green]within[/]' if ok else '[red]over[/]'}")
        return plan, ok

    # A feasible plan's own all-in bits bound the answer from above: the greedy knapsack picks the same plan
    # at any budget between its cost and the budget it was given.
    best, ok = validated(hi)
    hi = best.all_in_bits
    if not ok:
        raise UserError(f"`max_drop` {max_drop:g}: even the largest budget ({hi:.3f} bits) drops {headline} "
                        f"by {tried[-1]['drop']:.4f}; raise `max_drop` or allow larger candidates")
    plan, ok = validated(lo)
    if ok:
        best, hi = plan, lo
    while hi - lo > tolerance:
        mid = 0.5 * (lo + hi)
        plan, ok = validated(mid)
        if ok:
            best, hi = plan, plan.all_in_bits
        else:
            lo = mid
    return best, {"max_drop": max_drop, "headline": headline, "fp32_score": own, "tolerance_bits": tolerance,
                  "chosen_all_in_bits": best.all_in_bits, "steps": tried,
                  "note": "each step validates on the evaluation set the report scores"}, reference
