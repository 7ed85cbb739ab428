"""FitLaplacePosterior: the Laplace posterior of every weight in scope, in the canonical ``[rows, cols]``
layout of its ONNX initializer (analysis in PyTorch on the traced program; see :mod:`bayesq_onnx.bayes.laplace`).

Each ONNX initializer is bound to the program ops whose weight it holds, by content: as is, transposed, or
times a per-output-channel constant (:func:`bind_weight`), so whatever the exporter folded or renamed, the
posterior follows the values."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..bayes.laplace import CalibrationData, LaplaceOptions, fit_laplace
from ..bayes.parameter_fisher import fit_parameter_fisher
from ..errors import UserError
from ..export import traced_program
from ..traced import weight_ops
from ..models.base import ModelBundle
from ..quant.layout import WeightLayout
from ..weights import WeightInfo, WeightPosterior


@dataclass(frozen=True)
class OpBinding:
    """How an ONNX initializer holds a program op's weight (frame ``[out, in]`` for linear ops): as is or
    transposed, times a per-output-channel constant ``scale`` (``None``: 1; BatchNorm the exporter folded,
    or any constant scaling)."""

    op: str
    transposed: bool
    scale: torch.Tensor | None = None


def bind_weight(array: np.ndarray, frame: torch.Tensor, op: str, rtol: float = 1e-5) -> OpBinding | None:
    """Whether ``array`` (an initializer) is ``s ⊙ frame`` or ``(s ⊙ frame)ᵀ`` for a per-output-channel
    constant ``s`` (rows of the frame); exact equality is the case ``s ≡ 1``.

    ``s_r = ⟨a_r, f_r⟩ / ⟨f_r, f_r⟩`` (least squares per row), accepted when ``max |a − s f| ≤ rtol · max |a|``
    (float32 round-off of the exporter's folding) and no ``s_r`` is zero.
    """
    a = torch.from_numpy(np.ascontiguousarray(array))
    for transposed in (False, True):
        if transposed and a.dim() != 2:
            break
        cand = a.T if transposed else a
        if tuple(cand.shape) != tuple(frame.shape):
            continue
        f2, a2 = frame.reshape(frame.shape[0], -1), cand.reshape(cand.shape[0], -1)
        # the test is per row: a few rows reject almost every wrong pairing before the whole tensor is read
        # (a model has dozens of same-shaped weights, each tried against every same-shaped op)
        few = slice(0, min(4, f2.shape[0]))
        if _row_scales(a2[few], f2[few], rtol, float(a2.abs().max())) is None:
            continue
        if torch.equal(cand, frame):
            return OpBinding(op, transposed)
        s = _row_scales(a2, f2, rtol, float(a2.abs().max()))
        if s is not None:
            return OpBinding(op, transposed, s.float())
    return None


def row_permutation(array: np.ndarray, param: torch.Tensor) -> torch.Tensor | None:
    """Indices ``p`` with ``array.reshape(-1, last)[i] == param.reshape(-1, last)[p[i]]`` for every row
    ``i`` (exact equality), when the initializer holds the parameter's rows in another order (the exporter
    folded torch's gate order into ONNX's); else ``None``."""
    last = array.shape[-1]
    if param.numel() != array.size or param.shape[-1] != last:
        return None
    a = np.ascontiguousarray(array.reshape(-1, last))
    b = param.reshape(-1, last).numpy()
    oa, ob = np.lexsort(a.T[::-1]), np.lexsort(b.T[::-1])
    if not np.array_equal(a[oa], b[ob]):
        return None
    perm = np.empty(len(oa), np.int64)
    perm[oa] = ob
    return torch.from_numpy(perm)


def _row_scales(a2: torch.Tensor, f2: torch.Tensor, rtol: float, amax: float) -> torch.Tensor | None:
    """Per-row least-squares ``s_r = ⟨a_r, f_r⟩ / ⟨f_r, f_r⟩`` when ``max |a − s f| ≤ rtol · amax`` and no
    ``s_r`` is zero; else ``None`` (float64 throughout)."""
    a2, f2 = a2.double(), f2.double()
    ff = (f2 * f2).sum(1)
    s = torch.where(ff > 0, (a2 * f2).sum(1) / ff.clamp_min(1e-300), torch.ones_like(ff))
    if bool((s == 0).any()) or float((a2 - s[:, None] * f2).abs().max()) > rtol * max(amax, 1e-30):
        return None
    return s


# ONNX consumer -> the program op kinds whose weight it can hold
_KINDS = {"MatMul": {"linear", "generic"}, "Gemm": {"linear"}, "Conv": {"conv", "generic"},
          "ConvTranspose": {"generic"}, "Einsum": {"generic"}, "Gather": {"embedding"}}


class FitLaplacePosterior:
    """Fit the Laplace posterior of every weight op of the traced program and re-express it per ONNX
    initializer. Afterwards ``unbound`` lists the initializers no op's weight was found in (they need the
    layer-wise posterior, :class:`~bayesq_onnx.analysis.fit_layer_posterior.FitLayerPosterior`)."""

    def __init__(self, bundle: ModelBundle, options: LaplaceOptions = LaplaceOptions(), *, progress=None):
        self.bundle, self.options, self.progress = bundle, options, progress
        self.unbound: list[str] = []

    def __call__(self, weights: dict[str, WeightInfo]) -> dict[str, WeightPosterior]:
        b = self.bundle
        if self.options.fisher == "empirical" and b.calibration_targets is None:
            raise UserError(f"`fisher` empirical needs labels; model {b.name!r} has none: use `fisher` true")
        program = traced_program(b)
        data = CalibrationData([{k: torch.from_numpy(v) for k, v in batch.items()} for batch in b.calibration],
                               b.input_names, b.likelihood,
                               [torch.from_numpy(t) for t in b.calibration_targets] if b.calibration_targets else None)
        sizes = {w.size for w in weights.values()}
        ops = [op for op in weight_ops(program) if op.numel is None or op.numel in sizes]  # only what can bind
        layers = fit_laplace(program, data, self.options, ops=ops, progress=self.progress)
        by_size: dict[int, list[str]] = {}
        for key, post in layers.items():
            by_size.setdefault(post.weight.numel(), []).append(key)
        out, self.unbound = {}, []
        for name, w in weights.items():
            # an initializer holds the weight of the program ops of its own consumers' kind: a table that a
            # Gather reads and a MatMul reads from another copy is the MatMul's weight only
            kinds = set().union(*(_KINDS.get(op, set()) for op in w.consumers))
            found = [bnd for key in by_size.get(w.size, ()) if layers[key].info["kind"] in kinds
                     and (bnd := bind_weight(w.array, layers[key].weight, key))]
            if not found:
                self.unbound.append(name)
                continue
            out[name] = _canonical(name, [(layers[bnd.op], bnd) for bnd in found], w.layout)
        if self.unbound:
            self._fit_parameters(program, data, weights, out)
        return out

    def _fit_parameters(self, program, data: CalibrationData, weights: dict[str, WeightInfo],
                        out: dict[str, WeightPosterior]) -> None:
        """The unbound weights that hold a parameter of the program (as is, transposed or per-channel scaled):
        their diagonal Laplace posterior by whole-program autograd (:func:`fit_parameter_fisher`); what is
        left stays in ``unbound``."""
        params = dict(program.named_parameters())
        bound: dict[str, OpBinding] = {}
        permuted: dict[str, torch.Tensor] = {}  # the exporter reordered the rows (a recurrent op's gates)
        for name in self.unbound:
            w = weights[name]
            for pname, p in params.items():
                if p.numel() != w.size or not p.is_floating_point() or pname in {b.op for b in bound.values()}:
                    continue
                if bnd := bind_weight(w.array, p.detach().float(), pname):
                    bound[name] = bnd
                    break
                if (rows := row_permutation(w.array, p.detach().float())) is not None:
                    bound[name] = OpBinding(pname, False)
                    permuted[name] = rows
                    break
        if not bound:
            return
        fitted = fit_parameter_fisher(program, sorted({b.op for b in bound.values()}), data, self.options,
                                      progress=(lambda b: self.progress(b, 1)) if self.progress else None)
        for name, bnd in bound.items():
            fit = fitted[bnd.op]
            if name in permuted:  # the parameter's rows in the initializer's order and shape
                shape, last = weights[name].layout.shape, weights[name].layout.shape[-1]
                fit = dataclasses.replace(fit, fisher_diag=fit.fisher_diag.reshape(-1, last)[permuted[name]].reshape(shape),
                                          weight=fit.weight.reshape(-1, last)[permuted[name]].reshape(shape))
            post = _canonical(name, [(fit, bnd)], weights[name].layout)
            post.info["posterior"] = (f"Laplace (diagonal {self.options.fisher} Fisher of parameter {bnd.op} by "
                                      "whole-model autograd, one backward per item: no traced op reads it alone"
                                      + (", transposed" if bnd.transposed else "")
                                      + (", rows reordered" if name in permuted else "")
                                      + (", × per-channel scale" if bnd.scale is not None else "") + ")")
            out[name] = post
        self.unbound = [n for n in self.unbound if n not in bound]


def _canonical(name: str, fits: list, layout: WeightLayout) -> WeightPosterior:
    """One initializer's posterior in canonical layout from the op posteriors it holds (several: a tied
    weight; their data precisions add, the cross terms between the uses are dropped), mapped through each
    binding: transposed as stored, and a per-channel scale ``s`` gives ``λ / s²`` (Λ of ``s·w`` is Λ_w / s²)."""
    post, binding = fits[0]

    def canon(t: torch.Tensor, bnd: OpBinding, power: int = 2) -> torch.Tensor:
        """A precision-like tensor (``power`` 2; a square-root factor such as a column of U: 1) of the
        op's frame in the initializer's canonical layout."""
        if bnd.scale is not None:
            t = t / (bnd.scale ** power).reshape((-1,) + (1,) * (t.dim() - 1))
        t = t.T if bnd.transposed else t
        return layout.to_canonical(t.float())

    data = sum(canon(p.n_data * p.fisher_diag, bnd) for p, bnd in fits)
    tau = canon(torch.full_like(post.fisher_diag, post.prior_precision), binding)
    info = dict(post.info)
    info["posterior"] = "Laplace (" + ", ".join(
        (f"{p.parameter} at op {p.op}" if p.parameter != p.op else f"computed weight of op {p.op}")
        + (", transposed" if bnd.transposed else "") + (", × per-channel scale" if bnd.scale is not None else "")
        for p, bnd in fits) + ")"
    # a scaled weight's prior precision is τ/s² per channel: report the mean as the scalar τ
    wp = WeightPosterior(name, post.parameter, data + tau, float(tau.mean()), post.n_data, info=info)
    if post.A is not None:
        order = _column_order(tuple(post.weight.shape), binding, layout)
        identity = bool((order == torch.arange(len(order))).all())
        wp.A = post.A if identity else post.A[order][:, order]  # shared, not copied, when the order is the same
        g = (post.G if post.G.dim() == 1 else torch.diag(post.G)).float()
        wp.G_diag = g / binding.scale ** 2 if binding.scale is not None else g
    if post.U is not None:
        shape = tuple(post.weight.shape)
        wp.U = torch.stack([canon(post.U[:, i].reshape(shape), binding, power=1).reshape(-1) * np.sqrt(post.n_data)
                            for i in range(post.U.shape[1])], dim=1)
    return wp


def _column_order(param_shape, binding: OpBinding, layout: WeightLayout) -> torch.Tensor:
    """Indices into the K-FAC input factor (PyTorch's flattening of one output row: in, k1, k2, …) for each
    canonical column (k1, k2, …, in)."""
    per_row = torch.arange(int(np.prod(param_shape[1:]))).reshape(1, *param_shape[1:])
    one_row = per_row.T if binding.transposed else per_row
    shape = (1,) + tuple(layout.shape[1:]) if not binding.transposed else tuple(layout.shape[:-1]) + (1,)
    return WeightLayout(shape, layout.perm, layout.row_dims).to_canonical(one_row.reshape(shape))[0]
