"""FitPosteriorPass: the Laplace posterior of every weight in scope, in the canonical ``[rows, cols]``
layout of its ONNX initializer (analysis in PyTorch; see :mod:`bayesq_onnx.bayes.laplace`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..bayes.laplace import fit_laplace
from ..errors import UserError
from ..export import ParameterBinding
from ..models.base import ModelBundle
from ..quant.layout import WeightLayout
from .collect_weights import WeightInfo


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

    def design_weights(self) -> torch.Tensor:
        """Per-weight λ_i for the quantizer design: diag Λ (Kronecker diagonal with K-FAC)."""
        if self.A is not None and self.G_diag is not None:
            return self.n_data * self.G_diag[:, None] * torch.diag(self.A)[None, :] + self.prior_precision
        return self.precision


class FitPosteriorPass:
    """Fit the posterior of each weight's torch parameter and re-express it per ONNX initializer."""

    def __init__(self, bundle: ModelBundle, bindings: dict[str, ParameterBinding], *, curvature: str = "diag",
                 fisher: str = "true", samples: int = 1, rank: int = 8, n_data: float | None = None,
                 prior_precision: float | None = None, seed: int = 0, progress=None):
        self.bundle, self.bindings = bundle, bindings
        self.options = dict(curvature=curvature, fisher=fisher, samples=samples, rank=rank, n_data=n_data,
                            prior_precision=prior_precision, seed=seed)
        self.progress = progress

    def __call__(self, weights: dict[str, WeightInfo]) -> dict[str, WeightPosterior]:
        b = self.bundle
        if self.options["fisher"] == "empirical" and b.calibration_targets is None:
            raise UserError(f"--fisher empirical needs labels; model {b.name!r} has none: use --fisher true")
        params = {name: self.bindings[name].parameter for name in weights if name in self.bindings}
        batches = [{k: torch.from_numpy(v) for k, v in batch.items()} for batch in b.calibration]
        targets = [torch.from_numpy(t) for t in b.calibration_targets] if b.calibration_targets else None
        layers = fit_laplace(b.module, batches, sorted(set(params.values())), input_names=b.input_names,
                             likelihood=b.likelihood, targets=targets, progress=self.progress, **self.options)
        out = {}
        for name, w in weights.items():
            pname = params.get(name)
            if pname is None:  # no torch parameter behind it: plain (unweighted) distortion
                out[name] = WeightPosterior(name, None, torch.ones(w.layout.rows, w.layout.cols), 1.0, 0.0,
                                            info={"posterior": "none (no PyTorch parameter bound)"})
                continue
            out[name] = _canonical(name, layers[pname], self.bindings[name], w.layout)
        return out


def _canonical(name: str, post, binding: ParameterBinding, layout: WeightLayout) -> WeightPosterior:
    def canon(t: torch.Tensor) -> torch.Tensor:
        t = t.T if binding.transposed else t
        return layout.to_canonical(t.float())

    param_shape = post.fisher_diag.shape
    wp = WeightPosterior(name, post.parameter, canon(post.precision_diag()), post.prior_precision, post.n_data,
                         info=dict(post.info))
    if post.A is not None:
        order = _column_order(param_shape, binding, layout)
        wp.A = post.A[order][:, order]
        wp.G_diag = torch.diag(post.G).float()
    if post.U is not None:
        k = post.U.shape[1]
        cols = [canon(post.U[:, i].reshape(param_shape)).reshape(-1) * np.sqrt(post.n_data) for i in range(k)]
        wp.U = torch.stack(cols, dim=1)
    return wp


def _column_order(param_shape, binding: ParameterBinding, layout: WeightLayout) -> torch.Tensor:
    """Indices into the K-FAC input factor (PyTorch's flattening of one output row: in, k1, k2, …) for each
    canonical column (k1, k2, …, in)."""
    per_row = torch.arange(int(np.prod(param_shape[1:]))).reshape(1, *param_shape[1:])
    one_row = per_row.T if binding.transposed else per_row
    shape = (1,) + tuple(layout.shape[1:]) if not binding.transposed else tuple(layout.shape[:-1]) + (1,)
    return WeightLayout(shape, layout.perm).to_canonical(one_row.reshape(shape))[0]
