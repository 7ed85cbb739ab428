"""PlanBayesFixedPass: one candidate everywhere (``--method bayesq-fixed``), every quantizer designed on
the posterior: grid by posterior-expected weighted distortion, codes by rounding in the posterior metric.

Per weight:  μ, diag Λ  ──design──►  grid (uniform scales/zero points, or codebook levels)
             grid, Λ    ──round───►  codes   diag: nearest · kfac: GPTQ with H = A · lowrank: D + UUᵀ feedback
The fitted values go in ``QuantizedTensor.info``: the design objective ``expected_distortion``
(Σ λ E[(Q(w) − w)²]), the realized ``whitened_error`` (ŵ − μ)ᵀΛ(ŵ − μ) and the tensor's ``fisher_mass``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..plan import Candidate, Plan, QuantizedTensor
from ..quant import design, feedback
from .collect_weights import WeightInfo
from .fit_posterior import WeightPosterior

_SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def design_tensor(weight: WeightInfo, post: WeightPosterior, cand: Candidate, *, curvature: str,
                  temperature: float = 1.0) -> QuantizedTensor:
    """Design and round one weight; see the module docstring."""
    lay = weight.layout
    mu = lay.to_canonical(torch.from_numpy(np.array(weight.array, dtype=np.float32)))
    lam = post.design_weights()
    if cand.family == "uniform":
        if cand.group_size and lay.in_channels % cand.group_size:
            raise ValueError(f"group size {cand.group_size} does not divide {lay.in_channels} input channels")
        grid, dist = design.fit_uniform(mu, lam, cand.bits, cand.group_size, symmetric=cand.symmetric,
                                        scale_dtype=_SCALE_DTYPES[cand.scale_dtype], temperature=temperature)
    else:
        grid, dist = design.fit_codebook(mu, lam, cand.bits, cand.group_size, temperature=temperature)
    rows, cols = slice(0, lay.rows), slice(0, lay.cols)
    if curvature == "kfac" and post.A is not None:
        codes, values = feedback.gptq_round(mu, post.A, grid)
    elif curvature == "lowrank" and post.U is not None:
        d = (post.precision - (post.U * post.U).sum(1).reshape(post.precision.shape)).clamp_min(post.prior_precision)
        codes, values = feedback.lowrank_round(mu, d, post.U, grid)
    else:
        codes, values = grid.quantize(mu, rows, cols)
    info = {"expected_distortion": float(dist.sum()), "whitened_error": whitened_error(values - mu, post),
            "fisher_mass": post.fisher_mass, "prior_precision": post.prior_precision,
            "curvature": curvature if (post.A is not None or post.U is not None) else "diag"}
    if cand.family == "uniform":
        return QuantizedTensor(weight.name, lay, cand, codes=codes.numpy(), scale=grid.scale.numpy(),
                               zero=grid.zero.numpy(), info=info)
    return QuantizedTensor(weight.name, lay, cand, codes=codes.numpy(),
                           levels=grid.levels.to(torch.float16).numpy(), info=info)


def whitened_error(x: torch.Tensor, post: WeightPosterior) -> float:
    """(ŵ − μ)ᵀ Λ (ŵ − μ) in the posterior's own form (diag, Kronecker, or diag + low rank)."""
    if post.A is not None and post.G_diag is not None:
        data = post.n_data * float(((post.G_diag[:, None] * x) * (x @ post.A)).sum())
        return data + post.prior_precision * float((x * x).sum())
    if post.U is not None:
        d = (post.precision - (post.U * post.U).sum(1).reshape(post.precision.shape)).clamp_min(post.prior_precision)
        return float((d * x * x).sum() + ((x.reshape(-1) @ post.U) ** 2).sum())
    return float((post.precision * x * x).sum())


class PlanBayesFixedPass:
    """Plan every weight with the same candidate, designed and rounded on its posterior."""

    def __init__(self, candidate: Candidate, posteriors: dict[str, WeightPosterior], *, curvature: str = "diag",
                 temperature: float = 1.0, progress=None):
        self.candidate, self.posteriors = candidate, posteriors
        self.curvature, self.temperature, self.progress = curvature, temperature, progress

    def __call__(self, weights: dict[str, WeightInfo]) -> Plan:
        names = sorted(weights)
        it = self.progress(names) if self.progress else names
        tensors = {n: design_tensor(weights[n], self.posteriors[n], self.candidate, curvature=self.curvature,
                                    temperature=self.temperature) for n in it}
        return Plan("bayesq-fixed", tensors, settings={"candidate": self.candidate.to_json(),
                                                       "curvature": self.curvature, "temperature": self.temperature})
