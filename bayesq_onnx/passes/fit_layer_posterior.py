"""FitLayerPosteriorPass: the posterior of every weight in scope from its input activations, collected by
running the ONNX model itself in ONNX Runtime — for inputs with no PyTorch model (``onnx:<file>``).

Each consumer's activation (MatMul/Gemm input A, Conv input X, Gather indices) is exposed as an extra graph
output of a throw-away copy of the model; one ORT run per calibration batch feeds the moment accumulators of
:mod:`bayesq_onnx.bayes.layerwise` (layer-wise Gaussian likelihood, ``Λ = N·(G ⊗ A) + τ``). The result has
the same form as :class:`~bayesq_onnx.passes.fit_posterior.FitPosteriorPass`'s, so the planners do not
care where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import torch

from ..bayes.layerwise import InputMoments, conv_patches, layerwise_posterior, token_frequency_posterior
from ..errors import UserError
from ..models.base import Batch
from ..runtime.session import CPU, make_session
from .collect_weights import WeightInfo
from .fit_posterior import WeightPosterior


@dataclass(frozen=True)
class _Tap:
    """Where a weight's input comes from: the activation's name and how the consumer reads it."""

    activation: str
    op_type: str
    attributes: dict


class FitLayerPosteriorPass:
    """Fit ``Λ = N·(G ⊗ A) + τ`` per weight from ORT activations on the calibration batches."""

    def __init__(self, model: onnx.ModelProto, calibration: list[Batch], *, curvature: str = "kfac",
                 n_data: float | None = None, prior_precision: float | None = None, progress: Callable | None = None):
        if curvature == "lowrank":
            raise ValueError("the layer-wise likelihood has no per-item gradients for a low-rank posterior")
        self.model, self.calibration, self.curvature = model, calibration, curvature
        self.n_data = float(n_data) if n_data is not None else float(sum(len(next(iter(b.values()))) for b in calibration))
        self.prior_precision, self.progress = prior_precision, progress

    def __call__(self, weights: dict[str, WeightInfo]) -> dict[str, WeightPosterior]:
        taps = _taps(self.model.graph, weights)
        inputs = {i.name for i in self.model.graph.input}
        fetch = sorted({t.activation for ts in taps.values() for t in ts} - inputs)
        probe = onnx.ModelProto()
        probe.CopyFrom(self.model)
        known = {o.name for o in probe.graph.output}
        probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in fetch if n not in known)
        session, _ = make_session(probe.SerializeToString(), [CPU])
        feeds = {i.name for i in session.get_inputs()}

        moments: dict[tuple[str, int], InputMoments] = {}
        counts: dict[tuple[str, int], torch.Tensor] = {}
        batches = self.progress(self.calibration) if self.progress else self.calibration
        for batch in batches:
            values = dict(zip(fetch, session.run(fetch, {k: v for k, v in batch.items() if k in feeds})))
            values.update({k: v for k, v in batch.items() if k in inputs})
            for name, ts in taps.items():
                for i, tap in enumerate(ts):
                    x = torch.from_numpy(np.ascontiguousarray(values[tap.activation]))
                    if tap.op_type == "Gather":
                        rows = weights[name].layout.shape[0]
                        c = torch.bincount((x.reshape(-1).long() % rows), minlength=rows)
                        counts[name, i] = counts[name, i] + c if (name, i) in counts else c
                        continue
                    rows_x, groups = _input_rows(x.float(), tap, weights[name])
                    key = (name, i)
                    if key not in moments:
                        moments[key] = InputMoments(rows_x.shape[-1], groups=groups)
                    moments[key].update(rows_x)

        out = {}
        for name, w in weights.items():
            mu = torch.from_numpy(w.layout.to_canonical(w.array).copy()).float()
            fitted = [layerwise_posterior(mu, moments[name, i], self.n_data, self.prior_precision)
                      for i, t in enumerate(taps.get(name, ())) if (name, i) in moments]
            if not fitted:
                c = sum((counts[name, i] for i, _ in enumerate(taps.get(name, ())) if (name, i) in counts), None)
                if c is None:
                    # no data reaches it: its posterior is the prior, N(μ, Var(w)·I)
                    tau = 1.0 / max(float(mu.double().var()), 1e-12)
                    out[name] = WeightPosterior(name, None, torch.full_like(mu, tau), tau, 0.0,
                                                info={"posterior": "prior only (no activations reach this weight)"})
                    continue
                fitted = [token_frequency_posterior(mu, c, self.n_data, self.prior_precision)]
            # A tensor read by several consumers (tied) is scored by the first; its other readers see the same
            # decoded values, and summing Fishers of differently scaled layers would need a common noise.
            post = fitted[0]
            out[name] = WeightPosterior(
                name, None, post.precision, post.prior_precision, self.n_data,
                A=post.A if self.curvature == "kfac" else None,
                G_diag=post.G_diag if self.curvature == "kfac" and post.A is not None else None,
                info={"posterior": "layer-wise Gaussian likelihood (ORT activations)",
                      "output_noise_var": post.output_noise_var, "consumers": len(taps.get(name, ())),
                      "calibration_rows": int(moments[name, 0].count) if (name, 0) in moments else None})
        return out


def _taps(graph: onnx.GraphProto, weights: dict[str, WeightInfo]) -> dict[str, list[_Tap]]:
    """Each weight's consumers in the main graph, with the activation each one multiplies it by."""
    taps: dict[str, list[_Tap]] = {}
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in ("MatMul", "Gemm", "Conv") and len(node.input) > 1 and node.input[1] in weights:
            taps.setdefault(node.input[1], []).append(_Tap(node.input[0], node.op_type, attrs))
        elif node.op_type == "Gather" and node.input[0] in weights and int(attrs.get("axis", 0)) == 0:
            taps.setdefault(node.input[0], []).append(_Tap(node.input[1], "Gather", attrs))
    return taps


def _input_rows(x: torch.Tensor, tap: _Tap, w: WeightInfo) -> tuple[torch.Tensor, int]:
    """The activation as rows in the weight's canonical column order, and the number of channel groups."""
    if tap.op_type == "MatMul":
        return x.reshape(-1, x.shape[-1]), 1
    if tap.op_type == "Gemm":
        x2 = x.reshape(x.shape[0], -1)
        return (x2.T if tap.attributes.get("transA", 0) else x2), 1
    kernel = tuple(int(k) for k in tap.attributes.get("kernel_shape", w.layout.shape[2:]))
    nd = len(kernel)
    strides = tuple(tap.attributes.get("strides", (1,) * nd))
    dilations = tuple(tap.attributes.get("dilations", (1,) * nd))
    groups = int(tap.attributes.get("group", 1))
    auto_pad = tap.attributes.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pads_b.append(small if auto_pad == "SAME_UPPER" else big)
            pads_e.append(big if auto_pad == "SAME_UPPER" else small)
        pads = tuple(pads_b + pads_e)
    else:
        pads = tuple(tap.attributes.get("pads", (0,) * (2 * nd)))
    try:
        patches = conv_patches(x, kernel, strides=strides, pads=pads, dilations=dilations, groups=groups)
    except ValueError as exc:
        raise UserError(f"weight {w.name}: {exc}; keep it in floating point with an --overrides entry 'fp16'") from exc
    return (patches[:, 0] if groups == 1 else patches), groups
