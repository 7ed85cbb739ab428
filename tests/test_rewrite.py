"""The rewrite, family by family and bit-width by bit-width, checked in ONNX Runtime against numpy."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from bayesq_onnx.plan import TENSOR, Candidate
from bayesq_onnx.report import file_accounting
from helpers import plan_all, reference_model, rewrite, run
from tiny_models import conv_model, embedding_model, linear_model

UNIFORM = [Candidate("uniform", b, g, symmetric=s) for b in (2, 3, 4, 5, 6, 8) for g in (0, 16) for s in (False, True)]
UNIFORM += [Candidate("uniform", 4, 0, scale_dtype="float32"), Candidate("uniform", 3, 16, scale_dtype="float32")]
CODEBOOK = [Candidate("codebook", b, r) for b in (2, 3, 4, 5, 8) for r in (1, 4)]
# grids shared by the whole tensor (short rows, tests/test_short_rows.py): they fit every layout
SHARED = [Candidate("uniform", b, TENSOR) for b in (2, 3, 4, 5, 6, 8)] + [Candidate("uniform", 3, TENSOR, symmetric=True)]
SHARED += [Candidate("codebook", 3, TENSOR), Candidate("codebook", 8, TENSOR)]
CANDIDATES = UNIFORM + CODEBOOK + SHARED + [Candidate("float", 16)]

MODELS = {
    "linear": (linear_model, lambda rng: {"x": rng.normal(size=(3, 64)).astype(np.float32)}),
    "conv": (conv_model, lambda rng: {"x": rng.normal(size=(2, 64, 8, 8)).astype(np.float32)}),
    "embedding": (embedding_model, lambda rng: {"ids": rng.integers(0, 100, size=(2, 5)).astype(np.int64)}),
}


@pytest.mark.parametrize("cand", CANDIDATES, ids=lambda c: c.label)
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_decoded_graph_matches_numpy_reference(kind, cand):
    make, feed_fn = MODELS[kind]
    proto = make()
    plan = plan_all(proto, cand)
    model, flags = rewrite(proto, plan)
    assert flags[1] is True
    q = ir.serde.serialize_model(model)
    onnx.checker.check_model(q, full_check=True)
    feed = feed_fn(np.random.default_rng(1))
    got = run(q, feed)
    want = run(reference_model(proto, plan), feed)
    # The decode graph must reproduce the plan's dequantized weights exactly; only summation order differs.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # ...and the quantization really changed the model (the comparison is not vacuous).
    fp = run(proto, feed)
    assert not np.allclose(got, fp, rtol=0, atol=0)


@pytest.mark.parametrize("cand", CANDIDATES, ids=lambda c: c.label)
def test_stored_bytes_are_exact(cand):
    proto = conv_model()
    plan = plan_all(proto, cand)
    model, _ = rewrite(proto, plan)
    data = ir.serde.serialize_model(model).SerializeToString()
    acc = file_accounting(data, plan)
    assert acc["missing_arrays"] == []
    assert acc["all_in_bits_file"] == pytest.approx(plan.all_in_bits, rel=0, abs=1e-12)
    (name, qt), = plan.tensors.items()
    proto_q = onnx.load_from_string(data)
    codes = next(t for t in proto_q.graph.initializer if t.name == f"{name}.codes" or t.name == f"{name}.values")
    n = qt.n_weights
    expected = {"float": n * 2}.get(cand.family, math.ceil(n * cand.bits / 8) if cand.bits != 3 else 3 * math.ceil(n / 8))
    assert len(codes.raw_data) == expected
    if cand.family == "codebook":
        levels = next(t for t in proto_q.graph.initializer if t.name == f"{name}.levels")
        assert len(levels.raw_data) == 2 * (qt.layout.rows // cand.rows_per_table(qt.layout)) * 2**cand.bits


@pytest.mark.parametrize("cand", [Candidate("uniform", 3, 16), Candidate("codebook", 2, 1), Candidate("uniform", 4)],
                         ids=lambda c: c.label)
def test_rewrite_twice_changes_nothing(cand):
    proto = linear_model()
    plan = plan_all(proto, cand)
    model, _ = rewrite(proto, plan)
    first = ir.serde.serialize_model(model).SerializeToString()
    from bayesq_onnx.passes.quantize_weights import QuantizeWeightsPass
    from bayesq_onnx.passes.upgrade_opset import UpgradeOpsetPass

    assert UpgradeOpsetPass(plan.min_opset)(model).modified is False
    assert QuantizeWeightsPass(plan)(model).modified is False
    assert ir.serde.serialize_model(model).SerializeToString() == first


def test_rewrite_is_deterministic():
    proto = conv_model()
    plan = plan_all(proto, Candidate("codebook", 3, 1))
    a = ir.serde.serialize_model(rewrite(proto, plan)[0]).SerializeToString()
    b = ir.serde.serialize_model(rewrite(proto, plan)[0]).SerializeToString()
    assert a == b


@pytest.mark.parametrize("cand", [Candidate("uniform", 4, 16), Candidate("uniform", 3), Candidate("codebook", 3, 1),
                                  Candidate("codebook", 2, 4), Candidate("float", 16)], ids=lambda c: c.label)
def test_ort_folds_decode_subgraphs_at_session_start(tmp_path, cand):
    """In a default session (no options), ORT's constant folding leaves no decode op in the graph."""
    proto = linear_model()
    model, _ = rewrite(proto, plan_all(proto, cand))
    opt = tmp_path / "optimized.onnx"
    run(model, {"x": np.zeros((1, 64), np.float32)}, optimized_path=str(opt))
    ops = {n.op_type for n in onnx.load(opt).graph.node}
    assert ops <= {"MatMul", "Relu", "Gemm"}, ops


def test_opset_follows_dtypes():
    proto = linear_model()
    assert plan_all(proto, Candidate("uniform", 2)).min_opset == 25
    assert plan_all(proto, Candidate("uniform", 4)).min_opset == 21
    assert plan_all(proto, Candidate("uniform", 8, 16)).min_opset == 21
    assert plan_all(proto, Candidate("uniform", 8)).min_opset == 19
    model, _ = rewrite(proto, plan_all(proto, Candidate("uniform", 2)))
    assert model.opset_imports[""] == 25 and model.ir_version >= 11


def test_a_weight_that_is_also_a_graph_output_is_decoded_there_too():
    import onnx.helper as oh

    w = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4]),
         oh.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [8, 4])],
        [onnx.numpy_helper.from_array(w, "W")])
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    plan = plan_all(proto, Candidate("uniform", 4))
    model, flags = rewrite(proto, plan)
    assert flags[1]
    serialized = ir.serde.serialize_model(model)
    onnx.checker.check_model(serialized, full_check=True)
    sess = ort.InferenceSession(serialized.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.ones((2, 8), np.float32)
    y, w_out = sess.run(None, {"x": x})
    np.testing.assert_allclose(w_out, plan.tensors["W"].dequantize(), atol=1e-6)
    np.testing.assert_allclose(y, x @ w_out, rtol=1e-5, atol=1e-5)
