"""PlanGPTQ: the GPTQ baseline (Frantar et al., 2023), as its reference implementation does it.

* Grid: per output row (or per group of ``group_size`` input channels) asymmetric min-max over
  ``[min(w, 0), max(w, 0)]`` — GPTQ's ``Quantizer.find_params`` — with FP16 scales like every uniform artifact.
  With groups the grid is fixed from the original weights before rounding (AutoGPTQ's ``static_groups``), which
  keeps groups contiguous under act-order.
* Rounding: column by column with the error fed back through the upper Cholesky factor of ``H⁻¹``, lazy blocks
  of 128 columns, dampening ``0.01 · mean(diag H)``, optional act-order (:func:`~bayesq_onnx.quant.feedback.gptq_round`).
* ``H`` is the input second moment ``E[x xᵀ]`` of each layer from the FP32 model's activations on the calibration
  set — the same ``A`` BayesQ's K-FAC posterior uses, so the two methods see the same data (where fewer rows than
  columns reach a layer, the posterior's ``A`` is pulled toward its diagonal; GPTQ takes the measured one back).
  (The reference code feeds each layer the outputs of already-quantized layers; this variant does not.)
* Fractional budgets mix the two code widths around ``bits`` (e.g. 3 and 4 for 3.5). ``mix="knapsack"``: the
  same greedy knapsack BayesQ uses, on GPTQ's own layer errors ``tr(ΔW H ΔWᵀ)·(rows of X)`` — the squared output
  error on the calibration set; ``mix="proportional"``: the wider codes go to layers in graph order until the
  budget is spent, ignoring errors (the naive mix).
"""

from __future__ import annotations

import math
from typing import Callable

from ..bayes.empirical_bayes import unshrink_from_diagonal
from ..errors import UserError
from ..plan import CODE_BITS, Candidate, Plan, QuantizedTensor
from ..quant import knapsack, uniform
from ..quant.design import UniformGrid
from ..quant.feedback import gptq_round
from ..weights import WeightInfo, WeightPosterior, canonical_mu
from .candidates import cost_bits, range_text

MIXES = ("knapsack", "proportional")


def mix_widths(bits: float) -> tuple[int, ...]:
    """The code widths a budget of ``bits`` mixes: itself if it is one, else its neighbours in CODE_BITS."""
    if bits in CODE_BITS:
        return (int(bits),)
    below = [b for b in CODE_BITS if b < bits]
    above = [b for b in CODE_BITS if b > bits]
    if not below or not above:
        raise UserError(f"`bits` {bits:g} is outside GPTQ's code widths {CODE_BITS}; pick a budget between them")
    return (below[-1], above[0])


class PlanGPTQ:
    """Plan every weight with GPTQ at ``bits`` (a code width, or a budget mixing two); returns a :class:`Plan`."""

    def __init__(self, bits: float, posteriors: dict[str, WeightPosterior], *, group_size: int = 0,
                 act_order: bool = False, mix: str = "knapsack", block: int = 128, damp: float = 0.01,
                 order: list[str] | None = None, progress: Callable | None = None,
                 forms: dict[str, list[Candidate]] | None = None):
        if mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}")
        self.bits, self.posteriors, self.group_size = bits, posteriors, group_size
        self.act_order, self.mix, self.block, self.damp = act_order, mix, block, damp
        self.order, self.progress = order, progress
        self.widths = mix_widths(bits)
        # per weight, the uniform grids to mix (narrowest first) instead of `widths` at `group_size`: GPTQ held
        # to the forms a target allows (planning/floor.py)
        self.forms = forms

    def __call__(self, weights: dict[str, WeightInfo]) -> Plan:
        names = sorted(weights)
        default = [Candidate("uniform", b, self.group_size) for b in self.widths]
        cands = {n: (self.forms or {}).get(n, default) for n in names}
        for name in names:
            if not all(c.fits(weights[name].layout) for c in cands[name]):
                raise UserError(f"`group_size` {self.group_size} does not divide the input channels of {name}; "
                                "pick a divisor or 0 (per row)")
        total = sum(weights[n].size for n in names)
        costs = {n: [cost_bits(weights[n].layout, c) for c in cands[n]] for n in names}
        lo, hi = (sum(c[i] for c in costs.values()) / total for i in (0, -1))
        mixed = any(len(c) > 1 for c in cands.values())
        if mixed and not lo <= self.bits <= hi:
            low, high = range_text(self.bits, lo, hi)
            raise UserError(f"`bits` {self.bits:g} cannot be met mixing GPTQ layers of {self.widths[0]} to "
                            f"{self.widths[-1]} bits: they give {low} to {high} all-in bits on this model")
        if not mixed:
            choice = {n: 0 for n in names}
        elif self.mix == "proportional":
            choice = self._fill_in_order(names, costs, total)
        else:
            choice = None  # after every width's error is known
        done: dict[tuple[str, int], tuple[QuantizedTensor, float]] = {}
        need = [(n, i) for n in names for i in range(len(cands[n])) if choice is None or choice[n] == i]
        for name, i in (self.progress(need) if self.progress else need):
            done[name, i] = self._quantize(weights[name], cands[name][i])
        if choice is None:
            risks = [[done[n, i][1] for i in range(len(cands[n]))] for n in names]
            picked = knapsack.greedy([costs[n] for n in names], risks, self.bits * total)
            choice = dict(zip(names, picked))
        tensors = {n: done[n, choice[n]][0] for n in names}
        settings = {"budget": self.bits, "widths": list(self.widths), "mix": self.mix if len(cands) > 1 else None,
                    "group_size": self.group_size, "act_order": self.act_order, "block": self.block,
                    "damp": self.damp, "hessian": "E[x xᵀ] of FP32 activations on the calibration set"}
        return Plan("gptq", tensors, settings=settings)

    def _fill_in_order(self, names: list[str], costs: dict[str, list[int]], total: int) -> dict[str, int]:
        """Wider codes to layers in graph order while the budget allows, the rest narrower."""
        order = [n for n in (self.order or names) if n in costs]
        spent = sum(c[0] for c in costs.values())
        choice = dict.fromkeys(names, 0)
        for n in order:
            extra = costs[n][1] - costs[n][0]
            if spent + extra <= self.bits * total:
                choice[n], spent = 1, spent + extra
        return choice

    def _quantize(self, weight: WeightInfo, cand: Candidate) -> tuple[QuantizedTensor, float]:
        """GPTQ codes for one weight and its layer error tr(ΔW H ΔWᵀ) (per calibration row of X)."""
        lay = weight.layout
        w2 = canonical_mu(weight)
        scale, zero = uniform.minmax_params(w2, cand.bits, cand.group_size, symmetric=False,
                                            scale_dtype=cand.scale_torch_dtype)
        grid = UniformGrid(scale, zero, cand.bits, cand.group_size, False)
        post = self.posteriors.get(weight.name)
        # GPTQ's H as published: the measured second moment, without the posterior's diagonal prior
        hessian = None if post is None or post.A is None else \
            unshrink_from_diagonal(post.A, post.info.get("input_shrinkage", 0.0))
        if hessian is None:  # no activations reach it (Gather table, grouped conv): nearest rounding
            codes, values = grid.quantize(w2, slice(0, lay.rows), slice(0, lay.cols))
            error, how = float(((values - w2) ** 2).sum()), "nearest (no H for this tensor)"
        else:
            codes, values = gptq_round(w2, hessian, grid, block=self.block, damp=self.damp, act_order=self.act_order)
            delta = (values - w2).double()
            error, how = float(((delta @ hessian.double()) * delta).sum()), "gptq"
        if not math.isfinite(error):
            raise UserError(f"GPTQ produced a non-finite error on {weight.name}; check the calibration data")
        qt = QuantizedTensor(weight.name, lay, cand, codes=codes.numpy(), scale=scale.numpy(), zero=zero.numpy(),
                             info={"gptq_error": error, "rounding": how})
        return qt, error
