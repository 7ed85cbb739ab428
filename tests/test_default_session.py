"""Size artifacts run at FP32 speed in a default ONNX Runtime session (issue 15 item 1).

``ort.InferenceSession(path)`` with no options keeps ``DequantizeLinear`` unfolded (its QDQ handling), so
size-target decodes use only ops its default constant folding folds (``bayesq.DequantizeAffine`` /
``DequantizeSymmetric``: Cast → Reshape → Sub → Mul; ``bayesq.AffineLookup`` and ``bayesq.CodebookLookup``: a
small table, then Cast → GatherElements). For
every candidate family on tiny linear / conv / embedding models: the optimized graph ORT writes at its default
level is the FP32 model's (every decode folded), the decoded weights equal ``QuantizedTensor.dequantize()``
bit for bit, and the stored bytes are the plan's. Speed and CUDA targets keep ``DequantizeLinear``.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops import op_gather_elements

from bayesq_onnx.config import CompileConfig
from bayesq_onnx.pipeline import compile_model
from bayesq_onnx.plan import Candidate
from bayesq_onnx.report import file_accounting
from bayesq_onnx.runtime.session import session_config_for
from helpers import plan_all, reference_model, rewrite, run
from test_reference_evaluator import _gather_elements_spec
from test_rewrite import CANDIDATES, MODELS
from tiny_torch import tiny_bundle

DECODE_OPS = {"DequantizeLinear", "Cast", "GatherElements", "Reshape", "Sub", "Mul", "BitShift", "BitwiseAnd",
              "BitwiseOr", "Split", "Slice", "Expand", "Transpose", "Concat", "Shape", "ReduceProd"}


def _optimized_ops(model: bytes, feed: dict, path) -> collections.Counter:
    """Op types of the graph a default session runs (ORT's default optimization level, no config entries)."""
    run(model, feed, optimized_path=str(path))
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


@pytest.mark.parametrize("cand", CANDIDATES, ids=lambda c: c.label)
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_default_session_folds_every_decode(kind, cand, tmp_path):
    make, feed_fn = MODELS[kind]
    proto = make()
    plan = plan_all(proto, cand)
    model, _ = rewrite(proto, plan)
    q = ir.serde.serialize_model(model).SerializeToString()
    feed = feed_fn(np.random.default_rng(3))
    got_ops = _optimized_ops(q, feed, tmp_path / "q.onnx")
    fp_ops = _optimized_ops(proto.SerializeToString(), feed, tmp_path / "fp.onnx")
    if kind == "embedding" and plan.tensors["e"].row_gatherable():
        # the table is decoded row by row as Gather reads it: never folded into a float table
        tables = [t for t in onnx.load(tmp_path / "q.onnx").graph.initializer
                  if list(t.dims) == [100, 64] and t.data_type == onnx.TensorProto.FLOAT]
        assert tables == [] and "Gather" in got_ops and "DequantizeLinear" not in got_ops
    else:
        # folded: the artifact optimizes to the FP32 model's graph, no decode op left
        assert got_ops == fp_ops, (got_ops, fp_ops)
        assert "DequantizeLinear" not in got_ops and not (set(got_ops) - set(fp_ops)) & DECODE_OPS
    # ...and computes what the reference model (weights = dequantize()) computes, in the same kind of session
    np.testing.assert_allclose(run(q, feed), run(reference_model(proto, plan), feed), rtol=1e-5, atol=1e-6)
    acc = file_accounting(q, plan)
    assert acc["missing_arrays"] == [] and 8 * acc["quantized_tensor_bytes"] == plan.stored_bits


@pytest.mark.parametrize("cand", CANDIDATES, ids=lambda c: c.label)
@pytest.mark.parametrize("target", ["size", "speed", "cuda"])
def test_decoded_weights_equal_dequantize_exactly(cand, target, monkeypatch):
    """Every decoded weight, exposed as a graph output, is ``dequantize()`` bit for bit in a default ORT session
    and in ``onnx.reference``, in the arithmetic form (size) and in the DequantizeLinear form (speed / cuda)."""
    if cand.family != "float" and 2 ** cand.bits > 32:  # tables past np.choose's limit (test_reference_evaluator.py)
        monkeypatch.setattr(op_gather_elements, "gather_numpy", _gather_elements_spec)
    for kind in ("linear", "conv"):
        make, feed_fn = MODELS[kind]
        proto = make()
        plan = plan_all(proto, cand)
        model, _ = rewrite(proto, plan, target=target)
        outputs = {v.name: v for node in model.graph for v in node.outputs if v.name in plan.tensors}
        model.graph.outputs.extend(outputs[name] for name in sorted(plan.tensors))
        q = ir.serde.serialize_model(model)
        onnx.checker.check_model(q, full_check=True)
        feed = feed_fn(np.random.default_rng(0))
        got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[1:]
        reference = ReferenceEvaluator(q).run(None, feed)[1:]
        for name, w, r in zip(sorted(plan.tensors), got, reference):
            want = plan.tensors[name].dequantize()
            assert w.dtype == r.dtype == np.float32 and w.shape == r.shape == want.shape
            np.testing.assert_array_equal(w, want, err_msg=f"ORT {kind} {name}")
            np.testing.assert_array_equal(r, want, err_msg=f"onnx.reference {kind} {name}")


@pytest.mark.parametrize("cand", [Candidate("uniform", 4, 16), Candidate("uniform", 3), Candidate("uniform", 8),
                                  Candidate("uniform", 4, symmetric=True), Candidate("uniform", 2)],
                         ids=lambda c: c.label)
def test_stored_bytes_do_not_depend_on_the_decode_form(cand):
    """Size (arithmetic decode, broadcasting scale shapes) and speed/cuda (DequantizeLinear) artifacts store
    the same bytes per array; only the scale and zero-point dims differ. DequantizeLinear stays where the
    target's provider uses it: cuda on every uniform weight, speed on MatMul weights only (MatMulNBits; the
    Gemm weight gets the arithmetic decode, which folds even with ORT's QDQ handling on), size nowhere."""
    proto = MODELS["linear"][0]()  # w1 feeds a MatMul, w2 a Gemm (transB)
    plan = plan_all(proto, cand)
    for qt in plan.tensors.values():
        for role, a in qt.stored().items():
            b = qt.stored(broadcast=True)[role]
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes() and a.size == b.size
    arrays = {}
    for target, dq_weights in (("size", set()), ("speed", {"w1"}), ("cuda", {"w1", "w2"})):
        data = ir.serde.serialize_model(rewrite(proto, plan, target=target)[0]).SerializeToString()
        graph = onnx.load_from_string(data).graph
        arrays[target] = {t.name: t.raw_data for t in graph.initializer}
        assert 8 * file_accounting(data, plan)["quantized_tensor_bytes"] == plan.stored_bits
        # decode nodes are named "<weight>/<op>"
        assert {n.name.split("/")[0] for n in graph.node if n.op_type == "DequantizeLinear"} == dq_weights
    assert arrays["size"] == arrays["speed"] == arrays["cuda"]


def test_speed_target_folds_what_it_does_not_fuse(tmp_path):
    """Under speed (ORT's QDQ handling on, as in a default session) only the MatMul weight keeps its
    DequantizeLinear (for MatMulNBits); the Gemm weight's arithmetic decode folds."""
    proto = MODELS["linear"][0]()
    plan = plan_all(proto, Candidate("uniform", 4, 16, scale_dtype="float32"))
    model, _ = rewrite(proto, plan, target="speed")
    run(model, {"x": np.zeros((1, 64), np.float32)}, optimized_path=str(tmp_path / "q.onnx"))
    graph = onnx.load(tmp_path / "q.onnx").graph
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    assert gemm.input[1] in {t.name for t in graph.initializer}  # a folded float weight
    assert [n.op_type for n in graph.node].count("DequantizeLinear") <= 1


def test_unknown_target_is_refused():
    proto = MODELS["linear"][0]()
    with pytest.raises(ValueError, match="unknown target"):
        rewrite(proto, plan_all(proto, Candidate("uniform", 4)), target="fast")


def test_size_artifact_records_no_session_config(tmp_path):
    """A compiled size artifact asks for no session settings, and folds in a default session."""
    assert session_config_for("size") == {} and session_config_for("speed") == {}
    bundle = tiny_bundle()
    config = CompileConfig(model="tiny", method="bayesq", bits=3, out=tmp_path / "out", latency_runs=1, memory_loads=1,
                           latency_warmup=0)
    result = compile_model(config, bundle=bundle)
    proto = onnx.load(result.artifact)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["bayesq.ort_session_config"]) == {}
    assert result.report["provider"]["artifact_session_config"] == {}
    assert "DequantizeLinear" not in {n.op_type for n in proto.graph.node}
    ops = _optimized_ops(result.artifact.read_bytes(), bundle.evaluation[0], tmp_path / "q.onnx")
    assert not set(ops) & {"DequantizeLinear", "GatherElements", "BitShift"}, ops
