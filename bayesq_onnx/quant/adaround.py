"""Learned rounding between two grid points per weight (AdaRound, arXiv 2004.10568), in pure torch.

Every weight keeps its planned code ``q`` or moves one grid point toward its FP32 value, ``q′``; its value is

    ŵ = v(q) + h(V) · (v(q′) − v(q)),   h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1),  ζ = 1.1, γ = −0.1

(the rectified sigmoid: unlike σ it reaches 0 and 1 exactly, so a soft weight can sit on a grid point). The
regularizer ``1 − |2h − 1|^β`` is 0 at h ∈ {0, 1} and 1 at h = ½; annealing β from 20 to 2 first leaves the
variables free and then pushes each to a grid point. ``h ≥ ½`` picks ``q′`` when the variables are hardened.
"""

from __future__ import annotations

import math

import torch

ZETA, GAMMA = 1.1, -0.1
BETA_START, BETA_END = 20.0, 2.0
WARMUP = 0.2  # the first fifth of the steps: no regularizer (AdaRound's warm-up)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def start_logits(moved: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V)`` just inside ``[0, 1]`` at 1 where ``moved`` and at 0 elsewhere: hardened, the start
    is exactly the given codes, and the clamp still passes a gradient (``|h − round h| < 10⁻⁴``)."""
    edge = math.log((1 - GAMMA) / -GAMMA)  # h(±ln 11) = 1 and 0 exactly (ζ − 1 = −γ)
    inward = 1e-3
    return torch.where(moved, torch.full(moved.shape, edge - inward), torch.full(moved.shape, -edge + inward))


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean of ``1 − |2h − 1|^β`` over the variables: 0 when every ``h`` is 0 or 1."""
    return (1 - (2 * h - 1).abs().pow(beta)).mean()


def annealed_beta(step: int, steps: int) -> float | None:
    """β at ``step`` of ``steps``: ``None`` (no regularizer) during the warm-up, then linear from 20 to 2."""
    start = int(WARMUP * steps)
    if step < start:
        return None
    t = (step - start) / max(1, steps - 1 - start)
    return BETA_START + (BETA_END - BETA_START) * min(1.0, t)


def soft_weight(planned: torch.Tensor, alternative: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``v(q) + h(V)·(v(q′) − v(q))`` for the values of the planned and alternative codes."""
    return planned + rectified_sigmoid(v) * (alternative - planned)


def hardened(v: torch.Tensor) -> torch.Tensor:
    """Which variables pick the alternative code: ``h(V) ≥ ½``, i.e. ``V ≥ 0`` (ζ − 1 = −γ makes it symmetric)."""
    return v >= 0
