"""Grids shared across short rows (issue 13 item 4): uniform per tensor, codebooks per group of rows and per
tensor. Each decodes in ONNX Runtime to exactly ``QuantizedTensor.dequantize()``, is stored in exactly the
bits the plan counts, is designed on the same weighted objective as the per-row grids, works through every
planner path, and is offered by ``for_target`` only to weights with short rows."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bayesq_onnx.choices import LEAST_CODE_BITS
from bayesq_onnx.distill import QuantWeight
from bayesq_onnx.passes.collect_weights import CollectWeightsPass
from bayesq_onnx.plan import TENSOR, Candidate, Plan, QuantizedTensor
from bayesq_onnx.planning import candidates
from bayesq_onnx.planning.bayesq import PlanBayesQ
from bayesq_onnx.planning.bayesq_fixed import PlanBayesQFixed
from bayesq_onnx.planning.tensor_design import design_tensor, whitened_error
from bayesq_onnx.quant import design, uniform
from bayesq_onnx.quant.layout import WeightLayout
from bayesq_onnx.report import file_accounting
from bayesq_onnx.weights import WeightInfo, WeightPosterior
from helpers import plan_all, reference_model, rewrite, run
from tiny_models import linear_model

UNIFORM = [Candidate("uniform", b, TENSOR, symmetric=s) for b in (2, 3, 4, 8) for s in (False, True)]
UNIFORM += [Candidate("uniform", 4, TENSOR, scale_dtype="float32")]
CODEBOOK = [Candidate("codebook", b, r) for b in (2, 3, 4, 8) for r in (8, 32, TENSOR)]
SHARED = UNIFORM + CODEBOOK


def dwconv_model(channels: int = 96, kernel: int = 3, seed: int = 0) -> onnx.ModelProto:
    """x[b,C,8,8] -> depthwise Conv(W[C,1,k,k], group=C) + bias -> Relu -> GlobalAveragePool -> y."""
    rng = np.random.default_rng(seed)
    # per-channel spreads that differ by 10x, as depthwise kernels' do
    w = (rng.normal(0, 1, (channels, 1, kernel, kernel)) * rng.uniform(0.05, 0.5, (channels, 1, 1, 1)))
    b = rng.normal(0, 0.1, (channels,))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="dw", group=channels, pads=[kernel // 2] * 4),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["y"], name="gap")]
    graph = helper.make_graph(
        nodes, "dwconv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", channels, 1, 1])],
        [numpy_helper.from_array(w.astype(np.float32), "w"), numpy_helper.from_array(b.astype(np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def short_linear_model() -> onnx.ModelProto:
    """linear_model with 24 inputs and 32 units: MatMul W1[24,32] and Gemm W2[32,32] (transB), both with
    32 rows, and rows shorter than SHORT_ROW."""
    return linear_model(k=24, n=32, m=32)


MODELS = {
    "dwconv": (dwconv_model, "w", lambda rng: {"x": rng.normal(size=(2, 96, 8, 8)).astype(np.float32)}),
    "linear": (short_linear_model, "w1", lambda rng: {"x": rng.normal(size=(3, 24)).astype(np.float32)}),
}


def _run_all(model, feed):
    import onnxruntime as ort

    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    # a default session (no options): how users load the artifact
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def _weights(proto) -> dict[str, WeightInfo]:
    collect = CollectWeightsPass(scope="all", min_size=1)
    collect(ir.serde.deserialize_model(proto))
    return collect.weights


def _check_artifact(proto, plan: Plan, feed, exposed: str) -> onnx.ModelProto:
    """Rewrite, check, run: the decoded weight equals ``dequantize()``, the output the reference model's,
    and the stored arrays take exactly the plan's bits."""
    model, flags = rewrite(proto, plan)
    assert flags[1] is True
    # the decoded weight (the decode subgraph's output keeps the weight's name) as a second graph output
    decoded = next(v for node in model.graph for v in node.outputs if v.name == exposed)
    model.graph.outputs.append(decoded)
    q = ir.serde.serialize_model(model)
    onnx.checker.check_model(q, full_check=True)
    y, w = _run_all(q, feed)
    want = plan.tensors[exposed].dequantize()
    assert float(np.abs(w - want).max()) <= 1e-6
    y_ref = run(reference_model(proto, plan), feed)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    data = q.SerializeToString()
    acc = file_accounting(data, plan)
    assert acc["missing_arrays"] == [] and 8 * acc["quantized_tensor_bytes"] == plan.stored_bits
    return onnx.load_from_string(data)


# ---- rewrite: every shared form decodes exactly and is stored in exactly its bits ------------------------

@pytest.mark.parametrize("cand", SHARED, ids=lambda c: c.label)
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_shared_grid_artifact_decodes_to_dequantize(kind, cand):
    make, exposed, feed_fn = MODELS[kind]
    proto = make()
    plan = plan_all(proto, cand)
    q = _check_artifact(proto, plan, feed_fn(np.random.default_rng(1)), exposed)
    inits = {t.name: t for t in q.graph.initializer}
    for name, qt in plan.tensors.items():
        n, lay = qt.n_weights, qt.layout
        codes = math.ceil(n * cand.bits / 8) if cand.bits != 3 else 3 * math.ceil(n / 8)
        assert len(inits[f"{name}.codes"].raw_data) == codes
        if cand.family == "uniform":
            scale = inits[f"{name}.scale"]
            assert list(scale.dims) == [] and len(scale.raw_data) == (2 if cand.scale_dtype == "float16" else 4)
            has_zero = not cand.symmetric or cand.bits == 3  # 3-bit codes are unpacked to uint8: shifted zero
            assert (f"{name}.zero_point" in inits) == has_zero
            if has_zero:
                assert list(inits[f"{name}.zero_point"].dims) == [] and len(inits[f"{name}.zero_point"].raw_data) == 1
            # size target: a scalar scale in the arithmetic decode or the level table; speed/cuda:
            # DequantizeLinear per tensor
            assert {node.op_type for node in q.graph.node if node.domain == "bayesq"} & \
                {"DequantizeAffine", "DequantizeSymmetric", "AffineLookup"}
            assert not [node for node in q.graph.node if node.op_type == "DequantizeLinear"]
            dq = [node for node in ir.serde.serialize_model(rewrite(proto, plan, target="cuda")[0]).graph.node
                  if node.op_type == "DequantizeLinear"]
            assert dq and all(not node.attribute for node in dq)  # per tensor: no axis, no block_size
            side = 8 * (len(scale.raw_data) + (1 if has_zero else 0))
        else:
            tables = 1 if cand.per_tensor else lay.rows // cand.group_size
            assert len(inits[f"{name}.levels"].raw_data) == 2 * tables * 2**cand.bits
            side = 16 * tables * 2**cand.bits
        assert qt.stored_bits() == 8 * codes + side


@pytest.mark.parametrize("cand", [Candidate("uniform", 4, TENSOR), Candidate("uniform", 3, TENSOR),
                                  Candidate("uniform", 8, TENSOR, symmetric=True), Candidate("codebook", 3, TENSOR)],
                         ids=lambda c: c.label)
def test_ort_folds_shared_decodes(tmp_path, cand):
    proto = dwconv_model()
    model, _ = rewrite(proto, plan_all(proto, cand))
    feed = {"x": np.zeros((1, 96, 8, 8), np.float32)}
    run(model, feed, optimized_path=str(tmp_path / "optimized.onnx"))
    run(proto, feed, optimized_path=str(tmp_path / "fp32.onnx"))  # a default session's own layout ops (NCHWc)
    ops = sorted(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)
    assert ops == sorted(n.op_type for n in onnx.load(tmp_path / "fp32.onnx").graph.node), ops


def test_min_opset_of_shared_grids():
    proto = dwconv_model()
    opsets = {c.label: plan_all(proto, c).min_opset for c in
              [Candidate("uniform", b, TENSOR) for b in (2, 3, 4, 8)] + [Candidate("codebook", 3, TENSOR)]}
    assert opsets == {"uint2-tensor": 25, "uint3-tensor": 19, "uint4-tensor": 21, "uint8-tensor": 19,
                      "codebook3-tensor": 19}


def test_labels_and_depthwise_overhead():
    """The new labels parse; a [96,1,3,3] depthwise kernel's side information per weight under each form."""
    for label in ("uint4-tensor", "int8-tensor", "uint3-tensor-s32", "codebook3-tensor", "codebook2-32rows"):
        assert candidates.parse(label).label == label
    assert candidates.parse("uint4-tensor") == Candidate("uniform", 4, TENSOR)
    lay = WeightLayout.for_consumer("Conv", (96, 1, 3, 3))
    over = lambda c: candidates.cost_bits(lay, c) / 864 - (3 * math.ceil(864 / 8) * 8 / 864 if c.bits == 3  # noqa: E731
                                                          else c.bits)
    assert over(Candidate("uniform", 4, 0)) == pytest.approx(96 * (16 + 4) / 864)
    assert over(Candidate("uniform", 4, TENSOR)) == pytest.approx((16 + 8) / 864)  # a 4-bit zero takes a byte
    assert over(Candidate("codebook", 3, 1)) == pytest.approx(96 * 8 * 16 / 864)
    assert over(Candidate("codebook", 3, 8)) == pytest.approx(12 * 8 * 16 / 864)
    assert over(Candidate("codebook", 3, TENSOR)) == pytest.approx(8 * 16 / 864)
    with pytest.raises(ValueError):
        Candidate("uniform", 4, -2)


# ---- design: same weighted objective, whole tensor as one row --------------------------------------------

def _problem(seed, rows=24, cols=9):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (torch.rand(rows, 1, generator=g) * 0.5 + 0.05)
    w[0, 0] = 2.0  # one outlier: min-max wastes most of the per-tensor range on it
    lam = torch.rand(rows, cols, generator=g) ** 4 * 100 + 0.1
    return w, lam


@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 3, 4, 8]), st.booleans())
def test_per_tensor_fit_never_loses_to_minmax(seed, bits, symmetric):
    w, lam = _problem(seed)
    grid, d = design.fit_uniform(w, lam, bits, TENSOR, symmetric=symmetric, temperature=0.0)
    assert grid.scale.shape == d.shape == (1, 1)
    s, z = uniform.minmax_params(w, bits, TENSOR, symmetric=symmetric, scale_dtype=torch.float16)
    codes = uniform.quantize(w, s, z, bits, TENSOR, symmetric=symmetric)
    naive = float(((uniform.dequantize(codes, s, z, TENSOR) - w) ** 2 * lam).sum())
    assert float(d) <= naive * (1 + 1e-5) + 1e-9
    # the reported objective is what the grid achieves, and it is the search over the tensor as one row
    _, values = grid.quantize(w, slice(0, 24), slice(0, 9))
    assert float(((values - w) ** 2 * lam).sum()) == pytest.approx(float(d), rel=1e-4, abs=1e-7)
    row_grid, row_d = design.fit_uniform(w.reshape(1, -1), lam.reshape(1, -1), bits, 0, symmetric=symmetric,
                                         temperature=0.0)
    assert torch.equal(row_grid.scale, grid.scale) and torch.equal(row_grid.zero, grid.zero)


def test_per_tensor_soft_design_and_codebook_on_the_union_of_rows():
    w, lam = _problem(5)
    _, d0 = design.fit_uniform(w, lam, 3, TENSOR, temperature=0.0)
    _, d1 = design.fit_uniform(w, lam, 3, TENSOR, temperature=1.0)
    assert float(d1) > float(d0)
    grid, d = design.fit_codebook(w, lam, 3, 24, temperature=0.0)
    flat, fd = design.fit_codebook(w.reshape(1, -1), lam.reshape(1, -1), 3, 1, temperature=0.0)
    assert torch.equal(grid.levels, flat.levels) and torch.allclose(d, fd)
    _, values = grid.quantize(w, slice(0, 24), slice(0, 9))
    assert float(((values - w) ** 2 * lam).sum()) == pytest.approx(float(d), rel=1e-4)


# ---- planners: every path that may receive a shared grid -------------------------------------------------

def _posterior(w: WeightInfo, curvature: str, seed: int = 0) -> WeightPosterior:
    g = torch.Generator().manual_seed(seed)
    rows, cols = w.layout.rows, w.layout.cols
    prec = torch.rand(rows, cols, generator=g) * 50 + 1.0
    if curvature == "kfac":
        x = torch.randn(64, cols, generator=g) @ torch.randn(cols, cols, generator=g)  # correlated inputs
        return WeightPosterior(w.name, None, prec, 1.0, 32.0, A=x.T @ x / 64,
                               G_diag=torch.rand(rows, generator=g) + 0.1)
    if curvature == "lowrank":
        return WeightPosterior(w.name, None, prec, 1.0, 32.0, U=torch.randn(rows * cols, 4, generator=g))
    return WeightPosterior(w.name, None, prec, 1.0, 32.0)


@pytest.mark.parametrize("curvature", ["diag", "kfac", "lowrank"])
def test_planners_use_shared_grids_on_every_rounding_path(curvature):
    proto = dwconv_model()
    weights = _weights(proto)
    post = {n: _posterior(w, curvature) for n, w in weights.items()}
    allowed = candidates.allowed(weights)
    # per-row forms cost >= 4 bits all-in on 9-weight rows: 3.5 bits is reachable only with shared grids
    plan = PlanBayesQ(3.5, post, allowed, curvature=curvature)(weights)
    assert plan.all_in_bits <= 3.5 and plan.tensors["w"].candidate.group_size in (8, 32, TENSOR)
    feed = {"x": np.random.default_rng(3).normal(size=(2, 96, 8, 8)).astype(np.float32)}
    _check_artifact(proto, plan, feed, "w")
    for cand in (Candidate("uniform", 3, TENSOR), Candidate("codebook", 2, TENSOR)):
        fixed = PlanBayesQFixed(cand, post, curvature=curvature)(weights)
        qt = fixed.tensors["w"]
        assert qt.codes.min() >= 0 and qt.codes.max() <= 2**cand.bits - 1
        if cand.family == "uniform":
            assert qt.scale.shape == qt.zero.shape == (1, 1)
        else:
            assert qt.levels.shape == (1, 2**cand.bits)
        # the rounding path's own values are what the artifact decodes
        x = torch.from_numpy(qt.layout.to_canonical(qt.dequantize()) - qt.layout.to_canonical(weights["w"].array))
        assert whitened_error(x, post["w"]) == pytest.approx(qt.info["whitened_error"], rel=1e-5)
        _check_artifact(proto, fixed, feed, "w")


def test_distill_student_starts_at_the_shared_grid():
    proto = dwconv_model()
    w = _weights(proto)["w"]
    post = _posterior(w, "diag")
    for cand in (Candidate("uniform", 4, TENSOR), Candidate("codebook", 3, TENSOR), Candidate("codebook", 2, 8)):
        qt = design_tensor(w, post, cand, curvature="diag")
        student = QuantWeight(qt)
        with torch.no_grad():
            np.testing.assert_array_equal(student().numpy(), qt.dequantize())
            assert student.stored(qt).stored_bits() == qt.stored_bits()


# ---- which weights are offered the shared grids ----------------------------------------------------------

def _info(op: str, shape: tuple[int, ...], trans_b: bool = False) -> WeightInfo:
    return WeightInfo("w", WeightLayout.for_consumer(op, shape, trans_b=trans_b), np.zeros(shape, np.float32), (op,),
                      matmul_nbits=op == "MatMul")


def test_for_target_offers_shared_grids_only_for_short_rows():
    depthwise = _info("Conv", (96, 1, 3, 3))
    labels = [c.label for c in candidates.for_target(depthwise, "size")]
    assert {"uint2-tensor", "uint3-tensor", "uint4-tensor", "uint8-tensor", "codebook3-8rows",
            "codebook3-32rows", "codebook3-tensor", "codebook2-tensor", "codebook4-tensor"} <= set(labels)
    assert labels[-1] == "fp16" and len(labels) == len(set(labels))
    assert [c.label for c in candidates.for_target(depthwise, "cuda")] == \
        ["uint4-row", "uint8-row", "uint4-tensor", "uint8-tensor", "fp16"]
    assert not any(c.per_tensor for c in candidates.for_target(depthwise, "speed"))
    # row groups only where they divide the rows (48: 8, not 32) and are fewer than all rows
    pointwise = _info("Conv", (48, 16, 1, 1))
    groups = {c.group_size for c in candidates.for_target(pointwise, "size") if c.family == "codebook"}
    assert groups == {1, 8, TENSOR}
    assert {c.group_size for c in candidates.for_target(_info("Conv", (8, 1, 5, 5)), "size")
            if c.family == "codebook"} == {1, TENSOR}
    # rows of SHORT_ROW and more (every MiniLM weight: 384+) get only the per-row and per-128 forms (MatMul
    # weights take the MatMulNBits forms instead: tests/test_memory_forms.py)
    for info in (_info("Gemm", (384, 384)), _info("Gemm", (384, 1536)), _info("Gather", (1536, 384)),
                 _info("Gemm", (10, 64), trans_b=True), _info("Conv", (16, 8, 3, 3))):
        assert info.layout.cols >= candidates.SHORT_ROW
        fits = info.layout.in_channels % candidates.GROUP == 0
        old = [Candidate("uniform", b, g) for b in (2, 3, 4, 5, 6, 8) for g in ([0, 128] if fits else [0])]
        old += [Candidate("codebook", b, 1) for b in (2, 3, 4)] + [Candidate("float", 16)]
        assert candidates.for_target(info, "size") == old
        old_cuda = [Candidate("uniform", b, g) for b in (4, 8) for g in ([0, 128] if fits else [0])]
        assert candidates.for_target(info, "cuda") == old_cuda + [Candidate("float", 16)]


def test_placeholder_cost_is_the_fitted_cost():
    proto = dwconv_model()
    w = _weights(proto)["w"]
    post = _posterior(w, "diag")
    for cand in candidates.for_target(w, "size"):
        fitted = design_tensor(w, post, cand, curvature="diag")
        assert QuantizedTensor.placeholder("w", w.layout, cand).stored_bits() == fitted.stored_bits()


# ---- end to end: compile, inspect, ONNX reference evaluator ----------------------------------------------

class TinyDepthwise(torch.nn.Module):
    """Stem 3×3 over 3 channels (rows of 27 weights), pointwise 1×1 over 48 (48), depthwise 3×3 (9), and a
    head with rows of 128 (not short); each has the 1024+ weights the default scope quantizes."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 48, 3, padding=1)
        self.pw = torch.nn.Conv2d(48, 128, 1)
        self.dw = torch.nn.Conv2d(128, 128, 3, padding=1, groups=128)
        self.head = torch.nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.dw(torch.relu(self.pw(torch.relu(self.stem(x))))))
        return self.head(h.mean(dim=(2, 3)))


def _tiny_depthwise_bundle():
    from bayesq_onnx.models.base import ModelBundle
    from tiny_torch import logits_fidelity

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    batch = lambda: {"x": rng.normal(size=(8, 3, 8, 8)).astype(np.float32)}  # noqa: E731
    return ModelBundle(
        name="tiny-dw", module=TinyDepthwise().eval(), input_names=["x"], output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}}, calibration=[batch() for _ in range(3)],
        evaluation=[batch() for _ in range(2)], latency_feed=batch(), metric=logits_fidelity,
        headline="top1_agreement", info={"source": "tests"}, likelihood="categorical")


def test_compiled_short_row_model_is_accounted_by_inspect(tmp_path):
    """At 2.5 bits all-in every per-row form is out of reach for the depthwise kernel (≥ 4 bits): the plan
    takes shared grids, the artifact runs in ORT and in onnx.reference, and ``bayesq inspect`` redoes the
    accounting from the file alone."""
    from onnx.reference import ReferenceEvaluator

    from helpers import MatMulNBits

    from bayesq_onnx.config import CompileConfig
    from bayesq_onnx.inspection import inspect_artifact
    from bayesq_onnx.pipeline import compile_model

    bundle = _tiny_depthwise_bundle()
    config = CompileConfig(model="tiny-dw", method="bayesq", bits=2.5, out=tmp_path / "out", latency_runs=1,
                           memory_loads=1,
                           latency_warmup=0)
    result = compile_model(config, bundle=bundle)
    tensors = {t["name"]: t for t in result.report["plan"]["tensors"]}
    shared = [t for t in tensors.values() if t["candidate"]["label"].endswith(("-tensor", "rows"))]
    assert shared, [t["candidate"]["label"] for t in tensors.values()]
    info = inspect_artifact(result.artifact)
    assert info["totals"]["accounting_ok"] is True
    for t in info["tensors"]:
        assert t["label"] == tensors[t["name"]]["candidate"]["label"]
        assert 8 * t["bytes"] == tensors[t["name"]]["stored_bits"]
        assert t["family"] in ("uniform", "codebook", "float") and t["bits"] is not None
    model = result.artifact.read_bytes()
    feed = bundle.evaluation[0]
    np.testing.assert_allclose(run(model, feed), ReferenceEvaluator(model, new_ops=[MatMulNBits]).run(None, feed)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", candidates.TARGETS)
def test_least_code_bits_bounds_every_target_candidate(target):
    """config.validate refuses budgets below LEAST_CODE_BITS before a model loads: no candidate is narrower."""
    least = LEAST_CODE_BITS[target]
    seen = set()
    for shape, consumer in (((384, 1536), "MatMul"), ((96, 1, 3, 3), "Conv"), ((10, 64), "Gemm"), ((8, 16), "Gemm")):
        layout = WeightLayout.for_consumer(consumer, shape)
        weight = WeightInfo("w", layout, np.zeros(shape, np.float32), (consumer,))
        for cand in candidates.for_target(weight, target):
            if cand.family != "float":
                seen.add(cand.bits)
            assert cand.bits >= least, (target, cand.label)
    assert least in seen
