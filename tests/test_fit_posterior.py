"""FitLaplacePosterior and PlanBayesQFixed on the tiny PyTorch model: layouts, curvatures, plans."""

from __future__ import annotations

import pytest
import torch

from bayesq_onnx.analysis.fit_posterior import FitLaplacePosterior
from bayesq_onnx.bayes.laplace import LaplaceOptions
from bayesq_onnx.plan import Candidate
from bayesq_onnx.planning.bayesq_fixed import PlanBayesQFixed
from bayesq_onnx.planning.rtn import PlanRoundToNearest
from bayesq_onnx.planning.tensor_design import whitened_error
from bayesq_onnx.weights import canonical_mu


@pytest.fixture(scope="module")
def analysed(tiny_exported):
    bundle, bindings, weights = tiny_exported
    # N large: the data term dominates the prior, as for a pretrained model's posterior
    posts = {c: FitLaplacePosterior(bundle, LaplaceOptions(curvature=c, n_data=1e6))(weights)
             for c in ("diag", "kfac", "lowrank")}
    return bundle, bindings, weights, posts


def test_posteriors_are_canonical(analysed):
    bundle, bindings, weights, posts = analysed
    for curvature, post in posts.items():
        for name, w in weights.items():
            p = post[name]
            assert p.precision.shape == (w.layout.rows, w.layout.cols)
            assert torch.all(p.precision >= p.prior_precision * (1 - 1e-6))
            assert p.fisher_mass > 0
    # MatMul weight proj (ONNX holds Wᵀ): canonical rows are the torch Linear's rows
    diag = posts["diag"]["proj.weight"]
    assert diag.parameter == "proj.weight" and bindings["proj.weight"].transposed
    # Conv: canonical columns are (tap, in-channel); the K-FAC input factor follows that order
    conv = posts["kfac"]["conv.weight"]
    assert conv.A.shape == (96, 96) and conv.G_diag.shape == (32,)
    assert posts["lowrank"]["proj.weight"].U.shape == (32 * 32, 8)


def test_kfac_column_order_for_conv(analysed):
    """A's diagonal is the input second moment per (tap, channel): with padding=1 the first and last
    taps see one zero per sequence end, so taps differ only at the borders — check the exact values."""
    bundle, _, _, posts = analysed
    conv = posts["kfac"]["conv.weight"]
    with torch.no_grad():
        xs = [bundle.module.proj(bundle.module.emb(torch.from_numpy(b["ids"]))).relu().transpose(1, 2)
              for b in bundle.calibration]
    x = torch.cat(xs)                                          # [B, C=32, L]
    padded = torch.nn.functional.pad(x, (1, 1))
    taps = [padded[:, :, k:k + x.shape[2]] for k in range(3)]  # tap k sees x[t + k - 1]
    want = torch.cat([(t ** 2).sum((0, 2)) for t in taps]) / (x.shape[0] * x.shape[2])
    torch.testing.assert_close(torch.diag(conv.A), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("curvature", ["diag", "kfac", "lowrank"])
@pytest.mark.parametrize("cand", [Candidate("uniform", 3), Candidate("uniform", 4, 16), Candidate("codebook", 2, 1)],
                         ids=lambda c: c.label)
def test_bayes_plan_beats_rtn_in_its_own_metric(analysed, curvature, cand):
    _, _, weights, posts = analysed
    post = posts[curvature]
    plan = PlanBayesQFixed(cand, post, curvature=curvature)(weights)
    for name, qt in plan.tensors.items():
        assert qt.info["whitened_error"] > 0
        mu = canonical_mu(weights[name])
        got = torch.from_numpy(weights[name].layout.to_canonical(qt.dequantize()))
        assert whitened_error(got - mu, post[name]) == pytest.approx(qt.info["whitened_error"], rel=1e-4)
    if cand.family == "uniform":
        rtn = PlanRoundToNearest(cand.bits, cand.group_size)(weights)
        ours = sum(t.info["whitened_error"] for t in plan.tensors.values())
        theirs = 0.0
        for name, qt in rtn.tensors.items():
            mu = canonical_mu(weights[name])
            got = torch.from_numpy(weights[name].layout.to_canonical(qt.dequantize()))
            theirs += whitened_error(got - mu, post[name])
        assert ours <= theirs * (1 + 1e-9)  # the clipping search includes RTN's own range
        if curvature != "diag":
            assert ours < 0.95 * theirs       # error feedback in the posterior metric must pay off
        assert plan.all_in_bits == pytest.approx(rtn.all_in_bits)  # same candidate, same storage
