"""The distillation teacher: posterior samples of the planned weights and the predictive they average
(package docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from ..export import ParameterBinding
from ..plan import Plan
from ..quant.layout import WeightLayout
from ..weights import WeightPosterior
from .student import _first


class PosteriorNoise:
    """Draws ``ε ~ N(0, Λ⁻¹)`` for one weight, canonical ``[rows, cols]`` (forms in the module docstring)."""

    def __init__(self, post: WeightPosterior):
        self.shape = tuple(post.precision.shape)
        self.kind = "none"
        if post.n_data <= 0:  # placeholder posterior of an unbound tensor: no uncertainty to sample
            return
        tau, n = float(post.prior_precision), float(post.n_data)
        if post.A is not None and post.G_diag is not None:
            a, v = torch.linalg.eigh(post.A.double())
            self.kind, self.V = "kfac", v.float()
            lam = n * post.G_diag.double().clamp_min(0)[:, None] * a.clamp_min(0)[None, :] + tau
            self.std = lam.rsqrt().float()                                       # [rows, cols], eigenbasis
        elif post.U is not None:
            d = post.lowrank_diagonal().double()
            w = post.U.double() / d.reshape(-1, 1).sqrt()
            p, s, _ = torch.linalg.svd(w, full_matrices=False)
            self.kind, self.P = "lowrank", p.float()
            self.shrink = ((1 + s * s).rsqrt() - 1).float()
            self.std = d.rsqrt().float()
        else:
            self.kind, self.std = "diag", post.precision.double().rsqrt().float()

    def __call__(self, gen: torch.Generator, n: int | None = None) -> torch.Tensor:
        """One draw ``[rows, cols]``, or ``n`` draws ``[n, rows, cols]``."""
        shape = self.shape if n is None else (n, *self.shape)
        if self.kind == "none":
            return torch.zeros(shape)
        eps = torch.randn(shape, generator=gen)
        if self.kind == "kfac":
            return (eps * self.std) @ self.V.T
        if self.kind == "lowrank":
            e = eps.reshape(-1, self.P.shape[0])
            e = e + ((e @ self.P) * self.shrink) @ self.P.T
            return e.reshape(shape) * self.std
        return eps * self.std


@dataclass
class SampledWeight:
    """A weight the teacher draws: its parameter, how the graph holds it, and its posterior noise."""

    parameter: str
    transposed: bool
    layout: WeightLayout
    noise: PosteriorNoise


def sampled_weights(module: nn.Module, plan: Plan, posteriors: dict[str, WeightPosterior],
                    bindings: dict[str, ParameterBinding]) -> list[SampledWeight]:
    """Every planned weight with a PyTorch parameter and a fitted posterior, in name order."""
    params = dict(module.named_parameters())
    out = []
    for name in sorted(plan.tensors):
        b, post = bindings.get(name), posteriors.get(name)
        if b is None or post is None or post.n_data <= 0:
            continue
        pname = next((a for a in b.aliases if a in params), b.parameter)
        out.append(SampledWeight(pname, b.transposed, plan.tensors[name].layout, PosteriorNoise(post)))
    return out


def teacher_targets(module: nn.Module, batches: list[tuple[torch.Tensor, ...]], *, categorical: bool,
                    weights: list[SampledWeight], samples: int, seed: int,
                    progress: Callable | None = None) -> list[torch.Tensor]:
    """Teacher targets per batch: log p̄ (categorical) or the mean output, p̄ / the mean over ``samples``
    posterior draws of ``weights`` (no ``weights``: the FP32 model, one pass).

    Draw s sets every sampled weight once and runs all batches with it, so one set of sampled weights is
    in memory at a time; the per-batch sums are the targets (finished in place), one output per item.
    """
    params = dict(module.named_parameters())
    draws = samples if weights else 1
    gen = torch.Generator().manual_seed(seed)
    total: list[torch.Tensor | None] = [None] * len(batches)
    runs = [(s, i) for s in range(draws) for i in range(len(batches))]
    label = f"teacher outputs ({draws} posterior samples)" if weights else "teacher outputs (FP32)"
    sampled: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for s, i in (progress(runs, label) if progress else runs):
            if i == 0:
                sampled = {}
                for sw in weights:
                    p = params[sw.parameter]
                    held = (p.T if sw.transposed else p).reshape(sw.layout.shape)   # as the graph holds it
                    w2 = sw.layout.to_canonical(held.float()) + sw.noise(gen)
                    value = sw.layout.from_canonical(w2)
                    sampled[sw.parameter] = (value.T if sw.transposed else value).reshape(p.shape)
            out = _first(functional_call(module, sampled, batches[i]))
            value = torch.softmax(out, dim=-1) if categorical else out
            total[i] = value if total[i] is None else total[i] + value
    for i, t in enumerate(total):  # in place: one copy of the targets at a time
        t.div_(draws)
        total[i] = t.clamp_min_(1e-30).log_() if categorical else t
    return total
