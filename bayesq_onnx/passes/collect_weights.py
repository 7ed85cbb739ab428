"""CollectWeightsPass: find the weight initializers in quantization scope (analysis; changes nothing).

Scope ``linear`` (docs/design.md §2): the weight input of Conv, ConvTranspose, Gemm, MatMul (either side),
Einsum (either operand) and GRU/LSTM/RNN (``W``, ``R``), read directly or through layout-only ops. Scope ``all`` (the default)
adds embedding tables read by Gather. Biases, norm parameters and small tensors stay in floating point.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..quant.layout import WeightLayout
from ..weight_inputs import (EMBEDDING_WEIGHT_INPUT, LAYOUT_OPS, LINEAR_OPS, LINEAR_READERS, RECURRENT_WEIGHT_INPUTS,
                             WEIGHT_INPUT)
from ..weights import WeightInfo

from ..choices import SCOPES  # noqa: F401 (re-exported: the scopes this pass knows)


class CollectWeightsPass(ir.passes.PassBase):
    """Analysis pass: afterwards ``self.weights`` maps initializer name -> :class:`WeightInfo`.

    A weight qualifies when it is a float32 initializer that is not also a graph input (which a user
    could override), has at least ``min_size`` elements, every consumer reads it as a weight (or as a
    Gather table), and at least one consumer is in scope: a table tied between an embedding Gather and an
    output Gemm is a Gemm weight, so the default scope quantizes it (both readers see the decoded table).

    A weight input is the weight input of MatMul (either operand: ``x @ W`` and ``W @ x``), Gemm, Conv,
    ConvTranspose, either operand of a two-input Einsum, the ``W``/``R`` input of GRU/LSTM/RNN, or any of
    these reached through a chain of layout-only ops (Slice, Split, Concat, Transpose, Reshape, Unsqueeze,
    Squeeze, Identity): the rewrite replaces the initializer by its decode, and the chain runs on the decoded
    tensor as before. The layout comes from the first direct linear consumer (a tied embedding/projection
    table is one tensor, decoded once; any layout reproduces it exactly), else from an Einsum or ``W @ x``
    reader, else (only chains) rows along axis 0 (torch's recurrent weights ``[gates·H, in]``, a tied table
    ``[V, D]``), else the Gather's.
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
        in_scope = set(LINEAR_OPS) | (set(EMBEDDING_WEIGHT_INPUT) if self.scope == "all" else set())
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
            layout, ops, chained, why = self._layout(value, shape)
            if layout is None:
                self.skipped[name] = why
                continue
            if not in_scope.intersection(ops):
                self.skipped[name] = f"read by {', '.join(sorted(set(ops)))}: outside `scope` {self.scope}"
                continue
            first = min(position.get(id(node), 0) for node, _ in value.uses())
            self.weights[name] = WeightInfo(name, layout, value.const_value.numpy(), ops, first,
                                            matmul_nbits=all(matmul_nbits_reader(n, i) for n, i in value.uses()),
                                            chained=chained)
        return ir.passes.PassResult(model, modified=False)

    @staticmethod
    def _layout(value: ir.Value, shape) -> tuple[WeightLayout | None, tuple[str, ...], bool, str]:
        """``(layout, reader op types, read through a layout chain, why not)``; layout ``None`` when some
        reader does not read it as a weight (``why`` names it)."""
        uses = list(value.uses())
        if not uses:
            return None, (), False, "read by nothing"
        direct, special, chain, gather, ops = [], [], [], [], []
        chained = False
        for node, index in uses:
            op = node.op_type
            if node.domain not in ("", "ai.onnx"):
                return None, (), False, f"read by {node.domain}.{op}[{index}], not as a weight we quantize"
            try:
                if WEIGHT_INPUT.get(op) == index:
                    trans_b = op == "Gemm" and bool(node.attributes.get_int("transB", 0))
                    lay = WeightLayout.for_consumer(op, shape, trans_b=trans_b)
                    (gather if op in EMBEDDING_WEIGHT_INPUT else direct).append(lay)
                    ops.append(op)
                    continue
                if op == "MatMul" and index == 0:  # W @ x: W [M, K], rows the M outputs
                    if len(shape) != 2 or _is_constant(node.inputs[1]):
                        return None, (), False, f"read by MatMul[0] with a {len(shape)}-D weight or a constant x"
                    special.append(WeightLayout(tuple(shape), (0, 1)))
                    ops.append(op)
                    continue
                if op in RECURRENT_WEIGHT_INPUTS and index in RECURRENT_WEIGHT_INPUTS[op]:  # [dirs, gates·H, in]
                    if len(shape) != 3:
                        return None, (), False, f"read by {op}[{index}] with a {len(shape)}-D weight"
                    special.append(WeightLayout.from_axes(tuple(shape), (0, 1), (2,)))
                    ops.append(op)
                    continue
                if op == "Einsum":
                    lay = einsum_layout(node, index, shape)
                    if lay is None:
                        return None, (), False, (f"read by Einsum[{index}] ({node.attributes.get_string('equation', '')!r}): "
                                                 "not a product with input features to contract")
                    special.append(lay)
                    ops.append(op)
                    continue
            except ValueError as exc:
                return None, (), False, f"read by {op}[{index}]: {exc}"
            if op in LAYOUT_OPS and LAYOUT_OPS[op] in (None, index):
                ends, why = chain_readers(node)
                if ends is None:
                    return None, (), False, f"read through {op}[{index}] {why}"
                chain.append(WeightLayout(tuple(shape), tuple(range(len(shape)))))
                ops.extend(ends)
                chained = True
                continue
            constant = " (a computed constant)" if _is_constant_node(node) else ""
            return None, (), False, f"read by {op}[{index}]{constant}, not as a weight we quantize"
        return (direct or special or chain or gather)[0], tuple(ops), chained, ""


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


MAX_CHAIN = 16  # layout ops between a weight and its reader


def chain_readers(node: ir.Node, depth: int = 0) -> tuple[tuple[str, ...] | None, str]:
    """The linear ops that read the outputs of the layout op ``node`` as a weight, following further layout
    ops: ``(op types, "")``, or ``(None, why)`` when some output reaches anything else (or a graph output)."""
    if depth > MAX_CHAIN:
        return None, f"(a chain of more than {MAX_CHAIN} layout ops)"
    ends: list[str] = []
    for out in node.outputs:
        if out.is_graph_output():
            return None, "into a graph output"
        for user, index in out.uses():
            op = user.op_type
            if user.domain not in ("", "ai.onnx"):
                return None, f"into {user.domain}.{op}[{index}]"
            if index in LINEAR_READERS.get(op, ()) and not (op == "MatMul" and index == 0 and _is_constant(user.inputs[1])):
                ends.append(op)
            elif op in LAYOUT_OPS and LAYOUT_OPS[op] in (None, index):
                more, why = chain_readers(user, depth + 1)
                if more is None:
                    return None, why
                ends.extend(more)
            else:
                return None, f"into {op}[{index}], not a weight input"
    if not ends:
        return None, "into nothing"
    return tuple(ends), ""


def einsum_layout(node: ir.Node, index: int, shape: tuple[int, ...]) -> WeightLayout | None:
    """Layout of operand ``index`` of a two-input Einsum: rows are the weight's axes that appear in the output
    (its output features, outer first in the weight's own order), columns the axes it contracts with the other
    operand (the last one is the input-channel axis). ``None`` for what is not such a product: an ellipsis, a
    repeated letter, an axis summed away on its own, no output axis or no contracted axis."""
    if len(node.inputs) != 2 or _is_constant(node.inputs[1 - index]):
        return None
    split = einsum_split(node.attributes.get_string("equation", ""), index, len(shape))
    return None if split is None else WeightLayout.from_axes(tuple(shape), *split)


def einsum_split(equation: str, index: int, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(row axes, column axes)`` of operand ``index`` (of rank ``rank``) of a two-operand ``equation``
    (:func:`einsum_layout`), or ``None``."""
    equation = equation.replace(" ", "")
    lhs, arrow, out = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != 2 or "." in equation:
        return None
    if not arrow:  # implicit output: the letters that appear once, in alphabetical order
        out = "".join(sorted(c for c in set(lhs) if c.isalpha() and lhs.count(c) == 1))
    mine, other = terms[index], terms[1 - index]
    if len(mine) != rank or len(set(mine)) != len(mine):
        return None
    rows = tuple(i for i, c in enumerate(mine) if c in out)
    cols = tuple(i for i, c in enumerate(mine) if c not in out and c in other)
    if not rows or not cols or len(rows) + len(cols) != rank:
        return None
    return rows, cols


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and (value.const_value is not None or
                                  (value.producer() is not None and value.producer().op_type == "Constant"))


def _is_constant_node(node: ir.Node) -> bool:
    """Whether every input of ``node`` is a constant (its output is a computed constant)."""
    return all(v is None or _is_constant(v) for v in node.inputs)
