"""Empirical Bayes for the Laplace posterior: the prior precision τ of a layer (MacKay's evidence fixed
point), the noise variance σ² of a Gaussian output (the output's own spread) and the posterior mean of a
layer's input second moment under a prior centred on its diagonal. Pure torch."""

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


def shrink_to_diagonal(a: torch.Tensor, samples: int) -> tuple[torch.Tensor, float]:
    """The posterior mean of a layer's input second moment ``A`` (``d × d``, averaged over ``n = samples``
    rows) under a prior of ``ν = max(0, d − n)`` pseudo-rows centred on its diagonal:

        A* = (n·A + ν·diag(A)) / (n + ν) = (1 − δ)·A + δ·diag(A),    δ = ν / (n + ν) = max(0, 1 − n/d).

    Why: ``n < d`` rows give ``A`` rank ≤ n, and error feedback (GPTQ, whose Hessian is ``A``) moves rounding
    error into the d − n directions the sample never saw as if they cost nothing; inputs from other data
    excite them (EfficientNet-Lite's classifier: 256 pooled features, 1280 columns). The prior supplies the
    missing d − n rows from the diagonal, each input uncorrelated with the others, so that the estimate
    rests on d rows, and leaves every layer with at least as many rows as columns as measured. The diagonal,
    hence each weight's own precision, does not move. Returns ``(A*, δ)``."""
    dim = a.shape[0]
    if samples <= 0 or samples >= dim:
        return a, 0.0
    delta = 1.0 - samples / dim
    shrunk = (1.0 - delta) * a
    shrunk.diagonal().copy_(torch.diagonal(a))
    return shrunk, delta


def unshrink_from_diagonal(a: torch.Tensor, delta: float) -> torch.Tensor:
    """The sample moment back from :func:`shrink_to_diagonal`'s ``A* = (1 − δ)·A + δ·diag(A)``:
    ``A = diag(A*) + (A* − diag(A*)) / (1 − δ)`` (exact for δ < 1, which ``n ≥ 1`` rows guarantee). For
    methods whose published form takes the measured ``E[x xᵀ]`` (GPTQ's ``H``)."""
    if not delta:
        return a
    raw = a / (1.0 - delta)
    raw.diagonal().copy_(torch.diagonal(a))
    return raw


class OutputMoments:
    """The program's output over the calibration items as running moments, for a Gaussian output's σ² (the
    mean over output coordinates of their variance across items, as
    :func:`output_variance` defines it) without keeping the outputs: an
    LM's logits over the calibration set are items × tokens × vocabulary, these sums one item's worth.

    Per coordinate, the count, mean and sum of squared deviations in float64, each batch's (two-pass) merged
    in by Chan et al.'s pairwise update. Two frames, as ``output_variance`` reads them: the coordinates of a
    whole item (while every batch's items have one shape) and rows of the last axis (used once they differ).
    ``needed=False`` (a categorical output, or σ² given): ``append`` keeps nothing.
    """

    def __init__(self, needed: bool = True):
        self.needed = needed
        self.shape: tuple | None = None        # one item's output shape, while all batches agree on it
        self.item: list | None = None          # [count, mean, m2] over whole items
        self.row: list | None = None           # [count, mean, m2] over rows of the last axis

    def append(self, out: torch.Tensor) -> None:
        """Add one batch's outputs (items first)."""
        if not self.needed:
            return
        if self.shape is None:
            self.shape = tuple(out.shape[1:])
        if self.item is not None or self.row is None:  # still in the whole-item frame
            if tuple(out.shape[1:]) == self.shape:
                self.item = self._merge(self.item, out.reshape(out.shape[0], -1))
            else:
                self.item = None
        self.row = self._merge(self.row, out.reshape(-1, out.shape[-1]))

    @staticmethod
    def _merge(acc: list | None, x: torch.Tensor) -> list:
        x = x.detach().double()
        n, mean = x.shape[0], x.mean(0)
        m2 = (x - mean).square_().sum(0)
        if acc is None:
            return [n, mean, m2]
        count, mu, sq = acc
        delta, total = mean - mu, count + n
        return [total, mu + delta * (n / total), sq + m2 + delta.square_() * (count * n / total)]

    def variance(self) -> float:
        """σ²: the mean over coordinates of each one's unbiased variance across items (rows when the items'
        shapes differ), floored at 1e-12."""
        count, _, m2 = self.item if self.item is not None else self.row
        per_coordinate = (m2 / (count - 1)).float()   # float32, as torch.var returns it for float32 outputs
        return max(float(per_coordinate.mean()), 1e-12)
