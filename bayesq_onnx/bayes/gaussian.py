"""Closed-form quantization error of a Gaussian, and the standard-normal quantizer tables.

For ``w ~ N(m, s²)`` and a scalar quantizer with cells ``[a_k, b_k)`` and levels ``c_k``, with
``α = (a − m)/s`` and ``β = (b − m)/s`` (docs/design.md §3.3):

    E[(w − c)²; a ≤ w < b] = ((m − c)² + s²)(Φ(β) − Φ(α)) + 2s(m − c)(φ(α) − φ(β)) + s²(αφ(α) − βφ(β))

Summed over cells this is the posterior-expected distortion of the quantizer. All functions are
vectorized: ``m`` and ``s`` are tensors of any shape, levels broadcast against ``m[..., None]``.
"""

from __future__ import annotations

import functools
import math

import torch

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _pdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _x_pdf(x: torch.Tensor) -> torch.Tensor:
    """x·φ(x), which tends to 0 at ±∞ (where x·φ(x) would be inf·0)."""
    finite = torch.isfinite(x)
    xs = torch.where(finite, x, torch.zeros_like(x))
    return torch.where(finite, xs * _pdf(xs), torch.zeros_like(x))


def cell_bounds(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-level cells of sorted ``levels [..., K]``: lower and upper bounds ``[..., K]`` (±∞ outside)."""
    mids = (levels[..., 1:] + levels[..., :-1]) / 2
    inf = torch.full_like(levels[..., :1], math.inf)
    return torch.cat([-inf, mids], dim=-1), torch.cat([mids, inf], dim=-1)


def cell_moments(m: torch.Tensor, s: torch.Tensor, levels: torch.Tensor):
    """Per cell: probability P_k, partial mean E[w; cell k] and E[(w − c_k)²; cell k], each ``[..., K]``.

    ``s`` must be positive; the point case (s = 0) is handled by :func:`expected_sq_error`.
    """
    lower, upper = cell_bounds(levels)
    m_, s_ = m[..., None], s[..., None]
    a, b = (lower - m_) / s_, (upper - m_) / s_
    pa, pb = _pdf(a), _pdf(b)
    prob = torch.special.ndtr(b) - torch.special.ndtr(a)
    partial_mean = m_ * prob + s_ * (pa - pb)
    d = m_ - levels
    sq = (d * d + s_ * s_) * prob + 2 * s_ * d * (pa - pb) + s_ * s_ * (_x_pdf(a) - _x_pdf(b))
    return prob, partial_mean, sq


def expected_sq_error(m: torch.Tensor, s: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """E[(Q(w) − w)²] for ``w ~ N(m, s²)`` and Q = nearest of the sorted ``levels``; ``s = 0`` gives
    the point error ``(Q(m) − m)²``. Shape of ``m``."""
    s = torch.as_tensor(s, dtype=m.dtype).expand_as(m)
    levels = levels.expand(*m.shape, levels.shape[-1]) if levels.dim() == 1 else levels
    point = s <= 0
    hard = (levels - m[..., None]).abs().amin(dim=-1) ** 2
    if bool(point.all()):  # the point design needs no cell integrals
        return hard
    safe_s = torch.where(point, torch.ones_like(s), s)
    _, _, sq = cell_moments(m, safe_s, levels)
    return torch.where(point, hard, sq.sum(dim=-1).clamp_min(0))


@functools.lru_cache(maxsize=None)
def lloyd_max(bits: int, iters: int = 3000, tol: float = 1e-11) -> tuple[tuple[float, ...], float]:
    """Lloyd–Max quantizer of N(0, 1) with 2^bits levels: (levels, mean squared error).

    Lloyd's iteration: boundaries at midpoints, each level the conditional mean of its cell,
    ``c_k = (φ(α_k) − φ(β_k)) / (Φ(β_k) − Φ(α_k))``, in float64 until the levels move less than ``tol``.
    It starts from the high-resolution optimum (Panter–Dite: level density ∝ p^(1/3), i.e. the quantiles
    of N(0, 3)), which is already close for many levels.
    """
    k = 2**bits
    zero, one = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
    levels = math.sqrt(3.0) * torch.special.ndtri((torch.arange(k, dtype=torch.float64) + 0.5) / k)
    for _ in range(iters):
        prob, partial_mean, _ = cell_moments(zero, one, levels)
        new = partial_mean / prob
        if (new - levels).abs().max() < tol:
            levels = new
            break
        levels = new
    mse = float(expected_sq_error(zero, one, levels))
    return tuple(float(x) for x in levels), mse


@functools.lru_cache(maxsize=None)
def optimal_uniform_step(bits: int) -> tuple[float, float]:
    """Step Δ of the MSE-optimal symmetric uniform quantizer of N(0, 1) with 2^bits levels
    ``(k − (2^bits − 1)/2)·Δ`` (clipping beyond the outer levels included): (Δ, mean squared error).

    Golden-section search on the closed form (the error is unimodal in Δ)."""
    k = 2**bits
    zero, one = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
    offsets = torch.arange(k, dtype=torch.float64) - (k - 1) / 2

    def mse(step: float) -> float:
        return float(expected_sq_error(zero, one, offsets * step))

    lo, hi = 1e-4, 8.0 / (k - 1) + 2.0
    g = (math.sqrt(5) - 1) / 2
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = mse(x1), mse(x2)
    while hi - lo > 1e-10:
        if f1 < f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - g * (hi - lo)
            f1 = mse(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + g * (hi - lo)
            f2 = mse(x2)
    step = (lo + hi) / 2
    return step, mse(step)
