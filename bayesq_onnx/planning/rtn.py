"""PlanRoundToNearest: the round-to-nearest baseline planner (``method="rtn"``).

Every weight in scope gets the same candidate: a per-row (or per-group) asymmetric min-max grid at one
bit-width, codes by rounding to nearest. It stays as the baseline the Bayesian planners must beat.
"""

from __future__ import annotations

from ..errors import UserError
from ..plan import Candidate, Plan, QuantizedTensor
from ..quant import uniform
from ..weights import WeightInfo, canonical_mu


def fit_minmax(weight: WeightInfo, candidate: Candidate) -> QuantizedTensor:
    """Min-max grid + nearest rounding for one weight (vectorized over all rows and groups)."""
    lay = weight.layout
    if not candidate.fits(lay):
        raise UserError(f"group size {candidate.group_size} does not divide the {lay.in_channels} input "
                        f"channels of {weight.name}; pick a divisor or `group_size` 0 (per row)")
    w2 = canonical_mu(weight)
    scale, zero = uniform.minmax_params(w2, candidate.bits, candidate.group_size,
                                        symmetric=candidate.symmetric, scale_dtype=candidate.scale_torch_dtype)
    codes = uniform.quantize(w2, scale, zero, candidate.bits, candidate.group_size,
                             symmetric=candidate.symmetric)
    return QuantizedTensor(weight.name, lay, candidate, codes=codes.numpy(), scale=scale.numpy(),
                           zero=zero.numpy())


class PlanRoundToNearest:
    """Plan every weight with ``Candidate('uniform', bits, group_size)``; returns a :class:`Plan`."""

    def __init__(self, bits: int, group_size: int = 0, scale_dtype: str = "float16"):
        self.candidate = Candidate("uniform", bits, group_size, symmetric=False, scale_dtype=scale_dtype)

    def __call__(self, weights: dict[str, WeightInfo]) -> Plan:
        tensors = {name: fit_minmax(w, self.candidate) for name, w in sorted(weights.items())}
        return Plan("rtn", tensors, settings={"candidate": self.candidate.to_json()})
