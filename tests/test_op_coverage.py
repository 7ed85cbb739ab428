"""Issue 29's readers: ConvTranspose (1/2/3-D, grouped), Einsum operands, ``W @ x``, GRU/LSTM weights through
Slice/Concat chains, a tied Gather + Transpose→MatMul table; their posteriors (Laplace and layer-wise), and
``--risk mc`` never handing a NaN to the knapsack. Tiny models, checked bit-exactly against ONNX Runtime."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from bayesq_onnx.analysis.fit_layer_posterior import FitLayerPosterior
from bayesq_onnx.analysis.fit_posterior import FitLaplacePosterior
from bayesq_onnx.bayes.laplace import LaplaceOptions
from bayesq_onnx.errors import PassFailure
from bayesq_onnx.passes.collect_weights import CollectWeightsPass
from bayesq_onnx.plan import Candidate
from bayesq_onnx.quant.layout import WeightLayout
from helpers import plan_all, reference_model, rewrite, run

CANDIDATES = [Candidate("uniform", 4, 0), Candidate("uniform", 3, 0), Candidate("codebook", 3, 1),
              Candidate("uniform", 8, 0, symmetric=True)]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(nodes, inputs, output, inits, opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [onnx.ValueInfoProto(name=output)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def _collect(proto):
    c = CollectWeightsPass(scope="all", min_size=1)
    c(ir.serde.deserialize_model(proto))
    return c


def _exact(proto, feed, names, targets=("size", "cuda")):
    """Every candidate of every target decodes in ORT to exactly the plan's values."""
    c = _collect(proto)
    assert set(names) <= set(c.weights), c.skipped
    for cand in CANDIDATES:
        plan = plan_all(proto, cand)
        want = run(reference_model(proto, plan), feed)
        for target in targets:
            got = run(rewrite(proto, plan, target)[0], feed)
            np.testing.assert_array_equal(got, want, err_msg=f"{cand.label} {target}")
    return c


# ---- ConvTranspose --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nd,group", [(1, 1), (2, 1), (3, 1), (2, 2), (1, 4)])
def test_conv_transpose_quantizes_exactly(nd, group):
    rng = np.random.default_rng(nd)
    cin, cout_g, k = 8, 6, (3, 2, 2)[:nd]
    w = rng.standard_normal((cin, cout_g, *k)).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2] * nd, group=group)
    proto = _model([node], [("x", [2, cin, *[4] * nd])], "y", {"w": w})
    c = _exact(proto, {"x": rng.standard_normal((2, cin, *[4] * nd)).astype(np.float32)}, ["w"])
    lay = c.weights["w"].layout
    assert lay.rows == cout_g and lay.row_axis == 1 and lay.cols == cin * math.prod(k)
    assert c.weights["w"].in_linear_scope


def test_conv_transpose_rows_are_output_channels():
    w = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
    lay = WeightLayout.for_consumer("ConvTranspose", w.shape)
    canon = lay.to_canonical(w)
    np.testing.assert_array_equal(canon[1], w[:, 1, :].T.reshape(-1))  # (tap, input channel), channel last
    np.testing.assert_array_equal(lay.from_canonical(canon), w)


# ---- Einsum and W @ x -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("equation,shape,index,rows", [
    ("dc,btc->btd", (16, 8), 0, 16),               # weight first
    ("btd,shde->sbhte", (3, 2, 8, 4), 1, 3 * 2 * 4),  # rows over three axes
    ("bhte,hed->btd", (2, 4, 8), 1, 8),            # two contracted axes
])
def test_einsum_operand_quantizes_exactly(equation, shape, index, rows):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    x_term = equation.split("->")[0].split(",")[1 - index]
    w_term = equation.split("->")[0].split(",")[index]
    sizes = dict(zip(w_term, shape)) | {"b": 2, "t": 3}
    x_shape = [sizes[c] for c in x_term]
    inputs = ["w", "x"] if index == 0 else ["x", "w"]
    proto = _model([helper.make_node("Einsum", inputs, ["y"], equation=equation)], [("x", x_shape)], "y", {"w": w})
    c = _exact(proto, {"x": rng.standard_normal(x_shape).astype(np.float32)}, ["w"])
    assert c.weights["w"].layout.rows == rows and not c.weights["w"].matmul_nbits


def test_matmul_constant_on_the_left():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((12, 16)).astype(np.float32)
    proto = _model([helper.make_node("MatMul", ["w", "x"], ["y"])], [("x", [2, 16, 5])], "y", {"w": w})
    c = _exact(proto, {"x": rng.standard_normal((2, 16, 5)).astype(np.float32)}, ["w"])
    assert c.weights["w"].layout.rows == 12 and not c.weights["w"].matmul_nbits


def test_einsum_multi_axis_rows_layout_round_trips():
    lay = WeightLayout.from_axes((3, 2, 8, 4), (0, 1, 3), (2,))
    w = np.random.default_rng(0).standard_normal((3, 2, 8, 4)).astype(np.float32)
    assert (lay.rows, lay.cols, lay.row_axes) == (24, 8, (0, 1, 3))
    np.testing.assert_array_equal(lay.from_canonical(lay.to_canonical(w)), w)
    with pytest.raises(ValueError):
        lay.row_axis


# ---- recurrent weights through Slice/Concat chains -------------------------------------------------------------

def _recurrent(op: str, seed: int = 0):
    """torch's gate order into ONNX's: W [G·H, in] sliced per gate, concatenated in ONNX order, unsqueezed."""
    rng = np.random.default_rng(seed)
    gates, hidden, inp = (4 if op == "LSTM" else 3), 8, 6
    order = [0, 3, 1, 2] if op == "LSTM" else [1, 0, 2]
    inits = {"W": rng.standard_normal((gates * hidden, inp)).astype(np.float32) * 0.3,
             "R": rng.standard_normal((gates * hidden, hidden)).astype(np.float32) * 0.3,
             "axes0": np.array([0], np.int64)}
    nodes = []
    for name in ("W", "R"):
        for g in range(gates):
            inits[f"s{g}"], inits[f"e{g}"] = np.array([g * hidden], np.int64), np.array([(g + 1) * hidden], np.int64)
            nodes.append(helper.make_node("Slice", [name, f"s{g}", f"e{g}", "axes0"], [f"{name}_{g}"]))
        nodes.append(helper.make_node("Concat", [f"{name}_{g}" for g in order], [f"{name}_cat"], axis=0))
        nodes.append(helper.make_node("Unsqueeze", [f"{name}_cat", "axes0"], [f"{name}_3d"]))
    extra = {"linear_before_reset": 1} if op == "GRU" else {}
    nodes.append(helper.make_node(op, ["x", "W_3d", "R_3d"], ["y"], hidden_size=hidden, **extra))
    proto = _model(nodes, [("x", ["T", "B", inp])], "y", inits)
    return proto, {"x": rng.standard_normal((5, 2, inp)).astype(np.float32)}


@pytest.mark.parametrize("op", ["GRU", "LSTM"])
def test_recurrent_weights_through_slices_quantize_exactly(op):
    proto, feed = _recurrent(op)
    c = _exact(proto, feed, ["W", "R"], targets=("size",))
    # under cuda DequantizeLinear stays unfolded, so ORT's LSTM takes its non-prepacked path (1e-8 apart):
    # the weights the chain hands the op are still bit-exact
    plan = plan_all(proto, Candidate("uniform", 4, 0))
    q, ref = ir.serde.serialize_model(rewrite(proto, plan, "cuda")[0]), reference_model(proto, plan)
    for m in (q, ref):
        m.graph.output.extend([onnx.ValueInfoProto(name="W_3d"), onnx.ValueInfoProto(name="R_3d")])
    import onnxruntime as ort
    got, want = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
                 for m in (q, ref))
    for a, b in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(a, b)
    for n in ("W", "R"):
        w = c.weights[n]
        assert w.chained and w.consumers == (op,) * w.consumers.count(op) and w.in_linear_scope
        assert w.layout.perm == (0, 1) and not w.matmul_nbits


@pytest.mark.parametrize("op", ["GRU", "LSTM"])
def test_recurrent_layerwise_posterior_is_measured(op):
    proto, feed = _recurrent(op)
    c = _collect(proto)
    batches = [{"x": np.random.default_rng(i).standard_normal((5, 2, 6)).astype(np.float32)} for i in range(2)]
    posts = FitLayerPosterior(proto, batches)(c.weights)
    for n in ("W", "R"):
        p = posts[n]
        assert "layer-wise" in p.info["posterior"] and "through layout ops" in p.info["posterior"]
        data = p.precision - p.prior_precision
        assert bool((data > 0).all()), f"{n}: every element is read, every one has data"
    # W's data precision is N·E[x_j²]/σ² per column, the same for every row of a gate block (rows pooled)
    dw = (posts["W"].precision - posts["W"].prior_precision)
    assert torch.allclose(dw / dw[:1], torch.ones_like(dw), rtol=1e-3)


def test_unsupported_reader_is_left_in_float_with_its_op():
    w = np.ones((32, 32), np.float32)
    proto = _model([helper.make_node("Add", ["x", "w"], ["y"])], [("x", [32, 32])], "y", {"w": w})
    c = _collect(proto)
    assert "w" not in c.weights and "Add[1]" in c.skipped["w"]
    proto = _model([helper.make_node("Transpose", ["w"], ["t"], perm=[1, 0]), helper.make_node("Add", ["x", "t"], ["y"])],
                   [("x", [32, 32])], "y", {"w": w})
    c = _collect(proto)
    assert "Transpose" in c.skipped["w"] and "Add[1]" in c.skipped["w"]


# ---- a tied table: Gather + Transpose -> MatMul ------------------------------------------------------------------

def _tied_proto():
    rng = np.random.default_rng(3)
    table = rng.standard_normal((40, 16)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"]),
             helper.make_node("Transpose", ["table"], ["tt"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "tt"], ["y"])]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
                              [onnx.ValueInfoProto(name="y")], [numpy_helper.from_array(table, "table")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    return m, {"ids": rng.integers(0, 40, (2, 5)).astype(np.int64)}


def test_tied_table_is_quantized_once_and_not_row_gathered():
    proto, feed = _tied_proto()
    c = _exact(proto, feed, ["table"])
    w = c.weights["table"]
    assert set(w.consumers) == {"Gather", "MatMul"} and w.chained and w.in_linear_scope
    plan = plan_all(proto, Candidate("uniform", 4, 0))
    model = ir.serde.serialize_model(rewrite(proto, plan)[0])
    assert not any(n.op_type.startswith("Gather") and n.domain != "" for n in model.graph.node)  # no row form


def _bundle(module, batches, likelihood="categorical"):
    from bayesq_onnx.models.python_module import module_bundle
    return module_bundle(module, batches, likelihood=likelihood)


def test_tied_laplace_curvatures_of_both_uses_add():
    """``logits = h @ wte.weightᵀ`` with the table tied: one initializer read by Gather and by
    Transpose -> MatMul, quantized once, its posterior the sum of both uses' curvatures."""
    from written_models import TiedLM
    from bayesq_onnx.bayes.laplace import CalibrationData, fit_laplace
    from bayesq_onnx.export import fp32_model, traced_program
    from bayesq_onnx.traced import weight_ops
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # (at this size the exporter keeps the Transpose; a small table it folds into a transposed copy)
    bundle = _bundle(TiedLM(layers=1), [torch.randint(0, 256, (4, 6), generator=g) for _ in range(2)])
    model, _ = fp32_model(bundle)
    c = CollectWeightsPass(scope="all")
    c(model)
    name = next(n for n in c.weights if set(c.weights[n].consumers) == {"Gather", "MatMul"})
    assert c.weights[name].chained
    post = FitLaplacePosterior(bundle, LaplaceOptions())({name: c.weights[name]})[name]
    assert "embedding" in post.info["posterior"] and "linear" in post.info["posterior"], post.info["posterior"]
    # the two uses, fitted on their own, add up to the tied posterior's data precision
    program = traced_program(bundle)
    data = CalibrationData([{k: torch.from_numpy(v) for k, v in b.items()} for b in bundle.calibration],
                           bundle.input_names, "categorical")
    layers = fit_laplace(program, data, LaplaceOptions(), ops=weight_ops(program))
    table = torch.from_numpy(c.weights[name].array)
    uses = [p for p in layers.values() if p.weight.shape == table.shape and torch.equal(p.weight, table)]
    assert len(uses) == 2 and all(float(p.fisher_diag.sum()) > 0 for p in uses)
    total = sum(p.n_data * p.fisher_diag for p in uses)
    np.testing.assert_allclose((post.precision - post.prior_precision).numpy(), total.numpy(), rtol=1e-4, atol=1e-6)


# ---- Laplace on ConvTranspose / Conv1d / Conv3d / Einsum / GRU (traced) ---------------------------------------------

class _Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv1d(4, 16, 3, padding=1)
        self.up = torch.nn.ConvTranspose1d(16, 32, 2, stride=2)
        self.gru = torch.nn.GRU(32, 32, batch_first=True)
        self.w = torch.nn.Parameter(torch.randn(32, 48) / 6)

    def forward(self, x):                                   # [b, 4, t]
        h = torch.relu(self.up(torch.relu(self.c1(x))))      # [b, 32, 2t]
        y, _ = self.gru(h.transpose(1, 2))
        return torch.einsum("btc,cd->bd", y, self.w)


class _Video(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c = torch.nn.Conv3d(3, 16, 3, padding=1)
        self.up = torch.nn.ConvTranspose3d(16, 8, 2, stride=2, groups=2)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.up(torch.relu(self.c(x)))).mean((2, 3, 4)))


@pytest.mark.parametrize("factory,shape,likelihood", [(_Mixed, (4, 4, 6), "gaussian"), (_Video, (2, 3, 4, 4, 4), "gaussian")])
def test_every_weight_gets_a_measured_posterior_both_paths(factory, shape, likelihood):
    from bayesq_onnx.export import fp32_model
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    bundle = _bundle(factory(), [torch.randn(*shape, generator=g) for _ in range(2)], likelihood)
    model, _ = fp32_model(bundle)
    c = CollectWeightsPass(scope="all")
    c(model)
    assert not c.skipped, c.skipped
    laplace = FitLaplacePosterior(bundle, LaplaceOptions())
    posts = laplace(c.weights)
    assert not laplace.unbound and set(posts) == set(c.weights)
    for n, p in posts.items():
        assert p.info["posterior"].startswith("Laplace") and p.fisher_mass > 0, (n, p.info["posterior"])
    gru = [n for n in posts if "gru" in n]
    assert all("whole-model autograd" in posts[n].info["posterior"] for n in gru)
    # the layer-wise path (an ONNX input) measures every weight too, Conv1d/Conv3d/ConvTranspose included
    proto = ir.serde.serialize_model(model)
    for curvature in ("kfac", "diag"):
        lw = FitLayerPosterior(proto, bundle.calibration, curvature=curvature)(c.weights)
        for n, p in lw.items():
            assert "layer-wise" in p.info["posterior"] and p.fisher_mass > 0, (n, p.info["posterior"])


def test_layerwise_conv_transpose_matches_its_equivalent_conv():
    """A ConvTranspose's layer-wise diag precision equals the direct Conv's on the equivalent input (the
    upsampled, padded input with the kernel flipped): same patches, same output variance."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 6, 3)).astype(np.float32)               # [I, O, k]
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    t = _model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2], pads=[1, 0])], [("x", [3, 4, 5])], "y", {"w": w})
    up = np.zeros((3, 4, 9), np.float32)
    up[:, :, ::2] = x
    up = np.pad(up, ((0, 0), (0, 0), (1, 2)))                           # d(k−1) − pads: 1 before, 2 after
    wc = np.ascontiguousarray(w.transpose(1, 0, 2)[:, :, ::-1])         # [O, I, k] flipped
    d = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [("x", list(up.shape))], "y", {"w": wc})
    np.testing.assert_allclose(run(t, {"x": x}), run(d, {"x": up}), rtol=1e-5, atol=1e-5)
    pt = FitLayerPosterior(t, [{"x": x}], curvature="diag")(_collect(t).weights)["w"]
    pd = FitLayerPosterior(d, [{"x": up}], curvature="diag")(_collect(d).weights)["w"]
    lt = _collect(t).weights["w"].layout.from_canonical(pt.precision - pt.prior_precision)   # [I, O, k]
    ld = _collect(d).weights["w"].layout.from_canonical(pd.precision - pd.prior_precision)   # [O, I, k]
    np.testing.assert_allclose(lt.numpy(), ld.permute(1, 0, 2).flip(2).numpy(), rtol=1e-4)


# ---- --risk mc ----------------------------------------------------------------------------------------------------

def test_mc_risk_never_reaches_the_knapsack_as_nan():
    from bayesq_onnx.planning.bayesq import PlanBayesQ
    from bayesq_onnx.weights import WeightInfo, WeightPosterior
    rng = np.random.default_rng(0)
    w = WeightInfo("w", WeightLayout((16, 32), (0, 1)), rng.standard_normal((16, 32)).astype(np.float32), ("Gemm",))
    post = WeightPosterior("w", None, torch.ones(16, 32), 1.0, 1.0, info={"posterior": "Laplace (test)"})
    cands = [Candidate("uniform", 2, 0), Candidate("uniform", 4, 0), Candidate("uniform", 8, 0)]
    planner = PlanBayesQ(4.5, {"w": post}, {"w": cands}, mc_risk=lambda *a: float("nan"))
    plan = planner({"w": w})
    rows = plan.settings["risk_table"]["w"]
    assert all(math.isfinite(r["risk"]) and r["risk"] == r["risk_closed"] and "closed" in r["risk_source"] for r in rows)
    assert "closed" in plan.tensors["w"].info["risk_source"]
    closed = PlanBayesQ(4.5, {"w": post}, {"w": cands})({"w": w})
    assert plan.tensors["w"].candidate == closed.tensors["w"].candidate  # the closed-form risks chose
    planner.table["w"][0]["risk"] = float("nan")
    with pytest.raises(PassFailure, match="non-finite risk"):
        planner.plan_at(4.5, {"w": w})
