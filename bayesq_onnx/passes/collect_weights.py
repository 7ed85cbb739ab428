"""CollectWeightsPass: find the weight initializers in quantization scope (analysis; changes nothing).

Scope ``linear`` (docs/design.md §2): the weight input of Conv, Gemm and MatMul. Scope ``all`` (the default)
adds embedding tables read by Gather. Biases, norm parameters and small tensors stay in floating point.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..quant.layout import WeightLayout
from ..weight_inputs import EMBEDDING_WEIGHT_INPUT, LINEAR_WEIGHT_INPUT, WEIGHT_INPUT
from ..weights import WeightInfo

from ..choices import SCOPES  # noqa: F401 (re-exported: the scopes this pass knows)


class CollectWeightsPass(ir.passes.PassBase):
    """Analysis pass: afterwards ``self.weights`` maps initializer name -> :class:`WeightInfo`.

    A weight qualifies when it is a float32 initializer that is not also a graph input (which a user
    could override), has at least ``min_size`` elements, every consumer reads it as a weight (or as a
    Gather table), and at least one consumer is in scope: a table tied between an embedding Gather and an
    output Gemm is a Gemm weight, so the default scope quantizes it (both readers see the decoded table).
    The layout comes from the first linear consumer (a tied embedding/projection table is one tensor,
    decoded once; any layout reproduces it exactly).
    """

    in_place = True
    changes_input = False

    def __init__(self, scope: str = "linear", min_size: int = 1024):
        super().__init__()
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
        self.scope = scope
        self.min_size = min_size
        self.weights: dict[str, WeightInfo] = {}
        self.skipped: dict[str, str] = {}  # float tensors of at least min_size left as they are, and why

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        in_scope = set(LINEAR_WEIGHT_INPUT) | (set(EMBEDDING_WEIGHT_INPUT) if self.scope == "all" else set())
        graph_inputs = {v.name for v in model.graph.inputs}
        position = {id(node): i for i, node in enumerate(model.graph)}
        self.weights, self.skipped = {}, {}
        for name, value in model.graph.initializers.items():
            if value.const_value is None or value.dtype != ir.DataType.FLOAT or value.shape is None:
                continue
            shape = tuple(int(d) for d in value.shape)
            if int(np.prod(shape)) < self.min_size:
                continue
            if name in graph_inputs:
                self.skipped[name] = "also a graph input (a caller may override it)"
                continue
            if len(shape) < 2:
                continue  # biases and norm scales stay in float by design
            layout, ops = self._layout(value, shape)
            if layout is None:
                readers = sorted({f"{n.op_type}[{i}]" for n, i in value.uses()})
                self.skipped[name] = f"read as {', '.join(readers) or 'nothing'}, not as a weight we quantize"
                continue
            if not in_scope.intersection(ops):
                self.skipped[name] = f"read by {', '.join(sorted(set(ops)))}: outside `scope` {self.scope}"
                continue
            first = min(position.get(id(node), 0) for node, _ in value.uses())
            self.weights[name] = WeightInfo(name, layout, value.const_value.numpy(), ops, first,
                                            matmul_nbits=all(matmul_nbits_reader(n, i) for n, i in value.uses()))
        return ir.passes.PassResult(model, modified=False)

    @staticmethod
    def _layout(value: ir.Value, shape) -> tuple[WeightLayout | None, tuple[str, ...]]:
        uses = list(value.uses())
        layouts: list[WeightLayout] = []
        for node, index in uses:
            if node.domain not in ("", "ai.onnx") or WEIGHT_INPUT.get(node.op_type) != index:
                return None, ()  # read as something other than a weight: leave it alone
            trans_b = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
            try:
                layouts.append(WeightLayout.for_consumer(node.op_type, shape, trans_b=trans_b))
            except ValueError:
                return None, ()
        if not layouts:
            return None, ()
        ops = tuple(node.op_type for node, _ in uses)
        # Prefer a linear consumer's rows (output channels) over a Gather's (vocabulary entries).
        linear = [lay for lay, op in zip(layouts, ops) if op in LINEAR_WEIGHT_INPUT]
        return (linear or layouts)[0], ops


def matmul_nbits_reader(node: ir.Node, index: int) -> bool:
    """Whether ``node`` reading a 2-D weight at input ``index`` can become ``MatMulNBits(A, W, ..., bias)``:
    a MatMul reading it as B, or a Gemm reading it as B with ``transA`` 0, ``alpha`` 1 and, if it has a C,
    ``beta`` 1 and C a constant of shape ``[N]`` (MatMulNBits adds a bias of one value per output)."""
    if node.domain not in ("", "ai.onnx") or index != 1:
        return False
    if node.op_type == "MatMul":
        return True
    if node.op_type != "Gemm" or node.attributes.get_int("transA", 0) or node.attributes.get_float("alpha", 1.0) != 1.0:
        return False
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is None:
        return True
    weight = node.inputs[1]
    n = weight.shape[0] if node.attributes.get_int("transB", 0) else weight.shape[1]
    return (node.attributes.get_float("beta", 1.0) == 1.0 and bias.const_value is not None
            and tuple(bias.shape) == (n,))
