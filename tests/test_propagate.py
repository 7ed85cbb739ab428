"""Error propagation (planning/propagate.py, quant/propagation.py): the least-squares target, the paired
moments of conv patches, the level order, and on a tiny ONNX model: bits unchanged, only codes move, no layer
worse in its own propagated metric, and the FP32-output target brings the ORT output closer to FP32."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from bayesq_onnx.analysis.fit_layer_posterior import FitLayerPosterior
from bayesq_onnx.bayes.layerwise import conv_patches
from bayesq_onnx.passes.collect_weights import CollectWeightsPass
from bayesq_onnx.planning.propagate import PropagateErrors, fp_output_error, grid_of, propagated_error, weight_levels
from bayesq_onnx.planning.rtn import PlanRoundToNearest
from bayesq_onnx.quant.propagation import PairedMoments, dampened, fp_output_target
from bayesq_onnx.runtime.session import CPU, make_session


def _layer(seed: int, rows: int, cols: int, items: int, noise: float):
    """FP32 inputs x, quantized-model inputs x̃ = x + noise, a weight W, and their paired moments."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(items, cols, generator=g, dtype=torch.float64)
    xq = x + noise * torch.randn(items, cols, generator=g, dtype=torch.float64)
    w = torch.randn(rows, cols, generator=g)
    m = PairedMoments(cols)
    m.update(x, xq)
    return g, x, xq, w, m


def test_fp_output_target_is_the_least_squares_fit():
    """W* = W + W K H̃⁻¹ minimizes ‖X Wᵀ − X̃ W*ᵀ‖² (here with no dampening to speak of)."""
    g, x, xq, w, m = _layer(0, 5, 12, 500, 0.1)
    h = dampened(m.h, m.count, 1e-12)
    got = fp_output_target(w, h, m.k, m.count).double()
    want = torch.linalg.lstsq(xq, x @ w.double().T).solution.T
    assert torch.allclose(got, want, atol=1e-5)
    # and the objective really is ‖X̃ (W* − Ŵ)ᵀ‖² + constant: two candidate Ŵ differ by the same amount in both
    a, b = torch.randn(5, 12, generator=g, dtype=torch.float64), torch.randn(5, 12, generator=g, dtype=torch.float64)
    full = lambda v: float(((x @ w.double().T - xq @ v.T) ** 2).sum())  # noqa: E731
    assert full(a) - full(b) == pytest.approx(m.count * (propagated_error(got, a, h) - propagated_error(got, b, h)),
                                              rel=1e-6)


def test_fp_output_error_is_the_output_error_up_to_a_constant():
    g, x, xq, w, m = _layer(2, 4, 10, 300, 0.2)
    full = lambda v: float(((x @ w.double().T - xq @ v.double().T) ** 2).sum()) / 300  # noqa: E731
    a, b = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    assert fp_output_error(w, a, m) - fp_output_error(w, b, m) == pytest.approx(full(a) - full(b), rel=1e-9)
    assert full(a) - fp_output_error(w, a, m) == pytest.approx(full(w) - fp_output_error(w, w, m), rel=1e-9)


def test_paired_conv_moments_are_the_patch_sums():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 7, 6, generator=g)
    xq = x + 0.05 * torch.randn(3, 4, 7, 6, generator=g)
    conv = dict(strides=(2, 1), pads=(1, 0, 1, 2), dilations=(1, 1))
    m = PairedMoments(4 * 9)
    m.update_conv(x, xq, (3, 3), **conv)
    p = conv_patches(x.double(), (3, 3), groups=1, **conv)[:, 0]
    pq = conv_patches(xq.double(), (3, 3), groups=1, **conv)[:, 0]
    assert m.count == p.shape[0]
    assert torch.allclose(m.h, pq.T @ pq) and torch.allclose(m.k, (p - pq).T @ pq)


def _chain(widths=(16, 24, 24, 8), seed=0) -> onnx.ModelProto:
    """x → MatMul(w0) → Relu → MatMul(w1) → Relu → {MatMul(w2a), MatMul(w2b)} → Add → y: w2a, w2b share a level."""
    rng = np.random.default_rng(seed)
    a, b, c, d = widths
    ws = {"w0": rng.normal(0, 0.3, (a, b)), "w1": rng.normal(0, 0.3, (b, c)),
          "w2a": rng.normal(0, 0.3, (c, d)), "w2b": rng.normal(0, 0.3, (c, d))}
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]), helper.make_node("Relu", ["h0"], ["r0"]),
             helper.make_node("MatMul", ["r0", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2a"], ["ya"]), helper.make_node("MatMul", ["r1", "w2b"], ["yb"]),
             helper.make_node("Add", ["ya", "yb"], ["y"])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", a])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", d])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in ws.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def test_levels_follow_the_graph():
    graph = _chain().graph
    names = {"w0", "w1", "w2a", "w2b"}
    assert weight_levels(graph, names, names) == {"w0": 0, "w1": 1, "w2a": 2, "w2b": 2}
    # a planned weight that keeps its codes adds no level: it is quantized from the start
    assert weight_levels(graph, names - {"w1"}, names) == {"w0": 0, "w2a": 1, "w2b": 1}


@pytest.fixture(scope="module")
def chain_case():
    model = _chain()
    rng = np.random.default_rng(1)
    mix = rng.normal(size=(16, 16)).astype(np.float32)
    batches = [{"x": rng.normal(size=(64, 16)).astype(np.float32) @ mix} for _ in range(4)]
    collect = CollectWeightsPass(min_size=1)
    collect(ir.serde.deserialize_model(model))
    posts = FitLayerPosterior(model, batches, n_data=1.0, prior_precision=1.0)(collect.weights)
    plan = PlanRoundToNearest(3)(collect.weights)  # nearest codes everywhere: the most room to improve
    return model, batches, collect.weights, posts, plan


def _output_error(model: onnx.ModelProto, plan, batches) -> float:
    q = onnx.ModelProto()
    q.CopyFrom(model)
    for init in q.graph.initializer:
        if init.name in plan.tensors:
            init.CopyFrom(numpy_helper.from_array(plan.tensors[init.name].dequantize().astype(np.float32), init.name))
    fp, _ = make_session(model.SerializeToString(), [CPU])
    qs, _ = make_session(q.SerializeToString(), [CPU])
    return sum(float(((fp.run(None, b)[0] - qs.run(None, b)[0]) ** 2).sum()) for b in batches)


@pytest.mark.parametrize("mode", ["sequential", "fp-outputs"])
def test_propagation_moves_codes_only_and_never_worsens_a_layer(chain_case, mode):
    model, batches, weights, posts, plan = chain_case
    out = PropagateErrors(model, batches, mode=mode, posteriors=posts)(plan, weights)
    assert out.stored_bits == plan.stored_bits and out.all_in_bits == plan.all_in_bits
    stats = out.settings["propagation"]
    assert stats["levels"] == 3 and stats["rerounded"] + stats["kept_planned_codes"] == 4 and stats["rerounded"] >= 1
    for name, qt in out.tensors.items():
        before = plan.tensors[name]
        assert np.array_equal(qt.scale, before.scale) and np.array_equal(qt.zero, before.zero)
        p = qt.info["propagation"]
        if mode == "sequential":  # re-rounded only where it beats the planned codes in its own metric
            assert p["error_rerounded"] <= p["error_planned"] * (1 + 1e-9) or p["codes"] == "planned"
        else:  # the choice with the least held-out error on the FP32 outputs
            best = min(p["heldout_error"], key=p["heldout_error"].get)
            assert (p["codes"] == "planned") == (best == "planned") and p.get("target", "planned") == best
        if p["codes"] == "planned":
            assert np.array_equal(qt.codes, before.codes)
    # running it again on its own output changes nothing it has not already minimized
    again = PropagateErrors(model, batches, mode=mode, posteriors=posts)(out, weights)
    for name, qt in again.tensors.items():
        p = qt.info["propagation"]
        if mode == "sequential":
            assert p["error_rerounded"] >= p["error_planned"] * (1 - 1e-3) or p["codes"] == "planned"


def test_fp_outputs_brings_the_model_closer_to_fp32(chain_case):
    model, batches, weights, posts, plan = chain_case
    out = PropagateErrors(model, batches, mode="fp-outputs", posteriors=posts)(plan, weights)
    assert _output_error(model, out, batches) < 0.7 * _output_error(model, plan, batches)


def test_grid_of_reproduces_the_stored_values(chain_case):
    _, _, weights, _, plan = chain_case
    for name, qt in plan.tensors.items():
        grid = grid_of(qt)
        w = torch.from_numpy(qt.layout.to_canonical(qt.dequantize()))
        codes, values = grid.quantize(w, slice(0, w.shape[0]), slice(0, w.shape[1]))
        assert np.array_equal(codes.numpy(), qt.codes) and torch.equal(values, w)


@pytest.mark.parametrize("mode", ["sequential", "fp-outputs"])
def test_compile_with_propagation_keeps_the_budget_and_is_deterministic(tmp_path, mode):
    """Through the pipeline: the same candidates and all-in bits as without, codes re-rounded, the report says
    what it did, and the same inputs give the same bytes."""
    from bayesq_onnx.config import CompileConfig
    from bayesq_onnx.pipeline import compile_model
    from tiny_torch import tiny_bundle

    def run(name, **kw):
        config = CompileConfig(model="tiny", out=tmp_path / name, method="bayesq", bits=3.5, latency_runs=2,
                               memory_loads=1,
                               latency_warmup=1, **kw)
        return compile_model(config, bundle=tiny_bundle())

    base, a, b = run("base"), run("a", propagate=mode), run("b", propagate=mode)
    assert a.artifact.read_bytes() == b.artifact.read_bytes()
    assert a.report["bits"]["all_in"] == base.report["bits"]["all_in"]
    assert {t: q.candidate for t, q in a.plan.tensors.items()} == {t: q.candidate for t, q in base.plan.tensors.items()}
    stats = a.report["plan"]["settings"]["propagation"]
    assert stats["mode"] == mode and stats["rerounded"] + stats["kept_planned_codes"] + stats["fixed"] == len(a.plan.tensors)
    assert any(not np.array_equal(q.codes, base.plan.tensors[t].codes) for t, q in a.plan.tensors.items()) == (stats["rerounded"] > 0)


def test_propagate_is_refused_for_methods_that_round_their_own_way():
    from bayesq_onnx.config import CompileConfig
    from bayesq_onnx.errors import UserError

    with pytest.raises(UserError, match="propagate"):
        CompileConfig(method="gptq", bits=4, propagate="sequential").validate()
    CompileConfig(method="bayesq-fixed", bits=4, propagate="fp-outputs").validate()
