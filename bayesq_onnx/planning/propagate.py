"""PropagateErrors: re-round a plan's codes in graph order, each layer in the metric of the inputs it really
gets from the partly quantized model (issue 14 lever 2; the math is :mod:`bayesq_onnx.quant.propagation`).

The planner rounds every layer on the FP32 model's activations, as if no other layer were quantized. Here the
layers are visited by *level*: a layer's level is one more than the highest level of the re-rounded layers
its input depends on, so every layer of a level sees inputs whose upstream layers are all final. For each
level, ONNX Runtime runs the calibration batches through the model with the final values of the layers below
it fed in place of their FP32 initializers (one session; the planned weights are overridable inputs), and
each layer of the level is rounded again:

* ``sequential``: GPTQ on ``W`` with ``H̃ = E[x̃ x̃ᵀ]`` of its inputs in the partly quantized model;
* ``fp-outputs``: GPTQ on ``W* = W + W K H̃⁻¹`` (``K = E[(x − x̃) x̃ᵀ]``, ``x`` from the FP32 model on the same
  items), so the layer reproduces the FP32 model's outputs from the inputs it gets (GPTAQ-style).

The candidates and their grids (scales, zero points, codebook levels) stay as planned, so the stored bits do
not move: only codes change. ``sequential`` keeps a layer's planned codes when they score at least as well in
its objective ``tr((W − Ŵ) H̃ (W − Ŵ)ᵀ)`` (GPTQ is greedy). ``fp-outputs`` chooses, per layer, among the planned
codes, the sequential target and the FP32-output target by the error on the FP32 model's outputs over
held-out calibration items (the odd-numbered ones; the targets are fitted on the even ones), since the
least-squares ``W*`` fits noise where the upstream error is small. Re-rounded: MatMul / Gemm weights and ungrouped 1-D / 2-D convolutions with a single
consumer; other planned weights (embedding tables, grouped and depthwise convolutions, tied weights) keep
their codes and are fed quantized from the first level on.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np
import onnx
import torch

from ..models.base import Batch
from ..plan import Plan, QuantizedTensor
from ..quant import feedback
from ..quant.design import CodebookGrid, UniformGrid
from ..quant.propagation import PairedMoments, dampened, fp_output_target
from ..runtime.activations import (FETCH_BYTES, Tap, conv_geometry, item_count, matmul_rows, probe_model,
                                   run_in_item_chunks, splittable_inputs, weight_taps)
from ..runtime.session import CPU, make_session
from ..weight_inputs import WEIGHT_INPUT
from ..weights import WeightInfo, WeightPosterior, canonical_mu
from .tensor_design import prior_damping, whitened_error

GPTQ_DAMPING = 0.01
"""Relative dampening of ``H̃`` for a weight whose posterior has no K-FAC factor to take it from."""


class PropagateErrors:
    """Re-round ``plan``'s codes level by level on ORT activations of the partly quantized model."""

    def __init__(self, model: onnx.ModelProto, calibration: list[Batch], *, mode: str = "fp-outputs",
                 posteriors: dict[str, WeightPosterior] | None = None, act_order: bool = False,
                 fetch_bytes: int = FETCH_BYTES, progress: Callable | None = None):
        if mode not in ("sequential", "fp-outputs"):
            raise ValueError(f"unknown propagation mode {mode!r}")
        self.model, self.calibration, self.mode = model, calibration, mode
        self.posteriors, self.act_order = posteriors or {}, act_order
        self.fetch_bytes, self.progress = fetch_bytes, progress

    def __call__(self, plan: Plan, weights: dict[str, WeightInfo]) -> Plan:
        start = time.perf_counter()
        graph = self.model.graph
        taps = weight_taps(graph, plan.tensors)
        eligible = {n for n, qt in plan.tensors.items() if _reroundable(qt, taps.get(n, []), weights[n])}
        levels = weight_levels(graph, eligible, set(plan.tensors))
        fetch = sorted({taps[n][0].activation for n in eligible} - {i.name for i in graph.input})
        session, _ = make_session(probe_model(self.model, fetch, overridable=plan.tensors), [CPU])
        feeds = {i.name for i in session.get_inputs()} | {i.name for i in session.get_overridable_initializers()}
        dtypes = {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in graph.initializer}

        tensors = dict(plan.tensors)
        # planned weights that keep their codes are quantized from the first level on
        fed = {n: _onnx_value(tensors[n], dtypes[n]) for n in tensors if n not in eligible}
        counts = {"rerounded": 0, "kept": 0}
        order = sorted(set(levels.values()))
        for level in self.progress(order, "propagate errors (levels)") if self.progress else order:
            names = sorted(n for n in eligible if levels[n] == level)
            moments = self._moments(session, feeds, names, taps, weights, fed)
            for name in names:
                tensors[name], changed = self._reround(tensors[name], weights[name], moments[name], level)
                counts["rerounded" if changed else "kept"] += 1
                fed[name] = _onnx_value(tensors[name], dtypes[name])
        stats = {"mode": self.mode, "levels": len(order), "rerounded": counts["rerounded"],
                 "kept_planned_codes": counts["kept"], "fixed": len(plan.tensors) - len(eligible),
                 "seconds": round(time.perf_counter() - start, 3)}
        return Plan(plan.method, tensors, {**plan.settings, "propagation": stats})

    def _moments(self, session, feeds: set[str], names: list[str], taps: dict[str, list[Tap]],
                 weights: dict[str, WeightInfo], fed: dict[str, np.ndarray]) -> dict[str, tuple[PairedMoments, PairedMoments]]:
        """Each of ``names``' paired input moments over the calibration batches: the FP32 model's inputs and
        those of the model with the ``fed`` weights quantized, on the same items; as two halves, the
        even-numbered calibration items and the odd ones (which ``fp-outputs`` holds out to choose a target;
        an activation whose axis 0 is not the items goes to the first half)."""
        cross = self.mode == "fp-outputs"
        moments = {n: (PairedMoments(weights[n].layout.cols, cross=cross), PairedMoments(weights[n].layout.cols, cross=cross))
                   for n in names}
        activations = sorted({taps[n][0].activation for n in names})
        outputs = {o.name for o in session.get_outputs()}
        fetch = [a for a in activations if a in outputs]  # the others are graph inputs, read from the batch
        overrides = {k: v for k, v in fed.items() if k in feeds}
        seen = 0  # calibration items before this chunk

        def run(chunk: Batch) -> int:
            nonlocal seen
            base = {k: v for k, v in chunk.items() if k in feeds}
            quantized = dict(zip(fetch, session.run(fetch, {**base, **overrides}))) if fetch else {}
            fp = dict(zip(fetch, session.run(fetch, base))) if cross and fetch else {}
            for values in (quantized, fp):
                values.update({k: v for k, v in chunk.items() if k in activations})  # graph inputs
            items = item_count(chunk)
            for n in names:
                tap = taps[n][0]
                xq = torch.from_numpy(np.ascontiguousarray(quantized[tap.activation])).float()
                xf = torch.from_numpy(np.ascontiguousarray(fp[tap.activation])).float() if cross else None
                by_item = items is not None and xq.dim() >= 2 and xq.shape[0] == items and not tap.attributes.get("transA", 0)
                parity = (torch.arange(xq.shape[0]) + seen) % 2 if by_item else torch.zeros(xq.shape[0], dtype=torch.long)
                for half, m in enumerate(moments[n]):
                    pick = parity == half
                    if not bool(pick.any()):
                        continue
                    q, f = xq[pick], None if xf is None else xf[pick]
                    if tap.op_type == "Conv":
                        kernel, conv = conv_geometry(q, tap, weights[n])
                        conv.pop("groups")
                        m.update_conv(f, q, kernel, **conv)
                    else:
                        m.update(None if f is None else matmul_rows(f, tap), matmul_rows(q, tap))
            seen += items or 0
            return sum(v.nbytes for v in quantized.values()) + sum(v.nbytes for v in fp.values())

        run_in_item_chunks(self.calibration, run, splittable=splittable_inputs(session), fetch_bytes=self.fetch_bytes)
        return moments

    def _reround(self, qt: QuantizedTensor, weight: WeightInfo, halves: tuple[PairedMoments, PairedMoments],
                 level: int) -> tuple[QuantizedTensor, bool]:
        """``qt`` with codes rounded again on the propagated inputs, or as planned when those score no worse.

        ``sequential``: GPTQ on ``W`` with ``H̃`` of all items, kept when its error ``tr((W − Ŵ) H̃ (W − Ŵ)ᵀ)``
        beats the planned codes'. ``fp-outputs``: three codes are scored by their error on the FP32 model's
        outputs over the *held-out* half of the items (:func:`fp_output_error`): the planned ones, and GPTQ
        on the sequential target ``W`` and on the FP32-output target ``W*``, both fitted on the other half.
        The least-squares ``W*`` has ``cols`` parameters per row: where the upstream error is small it fits
        noise, and the held-out score catches that. The winning target is then rounded on all the items."""
        fit, held = halves
        both = fit.merged(held)
        mu = canonical_mu(weight).contiguous()
        relative = _relative_damping(self.posteriors.get(weight.name))
        grid = grid_of(qt)
        planned = torch.from_numpy(qt.layout.to_canonical(qt.dequantize()))

        def rounded(target, m: PairedMoments):
            h = dampened(m.h, m.count, relative)
            t = fp_output_target(mu, h, m.k, m.count) if target == "fp-outputs" else mu
            return feedback.gptq_round(t, h.float(), grid, damp=1e-6, act_order=self.act_order), t, h

        scores: dict[str, float] = {}
        if self.mode == "fp-outputs" and held.count and fit.count:
            scores = {"planned": fp_output_error(mu, planned, held)}
            for target in ("sequential", "fp-outputs"):
                (_, values), _, _ = rounded(target, fit)
                scores[target] = fp_output_error(mu, values, held)
            choice = min(scores, key=lambda k: (scores[k], k != "planned"))
        else:
            choice = self.mode
        info = {**qt.info, "propagation": {"mode": self.mode, "level": level, "rows": both.count,
                                           **({"heldout_error": scores} if scores else {})}}
        if choice == "planned":
            info["propagation"]["codes"] = "planned"
            return dataclasses.replace(qt, info=info), False
        (codes, values), target, h = rounded(choice, both)
        before, after = propagated_error(target, planned, h), propagated_error(target, values, h)
        info["propagation"].update(target=choice, error_planned=before, error_rerounded=after)
        if not scores and not after < before:  # sequential: the planned codes, unless beaten in-sample
            info["propagation"]["codes"] = "planned"
            return dataclasses.replace(qt, info=info), False
        info["propagation"]["codes"] = "rerounded"
        post = self.posteriors.get(weight.name)
        if post is not None and "whitened_error" in info:  # the planner's figure was for the planned codes
            info["whitened_error"] = whitened_error(values - mu, post)
        return dataclasses.replace(qt, codes=codes.numpy(), info=info), True


def weight_levels(graph: onnx.GraphProto, eligible: set[str], planned: set[str]) -> dict[str, int]:
    """Each ``eligible`` weight's level: one more than the highest level among the eligible weights its
    consumer's activation depends on (0: none). Planned weights outside ``eligible`` add no level (they are
    quantized from the start); a weight read by several nodes takes the highest."""
    value_level: dict[str, int] = {}
    levels: dict[str, int] = {}
    for node in graph.node:
        level = max((value_level.get(i, -1) for i in node.input if i and i not in planned), default=-1)
        index = WEIGHT_INPUT.get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index] in eligible:
            name = node.input[index]
            levels[name] = max(levels.get(name, -1), level + 1)
            level = levels[name]
        for out in node.output:
            value_level[out] = level
    return levels


def grid_of(qt: QuantizedTensor):
    """The stored grid of a planned uniform or codebook tensor, as the rounding functions take it."""
    c = qt.candidate
    if c.family == "uniform":
        return UniformGrid(torch.from_numpy(qt.scale.astype(np.float32)), torch.from_numpy(qt.zero.astype(np.float32)),
                           c.bits, c.group_size, c.symmetric)
    return CodebookGrid(torch.from_numpy(qt.levels.astype(np.float32)), c.rows_per_table(qt.layout))


def fp_output_error(w: torch.Tensor, values: torch.Tensor, m: PairedMoments) -> float:
    """Mean ``‖W x − Ŵ x̃‖²`` over ``m``'s rows, less the part no ``Ŵ`` changes:
    ``tr(D H̃ Dᵀ) + 2 tr(W K Dᵀ)`` per row with ``D = W − Ŵ``, ``H̃ = Σ x̃x̃ᵀ``, ``K = Σ (x − x̃)x̃ᵀ``."""
    w = w.double()
    d = w - values.double()
    return float(((d @ m.h) * d).sum() + 2 * ((w @ m.k) * d).sum()) / max(m.count, 1)


def propagated_error(target: torch.Tensor, values: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W* − Ŵ) H (W* − Ŵ)ᵀ)``: the layer's output error on the propagated inputs, up to a constant."""
    d = (target.double() - values.double())
    return float(((d @ h) * d).sum())


def _reroundable(qt: QuantizedTensor, taps: list[Tap], weight: WeightInfo) -> bool:
    if qt.candidate.family not in ("uniform", "codebook") or len(taps) != 1 or len(weight.consumers) != 1:
        return False
    tap = taps[0]
    if tap.op_type in ("MatMul", "Gemm"):
        return True
    return tap.op_type == "Conv" and int(tap.attributes.get("group", 1)) == 1 and len(weight.layout.shape) in (3, 4)


def _relative_damping(post: WeightPosterior | None) -> float:
    """The dampening the posterior metric used for this weight (:func:`~.tensor_design.prior_damping`),
    relative to ``mean diag A``; GPTQ's 0.01 without a K-FAC posterior."""
    if post is None or post.A is None or post.G_diag is None or post.n_data <= 0 or float(post.G_diag.mean()) <= 0:
        return GPTQ_DAMPING
    mean_diag = float(torch.diagonal(post.A).mean())
    return prior_damping(post) / mean_diag if mean_diag > 0 else GPTQ_DAMPING


def _onnx_value(qt: QuantizedTensor, dtype) -> np.ndarray:
    """The value the artifact's decode computes for ``qt``, as its FP32 initializer's dtype and layout."""
    return np.ascontiguousarray(qt.dequantize().astype(dtype))
