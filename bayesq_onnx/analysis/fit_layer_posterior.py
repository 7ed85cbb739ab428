"""FitLayerPosterior: the posterior of every weight in scope from its input activations, collected by
running the ONNX model itself in ONNX Runtime — for inputs with no PyTorch model (``onnx:<file>``).

Each consumer's activation (MatMul/Gemm input A, Conv input X, Gather indices) is exposed as an extra graph
output of a throw-away copy of the model; ORT runs over the calibration batches feed the moment accumulators
of :mod:`bayesq_onnx.bayes.layerwise` (layer-wise Gaussian likelihood, ``Λ = N·(G ⊗ A) + τ``). Every exposed
activation of a run is alive at once (in ORT and as the returned arrays), so a batch whose inputs are batched
along a dynamic axis 0 runs in item chunks of about :data:`FETCH_BYTES` of activations, and the moments take
each run's activations a bounded float64 chunk at a time: the peak memory does not grow with the batch size
or the number of layers tapped, and the moments are the same sums (up to float64 summation order). The result has
the same form as :class:`~bayesq_onnx.analysis.fit_posterior.FitLaplacePosterior`'s, so the planners do not
care where it came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import torch

from ..bayes.layerwise import InputMoments, layerwise_posterior, token_frequency_posterior
from ..errors import UserError
from ..models.base import Batch
from ..runtime.session import CPU, make_session
from ..weight_inputs import EMBEDDING_WEIGHT_INPUT, WEIGHT_INPUT
from ..weights import WeightInfo, WeightPosterior, canonical_mu


FETCH_BYTES = 64 << 20
"""About how many bytes of activations one ORT run fetches: a calibration batch runs in item chunks sized to
this (the first chunk is one item, which measures it), since every exposed activation of a run is alive at once."""


@dataclass(frozen=True)
class _Tap:
    """Where a weight's input comes from: the activation's name and how the consumer reads it."""

    activation: str
    op_type: str
    attributes: dict


class FitLayerPosterior:
    """Fit ``Λ = N·(G ⊗ A) + τ`` per weight from ORT activations on the calibration batches."""

    def __init__(self, model: onnx.ModelProto, calibration: list[Batch], *, curvature: str = "kfac",
                 n_data: float | None = None, prior_precision: float | None = None, progress: Callable | None = None,
                 fetch_bytes: int = FETCH_BYTES):
        if curvature == "lowrank":
            raise ValueError("the layer-wise likelihood has no per-item gradients for a low-rank posterior")
        self.model, self.calibration, self.curvature = model, calibration, curvature
        self.n_data = float(n_data) if n_data is not None else float(sum(len(next(iter(b.values()))) for b in calibration))
        self.prior_precision, self.progress, self.fetch_bytes = prior_precision, progress, fetch_bytes

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
        splittable = all(not isinstance(i.shape[0], int) for i in session.get_inputs() if i.shape)

        moments: dict[tuple[str, int], InputMoments] = {}
        counts: dict[tuple[str, int], torch.Tensor] = {}
        per_item: dict[tuple, int] = {}  # activation bytes per item, by the items' input shapes
        batches = self.progress(self.calibration) if self.progress else self.calibration
        for batch in batches:
            items = _items(batch) if splittable else None
            if items is None:
                self._run(session, fetch, feeds, inputs, batch, taps, weights, moments, counts)
                continue
            shapes = tuple(sorted((k, v.shape[1:]) for k, v in batch.items()))
            start = 0
            while start < items:  # the first chunk of a new shape is one item: it measures the bytes per item
                step = max(1, self.fetch_bytes // per_item[shapes]) if shapes in per_item else 1
                chunk = {k: v[start:start + step] for k, v in batch.items()}
                size = self._run(session, fetch, feeds, inputs, chunk, taps, weights, moments, counts)
                per_item[shapes] = max(per_item.get(shapes, 0), -(-size // len(next(iter(chunk.values())))), 1)
                start += step

        out = {}
        for name, w in weights.items():
            mu = canonical_mu(w).contiguous()  # row-major: its reductions sum in one order whatever the layout
            fitted = [layerwise_posterior(mu, moments[name, i], self.n_data, self.prior_precision)
                      for i, t in enumerate(taps.get(name, ())) if (name, i) in moments]
            if not fitted:
                looked_up = [counts[name, i] for i, _ in enumerate(taps.get(name, ())) if (name, i) in counts]
                if not looked_up:
                    # no data reaches it: its posterior is the prior, N(μ, Var(w)·I)
                    tau = 1.0 / max(float(mu.double().var()), 1e-12)
                    out[name] = WeightPosterior(name, None, torch.full_like(mu, tau), tau, 0.0,
                                                info={"posterior": "prior only (no activations reach this weight)"})
                    continue
                fitted = [token_frequency_posterior(mu, sum(looked_up[1:], looked_up[0]), self.n_data,
                                                    self.prior_precision)]
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

    @staticmethod
    def _run(session, fetch: list[str], feeds: set[str], inputs: set[str], batch: Batch,
             taps: dict[str, list[_Tap]], weights: dict[str, WeightInfo], moments: dict[tuple[str, int], InputMoments],
             counts: dict[tuple[str, int], torch.Tensor]) -> int:
        """One ORT run on ``batch``, its activations added to every consumer's moments (Gather: index counts);
        returns the bytes it fetched. The fetched arrays are released on return."""
        values = dict(zip(fetch, session.run(fetch, {k: v for k, v in batch.items() if k in feeds})))
        size = sum(v.nbytes for v in values.values())
        values.update({k: v for k, v in batch.items() if k in inputs})
        for name, ts in taps.items():
            for i, tap in enumerate(ts):
                x = torch.from_numpy(np.ascontiguousarray(values[tap.activation]))
                key = (name, i)
                if tap.op_type == "Gather":
                    rows = weights[name].layout.shape[0]
                    c = torch.bincount((x.reshape(-1).long() % rows), minlength=rows)
                    counts[key] = counts[key] + c if key in counts else c
                    continue
                x = x.float()
                if tap.op_type in ("MatMul", "Gemm"):
                    rows_x = _matmul_rows(x, tap)
                    if key not in moments:
                        moments[key] = InputMoments(rows_x.shape[-1])
                    moments[key].update(rows_x)
                    continue
                kernel, conv = _conv_geometry(x, tap, weights[name])
                groups = conv.pop("groups")
                if key not in moments:
                    moments[key] = InputMoments(math.prod(kernel) * (x.shape[1] // groups), groups=groups)
                moments[key].update_conv(x, kernel, **conv)
        return size


def _taps(graph: onnx.GraphProto, weights: dict[str, WeightInfo]) -> dict[str, list[_Tap]]:
    """Each weight's consumers in the main graph, with the activation each one multiplies it by."""
    taps: dict[str, list[_Tap]] = {}
    for node in graph.node:
        index = WEIGHT_INPUT.get(node.op_type)
        if index is None or len(node.input) < 2 or node.input[index] not in weights:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in EMBEDDING_WEIGHT_INPUT and int(attrs.get("axis", 0)) != 0:
            continue  # the table's posterior counts row lookups; a Gather on another axis makes none
        taps.setdefault(node.input[index], []).append(_Tap(node.input[1 - index], node.op_type, attrs))
    return taps


def _items(batch: Batch) -> int | None:
    """The number of items of a batch whose arrays all share axis 0 (so it can run in item chunks), else None."""
    lengths = {len(v) if v.ndim else -1 for v in batch.values()}
    return lengths.pop() if len(lengths) == 1 and min(lengths, default=-1) > 0 else None


def _matmul_rows(x: torch.Tensor, tap: _Tap) -> torch.Tensor:
    """A MatMul/Gemm activation as rows in the weight's canonical column order."""
    if tap.op_type == "MatMul":
        return x.reshape(-1, x.shape[-1])
    x2 = x.reshape(x.shape[0], -1)
    return x2.T if tap.attributes.get("transA", 0) else x2


def _conv_geometry(x: torch.Tensor, tap: _Tap, w: WeightInfo) -> tuple[tuple[int, ...], dict]:
    """A Conv consumer's kernel and its strides/pads/dilations/groups, ``auto_pad`` resolved on ``x``'s shape."""
    kernel = tuple(int(k) for k in tap.attributes.get("kernel_shape", w.layout.shape[2:]))
    nd = len(kernel)
    if nd not in (1, 2) or x.dim() != nd + 2:
        raise UserError(f"weight {w.name}: conv patches for 1-D and 2-D convolutions only, got kernel {kernel} and "
                        f"input {tuple(x.shape)}; keep it in floating point with an `overrides` entry 'fp16'")
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
    return kernel, {"strides": strides, "pads": pads, "dilations": dilations, "groups": groups}
