"""Empirical Bayes for the Laplace posterior: the prior precision τ of a layer (MacKay's evidence fixed
point) and the noise variance σ² of a Gaussian output (the output's own spread), both from calibration
statistics. Pure torch."""

from __future__ import annotations

import torch

from ..quant.feedback import one_thread


def output_variance(outputs: list[torch.Tensor]) -> float:
    """σ² of a Gaussian output: the mean over output coordinates of their variance across items; when the
    batches' outputs differ in shape (one row per token, batches of different lengths), each row of the last
    axis counts as a sample of its coordinates."""
    if len({tuple(o.shape[1:]) for o in outputs}) == 1:
        flat = torch.cat([o.reshape(o.shape[0], -1) for o in outputs])
    else:
        flat = torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs])
    return max(float(flat.var(dim=0).mean()), 1e-12)


def evidence_prior_precision(w: torch.Tensor, data_precision: torch.Tensor, iters: int = 100) -> float:
    """Empirical-Bayes prior precision of one layer (MacKay 1992): the fixed point of
    ``τ = γ / ‖w‖²``, ``γ = Σ_i λ_i / (λ_i + τ)`` with ``λ_i = N·F_ii``, started at ``1 / Var(w)``."""
    sq = float((w.double() ** 2).sum())
    lam = data_precision.double().reshape(-1)
    tau = 1.0 / max(float(w.double().var()), 1e-12)
    buf = torch.empty_like(lam)  # in place: the same arithmetic as lam / (lam + tau), without two allocations
    with one_thread():  # up to `iters` sequential steps
        for _ in range(iters):
            torch.add(lam, tau, out=buf)
            gamma = float(torch.div(lam, buf, out=buf).sum())
            new = max(gamma / max(sq, 1e-30), 1e-12)
            if abs(new - tau) <= 1e-6 * tau:
                return new
            tau = new
    return tau
