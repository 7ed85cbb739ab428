"""QuantizeWeightsPass: replace each planned weight initializer by its stored form and a decode subgraph.

    uniform, MatMulNBits candidates (``kernel="nbits"``: MatMul weights, and Gemm weights of the form
               A·W + bias, under the size and speed targets)
               : every reader becomes com.microsoft.MatMulNBits(A, codes, scale[, zero_point][, bias]),
                 which multiplies from the packed codes: the weight is never held in float
    uniform, size target (the rest)
               : codes [-> bayesq.UnpackBits] -> bayesq.AffineLookup(codes, scale, zero_point): per row or per
                 tensor, where the row's 2^b levels fit the weight's longest column axis: the levels (k − z)·s
                 as a small table, then one GatherElements from the codes (the same values);
                 otherwise bayesq.DequantizeAffine(codes, scale, zero_point) (symmetric 2/4/8-bit:
                 bayesq.DequantizeSymmetric(codes, scale)): Cast -> Sub -> Mul on the codes stored in the
                 weight's shape (blocked: input channels split into [groups, group_size], then one Reshape
                 back), scales stored in a shape that broadcasts
    uniform, cuda target, and speed target where every consumer is a MatMul and no MatMulNBits form fits
               : codes [-> bayesq.UnpackBits] -> DequantizeLinear(axis | block_size | scalar scale: per tensor),
                 its scale cast to float
    codebook : codes [-> bayesq.UnpackBits] -> bayesq.CodebookLookup(codes, levels): codes in the weight's shape,
               one GatherElements from a table per row (per row, per group of rows, or one for the tensor)
    float16  : values -> Cast float        (float32 "kept" tensors are left untouched)

A table read only by ``Gather`` (axis 0: an embedding) whose rows pack into whole words
(``QuantizedTensor.row_gatherable``) is not decoded as a whole: each Gather becomes
``bayesq.GatherAffine`` / ``bayesq.GatherCodebook`` (or Gather -> Cast for FP16) over the stored rows, which
decodes only the rows it reads, on every call: the table stays packed in memory.

Every form computes the same numbers (``QuantizedTensor.dequantize()``) from the same stored bytes. ONNX
Runtime's default session (no options) constant-folds the standard-op decodes into plain float weights at
session start, so a size artifact runs at FP32 speed as users load it; its folding holds every
intermediate of every decode until it ends, which is why the decodes avoid the reshapes and wide
intermediates they can and why MatMul weights and tables are not folded at all (docs/results.md#memory).
ORT keeps ``DequantizeLinear`` unfolded (QDQ handling), which the CUDA execution provider runs natively.

The decoded value keeps the weight's name, so consumers read exactly what they read before: a weight read
through layout ops (Slice/Concat into a GRU, a Transpose into a MatMul) has the chain run on its decoded
tensor; such a weight never takes the MatMulNBits or row-Gather forms, which need the initializer itself. A weight
that is no longer an initializer has been rewritten already: running the pass twice changes nothing.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from .. import onnx_functions
from ..choices import TARGETS
from ..errors import PassFailure
from ..plan import NBITS, Plan, QuantizedTensor
from ..quant import packing
from ..weight_inputs import WEIGHT_INPUT
from .collect_weights import matmul_nbits_reader

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's own operators (MatMulNBits), built into every ORT package


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
                if qt.candidate.kernel == NBITS:
                    self._rewrite_matmuls(model, value, qt)
                elif qt.row_gatherable() and (gathers := _table_gathers(value)):
                    self._rewrite_gathers(model, value, qt, gathers)
                else:
                    self._rewrite(model, value, qt)
            except Exception as exc:  # name the pass and the tensor (docs/design.md §6 debugging)
                raise PassFailure(f"QuantizeWeightsPass failed on tensor {name!r}: {exc}") from exc
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    def _rewrite(self, model: ir.Model, value: ir.Value, qt: QuantizedTensor) -> None:
        graph, name, cand = model.graph, value.name, qt.candidate
        if tuple(int(d) for d in value.shape) != qt.layout.shape:
            raise ValueError(f"plan shape {qt.layout.shape} != initializer shape {tuple(value.shape)}")
        # DequantizeLinear scales per row along one axis: rows over several axes (an Einsum weight) take the
        # arithmetic decode, which broadcasts a scale over any axes
        one_axis = qt.layout.row_dims == 1 or cand.per_tensor or bool(cand.group_size)
        arithmetic = cand.family == "uniform" and not (one_axis and self._keeps_dequantize_linear(value))
        stored = {role: self._initializer(graph, f"{name}.{role}", arr)
                  for role, arr in qt.stored(broadcast=arithmetic or cand.family == "codebook").items()}
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
            fn = "UnpackBits" if math.prod(shape) % 8 == 0 else "UnpackBitsPadded"  # no padding: no slice
            onnx_functions.add_function(model, fn)
            return add(fn, [codes], domain=onnx_functions.DOMAIN, bits=cand.bits, shape=shape)

        if cand.family == "float":
            out = add("Cast", [stored["values"]], to=ir.DataType.FLOAT)
        elif cand.family == "codebook":
            onnx_functions.add_function(model, "CodebookLookup")
            out = add("CodebookLookup", [unpacked(stored["codes"], list(lay.shape)), stored["levels"]],
                      domain=onnx_functions.DOMAIN, **qt.lookup_shapes())
        else:
            codes = unpacked(stored["codes"], qt.grouped_shape() if arithmetic else list(lay.shape))
            scale = stored["scale"]
            if cand.scale_dtype != "float32" and not arithmetic:  # a float32 scale: DequantizeLinear outputs float
                scale = add("Cast", [scale], to=ir.DataType.FLOAT)
            dq_inputs = [codes, scale] + ([stored["zero_point"]] if "zero_point" in stored else [])
            if arithmetic and (lookup := qt.affine_lookup()):  # one gather from a table of the row's levels
                onnx_functions.add_function(model, "AffineLookup")
                out = add("AffineLookup", dq_inputs, domain=onnx_functions.DOMAIN, **lookup)
            elif arithmetic:  # (q - z)·s in ops ORT's default constant folding folds
                fn = "DequantizeAffine" if "zero_point" in stored else "DequantizeSymmetric"
                onnx_functions.add_function(model, fn)
                out = add(fn, dq_inputs, domain=onnx_functions.DOMAIN)
                if qt.grouped_shape() != list(lay.shape):  # blocks: back to the weight's shape
                    out = add("Reshape", [out, add("Constant", [], value_ints=list(lay.shape))])
            elif cand.per_tensor:  # scalar scale and zero point: per-tensor quantization, no axis
                out = add("DequantizeLinear", dq_inputs)
            elif cand.group_size:
                out = add("DequantizeLinear", dq_inputs, axis=lay.group_axis, block_size=cand.group_size)
            else:
                out = add("DequantizeLinear", dq_inputs, axis=lay.row_axis)

        # a weight that is also a graph output: the output becomes the decoded value (same name, same numbers)
        ir.convenience.replace_all_uses_with(value, out, replace_graph_outputs=True)
        graph.initializers.pop(name)
        out.name = name
        out.dtype = ir.DataType.FLOAT
        out.shape = ir.Shape(list(lay.shape))
        graph.insert_before(graph[0], nodes)

    def _rewrite_matmuls(self, model: ir.Model, value: ir.Value, qt: QuantizedTensor) -> None:
        """Store the weight in ``MatMulNBits``'s layout and make every MatMul (or ``A·W + bias`` Gemm) reading it
        a MatMulNBits: the weight stays packed in memory. ``accuracy_level`` 0 (float32 activations, the FP32
        model's numbers up to summation order), 4 under the speed target (8-bit activations, faster)."""
        graph, name, cand, lay = model.graph, value.name, qt.candidate, qt.layout
        uses = list(value.uses())
        if value.is_graph_output() or not all(matmul_nbits_reader(node, i) for node, i in uses):
            raise ValueError("a MatMulNBits weight must be read only by MatMul, or Gemm as A·W + bias")
        stored = {role: self._initializer(graph, f"{name}.{role}", arr) for role, arr in qt.stored().items()}
        scale = stored["scale"]
        if cand.scale_dtype != "float32":  # MatMulNBits takes scales of A's type; folded at session start
            cast = ir.node("Cast", [scale], attributes={"to": ir.DataType.FLOAT}, name=f"{name}/Cast")
            graph.insert_before(graph[0], cast)
            scale = cast.outputs[0]
        attributes = {"K": lay.cols, "N": lay.rows, "bits": cand.bits, "block_size": cand.block(lay),
                      "accuracy_level": 4 if self.target == "speed" else 0}
        for i, (reader, _) in enumerate(uses):
            bias = reader.inputs[2] if reader.op_type == "Gemm" and len(reader.inputs) > 2 else None
            inputs = [reader.inputs[0], stored["codes"], scale, stored.get("zero_point")]
            inputs += [None, bias] if bias is not None else []  # MatMulNBits's inputs 4 (g_idx) and 5 (bias)
            while inputs[-1] is None:
                inputs.pop()
            node = ir.node("MatMulNBits", inputs, attributes=attributes, domain=MS_DOMAIN, name=f"{name}/MatMulNBits{i}")
            out = reader.outputs[0]
            graph.insert_after(reader, node)
            ir.convenience.replace_all_uses_with(out, node.outputs[0], replace_graph_outputs=True)
            graph.remove(reader, safe=True)
            node.outputs[0].name, node.outputs[0].type, node.outputs[0].shape = out.name, out.type, out.shape
        graph.initializers.pop(name)
        model.opset_imports[MS_DOMAIN] = 1

    def _rewrite_gathers(self, model: ir.Model, value: ir.Value, qt: QuantizedTensor, gathers: list[ir.Node]) -> None:
        """Store the table as rows and make each Gather reading it decode the rows it gathers."""
        graph, name, cand, lay = model.graph, value.name, qt.candidate, qt.layout
        stored = {role: self._initializer(graph, f"{name}.{role}", arr) for role, arr in qt.stored_rows().items()}
        row_shape = [-1, lay.cols]
        for i, gather in enumerate(gathers):
            indices, out = gather.inputs[1], gather.outputs[0]
            tag = f"{name}/Gather{i}"
            if cand.family == "float":
                rows = ir.node("Gather", [stored["values"], indices], attributes={"axis": 0}, name=f"{tag}/rows")
                nodes = [rows, ir.node("Cast", rows.outputs, attributes={"to": ir.DataType.FLOAT}, name=tag)]
            elif cand.family == "codebook":
                onnx_functions.add_function(model, "GatherCodebook")
                nodes = [ir.node("GatherCodebook", [stored["codes"], indices, stored["levels"]], domain=onnx_functions.DOMAIN,
                                 attributes={"bits": cand.bits, "row_shape": row_shape}, name=tag)]
            else:
                onnx_functions.add_function(model, "GatherAffine")
                groups = lay.cols // cand.group_size if cand.group_size else 1
                nodes = [ir.node("GatherAffine", [stored["codes"], indices, stored["scale"], stored["zero_point"]],
                                 domain=onnx_functions.DOMAIN, name=tag,
                                 attributes={"bits": cand.bits, "row_shape": row_shape,
                                             "grouped_shape": [-1, groups, lay.cols // groups],
                                             "side_shape": [-1, groups, 1]})]
            result = nodes[-1].outputs[0]
            graph.insert_after(gather, nodes)
            ir.convenience.replace_all_uses_with(out, result, replace_graph_outputs=True)
            graph.remove(gather, safe=True)
            result.name, result.dtype, result.shape = out.name, ir.DataType.FLOAT, out.shape
        graph.initializers.pop(name)

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


def _table_gathers(value: ir.Value) -> list[ir.Node]:
    """The Gather nodes reading ``value`` as their table on axis 0, when those are all its uses (and it is no
    graph output); otherwise none."""
    uses = list(value.uses())
    if not uses or value.is_graph_output():
        return []
    gathers = [node for node, index in uses
               if node.op_type == "Gather" and node.domain == "" and index == 0 and node.attributes.get_int("axis", 0) == 0]
    return gathers if len(gathers) == len(uses) else []
