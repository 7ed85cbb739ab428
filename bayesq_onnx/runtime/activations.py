"""The activations that multiply each weight, read from ONNX Runtime runs of the model itself.

Each consumer's activation (MatMul/Gemm input A, Conv input X, Gather indices) is exposed as an extra graph
output of a throw-away copy of the model (:func:`probe_model`). Every exposed activation of a run is alive at
once (in ORT and as the returned arrays), so :func:`run_in_item_chunks` runs a batch whose inputs share a
dynamic axis 0 in item chunks of about ``fetch_bytes`` of activations: the peak memory does not grow with the
batch size or the number of layers tapped. Used by the layer-wise posterior
(:mod:`bayesq_onnx.analysis.fit_layer_posterior`) and by error propagation (:mod:`bayesq_onnx.planning.propagate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import onnx
import torch

from ..errors import UserError
from ..models.base import Batch
from ..weight_inputs import EMBEDDING_WEIGHT_INPUT, WEIGHT_INPUT
from ..weights import WeightInfo

FETCH_BYTES = 64 << 20
"""About how many bytes of activations one ORT run fetches: a calibration batch runs in item chunks sized to
this (the first chunk is one item, which measures it)."""


@dataclass(frozen=True)
class Tap:
    """Where a weight's input comes from: the activation's name and how the consumer reads it."""

    activation: str
    op_type: str
    attributes: dict
    node: int = 0            # the consumer's index in the graph's node list


def weight_taps(graph: onnx.GraphProto, weights: Iterable[str]) -> dict[str, list[Tap]]:
    """Each weight's consumers in the main graph, with the activation each one multiplies it by."""
    names = set(weights)
    taps: dict[str, list[Tap]] = {}
    for i, node in enumerate(graph.node):
        index = WEIGHT_INPUT.get(node.op_type)
        if index is None or len(node.input) < 2 or node.input[index] not in names:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in EMBEDDING_WEIGHT_INPUT and int(attrs.get("axis", 0)) != 0:
            continue  # the table's posterior counts row lookups; a Gather on another axis makes none
        taps.setdefault(node.input[index], []).append(Tap(node.input[1 - index], node.op_type, attrs, i))
    return taps


def probe_model(model: onnx.ModelProto, fetch: Iterable[str], overridable: Iterable[str] = ()) -> bytes:
    """``model`` with the activations ``fetch`` as extra outputs and the initializers ``overridable`` also
    listed as graph inputs, so a run can feed other values for them (the initializer is the default)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in fetch if n not in known)
    inits = {t.name: t for t in probe.graph.initializer}
    inputs = {i.name for i in probe.graph.input}
    for name in overridable:
        if name not in inputs:
            t = inits[name]
            probe.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    return probe.SerializeToString()


def item_count(batch: Batch) -> int | None:
    """The number of items of a batch whose arrays all share axis 0 (so it can run in item chunks), else None."""
    lengths = {len(v) if v.ndim else -1 for v in batch.values()}
    return lengths.pop() if len(lengths) == 1 and min(lengths, default=-1) > 0 else None


def run_in_item_chunks(batches: Iterable[Batch], run: Callable[[Batch], int], *, splittable: bool,
                       fetch_bytes: int = FETCH_BYTES) -> None:
    """Call ``run(chunk)`` (which returns the bytes its ORT runs fetched) on every batch, in item chunks of
    about ``fetch_bytes`` where the batch's arrays share axis 0 and ``splittable`` (the model's inputs have a
    dynamic axis 0); the first chunk of each new item shape is one item, which measures the bytes per item."""
    per_item: dict[tuple, int] = {}
    for batch in batches:
        items = item_count(batch) if splittable else None
        if items is None:
            run(batch)
            continue
        shapes = tuple(sorted((k, v.shape[1:]) for k, v in batch.items()))
        start = 0
        while start < items:
            step = max(1, fetch_bytes // per_item[shapes]) if shapes in per_item else 1
            chunk = {k: v[start:start + step] for k, v in batch.items()}
            size = run(chunk)
            per_item[shapes] = max(per_item.get(shapes, 0), -(-size // len(next(iter(chunk.values())))), 1)
            start += step


def splittable_inputs(session) -> bool:
    """Whether every input of the session has a dynamic axis 0 (batches can run in item chunks)."""
    return all(not isinstance(i.shape[0], int) for i in session.get_inputs() if i.shape)


def matmul_rows(x: torch.Tensor, tap: Tap) -> torch.Tensor:
    """A MatMul/Gemm activation as rows in the weight's canonical column order."""
    if tap.op_type == "MatMul":
        return x.reshape(-1, x.shape[-1])
    x2 = x.reshape(x.shape[0], -1)
    return x2.T if tap.attributes.get("transA", 0) else x2


def conv_geometry(x: torch.Tensor, tap: Tap, w: WeightInfo) -> tuple[tuple[int, ...], dict]:
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
