"""What the analysis knows about one quantizable weight: :class:`WeightInfo` (its values, layout and
consumers in the ONNX graph) and :class:`WeightPosterior` (its posterior in the canonical layout). Plain
data shared by the passes, the planners, the design and distillation; no ONNX import."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .quant.layout import WeightLayout
from .weight_inputs import LINEAR_OPS


@dataclass
class WeightInfo:
    """A quantizable initializer: its values (original layout), layout and consumer op types.

    ``matmul_nbits``: every op reading it can become ONNX Runtime's ``MatMulNBits`` (a MatMul reading it as
    B, or a Gemm ``A·W(ᵀ) + bias`` with ``alpha`` 1 and a bias of one value per output or none), so it can
    stay packed in memory (only when it reads the initializer itself: a weight read through a chain of
    layout ops is decoded as a whole, and the chain runs on the decoded tensor).

    ``consumers``: the op type of each reader: the op reading it, or for a read through layout ops
    (``chained``), the linear op at the chain's end.
    """

    name: str
    layout: WeightLayout
    array: np.ndarray
    consumers: tuple[str, ...]
    first_use: int = 0  # index of its first consumer in graph order (first/last layer pins)
    matmul_nbits: bool = False
    chained: bool = False  # some reader reaches it through layout-only ops (Slice, Concat, Transpose, ...)

    @property
    def size(self) -> int:
        return int(self.array.size)

    @property
    def in_linear_scope(self) -> bool:
        """Whether scope ``linear`` quantizes it: a linear op reads it (not only Gather, as a table)."""
        return any(op in LINEAR_OPS for op in self.consumers)


def graph_order(weights: dict[str, WeightInfo]) -> list[str]:
    """The weights' names in the order the graph first uses them (ties by name)."""
    return sorted(weights, key=lambda n: (weights[n].first_use, n))


def canonical_mu(weight: WeightInfo) -> torch.Tensor:
    """The weight's values as float32 ``[rows, cols]`` in the canonical layout (the posterior mean μ; a view
    of a fresh copy where the layout allows)."""
    return weight.layout.to_canonical(torch.from_numpy(np.array(weight.array, dtype=np.float32)))


@dataclass
class WeightPosterior:
    """Posterior of one quantizable initializer, canonical layout (rows = output channels).

    ``precision`` is diag Λ = N·F + τ; with K-FAC, ``A`` (input factor, canonical column order) and
    ``G_diag`` (output factor's diagonal) describe Λ ≈ N·(G ⊗ A) + τ; with low rank, Λ = ``D`` + ``U``Uᵀ
    where ``U`` already carries √N.
    """

    name: str
    parameter: str | None
    precision: torch.Tensor
    prior_precision: float
    n_data: float
    A: torch.Tensor | None = None
    G_diag: torch.Tensor | None = None
    U: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    @property
    def fisher_mass(self) -> float:
        """Σ N·F_ii: how much the calibration data pins this tensor down."""
        return float((self.precision - self.prior_precision).clamp_min(0).sum())

    def rescaled(self, c: float) -> "WeightPosterior":
        """The posterior with every precision times ``c`` (a change of loss units: Λ → cΛ)."""
        info = {**self.info, "scale_to_laplace": c}
        info["posterior"] = f"{self.info.get('posterior', 'layer-wise')}, × {c:.3g} onto the Laplace scale"
        return WeightPosterior(self.name, self.parameter, self.precision * c, self.prior_precision * c, self.n_data,
                               A=self.A, G_diag=None if self.G_diag is None else self.G_diag * c,
                               U=None if self.U is None else self.U * c ** 0.5, info=info)

    def lowrank_diagonal(self) -> torch.Tensor:
        """``D`` of the low-rank form Λ = D + UUᵀ: diag Λ − rowsum(U²), clamped at τ (round-off in the
        subtraction must not leave a precision below the prior's)."""
        return (self.precision - (self.U * self.U).sum(1).reshape(self.precision.shape)).clamp_min(self.prior_precision)

    def design_weights(self) -> torch.Tensor:
        """Per-weight λ_i for the quantizer design: diag Λ (Kronecker diagonal with K-FAC)."""
        if self.A is not None and self.G_diag is not None:
            return self.n_data * self.G_diag[:, None] * torch.diag(self.A)[None, :] + self.prior_precision
        return self.precision
