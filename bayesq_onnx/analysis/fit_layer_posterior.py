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

from ..bayes.empirical_bayes import shrink_to_diagonal
from ..bayes.empirical_bayes import evidence_prior_precision
from ..bayes.layerwise import (InputMoments, conv_patches_nd, conv_transpose_patches, layerwise_posterior,
                               token_frequency_posterior)
from ..models.base import Batch
from ..runtime.activations import (FETCH_BYTES, Tap, conv_geometry, matmul_rows, probe_model, run_in_item_chunks,
                                   splittable_inputs, weight_taps)
from ..runtime.session import CPU, make_session
from ..passes.collect_weights import einsum_split
from ..quant.layout import WeightLayout
from ..weight_inputs import LAYOUT_OPS, WEIGHT_INPUT
from ..weights import WeightInfo, WeightPosterior, canonical_mu


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
        model = _named_recurrent_outputs(self.model)
        taps = weight_taps(model.graph, weights)
        extra = other_readers(model.graph, weights, taps)
        # taps measured in another layout than the weight's own (a tied weight's other reader), ConvTranspose
        # and convolutions of 3+ spatial axes are measured as readers instead
        for name, ts in taps.items():
            keep = [t for t in ts if t.op_type == "Gather" or tap_layout(t, weights[name]) == weights[name].layout]
            extra.setdefault(name, []).extend(_reader_from_tap(model.graph, t, weights[name]) for t in ts if t not in keep)
            taps[name] = keep
        extra = {n: rs for n, rs in extra.items() if rs}
        chained = {r.value for rs in extra.values() for r in rs if r.value not in weights}
        index_maps = _index_maps(model, weights, chained, self.calibration[0]) if chained else {}
        for name, rs in extra.items():
            for r in rs:
                shape = weights[name].layout.shape if r.value == name else tuple(index_maps[r.value][2].shape)
                r.layout = reader_layout(r, tuple(int(d) for d in shape))
        inputs = {i.name for i in model.graph.input}
        fetch = sorted(({t.activation for ts in taps.values() for t in ts}
                        | {a for rs in extra.values() for r in rs if r.layout is not None for a in r.activations if a})
                       - inputs)
        session, _ = make_session(probe_model(model, fetch), [CPU])
        feeds = {i.name for i in session.get_inputs()}
        moments: dict[tuple[str, int], InputMoments] = {}
        counts: dict[tuple[str, int], torch.Tensor] = {}
        self._extra, self._reader_moments = extra, {}
        run_in_item_chunks(self.progress(self.calibration) if self.progress else self.calibration,
                           lambda chunk: self._run(session, fetch, feeds, inputs, chunk, taps, weights, moments, counts),
                           splittable=splittable_inputs(session), fetch_bytes=self.fetch_bytes)

        out = {}
        for name, w in weights.items():
            mu = canonical_mu(w).contiguous()  # row-major: its reductions sum in one order whatever the layout
            measured = [moments[name, i] for i, _ in enumerate(taps.get(name, ())) if (name, i) in moments]
            fitted = [layerwise_posterior(mu, m, self.n_data, self.prior_precision) for m in measured]
            if not fitted and name in extra:
                post = self._from_readers(name, w, mu, extra[name], self._reader_moments, index_maps)
                if post is not None:
                    out[name] = post
                    continue
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
            rows = int(measured[0].count) if measured else None
            kfac = self.curvature == "kfac" and post.A is not None
            a, shrinkage = shrink_to_diagonal(post.A, rows) if kfac else (None, None)
            out[name] = WeightPosterior(
                name, None, post.precision, post.prior_precision, self.n_data, A=a,
                G_diag=post.G_diag if kfac else None,
                info={"posterior": "layer-wise Gaussian likelihood (ORT activations)",
                      "output_noise_var": post.output_noise_var, "consumers": len(taps.get(name, ())),
                      "calibration_rows": rows,
                      **({} if shrinkage is None else {"input_shrinkage": shrinkage})})
        return out

    def _from_readers(self, name: str, w: WeightInfo, mu: torch.Tensor, readers: list["Reader"],
                      reader_moments: dict, index_maps: dict) -> WeightPosterior | None:
        """The posterior of a weight measured only by :func:`other_readers` (a ConvTranspose or 3-D Conv, an
        Einsum operand, ``W @ x``, a recurrent op, or any of these through layout ops).

        One direct reader whose columns are the weight's own: the full layer-wise posterior (K-FAC ``A``
        kept). Otherwise each reader's layer-wise data precision ``N·diag(A)/σ²`` on the tensor it reads (in
        that tensor's own layout, ``σ²`` that reader's output variance) is carried back to the weight's
        elements through the layout chain (:func:`_index_maps`); an element several readers read adds their
        precisions. A recurrent op's ``W`` rows are its inputs ``x_t``, its ``R`` rows the previous hidden
        states (the Y output shifted by one step, the initial state first), all directions pooled into one
        ``A``; a GRU with ``linear_before_reset`` 0 multiplies ``R_h`` by ``r ⊙ h``, taken as ``h``.
        """
        data = torch.zeros(w.layout.shape, dtype=torch.float64)
        used, noise = [], []
        for i, r in enumerate(readers):
            m = reader_moments.get((name, i))
            if m is None or r.layout is None:
                continue
            direct = r.value == name
            v = w.array if direct else index_maps[r.value][2]
            v_mu = r.layout.to_canonical(torch.from_numpy(np.array(v, dtype=np.float32))).contiguous()
            if r.op_type == "ConvTranspose" and r.groups > 1 and not m.diagonal_only:
                # a canonical row holds one output channel of every group: each reads its own group's inputs
                chan = torch.arange(m.cols) % r.layout.in_channels // (r.layout.in_channels // r.groups)
                m._outer *= (chan[:, None] == chan[None, :]).double()
            post = layerwise_posterior(v_mu, m, self.n_data, self.prior_precision)
            if direct and r.layout == w.layout and len(readers) == 1:
                kfac = self.curvature == "kfac" and post.A is not None
                a, shrinkage = shrink_to_diagonal(post.A, int(m.count)) if kfac else (None, None)
                return WeightPosterior(name, None, post.precision, post.prior_precision, self.n_data, A=a,
                                       G_diag=post.G_diag if kfac else None,
                                       info={"posterior": f"layer-wise Gaussian likelihood (ORT activations of {r.op_type})",
                                             "output_noise_var": post.output_noise_var, "consumers": 1,
                                             "calibration_rows": int(m.count),
                                             **({} if shrinkage is None else {"input_shrinkage": shrinkage})})
            v_data = r.layout.from_canonical((post.precision - post.prior_precision).double()).reshape(-1)
            if direct:
                data += v_data.reshape(data.shape)
            else:
                owner, local, _ = index_maps[r.value]
                mine = torch.from_numpy((owner == name).reshape(-1))
                data.view(-1).index_add_(0, torch.from_numpy(local.reshape(-1).astype(np.int64))[mine], v_data[mine])
            used.append(r.op_type + ("" if direct else " through layout ops"))
            noise.append(post.output_noise_var)
        if not used:
            return None
        data_c = w.layout.to_canonical(data).float().contiguous()
        tau = float(self.prior_precision) if self.prior_precision is not None else \
            evidence_prior_precision(mu.double(), data_c.double())
        return WeightPosterior(name, None, data_c + tau, tau, self.n_data,
                               info={"posterior": f"layer-wise Gaussian likelihood, diagonal (ORT activations of "
                                                  f"{', '.join(sorted(set(used)))})",
                                     "output_noise_var": float(np.mean(noise)), "consumers": len(used)})

    def _run(self, session, fetch: list[str], feeds: set[str], inputs: set[str], batch: Batch,
             taps: dict[str, list[Tap]], weights: dict[str, WeightInfo], moments: dict[tuple[str, int], InputMoments],
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
                    rows_x = matmul_rows(x, tap)
                    if key not in moments:
                        moments[key] = InputMoments(rows_x.shape[-1])
                    moments[key].update(rows_x)
                    continue
                kernel, conv = conv_geometry(x, tap, weights[name])
                groups = conv.pop("groups")
                if key not in moments:
                    moments[key] = InputMoments(math.prod(kernel) * (x.shape[1] // groups), groups=groups)
                moments[key].update_conv(x, kernel, **conv)
        for name, readers in self._extra.items():
            for i, r in enumerate(readers):
                if r.layout is None:
                    continue
                acts = [torch.from_numpy(np.ascontiguousarray(values[a])).float() if a else None for a in r.activations]
                found = reader_rows(r, acts)
                if found is None:
                    continue
                rows, groups = found
                r.groups = int(r.attributes.get("group", 1)) if r.op_type == "ConvTranspose" else groups
                key = (name, i)
                if key not in self._reader_moments:
                    self._reader_moments[key] = InputMoments(rows.shape[-1], groups=groups)
                self._reader_moments[key].update(rows)
        return size


RECURRENT = ("GRU", "LSTM", "RNN")


@dataclass
class Reader:
    """A weight read other than as :func:`weight_taps` measures it: the node, the input it reads
    (``value``: the weight itself, or what a chain of layout ops made of it), the activations that multiply it
    and, once ``value``'s shape is known, the layout of ``value`` as this node multiplies it."""

    op_type: str
    index: int
    value: str
    activations: tuple[str, ...]
    attributes: dict
    layout: WeightLayout | None = None
    groups: int = 1


def tap_layout(tap: Tap, w: WeightInfo) -> WeightLayout | None:
    """The layout in which a :func:`weight_taps` tap's moments are measured; ``None`` for one that
    :meth:`FitLayerPosterior._run` does not measure (a ConvTranspose, a convolution of 3 or more spatial axes)."""
    if tap.op_type == "Conv" and len(w.layout.shape) in (3, 4):
        return w.layout if w.layout == WeightLayout.for_consumer("Conv", w.layout.shape) else None
    if tap.op_type in ("MatMul", "Gemm"):
        trans_b = tap.op_type == "Gemm" and bool(tap.attributes.get("transB", 0))
        return WeightLayout.for_consumer(tap.op_type, w.layout.shape, trans_b=trans_b)
    return None


def _reader_from_tap(graph: onnx.GraphProto, tap: Tap, w: WeightInfo) -> Reader:
    node = graph.node[tap.node]
    return Reader(node.op_type, WEIGHT_INPUT[node.op_type], w.name, (node.input[0],), tap.attributes)


def other_readers(graph: onnx.GraphProto, weights: dict[str, WeightInfo], taps) -> dict[str, list[Reader]]:
    """Each weight's readers that :func:`weight_taps` does not see: ``W @ x`` MatMuls, Einsum operands, and
    every reader at the end of a chain of layout ops (:data:`~bayesq_onnx.weight_inputs.LAYOUT_OPS`)."""
    uses: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name:
                uses.setdefault(name, []).append((node, i))
    out: dict[str, list[Reader]] = {}

    def visit(value: str, owner: str, depth: int) -> None:
        for node, i in uses.get(value, ()):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            op = node.op_type
            if value == owner and WEIGHT_INPUT.get(op) == i:
                continue  # a weight_taps tap
            if op in LAYOUT_OPS and LAYOUT_OPS[op] in (None, i) and depth < 16:
                for o in node.output:
                    visit(o, owner, depth + 1)
                continue
            if op == "MatMul" or op in ("Gemm", "Conv", "ConvTranspose"):
                acts = (node.input[1 - i],) if op == "MatMul" else (node.input[0],)
            elif op == "Einsum" and len(node.input) == 2:
                acts = (node.input[1 - i],)
            elif op in RECURRENT and i in (1, 2):
                initial_h = node.input[5] if len(node.input) > 5 else ""
                acts = (node.input[0],) if i == 1 else (node.output[0], initial_h)
            else:
                continue
            out.setdefault(owner, []).append(Reader(op, i, value, acts, attrs))

    for name in weights:
        visit(name, name, 0)
    return out


def reader_layout(r: Reader, shape: tuple[int, ...]) -> WeightLayout | None:
    """``r.value``'s layout (of ``shape``) as ``r``'s node multiplies it."""
    try:
        if r.op_type in RECURRENT:
            return WeightLayout.from_axes(shape, (0, 1), (2,)) if len(shape) == 3 else None
        if r.op_type == "MatMul" and r.index == 0:
            return WeightLayout(shape, (0, 1)) if len(shape) == 2 else None
        if r.op_type == "Einsum":
            split = einsum_split(_text(r.attributes.get("equation", "")), r.index, len(shape))
            return None if split is None else WeightLayout.from_axes(shape, *split)
        trans_b = r.op_type == "Gemm" and bool(r.attributes.get("transB", 0))
        return WeightLayout.for_consumer(r.op_type, shape, trans_b=trans_b)
    except ValueError:
        return None


def reader_rows(r: Reader, acts: list, shape: tuple[int, ...] | None = None):
    """``(rows, groups)``: the activations of one run as input rows ``[tokens, groups, cols]`` in the canonical
    column order of ``r.layout`` (``None`` when there is nothing to measure)."""
    lay = r.layout
    x = acts[0]
    if x is None or lay is None:
        return None
    op, a = r.op_type, r.attributes
    if op == "MatMul":
        rows = x.reshape(-1, x.shape[-1]) if r.index == 1 else x.transpose(-1, -2).reshape(-1, x.shape[-2])
    elif op == "Gemm":
        x2 = x.reshape(x.shape[0], -1)
        rows = x2.T if a.get("transA", 0) else x2
    elif op in ("Conv", "ConvTranspose"):
        kernel = tuple(int(k) for k in a.get("kernel_shape", lay.shape[2:]))
        nd, groups = len(kernel), int(a.get("group", 1))
        strides = tuple(a.get("strides", (1,) * nd))
        dilations = tuple(a.get("dilations", (1,) * nd))
        pads = _pads(x, a, kernel, strides, dilations, op == "ConvTranspose")
        if op == "Conv":
            return conv_patches_nd(x, kernel, strides=strides, pads=pads, dilations=dilations, groups=groups), groups
        rows = conv_transpose_patches(x, kernel, strides=strides, pads=pads, dilations=dilations,
                                      output_padding=tuple(a.get("output_padding", (0,) * nd)))
    elif op == "Einsum":
        eq = _text(a.get("equation", "")).replace(" ", "")
        terms = eq.partition("->")[0].split(",")
        mine, other = terms[r.index], terms[1 - r.index]
        cols = [mine[lay.perm.index(j)] for j in range(lay.row_dims, len(lay.perm))]  # canonical column letters
        tokens = [c for c in other if c not in cols]
        order = [other.index(c) for c in tokens + cols]
        rows = x.permute(*order).reshape(-1, lay.cols)
    elif op in RECURRENT:
        layout = int(a.get("layout", 0))
        if r.index == 1:
            rows = x.reshape(-1, x.shape[-1])
        else:  # R multiplies the previous hidden state: [initial_h, Y[:-1]] forward, [Y[1:], initial_h] reverse
            y = x if layout == 0 else x.permute(1, 2, 0, 3)                       # [T, D, B, H]
            h0 = acts[1] if len(acts) > 1 and acts[1] is not None else torch.zeros_like(y[0])
            h0 = h0 if layout == 0 else h0.transpose(0, 1)                          # [D, B, H]
            direction = _text(a.get("direction", "forward"))
            parts = []
            for d in range(y.shape[1]):
                reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
                prev = torch.cat([y[1:, d], h0[d:d + 1]]) if reverse else torch.cat([h0[d:d + 1], y[:-1, d]])
                parts.append(prev.reshape(-1, prev.shape[-1]))
            rows = torch.cat(parts)
    else:
        return None
    return rows[:, None, :], 1


def _pads(x, a: dict, kernel, strides, dilations, transposed: bool) -> tuple[int, ...]:
    """ONNX pads (begins, then ends) of a Conv/ConvTranspose, ``auto_pad`` resolved on ``x``'s shape."""
    nd = len(kernel)
    auto_pad = _text(a.get("auto_pad", "NOTSET"))
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        return tuple(a.get("pads", (0,) * (2 * nd)))
    begins, ends = [], []
    for i, (size, k, s, d) in enumerate(zip(x.shape[2:], kernel, strides, dilations)):
        if transposed:
            out = a["output_shape"][i] if "output_shape" in a else size * s
            total = max(s * (size - 1) + tuple(a.get("output_padding", (0,) * nd))[i] + (k - 1) * d + 1 - out, 0)
        else:
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else big)
        ends.append(big if auto_pad == "SAME_UPPER" else small)
    return tuple(begins + ends)


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _named_recurrent_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy whose GRU/LSTM/RNN nodes all name their ``Y`` output (the hidden states their
    ``R`` input multiplies), so a probe can fetch it."""
    if not any(n.op_type in RECURRENT and (not n.output or not n.output[0]) for n in model.graph.node):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for i, n in enumerate(copy.graph.node):
        if n.op_type in RECURRENT and (not n.output or not n.output[0]):
            if not n.output:
                n.output.append("")
            n.output[0] = f"bayesq_hidden_states_{i}"
    return copy


CODE_BASE = 4096


def _index_maps(model: onnx.ModelProto, weights: dict[str, WeightInfo], values: set[str], batch: Batch) -> dict:
    """For each tensor in ``values`` (what layout ops made of weights): ``(owner, index, value)`` arrays of its
    shape: the weight each element comes from (``""``: none), its flat index in that weight, and its value.

    Found by running the layout ops on codes: every weight is replaced by ``offset + arange(size)``, its own
    range of integers, sent in two runs as ``code // 4096`` and ``code % 4096`` so that float32 holds every
    code exactly; one more run with the true weights gives the values. One calibration item feeds the runs
    (a Reshape's shape may be computed from the input)."""
    names = sorted(weights)
    offsets = np.cumsum([0] + [weights[n].size for n in names])
    fetch = sorted(values)
    one = {k: v[:1] if getattr(v, "ndim", 0) else v for k, v in batch.items()}
    runs = []
    for part in ("hi", "lo", None):
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        if part is not None:
            for t in probe.graph.initializer:
                if t.name in weights:
                    k = names.index(t.name)
                    code = offsets[k] + np.arange(weights[t.name].size, dtype=np.int64)
                    code = code // CODE_BASE if part == "hi" else code % CODE_BASE
                    t.CopyFrom(onnx.numpy_helper.from_array(code.astype(np.float32).reshape(weights[t.name].array.shape), t.name))
        session, _ = make_session(probe_model(probe, fetch), [CPU])
        feeds = {i.name for i in session.get_inputs()}
        runs.append(session.run(fetch, {k: v for k, v in one.items() if k in feeds}))
    out = {}
    for name, hi, lo, val in zip(fetch, *runs):
        code = hi.astype(np.int64) * CODE_BASE + lo.astype(np.int64)
        valid = (hi == np.round(hi)) & (lo == np.round(lo)) & (lo >= 0) & (lo < CODE_BASE) & (code >= 0) & (code < offsets[-1])
        k = np.clip(np.searchsorted(offsets, code, side="right") - 1, 0, len(names) - 1)
        owner = np.where(valid, np.array(names, dtype=object)[k], "")
        out[name] = (owner, np.where(valid, code - offsets[k], 0), val)
    return out
