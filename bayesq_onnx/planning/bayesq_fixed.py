"""PlanBayesQFixed: one candidate everywhere (``method="bayesq-fixed"``), every quantizer designed on
the posterior and rounded in the posterior metric (:mod:`bayesq_onnx.planning.tensor_design`). It isolates what the
Bayesian quantizer design buys, before mixed precision (``method="bayesq"``) chooses the candidates.
"""

from __future__ import annotations

from ..plan import Candidate, Plan
from ..weights import WeightInfo, WeightPosterior
from .tensor_design import design_tensor


class PlanBayesQFixed:
    """Plan every weight with the same candidate, designed and rounded on its posterior."""

    def __init__(self, candidate: Candidate, posteriors: dict[str, WeightPosterior], *, curvature: str = "diag",
                 temperature: float = 0.0, act_order: bool = False, rounding: str = "feedback", progress=None):
        self.candidate, self.posteriors = candidate, posteriors
        self.curvature, self.temperature, self.progress = curvature, temperature, progress
        self.act_order, self.rounding = act_order, rounding

    def __call__(self, weights: dict[str, WeightInfo]) -> Plan:
        names = sorted(weights)
        it = self.progress(names) if self.progress else names
        tensors = {n: design_tensor(weights[n], self.posteriors[n], self.candidate, curvature=self.curvature,
                                    temperature=self.temperature, act_order=self.act_order,
                                    rounding=self.rounding) for n in it}
        return Plan("bayesq-fixed", tensors, settings={"candidate": self.candidate.to_json(),
                                                       "curvature": self.curvature, "temperature": self.temperature,
                                                       "act_order": self.act_order, "rounding": self.rounding})
