"""The GPTQ baseline: the rounding equals the textbook OBQ/GPTQ recursion, beats nearest rounding in its own
metric, and fractional budgets mix two widths within the budget (knapsack and graph-order fill)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx_ir as ir
import pytest
import torch

from bayesq_onnx.analysis.fit_layer_posterior import FitLayerPosterior
from bayesq_onnx.bayes.empirical_bayes import shrink_to_diagonal
from bayesq_onnx.config import CompileConfig
from bayesq_onnx.errors import UserError
from bayesq_onnx.passes.collect_weights import CollectWeightsPass
from bayesq_onnx.pipeline import compile_model
from bayesq_onnx.planning.gptq import PlanGPTQ, mix_widths
from bayesq_onnx.quant import uniform
from bayesq_onnx.quant.design import UniformGrid
from bayesq_onnx.quant.feedback import gptq_round
from tiny_models import conv_model, linear_model
from tiny_torch import tiny_bundle


def _textbook_gptq(w: torch.Tensor, h: torch.Tensor, grid: UniformGrid, damp: float) -> torch.Tensor:
    """Column-by-column OBQ update with an explicit inverse Hessian (no Cholesky, no blocks): after quantizing
    column j, W[:, j+1:] −= (w_j − q_j)/Hinv_jj · Hinv[j, j+1:] and Hinv drops column j by a Schur step."""
    w = w.double().clone()
    h = h.double() + damp * torch.mean(torch.diag(h.double())) * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    cols = w.shape[1]
    codes = torch.zeros(w.shape, dtype=torch.int16)
    for j in range(cols):
        c, v = grid.quantize(w[:, j:j + 1].float(), slice(0, w.shape[0]), slice(j, j + 1))
        codes[:, j] = c[:, 0]
        err = (w[:, j] - v[:, 0].double()) / hinv[j, j]
        w[:, j + 1:] -= err[:, None] * hinv[j, j + 1:][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return codes


def _grid(w2, bits, group=0):
    scale, zero = uniform.minmax_params(w2, bits, group, symmetric=False, scale_dtype=torch.float16)
    return UniformGrid(scale, zero, bits, group, False)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_round_is_the_textbook_recursion(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(400, 24, generator=g) @ torch.randn(24, 24, generator=g)  # correlated inputs
    h = x.T @ x / 400
    w = torch.randn(10, 24, generator=g) * 0.1
    grid = _grid(w, bits)
    codes, _ = gptq_round(w, h, grid, block=8, damp=0.01)
    want = _textbook_gptq(w, h, grid, damp=0.01)
    assert (codes != want).float().mean() < 0.01  # equal up to float ties


def _weights_and_posteriors(proto, batches):
    model = ir.serde.deserialize_model(proto)
    collect = CollectWeightsPass(min_size=1)
    collect(model)
    posts = FitLayerPosterior(proto, batches, n_data=1.0, prior_precision=1.0)(collect.weights)
    return collect.weights, posts


@pytest.fixture(scope="module")
def linear_case():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(64, 64)).astype(np.float32)
    batches = [{"x": (rng.normal(size=(32, 64)).astype(np.float32) @ mix)} for _ in range(4)]
    return _weights_and_posteriors(linear_model(), batches)


def test_gptq_beats_nearest_in_its_own_metric(linear_case):
    weights, posts = linear_case
    plan = PlanGPTQ(3, posts)(weights)
    for name, qt in plan.tensors.items():
        w2 = torch.from_numpy(weights[name].layout.to_canonical(weights[name].array).copy())
        h = posts[name].A.double()
        nearest = _grid(w2, 3).quantize(w2, slice(0, w2.shape[0]), slice(0, w2.shape[1]))[1]
        err_near = float((((nearest - w2).double() @ h) * (nearest - w2).double()).sum())
        assert qt.info["rounding"] == "gptq" and qt.info["gptq_error"] < 0.8 * err_near


def test_gptq_takes_the_measured_moment_where_the_posterior_shrank_it(linear_case):
    """A posterior whose A was pulled toward its diagonal (a rank-deficient layer) gives GPTQ the same H, and
    so the same codes and error, as the measured A: the baseline stays as published."""
    weights, posts = linear_case
    shrunk = {}
    for name, post in posts.items():
        a, _ = shrink_to_diagonal(post.A, post.A.shape[0] // 2)
        shrunk[name] = dataclasses.replace(post, A=a, info={**post.info, "input_shrinkage": 0.5})
    assert not torch.allclose(shrunk["w1"].A, posts["w1"].A)
    plain, pulled = PlanGPTQ(3, posts)(weights), PlanGPTQ(3, shrunk)(weights)
    for name, qt in plain.tensors.items():
        np.testing.assert_array_equal(pulled.tensors[name].codes, qt.codes)
        assert pulled.tensors[name].info["gptq_error"] == pytest.approx(qt.info["gptq_error"], rel=1e-5)


@pytest.mark.parametrize("mix", ["knapsack", "proportional"])
def test_fractional_budget_mixes_two_widths(linear_case, mix):
    weights, posts = linear_case
    # all 3-bit is 3.42 bits all-in here; w2 (a third of the weights) at 4 bits makes 3.75
    plan = PlanGPTQ(3.8, posts, mix=mix, order=["w1", "w2"])(weights)
    assert plan.all_in_bits <= 3.8 and sorted({t.candidate.bits for t in plan.tensors.values()}) == [3, 4]
    assert plan.settings["mix"] == mix and plan.settings["widths"] == [3, 4]


def test_knapsack_mix_has_no_more_error_than_graph_order(linear_case):
    weights, posts = linear_case
    errors = {}
    for mix in ("knapsack", "proportional"):
        plan = PlanGPTQ(3.8, posts, mix=mix, order=["w2", "w1"])(weights)
        errors[mix] = sum(t.info["gptq_error"] for t in plan.tensors.values())
    assert errors["knapsack"] <= errors["proportional"] + 1e-12


def test_widths_and_budget_errors():
    assert mix_widths(3) == (3,) and mix_widths(3.5) == (3, 4) and mix_widths(7.0) == (6, 8)
    with pytest.raises(UserError, match="outside GPTQ's code widths"):
        mix_widths(1.5)


def test_conv_weights_use_their_patch_hessian():
    rng = np.random.default_rng(1)
    batches = [{"x": rng.normal(size=(4, 64, 8, 8)).astype(np.float32)} for _ in range(2)]
    weights, posts = _weights_and_posteriors(conv_model(), batches)
    plan = PlanGPTQ(4, posts, group_size=32, act_order=True)(weights)
    assert plan.tensors["w"].info["rounding"] == "gptq" and plan.tensors["w"].candidate.group_size == 32


def test_gptq_through_the_pipeline(tmp_path):
    config = CompileConfig(model="tiny", out=tmp_path / "out", method="gptq", bits=3.5, latency_runs=2, memory_loads=1,
                           latency_warmup=1)
    result = compile_model(config, bundle=tiny_bundle())
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["plan"]["method"] == "gptq" and report["bits"]["all_in"] <= 3.5
    assert report["bits"]["all_in"] == pytest.approx(report["bits"]["all_in_from_file"], rel=1e-12)
    assert "collect GPTQ Hessians (E[x xᵀ] of activations)" in report["timings_s"]
    assert result.report["fidelity"]["top1_agreement"] > 0.5
