"""Quantizer design and error-feedback rounding: each step must lower the objective it claims to."""

from __future__ import annotations

import pytest
import torch

from bayesq_onnx.quant import design, feedback, uniform


def _problem(seed=0, rows=16, cols=64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[:, :3] *= 6  # a few outlier columns, as real layers have
    lam = torch.rand(rows, cols, generator=g) ** 4 * 100 + 0.1  # heavy-tailed importance
    return w, lam


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [0, 16])
def test_clipping_search_never_loses_to_minmax(bits, group):
    w, lam = _problem()
    grid, d = design.fit_uniform(w, lam, bits, group, temperature=0.0)
    s, z = uniform.minmax_params(w, bits, group, symmetric=False, scale_dtype=torch.float16)
    codes = uniform.quantize(w, s, z, bits, group, symmetric=False)
    err = uniform.grouped((uniform.dequantize(codes, s, z, group, torch.float16) - w) ** 2 * lam, group).sum(-1)
    assert torch.all(d <= err * (1 + 1e-5) + 1e-9)
    # the reported objective is what the grid really achieves (point design)
    _, values = grid.quantize(w, slice(0, 16), slice(0, 64))
    torch.testing.assert_close(uniform.grouped((values - w) ** 2 * lam, group).sum(-1), d, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weighted_lloyd_beats_its_start_and_uniform(bits):
    w, lam = _problem(1)
    grid, d = design.fit_codebook(w, lam, bits, 1, temperature=0.0)
    ugrid, ud = design.fit_uniform(w, lam, bits, 0, temperature=0.0)
    assert float(d.sum()) < float(ud.sum())  # a free codebook beats the best uniform grid (no zero constraint)
    codes, values = grid.quantize(w, slice(0, 16), slice(0, 64))
    torch.testing.assert_close(((values - w) ** 2 * lam).sum(1), d, rtol=1e-4, atol=1e-7)
    assert grid.levels.dtype == torch.float32 and torch.equal(grid.levels, grid.levels.half().float())


def test_soft_design_uses_the_posterior():
    """With broad posteriors the expected distortion exceeds the point distortion and is what it reports."""
    w, lam = _problem(2)
    _, d0 = design.fit_uniform(w, lam, 3, 0, temperature=0.0)
    _, d1 = design.fit_uniform(w, lam, 3, 0, temperature=1.0)
    assert torch.all(d1 > d0)


def test_gptq_lowers_the_hessian_weighted_error():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    h = x.T @ x / 512
    w = torch.randn(32, 64, generator=g) * 0.1
    grid, _ = design.fit_uniform(w, torch.ones_like(w), 3, 0, temperature=0.0)
    _, near = grid.quantize(w, slice(0, 32), slice(0, 64))
    codes, fed = feedback.gptq_round(w, h, grid, damp=0.0)
    loss = lambda v: float(torch.einsum("ri,ij,rj->", v - w, h, v - w))  # noqa: E731
    assert loss(fed) < 0.85 * loss(near)
    # the codes are on the grid and decode to the returned values
    torch.testing.assert_close(uniform.dequantize(codes, grid.scale, grid.zero, 0, torch.float16), fed)


def test_gptq_act_order_and_groups_decode_consistently():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 32, generator=g)
    h = x.T @ x
    w = torch.randn(8, 32, generator=g)
    grid, _ = design.fit_uniform(w, torch.ones_like(w), 4, 8, temperature=0.0)
    codes, values = feedback.gptq_round(w, h, grid, act_order=True, block=8)
    dq = uniform.dequantize(codes, grid.scale, grid.zero, 8, torch.float16)
    torch.testing.assert_close(dq, values)


def test_lowrank_feedback_lowers_the_lowrank_metric():
    g = torch.Generator().manual_seed(5)
    rows, cols, k = 16, 32, 4
    w = torch.randn(rows, cols, generator=g) * 0.1
    u = torch.randn(rows * cols, k, generator=g) * 3
    d = torch.rand(rows, cols, generator=g) + 0.1
    grid, _ = design.fit_uniform(w, d, 3, 0, temperature=0.0)
    _, near = grid.quantize(w, slice(0, rows), slice(0, cols))
    _, fed = feedback.lowrank_round(w, d, u, grid, blocks=8)
    loss = lambda v: float((d * (v - w) ** 2).sum() + (((v - w).reshape(-1) @ u) ** 2).sum())  # noqa: E731
    assert loss(fed) < 0.8 * loss(near)
