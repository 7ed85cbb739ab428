"""Bayesian design of one weight tensor for one candidate (docs/design.md §3.2–3.3):

    μ, diag Λ  ──design──►  grid   uniform scales/zero points or codebook levels minimizing
                                   Σ λ_i E_{w~N(μ_i, T/λ_i)}[(Q(w) − w)²]            (:mod:`quant.design`)
    grid, Λ    ──round───►  codes  diag: nearest · kfac: GPTQ with H = A + τ/(N·Ḡ)·I (optionally in
                                   decreasing H_jj order: "act-order") ·
                                   lowrank: D + UUᵀ block feedback                   (:mod:`quant.feedback`)
                                   (``rounding="nearest"``: nearest whatever the curvature)

The fitted values go in ``QuantizedTensor.info``: the design objective ``expected_distortion``, the
realized ``whitened_error`` (ŵ − μ)ᵀΛ(ŵ − μ) and the tensor's ``fisher_mass``.
"""

from __future__ import annotations

import torch

from ..plan import Candidate, QuantizedTensor
from ..quant import design, feedback
from ..weights import WeightInfo, WeightPosterior, canonical_mu


def design_grid(weight: WeightInfo, post: WeightPosterior, cand: Candidate, *, temperature: float = 0.0,
                mu: torch.Tensor | None = None):
    """The candidate's grid for this weight and its design objective per row/group/table (``None`` grid
    for a float16 keep, whose objective is the rounding error of float16)."""
    lay = weight.layout
    mu = canonical_mu(weight) if mu is None else mu
    lam = post.design_weights()
    if cand.family == "float":
        err = mu.to(torch.float16 if cand.bits == 16 else torch.float32).float() - mu
        return None, (lam * err * err).sum(1)
    if not cand.fits(lay):
        raise ValueError(f"{cand.label} does not fit {weight.name} ({lay.rows} rows × {lay.in_channels} inputs)")
    if cand.family == "uniform":
        return design.fit_uniform(mu, lam, cand.bits, cand.group_size, symmetric=cand.symmetric,
                                  scale_dtype=cand.scale_torch_dtype, temperature=temperature)
    return design.fit_codebook(mu, lam, cand.bits, cand.rows_per_table(lay), temperature=temperature)


def round_on_grid(weight: WeightInfo, post: WeightPosterior, cand: Candidate, grid, dist: torch.Tensor, *,
                  curvature: str, mu: torch.Tensor | None = None, act_order: bool = False,
                  rounding: str = "feedback") -> QuantizedTensor:
    """Codes on ``grid`` chosen in the posterior metric (``rounding="feedback"``: each code's error
    compensated on the columns not yet rounded, GPTQ-style) or nearest on the grid (``"nearest"``: no
    compensation, the ablation of what the feedback buys); the tensor as the artifact stores it."""
    lay = weight.layout
    mu = canonical_mu(weight) if mu is None else mu
    info = {"expected_distortion": float(dist.sum()), "fisher_mass": post.fisher_mass,
            "prior_precision": post.prior_precision}
    if post.info.get("input_shrinkage"):  # A was rank-deficient: the report says how far it was pulled to its diagonal
        info["input_shrinkage"] = post.info["input_shrinkage"]
    if cand.family == "float":
        qt = QuantizedTensor(weight.name, lay, cand, values=weight.array)
        x = torch.from_numpy(lay.to_canonical(qt.dequantize())) - mu
        info.update(whitened_error=whitened_error(x, post), curvature="none")
        qt.info = info
        return qt
    rows, cols = slice(0, lay.rows), slice(0, lay.cols)
    compensate = rounding == "feedback"
    if compensate and curvature == "kfac" and post.A is not None:
        # Per row the posterior metric is N·G_rr·A + τ·I = N·G_rr·(A + τ/(N·G_rr)·I): the prior is GPTQ's
        # dampening. GPTQ shares one H across rows, so the typical row's G_rr (the mean) sets it.
        hessian = post.A + prior_damping(post) * torch.eye(post.A.shape[0])
        codes, values = feedback.gptq_round(mu, hessian, grid, damp=1e-6, act_order=act_order)
    elif compensate and curvature == "lowrank" and post.U is not None:
        codes, values = feedback.lowrank_round(mu, post.lowrank_diagonal(), post.U, grid)
    else:
        codes, values = grid.quantize(mu, rows, cols)
    info.update(whitened_error=whitened_error(values - mu, post),
                curvature="nearest" if not compensate else curvature if (post.A is not None or post.U is not None)
                else "diag")
    if cand.family == "uniform":
        return QuantizedTensor(weight.name, lay, cand, codes=codes.numpy(), scale=grid.scale.numpy(),
                               zero=grid.zero.numpy(), info=info)
    return QuantizedTensor(weight.name, lay, cand, codes=codes.numpy(),
                           levels=grid.levels.to(torch.float16).numpy(), info=info)


def prior_damping(post: WeightPosterior) -> float:
    """``τ / (N·Ḡ)``: the prior's share of a K-FAC posterior's per-row metric ``N·G_rr·A + τ·I`` at the mean
    ``G_rr``, in the units of ``A`` (the dampening of the GPTQ Hessian ``H = A + τ/(N·Ḡ)·I``)."""
    return post.prior_precision / (post.n_data * float(post.G_diag.mean().clamp_min(1e-30)))


def whitened_error(x: torch.Tensor, post: WeightPosterior) -> float:
    """(ŵ − μ)ᵀ Λ (ŵ − μ) in the posterior's own form (diag, Kronecker, or diag + low rank)."""
    if post.A is not None and post.G_diag is not None:
        data = post.n_data * float(((post.G_diag[:, None] * x) * (x @ post.A)).sum())
        return data + post.prior_precision * float((x * x).sum())
    if post.U is not None:
        return float((post.lowrank_diagonal() * x * x).sum() + ((x.reshape(-1) @ post.U) ** 2).sum())
    return float((post.precision * x * x).sum())




def design_tensor(weight: WeightInfo, post: WeightPosterior, cand: Candidate, *, curvature: str,
                  temperature: float = 0.0, act_order: bool = False, rounding: str = "feedback") -> QuantizedTensor:
    """Design the grid and round the codes of one weight (see the module docstring)."""
    mu = canonical_mu(weight)
    grid, dist = design_grid(weight, post, cand, temperature=temperature, mu=mu)
    return round_on_grid(weight, post, cand, grid, dist, curvature=curvature, mu=mu, act_order=act_order,
                        rounding=rounding)
