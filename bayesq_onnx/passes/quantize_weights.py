"""QuantizeWeightsPass: replace each planned weight initializer by its stored form and a decode subgraph.

    uniform, size target (the default)
               : codes [-> bayesq.UnpackBits] -> bayesq.DequantizeAffine(codes, scale, zero_point)
                 (symmetric 2/4/8-bit: bayesq.DequantizeSymmetric(codes, scale)): Cast -> Reshape -> Sub -> Mul
                 -> rounded to the scale's dtype -> float, scales stored in a shape that broadcasts
    uniform, cuda target, and speed target where every consumer is a MatMul (ORT fuses it: MatMulNBits)
               : codes [-> bayesq.UnpackBits] -> DequantizeLinear(axis | block_size | scalar scale: per tensor)
                 [-> Cast float]
    codebook : codes -> bayesq.CodebookLookup(codes, levels)   (a table per row, per group of rows, or one)
    float16  : values -> Cast float        (float32 "kept" tensors are left untouched)

Both uniform forms compute the same numbers (``QuantizedTensor.dequantize()``) from the same stored bytes.
ONNX Runtime's default session (no options) constant-folds every size-target decode into a plain float
weight at session start, so a size artifact runs at FP32 speed as users load it; it keeps
``DequantizeLinear`` unfolded (QDQ handling), which the speed target needs (the DequantizeLinear -> MatMul
pattern becomes ``MatMulNBits``) and the CUDA execution provider runs natively.

The decoded value keeps the weight's name, so consumers read exactly what they read before. A weight
that is no longer an initializer has been rewritten already: running the pass twice changes nothing.
"""

from __future__ import annotations

import onnx_ir as ir

from .. import onnx_functions
from ..choices import TARGETS
from ..errors import PassFailure
from ..plan import Plan, QuantizedTensor
from ..quant import packing
from ..weight_inputs import WEIGHT_INPUT


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Rewrite every tensor of ``plan`` that is still a float initializer of the main graph, in the decode
    form of ``target`` (``size``: ops ORT's default session folds; ``speed``/``cuda``: DequantizeLinear)."""

    def __init__(self, plan: Plan, target: str = "size"):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
        self.plan = plan
        self.target = target

    def requires(self, model: ir.Model) -> None:
        opset = model.opset_imports.get("", 0)
        if opset < self.plan.min_opset:
            raise ir.passes.PreconditionError(
                f"the plan needs opset >= {self.plan.min_opset}, the model has {opset}: run UpgradeOpsetPass first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for name in sorted(self.plan.tensors):
            value = graph.initializers.get(name)
            qt = self.plan.tensors[name]
            if qt.candidate.family == "float" and qt.candidate.bits == 32:
                continue  # kept as is
            if value is None or value.const_value is None or value.dtype != ir.DataType.FLOAT:
                continue
            try:
                self._rewrite(model, value, qt)
            except Exception as exc:  # name the pass and the tensor (docs/design.md §6 debugging)
                raise PassFailure(f"QuantizeWeightsPass failed on tensor {name!r}: {exc}") from exc
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    def _rewrite(self, model: ir.Model, value: ir.Value, qt: QuantizedTensor) -> None:
        graph, name, cand = model.graph, value.name, qt.candidate
        if tuple(int(d) for d in value.shape) != qt.layout.shape:
            raise ValueError(f"plan shape {qt.layout.shape} != initializer shape {tuple(value.shape)}")
        arithmetic = cand.family == "uniform" and not self._keeps_dequantize_linear(value)
        stored = {role: self._initializer(graph, f"{name}.{role}", arr)
                  for role, arr in qt.stored(broadcast=arithmetic).items()}
        nodes: list[ir.Node] = []

        def add(op_type, inputs, domain="", **attributes) -> ir.Value:
            node = ir.node(op_type, inputs, attributes=attributes, domain=domain, name=f"{name}/{op_type}")
            nodes.append(node)
            return node.outputs[0]

        lay = qt.layout

        def unpacked(codes: ir.Value, shape: list[int]) -> ir.Value:
            """Bit-packed codes (3/5/6 bits) as uint8 of ``shape``; natively stored codes as they are."""
            if not packing.is_packed(cand.bits):
                return codes
            onnx_functions.add_function(model, "UnpackBits")
            return add("UnpackBits", [codes], domain=onnx_functions.DOMAIN, bits=cand.bits, shape=shape)

        if cand.family == "float":
            out = add("Cast", [stored["values"]], to=ir.DataType.FLOAT)
        elif cand.family == "codebook":
            codes = unpacked(stored["codes"], [lay.rows, lay.cols])  # codebook codes are stored canonical
            onnx_functions.add_function(model, "CodebookLookup")
            per = cand.rows_per_table(lay)
            out = add("CodebookLookup", [codes, stored["levels"]], domain=onnx_functions.DOMAIN,
                      grouped_shape=[lay.rows // per, per, lay.cols],
                      pre_shape=list(lay.pre_shape), perm=list(lay.perm))
        else:
            codes = unpacked(stored["codes"], list(lay.shape))
            dq_inputs = [codes, stored["scale"]] + ([stored["zero_point"]] if "zero_point" in stored else [])
            if arithmetic:  # (q - z)·s in ops ORT's default constant folding folds
                fn = "DequantizeAffine" if "zero_point" in stored else "DequantizeSymmetric"
                onnx_functions.add_function(model, fn)
                precision = ir.DataType.FLOAT16 if cand.scale_dtype == "float16" else ir.DataType.FLOAT
                out = add(fn, dq_inputs, domain=onnx_functions.DOMAIN, grouped_shape=qt.grouped_shape(),
                          shape=list(lay.shape), precision=int(precision))
            elif cand.per_tensor:  # scalar scale and zero point: per-tensor quantization, no axis
                out = add("DequantizeLinear", dq_inputs)
            elif cand.group_size:
                out = add("DequantizeLinear", dq_inputs, axis=lay.group_axis, block_size=cand.group_size)
            else:
                out = add("DequantizeLinear", dq_inputs, axis=lay.row_axis)
            if cand.scale_dtype != "float32" and not arithmetic:
                out = add("Cast", [out], to=ir.DataType.FLOAT)

        # a weight that is also a graph output: the output becomes the decoded value (same name, same numbers)
        ir.convenience.replace_all_uses_with(value, out, replace_graph_outputs=True)
        graph.initializers.pop(name)
        out.name = name
        out.dtype = ir.DataType.FLOAT
        out.shape = ir.Shape(list(lay.shape))
        graph.insert_before(graph[0], nodes)

    def _keeps_dequantize_linear(self, value: ir.Value) -> bool:
        """Whether a uniform weight stays behind DequantizeLinear: under ``cuda`` always; under ``speed`` where
        ORT fuses it (every consumer a MatMul reading it as B: ``MatMulNBits``); elsewhere the arithmetic
        decode, which ORT folds even with its QDQ handling on (a DequantizeLinear into Conv or Gemm would
        run on every call)."""
        if self.target == "cuda":
            return True
        if self.target == "speed":
            uses = list(value.uses())
            return bool(uses) and all(node.op_type == "MatMul" and node.domain == ""
                                      and index == WEIGHT_INPUT["MatMul"] for node, index in uses)
        return False

    @staticmethod
    def _initializer(graph: ir.Graph, name: str, array) -> ir.Value:
        if name in graph.initializers:
            raise ValueError(f"initializer {name!r} exists already")
        v = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
        graph.register_initializer(v)
        return v
