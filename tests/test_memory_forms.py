"""Weights that stay packed in memory (issue 28): MatMul weights as ``com.microsoft.MatMulNBits``, embedding
tables decoded row by row as Gather reads them; and the fresh-process measurement of what loading costs.

Each form is checked numerically against ONNX Runtime (the quantized model computes what the FP32 model with
the plan's dequantized weights computes), for its exact byte accounting, for being a no-op when rewritten
again, and for not holding the weight in float in the graph ORT runs.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bayesq_onnx.errors import UserError
from bayesq_onnx.passes.collect_weights import CollectWeightsPass
from bayesq_onnx.passes.quantize_weights import QuantizeWeightsPass
from bayesq_onnx.plan import NBITS, Candidate, Plan
from bayesq_onnx.planning import candidates
from bayesq_onnx.planning.rtn import fit_minmax
from bayesq_onnx.quant.layout import WeightLayout
from bayesq_onnx.report import file_accounting
from bayesq_onnx.runtime.load_memory import LOADS, LoadProbeFailed, _median, load_versus_fp32, measure_load
from bayesq_onnx.weights import WeightInfo
from helpers import plan_all, reference_model, rewrite, run
from tiny_models import conv_model, embedding_model, linear_model

NBITS_CANDIDATES = [Candidate("uniform", b, g, symmetric=s, scale_dtype=d, kernel=NBITS)
                    for b in (2, 4, 8) for g in (0, 16, 32) for s in (False, True) for d in ("float16", "float32")]


def _plan(proto: onnx.ModelProto, cand: Candidate) -> Plan:
    """``cand`` on every weight it fits that MatMulNBits can read, its standard-op per-row twin on the rest."""
    model = ir.serde.deserialize_model(proto)
    collect = CollectWeightsPass(scope="all", min_size=1)
    collect(model)
    twin = dataclasses.replace(cand, kernel="", group_size=0)
    return Plan("test", {n: fit_minmax(w, cand if cand.fits(w.layout) and w.matmul_nbits else twin)
                         for n, w in collect.weights.items()})


def _float_initializers(path) -> list[list[int]]:
    return [list(t.dims) for t in onnx.load(path).graph.initializer if t.data_type == TensorProto.FLOAT]


@pytest.mark.parametrize("cand", NBITS_CANDIDATES, ids=lambda c: c.label)
def test_matmul_nbits_computes_the_plan_and_stays_packed(cand, tmp_path):
    proto = linear_model()  # MatMul w1 [64, 48], then Gemm(r, w2 [32, 48], b2, transB=1): A·W2ᵀ + bias
    plan = _plan(proto, cand)
    assert plan.tensors["w1"].candidate == cand
    model, flags = rewrite(proto, plan)
    assert flags[1] is True
    packed = [n.op_type for n in model.graph if n.op_type in ("MatMul", "Gemm", "MatMulNBits")]
    assert packed == ["MatMulNBits", "MatMulNBits" if plan.tensors["w2"].candidate.kernel else "Gemm"]
    q = ir.serde.serialize_model(model)
    onnx.checker.check_model(q, full_check=True)
    feed = {"x": np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32)}
    np.testing.assert_allclose(run(q, feed, optimized_path=str(tmp_path / "opt.onnx")),
                               run(reference_model(proto, plan), feed), rtol=1e-5, atol=1e-6)
    assert [64, 48] not in _float_initializers(tmp_path / "opt.onnx")  # never decoded into a float weight
    acc = file_accounting(q.SerializeToString(), plan)
    assert acc["missing_arrays"] == [] and 8 * acc["quantized_tensor_bytes"] == plan.stored_bits
    assert QuantizeWeightsPass(plan)(model).modified is False  # a second run finds nothing to rewrite


def test_matmul_nbits_reads_a_batch_of_sequences():
    """MatMul weights of a transformer read ``[batch, seq, K]`` activations."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (64, 32)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 32])],
                              [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    plan = _plan(proto, Candidate("uniform", 4, 16, kernel=NBITS))
    model, _ = rewrite(proto, plan)
    feed = {"x": rng.normal(size=(2, 5, 64)).astype(np.float32)}
    np.testing.assert_allclose(run(model, feed), run(reference_model(proto, plan), feed), rtol=1e-5, atol=1e-6)


def _gemm_model(trans_b: int, bias_shape: tuple[int, ...] | None, alpha: float = 1.0) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (32, 64) if trans_b else (64, 32)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if bias_shape is not None:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, bias_shape).astype(np.float32), "c"))
        inputs.append("c")
    graph = helper.make_graph([helper.make_node("Gemm", inputs, ["y"], transB=trans_b, alpha=alpha)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 32])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


@pytest.mark.parametrize("trans_b,bias_shape", [(1, (32,)), (0, (32,)), (1, None)])
def test_gemm_with_a_bias_per_output_becomes_matmul_nbits(trans_b, bias_shape):
    proto = _gemm_model(trans_b, bias_shape)
    plan = _plan(proto, Candidate("uniform", 4, 32, kernel=NBITS))
    assert plan.tensors["w"].candidate.kernel == NBITS
    model, _ = rewrite(proto, plan)
    assert [n.op_type for n in model.graph if n.op_type != "Cast"] == ["MatMulNBits"]
    feed = {"x": np.random.default_rng(1).normal(size=(5, 64)).astype(np.float32)}
    np.testing.assert_allclose(run(model, feed), run(reference_model(proto, plan), feed), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias_shape,alpha", [((1, 32), 1.0), ((32,), 2.0)])
def test_other_gemms_keep_their_weight_decoded(bias_shape, alpha):
    """A bias that is not one value per output, or a scaled product, has no MatMulNBits form."""
    model = ir.serde.deserialize_model(_gemm_model(1, bias_shape, alpha))
    collect = CollectWeightsPass(scope="all", min_size=1)
    collect(model)
    assert collect.weights["w"].matmul_nbits is False
    assert not candidates.nbits_candidates(collect.weights["w"], (4,))


def test_nbits_zero_points_pad_each_row_to_whole_bytes_and_count_it():
    """K = 48 in blocks of 16: three 4-bit zero points per row take two bytes (MatMulNBits's layout), and
    the plan counts the padding nibble: the file and the budget agree."""
    layout = WeightLayout.for_consumer("MatMul", (48, 10))
    cand = Candidate("uniform", 4, 16, kernel=NBITS)
    w = np.random.default_rng(0).normal(size=(48, 10)).astype(np.float32)
    qt = fit_minmax(WeightInfo("w", layout, w, ("MatMul",)), cand)
    stored = qt.stored()
    assert stored["codes"].shape == (10, 3, 8) and stored["scale"].shape == (10, 3)
    assert stored["zero_point"].shape == (10, 2) and stored["zero_point"].dtype == np.uint8
    assert qt.stored_bits() == 8 * (10 * 3 * 8 + 10 * 3 * 2 + 10 * 2)
    assert candidates.cost_bits(layout, cand) == qt.stored_bits()
    # the symmetric grid stores no zero point: codes offset by 8, MatMulNBits's default
    sym = fit_minmax(WeightInfo("w", layout, w, ("MatMul",)), dataclasses.replace(cand, symmetric=True))
    assert "zero_point" not in sym.stored()


def _info(op: str, shape: tuple[int, ...], consumers: tuple[str, ...]) -> WeightInfo:
    return WeightInfo("w", WeightLayout.for_consumer(op, shape), np.zeros(shape, np.float32), consumers,
                      matmul_nbits=set(consumers) == {"MatMul"})


def test_size_target_offers_matmul_weights_only_forms_kept_packed():
    matmul = _info("MatMul", (384, 1536), ("MatMul",))
    size = candidates.for_target(matmul, "size")
    assert {c.kernel for c in size if c.family == "uniform"} == {NBITS}
    assert {c.bits for c in size if c.kernel} == {2, 4, 8} and Candidate("float", 16) in size
    assert {c.group_size for c in size if c.kernel} == {32, 64, 128}  # 384 is no power of two: no per-row block
    assert {c.bits for c in candidates.for_target(matmul, "speed")} == {4, 8}
    assert not any(c.kernel for c in candidates.for_target(matmul, "cuda"))
    # a power-of-two row gets the per-row block too; a weight some Gemm also reads gets no MatMulNBits form
    assert 0 in {c.group_size for c in candidates.for_target(_info("MatMul", (256, 64), ("MatMul",)), "size")}
    shared = _info("MatMul", (384, 384), ("MatMul", "Gemm"))
    assert not any(c.kernel for c in candidates.for_target(shared, "size"))
    assert candidates.pin_for(matmul, "size") == Candidate("uniform", 8, 32, kernel=NBITS)


def test_override_refuses_matmul_nbits_on_other_readers(tmp_path):
    path = tmp_path / "o.json"
    path.write_text(json.dumps({"w": ["uint4-g128-nbits"]}))
    gemm = {"w": _info("Gemm", (256, 128), ("Gemm",))}
    with pytest.raises(UserError, match="none of"):
        candidates.allowed(gemm, overrides=candidates.load_overrides(path))
    assert candidates.parse("uint4-g128-nbits") == Candidate("uniform", 4, 128, kernel=NBITS)


@pytest.mark.parametrize("label", ["uint2-row", "uint3-row", "uint4-g32", "uint5-g32", "uint6-row", "codebook3-row", "fp16"])
def test_gathered_rows_decode_exactly_for_any_index_shape(label):
    """Rows decoded as Gather reads them equal the decoded table's rows, negative and repeated indices too."""
    proto = embedding_model()
    plan = plan_all(proto, candidates.parse(label))
    assert plan.tensors["e"].row_gatherable()
    model, _ = rewrite(proto, plan)
    # the only Gather left (FP16) reads the stored float16 rows; no node reads a decoded table
    assert all(n.inputs[0].name == "e.values" for n in model.graph if n.op_type == "Gather")
    assert "e" not in model.graph.initializers and not any(v.name == "e" for n in model.graph for v in n.outputs)
    for ids in (np.array([[0, 99, -1, 5, 5]]), np.array([[3], [-100]]), np.arange(100).reshape(4, 25)):
        feed = {"ids": ids.astype(np.int64)}
        np.testing.assert_allclose(run(model, feed), run(reference_model(proto, plan), feed), rtol=1e-6, atol=1e-6)


def _matmul_model(k: int, n: int) -> onnx.ModelProto:
    w = np.random.default_rng(0).normal(0, 0.05, (k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def test_load_measurement_sees_the_weights_a_session_holds(tmp_path):
    """A 48 MB FP32 weight: its fresh process holds at least that much once the session has started; the
    same weight as 4-bit MatMulNBits codes (6.4 MB stored) holds far less, and the ratios say so."""
    k, n = 2048, 6144
    proto = _matmul_model(k, n)
    fp_path = tmp_path / "fp32.onnx"
    onnx.save(proto, fp_path)
    model, _ = rewrite(proto, _plan(proto, Candidate("uniform", 4, 128, kernel=NBITS)))
    q_path = tmp_path / "q.onnx"
    ir.save(model, q_path)
    feed = {"x": np.ones((4, k), np.float32)}
    mem = load_versus_fp32(fp_path, q_path, feed, ["CPUExecutionProvider"])
    weight_mb = k * n * 4 / 2**20
    fp, q = mem["fp32"], mem["quantized"]
    assert fp["after_start"]["resident_mb"] - fp["baseline"]["resident_mb"] >= 0.9 * weight_mb
    assert fp["after_run"]["peak_mb"] >= fp["after_start"]["peak_mb"] >= fp["baseline"]["peak_mb"]
    assert q["after_run"]["resident_mb"] - q["baseline"]["resident_mb"] < 0.5 * weight_mb
    assert mem["ratio"]["peak"] < 0.8 and mem["ratio"]["resident"] < 0.8
    assert mem["feed"] == f"x 4×{k}" and fp["session_start_s"] > 0
    # the figures are medians over the loads; the ratio of the medians lies within the pairs' ratios
    assert mem["loads"] == LOADS >= 3
    for key in ("peak", "resident"):
        low, high = mem["ratio_range"][key]
        assert low <= mem["ratio"][key] * (1 + 1e-9) and mem["ratio"][key] <= high * (1 + 1e-9)


def test_median_merges_loads_figure_by_figure():
    runs = [{"a": {"x": 1.0, "y": None}, "t": 3.0}, {"a": {"x": 5.0, "y": 2.0}, "t": 1.0},
            {"a": {"x": 2.0, "y": 1.0}, "t": 2.0}]
    assert _median(runs) == {"a": {"x": 2.0, "y": None}, "t": 2.0}


def test_a_model_that_cannot_load_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(LoadProbeFailed, match="bad.onnx"):
        measure_load(bad, {"x": np.ones((1, 2), np.float32)}, ["CPUExecutionProvider"])


def test_8_bit_tables_are_folded_not_gathered():
    """8-bit codes are left to the folded decode: a word of eight 8-bit codes is a 64-bit integer, past the
    2^53 that ORT's int64 ReduceSum (in bayesq.UnpackWords) keeps exact."""
    plan = plan_all(embedding_model(), candidates.parse("uint8-row"))
    assert not plan.tensors["e"].row_gatherable()


@pytest.mark.parametrize("label,cin,expected", [
    ("uint4-row", 64, "AffineLookup"),      # 16 levels along 64 input channels: one gather from the row's levels
    ("uint8-row", 64, "DequantizeAffine"),  # 256 levels: a table larger than the weight itself
    ("uint8-row", 256, "AffineLookup"),
    ("uint4-g128", 256, "DequantizeAffine"),  # a scale per group: no per-row table
    ("int4-row", 64, "DequantizeSymmetric"),  # Cast -> Mul already holds one copy
])
def test_affine_weights_decode_by_table_where_it_is_smaller(label, cin, expected):
    """A per-row affine grid folds as one GatherElements from its row's 2^b levels, exactly the values
    dequantize() gives, where that table is no larger than the weight; other grids keep the arithmetic."""
    proto = conv_model(cin=cin)
    plan = plan_all(proto, candidates.parse(label))
    model, _ = rewrite(proto, plan)
    ops = {node.op_type for node in model.graph if node.domain == "bayesq"}
    assert expected in ops and not ops & {"AffineLookup", "DequantizeAffine", "DequantizeSymmetric"} - {expected}
    q = ir.serde.serialize_model(model)
    name = next(iter(plan.tensors))
    q.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    x = np.random.default_rng(0).normal(size=(2, cin, 8, 8)).astype(np.float32)
    got = ort.InferenceSession(q.SerializeToString()).run([name], {"x": x})[0]
    np.testing.assert_array_equal(got, plan.tensors[name].dequantize())
