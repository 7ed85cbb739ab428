"""Rounding with error feedback (quant/feedback.py): the inverse Cholesky factor, and GPTQ's vectorized
lazy-block loop against the straightforward column loop, bit for bit."""

from __future__ import annotations

import pytest
import torch

from bayesq_onnx.quant import design, feedback, uniform


def _spd(n: int, seed: int, cond: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -cond, n, dtype=torch.float64)
    return x.T @ x / (3 * n) + 1e-6 * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("n,cond", [(1, 0.0), (7, 1.0), (200, 3.0), (1100, 2.0)])  # 1100: by halves
def test_inverse_cholesky_upper_is_gptq_factor(n, cond):
    h = _spd(n, n, cond)
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    got = feedback.inverse_cholesky_upper(h)
    assert torch.equal(got, torch.triu(got))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))
    torch.testing.assert_close(got.T @ got, torch.linalg.inv(h), rtol=1e-8, atol=1e-10 * float(torch.linalg.inv(h).abs().max()))


def _reference_gptq(w2, hessian, grid, *, block=128, damp=0.01, act_order=False):
    """The column loop as first written: ``grid.quantize`` on each column, row-major updates."""
    w = w2.float().clone()
    rows, cols = w.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    inv_perm = torch.argsort(perm)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = feedback.inverse_cholesky_upper(h).float()
    codes = torch.zeros(rows, cols, dtype=torch.int16)
    values = torch.zeros(rows, cols)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        wb = w[:, i1:i2].clone()
        err = torch.zeros_like(wb)
        hb = hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = perm[i1 + j].item()
            c, v = grid.quantize(wb[:, j:j + 1], slice(0, rows), slice(col, col + 1))
            codes[:, i1 + j], values[:, i1 + j] = c[:, 0], v[:, 0]
            e = (wb[:, j] - v[:, 0]) / hb[j, j]
            wb[:, j:] -= e[:, None] * hb[j, j:][None, :]
            err[:, j] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return codes[:, inv_perm], values[:, inv_perm]


class _QuantizeOnly:
    """A grid with only ``quantize`` (no ``columns``): gptq_round must fall back to it."""

    def __init__(self, grid):
        self.grid = grid

    def quantize(self, w, rows, cols):
        return self.grid.quantize(w, rows, cols)


def _gptq_problem(rows=24, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g) @ (torch.eye(cols) + 0.2 * torch.randn(cols, cols, generator=g))
    h = x.T @ x / x.shape[0]
    h[5, :] = h[:, 5] = 0.0  # a dead input
    w = torch.randn(rows, cols, generator=g) * 0.05
    lam = torch.rand(rows, cols, generator=g) + 0.5
    return w, h, lam


@pytest.mark.parametrize("family", ["uniform-row", "uniform-g128", "uniform-sym-g128-s32", "uniform-tensor",
                                    "codebook-row", "codebook-4rows", "codebook-tensor"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_round_matches_the_column_loop_bit_for_bit(family, act_order):
    w, h, lam = _gptq_problem()
    if family == "uniform-row":
        grid, _ = design.fit_uniform(w, lam, 3, 0, temperature=0.0)
    elif family == "uniform-g128":
        grid, _ = design.fit_uniform(w, lam, 4, 128, temperature=0.0)
    elif family == "uniform-sym-g128-s32":
        grid, _ = design.fit_uniform(w, lam, 4, 128, symmetric=True, scale_dtype=torch.float32, temperature=0.0)
    elif family == "uniform-tensor":
        grid, _ = design.fit_uniform(w, lam, 3, uniform.TENSOR, temperature=0.0)
    elif family == "codebook-row":
        grid, _ = design.fit_codebook(w, lam, 3, 1, temperature=0.0)
    elif family == "codebook-tensor":
        grid, _ = design.fit_codebook(w, lam, 3, w.shape[0], temperature=0.0)
    else:
        grid, _ = design.fit_codebook(w, lam, 2, 4, temperature=0.0)
    want = _reference_gptq(w, h, grid, block=64, act_order=act_order)
    for g in (grid, _QuantizeOnly(grid)):
        codes, values = feedback.gptq_round(w, h, g, block=64, act_order=act_order)
        assert codes.dtype == torch.int16
        assert torch.equal(codes, want[0]) and torch.equal(values, want[1])


def test_codebook_columns_break_ties_like_searchsorted():
    levels = torch.tensor([[-1.0, 0.0, 0.5, 0.5, 2.0], [-2.0, -1.0, 0.0, 1.0, 3.0]])
    grid = design.CodebookGrid(levels, 1)
    mids = (levels[:, 1:] + levels[:, :-1]) / 2
    w = torch.cat([mids, levels, torch.tensor([[-9.0, 9.0], [-9.0, 9.0]])], dim=1)  # exact ties included
    want_c, want_v = grid.quantize(w, slice(0, 2), slice(0, w.shape[1]))
    cols = grid.columns(torch.arange(w.shape[1]))
    for j in range(w.shape[1]):
        c, v = cols.quantize(j, w[:, j].contiguous())
        assert torch.equal(c, want_c[:, j].long()) and torch.equal(v, want_v[:, j])


def test_threads_are_restored_after_the_column_loop():
    n = torch.get_num_threads()
    w, h, lam = _gptq_problem(rows=4, cols=16)
    grid, _ = design.fit_uniform(w, lam, 3, 0, temperature=0.0)
    feedback.gptq_round(w, h, grid, block=8)
    assert torch.get_num_threads() == n
