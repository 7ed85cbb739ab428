"""PlanBayesQ: mixed precision under an exact all-in bits budget (``method="bayesq"``, docs/design.md §3.4–3.5).

1. Risk table: for every weight and every allowed candidate, the exact stored cost in bits and the risk
   R = expected loss increase. ``closed``: R = ½ Σ λ_i E[(Q(w_i) − w_i)²], the second-order proxy in the
   posterior metric for nearest rounding on the designed grid (closed form). ``rounded``: R = ½ (ŵ − μ)ᵀ
   Λ (ŵ − μ) for the codes ŵ the artifact would ship, rounded in the posterior metric (GPTQ / low-rank
   feedback), so the allocation sees what error feedback buys per tensor and width (at T > 0 the posterior
   adds T·dim, the same for every candidate). ``mc``: R measured by running the model with that one block
   quantized (see :class:`~bayesq_onnx.analysis.mc_risk.MonteCarloRisk`).
2. Greedy multiple-choice knapsack on each block's lower convex hull (:mod:`bayesq_onnx.quant.knapsack`).
3. The chosen grids are rounded in the posterior metric (GPTQ / low-rank feedback), as in bayesq-fixed.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

from ..errors import PassFailure
from ..plan import Candidate, Plan
from ..quant import knapsack
from ..weights import WeightInfo, WeightPosterior, canonical_mu
from .candidates import budget_range, check_budget, cost_bits
from .tensor_design import design_grid, round_on_grid


class PlanBayesQ:
    """Choose one candidate per weight so that all-in bits ≤ ``budget`` and total risk is least."""

    def __init__(self, budget: float, posteriors: dict[str, WeightPosterior], allowed: dict[str, list[Candidate]], *,
                 curvature: str = "kfac", temperature: float = 0.0, act_order: bool = False,
                 rounding: str = "feedback", rounded_risk: bool = False, mc_risk: Callable | None = None,
                 progress: Callable | None = None):
        self.budget, self.posteriors, self.allowed = budget, posteriors, allowed
        self.rounded_risk = rounded_risk
        self.curvature, self.temperature, self.mc_risk, self.progress = curvature, temperature, mc_risk, progress
        self.act_order, self.rounding = act_order, rounding
        self.table: dict[str, list[dict]] = {}
        self._grids: dict = {}
        self._rounded: dict = {}

    def __call__(self, weights: dict[str, WeightInfo]) -> Plan:
        check_budget(self.budget, weights, self.allowed)
        self.build_table(weights)
        return self.plan_at(self.budget, weights)

    def budget_range(self, weights: dict[str, WeightInfo]) -> tuple[float, float]:
        """The least and the most all-in bits per weight the allowed candidates give (the budgets
        :meth:`plan_at` can meet)."""
        return budget_range(weights, self.allowed)

    def build_table(self, weights: dict[str, WeightInfo]) -> None:
        """Design every allowed candidate of every weight once: its grid, stored cost and risk."""
        if self.table:
            return
        names = sorted(weights)
        for name in (self.progress(names) if self.progress else names):
            w, post = weights[name], self.posteriors[name]
            mu = canonical_mu(w)
            rows = []
            for cand in self.allowed[name]:
                grid, dist = design_grid(w, post, cand, temperature=self.temperature, mu=mu)
                cost = cost_bits(w.layout, cand)
                closed = 0.5 * float(dist.sum())
                entry = {"candidate": cand, "cost_bits": cost, "risk_closed": closed, "risk": closed}
                self._grids[name, cand] = (grid, dist)
                if self.rounded_risk:
                    qt = self._round(name, cand, weights)
                    entry["risk_rounded"] = entry["risk"] = 0.5 * qt.info["whitened_error"]
                if self.mc_risk is not None:
                    mc = self.mc_risk(w, post, cand, grid, mu)
                    if math.isfinite(mc):
                        entry["risk_mc"] = entry["risk"] = mc
                    else:  # no PyTorch parameter to perturb (a weight the exporter computed): closed form
                        entry["risk_source"] = "closed (mc: no parameter of the PyTorch model holds this weight)"
                rows.append(entry)
            self.table[name] = rows

    def plan_at(self, budget: float, weights: dict[str, WeightInfo]) -> Plan:
        """Knapsack on the risk table at ``budget`` all-in bits, then round each chosen grid (each
        (tensor, candidate) rounding is done once and reused when another budget picks it again)."""
        names = sorted(weights)
        total = sum(weights[n].size for n in names)
        costs = [[e["cost_bits"] for e in self.table[n]] for n in names]
        risks = [[e["risk"] for e in self.table[n]] for n in names]
        bad = [(n, e["candidate"].label, e["risk"]) for n in names for e in self.table[n]
               if not math.isfinite(e["risk"])]
        if bad:  # a NaN would leave its block at the cheapest candidate without a word
            raise PassFailure(f"internal error: non-finite risk for {len(bad)} (tensor, candidate) entries, e.g. "
                              f"{bad[0][0]} {bad[0][1]}: {bad[0][2]}")
        choice = knapsack.greedy(costs, risks, budget * total)
        tensors = {}
        for name, i in zip(names, choice):
            entry = self.table[name][i]
            cand = entry["candidate"]
            qt = self._round(name, cand, weights)
            qt = replace(qt, info=dict(qt.info))
            qt.info.update(risk=entry["risk"], candidates=len(self.table[name]))
            if "risk_source" in entry:
                qt.info["risk_source"] = entry["risk_source"]
            tensors[name] = qt
        settings = {"budget": budget, "curvature": self.curvature, "temperature": self.temperature,
                    "act_order": self.act_order, "rounding": self.rounding,
                    "risk": "mc" if self.mc_risk else "rounded" if self.rounded_risk else "closed",
                    "risk_table": {n: [{"candidate": e["candidate"].label, "cost_bits": e["cost_bits"],
                                        **{k: e[k] for k in ("risk", "risk_closed", "risk_rounded", "risk_mc",
                                                             "risk_source") if k in e}}
                                       for e in self.table[n]] for n in names}}
        return Plan("bayesq", tensors, settings=settings)

    def _round(self, name: str, cand: Candidate, weights: dict[str, WeightInfo]):
        """The codes of ``cand``'s grid for ``name``, rounded in the posterior metric once and kept."""
        if (name, cand) not in self._rounded:
            grid, dist = self._grids[name, cand]
            self._rounded[name, cand] = round_on_grid(weights[name], self.posteriors[name], cand, grid, dist,
                                                      curvature=self.curvature, act_order=self.act_order,
                                                      rounding=self.rounding)
        return self._rounded[name, cand]
