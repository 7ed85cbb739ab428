"""The analysis follows what the exporter traces: weight ops of a torch.export program, BatchNorm folded on
the traced graph, initializers bound by content (as is, transposed, per-channel scaled), posteriors mapped
through the binding, layer-wise fallback on the Laplace scale, and the verdict's warning line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from bayesq_onnx import traced
from bayesq_onnx.analysis.fit_posterior import OpBinding, _canonical, bind_weight
from bayesq_onnx.bayes.laplace import CalibrationData, LaplaceOptions, LayerPosterior, fit_laplace
from bayesq_onnx.bayes.layerwise import common_scale
from bayesq_onnx.quant.layout import WeightLayout
from bayesq_onnx.report import verdict_advice


class Mixed(torch.nn.Module):
    """Weights reached in ways nn.Module hooks cannot see: a bare parameter in F.linear, a scaled copy, a
    packed attention projection (sequence-first), a depthwise conv + BatchNorm, a transposed conv."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn_dw = torch.nn.BatchNorm2d(8)
        self.up = torch.nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.mha = torch.nn.MultiheadAttention(8, 2)  # batch_first=False: items on axis 1
        self.w = torch.nn.Parameter(torch.randn(6, 8) * 0.3)
        self.v = torch.nn.Parameter(torch.randn(6, 8) * 0.3)
        for bn in (self.bn, self.bn_dw):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)

    def forward(self, x):
        y = torch.relu(self.bn_dw(self.dw(torch.relu(self.bn(self.stem(x))))))
        up = self.up(y).mean((1, 2, 3))
        t = y.flatten(2).permute(2, 0, 1)                     # [L, B, E]
        t, _ = self.mha(t, t, t, need_weights=False)
        h = t.mean(0)
        return F.linear(h, self.w) + F.linear(h, self.v * 0.5) + up[:, None]


def _program(module, batch=4):
    x = torch.randn(batch, 3, 6, 6)
    return traced.export_program(module, (x,), ({0: torch.export.Dim("batch", min=1)},)), x


def test_fold_batchnorm_on_the_traced_graph_keeps_outputs():
    torch.manual_seed(0)
    m = Mixed().eval()
    gm, x = _program(m)
    with torch.no_grad():
        ref = m(x)
    assert traced.fold_batchnorm(gm) == (2, 2)
    assert traced.fold_batchnorm(gm) == (0, 0)  # a second run finds nothing left
    with torch.no_grad():
        assert torch.allclose(gm(x), ref, atol=1e-5)
        assert torch.allclose(gm(x[:1]), ref[:1], atol=1e-5)  # micro-batches of one item run too
    names = {n for n, _ in gm.named_parameters()}
    assert "stem.bias" in names and not any(n.startswith("bn") for n in names)


def test_weight_ops_find_every_weight_and_its_item_axis():
    torch.manual_seed(0)
    gm, _ = _program(Mixed().eval())
    ops = {op.parameter or op.name: op for op in traced.weight_ops(gm)}
    assert ops["stem.weight"].kind == "conv" and ops["dw.weight"].conv.groups == 8
    assert ops["up.weight"].kind == "generic"
    assert ops["mha.in_proj_weight"].kind == "linear" and ops["mha.in_proj_weight"].item_axis == 1
    assert ops["w"].kind == "linear" and ops["w"].item_axis == 0
    scaled = [op for op in ops.values() if op.parameter is None]  # F.linear(h, v * 0.5): a computed weight
    assert len(scaled) == 1 and scaled[0].kind == "linear"


def test_every_weight_op_gets_a_finite_positive_posterior():
    torch.manual_seed(0)
    gm, _ = _program(Mixed().eval())
    traced.fold_batchnorm(gm)
    batches = [{"x": torch.randn(6, 3, 6, 6)} for _ in range(2)]
    for curvature in ("diag", "kfac"):
        posts = fit_laplace(gm, CalibrationData(batches, ["x"]), LaplaceOptions(curvature=curvature, micro_batch=4))
        assert len(posts) == len(traced.weight_ops(gm))
        for p in posts.values():
            assert torch.isfinite(p.precision_diag()).all() and (p.precision_diag() > 0).all()
            assert p.fisher_diag.shape == p.weight.shape and float(p.fisher_diag.sum()) > 0


def test_generic_vjp_equals_autograd_per_item():
    """The transposed conv's per-item Fisher (vector-Jacobian products) equals Σ_i g_i² from autograd."""
    torch.manual_seed(0)

    class Up(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.ConvTranspose2d(3, 2, 2, stride=2)

        def forward(self, x):
            return self.up(x).flatten(1)

    m = Up().eval()
    x = torch.randn(5, 3, 3, 3)
    gm = traced.export_program(m, (x,), ({0: torch.export.Dim("batch", min=1)},))
    post = fit_laplace(gm, CalibrationData([{"x": x}], ["x"], "gaussian", targets=[torch.zeros(5, 72)]),
                       LaplaceOptions(fisher="empirical", output_noise=1.0, prior_precision=1.0, micro_batch=None))
    (p,) = post.values()
    expected = torch.zeros_like(m.up.weight)
    for i in range(5):
        m.zero_grad()
        (0.5 * (m(x[i:i + 1]) ** 2).sum()).backward()
        expected += m.up.weight.grad ** 2
    assert torch.allclose(p.fisher_diag * 5, expected, rtol=1e-4, atol=1e-8)


@given(st.integers(2, 6), st.integers(2, 6), st.booleans(), st.booleans())
def test_bind_weight_finds_transposes_and_channel_scales(rows, cols, transposed, scaled):
    g = torch.Generator().manual_seed(rows * 7 + cols)
    frame = torch.randn(rows, cols, generator=g)
    s = torch.rand(rows, generator=g) + 0.5 if scaled else torch.ones(rows)
    held = (frame * s[:, None]).T if transposed else frame * s[:, None]
    b = bind_weight(held.numpy(), frame, "op")
    assert b is not None
    scale = b.scale if b.scale is not None else torch.ones(rows)
    assert torch.allclose(held.T if b.transposed else held, frame * scale[:, None], rtol=1e-5, atol=1e-6)
    if scaled:
        assert b.scale is not None and torch.allclose(b.scale, s, rtol=1e-5)
    assert bind_weight((held + 0.1 * torch.randn(held.shape, generator=g)).numpy(), frame, "op") is None


def test_a_scaled_binding_maps_precision_to_lambda_over_s_squared():
    fisher = torch.rand(3, 4) + 0.1
    post = LayerPosterior("w", fisher, 2.0, 10.0, weight=torch.randn(3, 4), op="linear")
    s = torch.tensor([0.5, 1.0, 2.0])
    layout = WeightLayout.for_consumer("Gemm", (3, 4), trans_b=True)  # held as [out, in]
    plain = _canonical("w", [(post, OpBinding("linear", False))], layout)
    scaled = _canonical("w", [(post, OpBinding("linear", False, s))], layout)
    assert torch.allclose(scaled.precision, plain.precision / s[:, None] ** 2)
    tied = _canonical("w", [(post, OpBinding("linear", False)), (post, OpBinding("linear", False))], layout)
    assert torch.allclose(tied.precision - 2.0, 2 * (plain.precision - 2.0))  # data precisions add, τ once


@given(st.lists(st.floats(0.01, 100.0), min_size=1, max_size=9))
def test_common_scale_is_the_median_ratio(ratios):
    pairs = [(torch.full((4,), r * 3.0), torch.full((4,), 3.0)) for r in ratios]
    assert common_scale(pairs) == pytest.approx(float(torch.tensor(ratios, dtype=torch.float64).median()), rel=1e-6)
    assert common_scale([]) == 1.0


def test_verdict_advice_is_one_line_with_its_figures():
    import numpy as np

    from bayesq_onnx.models.metrics import output_fidelity
    from bayesq_onnx.verdict import derangement, judge, measure_for

    r = np.random.default_rng(0).normal(size=(32, 8))
    verdict = judge(measure_for(output_fidelity, "cosine_mean", categorical=False), r, r[derangement(32, 1)], None)
    w = verdict_advice(verdict, 4.0)
    assert "\n" not in w and "`max_drop`" in w and "collapsed" in w and "do not deploy" in w
