"""The fast paths give the results of the straightforward code they replace (bit for bit where the
arithmetic is the same, to float round-off where only the summation order changed)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from bayesq_onnx.bayes import laplace, op_gradients
from helpers import fit_parameters
from bayesq_onnx.traced import ConvSpec
from bayesq_onnx.quant import design, feedback, uniform
from bayesq_onnx.runtime.latency import compare_latency


# --------------------------------------------------------------------------------------------------- GPTQ
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


# ------------------------------------------------------------------------------------------ uniform design
def _reference_grid_distortion(g_w, g_lam, scale, zero, k, scale_dtype):
    q = (torch.round(g_w / scale[..., None]) + zero[..., None]).clamp_(k[0], k[-1])
    err = ((q - zero[..., None]) * scale[..., None]).to(scale_dtype).float() - g_w
    return (g_lam * err * err).sum(-1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric,scale_dtype", [(False, torch.float16), (True, torch.float32), (False, torch.float32)])
def test_point_grid_distortion_is_bit_identical(bits, symmetric, scale_dtype):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(32, 256, generator=g) * 0.05
    w[:, :2] *= 8
    lam = torch.rand(32, 256, generator=g) ** 4 * 100 + 0.1
    lo, hi = uniform.code_range(bits, symmetric)
    k = torch.arange(lo, hi + 1, dtype=torch.float32)
    for group in (0, 64):
        g_w, g_lam = uniform.grouped(w, group), uniform.grouped(lam, group)
        for ratio in design.CLIP_RATIOS:
            s, z = uniform.minmax_params(w * ratio, bits, group, symmetric=symmetric, scale_dtype=scale_dtype)
            want = _reference_grid_distortion(g_w, g_lam, s, z, k, scale_dtype)
            assert torch.equal(design._grid_distortion(g_w, g_lam, None, s, z, k, scale_dtype), want)


def _reference_fit_uniform(w2, lam, bits, group_size, symmetric, scale_dtype):
    """The point-design clipping search as first written: one whole-tensor pass per ratio."""
    g_w, g_lam = uniform.grouped(w2.float(), group_size), uniform.grouped(lam.float(), group_size)
    lo, hi = uniform.code_range(bits, symmetric)
    k = torch.arange(lo, hi + 1, dtype=torch.float32)
    top, bottom = (g_w.abs().amax(-1), None) if symmetric else (g_w.amax(-1).clamp(min=0.0), g_w.amin(-1).clamp(max=0.0))
    best_d, best_s, best_z = torch.full(g_w.shape[:2], float("inf")), torch.ones(g_w.shape[:2]), torch.zeros(g_w.shape[:2])
    for ratio in design.CLIP_RATIOS:
        if symmetric:
            scale = uniform.round_scale(ratio * top / max(hi, 1), scale_dtype)
            zero = torch.zeros_like(scale)
        else:
            scale = uniform.round_scale(ratio * (top - bottom) / (hi - lo), scale_dtype)
            zero = torch.round(-ratio * bottom / scale).clamp(lo, hi)
        d = _reference_grid_distortion(g_w, g_lam, scale, zero, k, scale_dtype)
        better = d < best_d
        best_d, best_s, best_z = torch.where(better, d, best_d), torch.where(better, scale, best_s), torch.where(better, zero, best_z)
    return best_s, best_z, best_d


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [0, 128])
@pytest.mark.parametrize("symmetric,scale_dtype", [(False, torch.float16), (True, torch.float32)])
def test_fit_uniform_in_row_blocks_is_bit_identical(bits, group, symmetric, scale_dtype, monkeypatch):
    g = torch.Generator().manual_seed(bits + group)
    w = torch.randn(37, 512, generator=g) * 0.05
    w[:, :2] *= 8
    lam = torch.rand(37, 512, generator=g) ** 4 * 100 + 0.1
    want = _reference_fit_uniform(w, lam, bits, group, symmetric, scale_dtype)
    for chunk in (1, 3000, 2**18):  # one row per block, a ragged last block, everything at once
        monkeypatch.setattr(design, "_POINT_CHUNK", chunk)
        grid, d = design.fit_uniform(w, lam, bits, group, symmetric=symmetric, scale_dtype=scale_dtype,
                                     temperature=0.0)
        assert torch.equal(grid.scale, want[0]) and torch.equal(grid.zero, want[1]) and torch.equal(d, want[2])


# ----------------------------------------------------------------------------------------- codebook design
def _reference_hard_lloyd(w2, lam, bits, rows_per_table, iters=25):
    """The point-design weighted Lloyd as first written: float32 scatter-adds over unsorted weights."""
    from bayesq_onnx.bayes import gaussian

    rows, cols = w2.shape
    t = rows // rows_per_table
    x = w2.float().reshape(t, rows_per_table * cols)
    lw = lam.float().reshape(t, -1).clamp_min(1e-30)
    mean = (lw * x).sum(1, keepdim=True) / lw.sum(1, keepdim=True)
    spread = torch.sqrt((lw * (x - mean) ** 2).sum(1, keepdim=True) / lw.sum(1, keepdim=True)).clamp_min(1e-12)
    unit, _ = gaussian.lloyd_max(bits)
    levels = mean + spread * torch.tensor(unit, dtype=torch.float32)
    for _ in range(iters):
        codes = design._nearest(x, levels)
        num = torch.zeros_like(levels).scatter_add_(1, codes, lw * x)
        den = torch.zeros_like(levels).scatter_add_(1, codes, lw)
        new, _ = torch.sort(torch.where(den > 0, num / den.clamp_min(1e-30), levels), dim=1)
        done = bool(((new - levels).abs() <= 1e-3 * spread).all())
        levels = new
        if done:
            break
    levels, _ = torch.sort(levels.to(torch.float16).float(), dim=1)
    err = x - torch.gather(levels, 1, design._nearest(x, levels))
    return levels, (lw * err * err).sum(1)


def _fp16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in float16 steps between float16-representable values."""
    ia = torch.from_numpy(a.half().numpy().view(np.int16).astype(np.int32))
    ib = torch.from_numpy(b.half().numpy().view(np.int16).astype(np.int32))
    # map the sign-magnitude bit patterns onto a monotone integer line
    ia = torch.where(ia < 0, -(ia & 0x7FFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFF), ib)
    return (ia - ib).abs()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows_per_table", [1, 4])
def test_sorted_prefix_lloyd_matches_scatter_lloyd(bits, rows_per_table):
    g = torch.Generator().manual_seed(10 * bits + rows_per_table)
    w = torch.randn(64, 384, generator=g) * 0.05
    w[:, :3] *= 6
    lam = torch.rand(64, 384, generator=g) ** 4 * 100 + 0.1
    want_levels, want_d = _reference_hard_lloyd(w, lam, bits, rows_per_table)
    grid, d = design.fit_codebook(w, lam, bits, rows_per_table, temperature=0.0)
    ulps = _fp16_ulps(grid.levels, want_levels)
    # float64 prefix sums vs float32 scatter-adds: the float16 levels agree to an ulp, except where round-off
    # flips the Lloyd path (a stopping test or a weight on a cell bound) — then to the Lloyd tolerance
    assert float((ulps > 1).float().mean()) <= 0.01
    torch.testing.assert_close(d, want_d, rtol=1e-3, atol=0.0)
    torch.testing.assert_close(d.sum(), want_d.sum(), rtol=1e-5, atol=0.0)
    # the reported objective is what the grid achieves
    _, values = grid.quantize(w, slice(0, 64), slice(0, 384))
    got = ((values - w) ** 2 * lam).reshape(d.shape[0], -1).sum(1)
    torch.testing.assert_close(d, got, rtol=1e-4, atol=1e-9)


def test_codebook_sort_cache_is_keyed_on_the_tensor_and_its_version():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 96, generator=g)
    lam = torch.rand(16, 96, generator=g) + 0.1

    def fresh(x, bits, rpt):
        design._SortedTables._cache.clear()
        return design.fit_codebook(x.clone(), lam, bits, rpt, temperature=0.0)

    for bits in (2, 3, 4):  # one sort shared by the bit widths
        grid, d = design.fit_codebook(w, lam, bits, 1, temperature=0.0)
        want, want_d = fresh(w, bits, 1)
        assert torch.equal(grid.levels, want.levels) and torch.equal(d, want_d)
    grid, _ = design.fit_codebook(w, lam, 3, 4, temperature=0.0)  # other tables: another sort
    assert torch.equal(grid.levels, fresh(w, 3, 4)[0].levels)
    w.mul_(-2.0)  # in-place change: the cached sort is stale
    grid, _ = design.fit_codebook(w, lam, 3, 1, temperature=0.0)
    assert torch.equal(grid.levels, fresh(w, 3, 1)[0].levels)


# ------------------------------------------------------------------------------------------- Laplace fit
class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c2 = torch.nn.Conv2d(8, 12, 1, stride=2)
        self.fc = torch.nn.Linear(12, 5)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(torch.relu(self.dw(h))))
        return self.fc(h.mean((2, 3)))


_PARAMS = ["c1.weight", "dw.weight", "c2.weight", "fc.weight"]


@pytest.fixture(scope="module")
def conv_data():
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(7, 3, 9, 9, generator=g)} for _ in range(2)]
    labels = [torch.randint(0, 5, (7,), generator=g) for _ in range(2)]
    return _ConvNet(), batches, labels


def _assert_same_posterior(a, b, rtol):
    for p in a:
        for attr in ("fisher_diag", "A", "G"):
            x, y = getattr(a[p], attr), getattr(b[p], attr)
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(y, x, rtol=rtol, atol=rtol * float(x.abs().max()))
        if a[p].U is not None:  # directions up to sign: compare U Uᵀ
            torch.testing.assert_close(b[p].U @ b[p].U.T, a[p].U @ a[p].U.T, rtol=rtol,
                                       atol=rtol * float((a[p].U @ a[p].U.T).abs().max()))
        assert b[p].prior_precision == pytest.approx(a[p].prior_precision, rel=rtol)


@pytest.mark.parametrize("likelihood,fisher", [("categorical", "true"), ("categorical", "empirical"),
                                               ("gaussian", "true")])
@pytest.mark.parametrize("curvature,samples", [("diag", 1), ("kfac", 2), ("lowrank", 2)])
def test_micro_batches_give_the_whole_batch_posterior(conv_data, likelihood, fisher, curvature, samples):
    """Same random targets (drawn per whole batch, in the unsplit order), so only round-off differs."""
    model, batches, labels = conv_data
    kw = dict(input_names=["x"], likelihood=likelihood, fisher=fisher, curvature=curvature, samples=samples,
              rank=3, seed=7, targets=labels if fisher == "empirical" else None)
    whole = fit_parameters(model, batches, _PARAMS, micro_batch=None, **kw)
    for micro in (1, 3, 7):
        _assert_same_posterior(whole, fit_parameters(model, batches, _PARAMS, micro_batch=micro, **kw), rtol=1e-4)


def test_categorical_targets_are_torch_multinomial_draws():
    """The micro-batch sampler ``argmax(p / q)``, ``q ~ Exp(1)`` drawn for the whole batch, is what
    ``torch.multinomial(p, 1)`` computes: the targets equal those of a whole-batch multinomial draw."""
    for seed in range(5):
        logits = torch.randn(12, 7, generator=torch.Generator().manual_seed(100 + seed)) * 3
        want = torch.multinomial(torch.softmax(logits, -1), 1, generator=torch.Generator().manual_seed(seed))[:, 0]
        draws = laplace._BatchDraws(torch.Generator().manual_seed(seed), 12)
        for rows in (slice(0, 5), slice(5, 12)):
            x = logits[rows].clone().requires_grad_()
            laplace._pseudo_loss(x, "categorical", "true", None, draws, 0, rows).backward()
            # the cross-entropy gradient is softmax − onehot(y): recover y from it
            y = (torch.softmax(logits[rows], -1) - x.grad).argmax(-1)
            assert torch.equal(y, want[rows])


def test_grouped_conv_gets_the_exact_diagonal_under_kfac(conv_data):
    model, batches, _ = conv_data
    kw = dict(input_names=["x"], likelihood="categorical", seed=2)
    kfac = fit_parameters(model, batches, _PARAMS, curvature="kfac", **kw)
    diag = fit_parameters(model, batches, _PARAMS, curvature="diag", **kw)
    dw = kfac["dw.weight"]
    assert dw.A is None and dw.G is None and dw.info["curvature"] == "diag"
    assert float(dw.fisher_diag.sum()) > 0
    torch.testing.assert_close(dw.fisher_diag, diag["dw.weight"].fisher_diag, rtol=1e-5, atol=1e-12)
    assert kfac["c1.weight"].A is not None and kfac["c1.weight"].info["curvature"] == "kfac"


def test_kfac_factors_are_symmetric_second_moments(conv_data):
    model, batches, _ = conv_data
    post = fit_parameters(model, batches, ["c1.weight"], input_names=["x"], likelihood="categorical",
                       curvature="kfac", kfac_output="full")["c1.weight"]
    x = torch.cat([b["x"] for b in batches])
    patches = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    assert torch.equal(post.A, post.A.T) and torch.equal(post.G, post.G.T)
    torch.testing.assert_close(post.A, patches.T @ patches / patches.shape[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("micro_batch", [None, 2])
def test_diagonal_output_factor_is_the_full_factors_diagonal(conv_data, micro_batch):
    model, batches, _ = conv_data
    kw = dict(input_names=["x"], likelihood="categorical", curvature="kfac", seed=4, micro_batch=micro_batch)
    full = fit_parameters(model, batches, _PARAMS, kfac_output="full", **kw)
    diag = fit_parameters(model, batches, _PARAMS, **kw)
    for p in ("c1.weight", "c2.weight", "fc.weight"):
        assert torch.equal(full[p].A, diag[p].A)
        assert torch.count_nonzero(full[p].G - torch.diag(torch.diag(full[p].G))) > 0
        torch.testing.assert_close(diag[p].G, torch.diag(torch.diag(full[p].G)), rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(diag[p].fisher_diag, full[p].fisher_diag, rtol=1e-5, atol=1e-12)
        assert diag[p].prior_precision == pytest.approx(full[p].prior_precision, rel=1e-5)


class _InPlaceNet(torch.nn.Module):
    """conv → ReLU(inplace) first (Conv+BN folded), or token ids → Linear → ReLU(inplace) first."""

    def __init__(self, tokens: bool):
        super().__init__()
        torch.manual_seed(3)
        self.tokens = tokens
        self.emb = torch.nn.Embedding(13, 6)
        self.first = torch.nn.Linear(6, 8) if tokens else torch.nn.Conv2d(3, 8, 3, padding=1)
        self.act = torch.nn.ReLU(inplace=True)
        self.last = torch.nn.Linear(8, 4)

    def forward(self, x):
        # (a Linear on [B, T, in] returns a view, and a view modified in place loses every tensor hook —
        # with loss.backward() too — so the token model pools first)
        h = self.act(self.first(self.emb(x).mean(1) if self.tokens else x))
        return self.last(h if self.tokens else h.mean((2, 3)))


@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("curvature", ["diag", "kfac"])
def test_outputs_modified_in_place_keep_their_hooks(tokens, curvature, monkeypatch):
    """The targeted backward must not lose the gradient of a layer whose output an in-place op rewrites
    (it is the first layer here, so nothing upstream pulls the backward through it)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 13, (6, 5), generator=g) if tokens else torch.randn(6, 3, 6, 6, generator=g)
    model = _InPlaceNet(tokens)
    kw = dict(input_names=["x"], likelihood="categorical", curvature=curvature, micro_batch=4, seed=1)
    used = []
    backward = laplace._backward
    monkeypatch.setattr(laplace, "_backward", lambda *a: used.append(backward(*a)) or used[-1])
    inplace = fit_parameters(model, [{"x": x}], ["first.weight", "last.weight"], **kw)
    # integer inputs: the targeted pass misses the first layer's hook and falls back to loss.backward()
    assert used == ([True, True] if tokens else [False, False])
    model.act.inplace = False
    plain = fit_parameters(model, [{"x": x}], ["first.weight", "last.weight"], **kw)
    assert float(inplace["first.weight"].fisher_diag.sum()) > 0
    _assert_same_posterior(plain, inplace, rtol=1e-6)


def test_a_model_may_modify_its_float_input_in_place():
    class Scales(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x.mul_(2.0))

    x = torch.randn(5, 4)
    post = fit_parameters(Scales(), [{"x": x.clone()}], ["lin.weight"], input_names=["x"], likelihood="categorical")
    assert float(post["lin.weight"].fisher_diag.sum()) > 0


def test_strided_1x1_conv_patches_are_unfold():
    conv = torch.nn.Conv2d(4, 2, 1, stride=2)
    x = torch.randn(3, 4, 7, 6)
    spec = ConvSpec((2, 2), (0, 0), (1, 1), 1)
    assert torch.equal(op_gradients.conv_patches(x, (1, 1), spec), torch.nn.functional.unfold(x, 1, stride=2))


def test_gram_upper_blocks_match_the_full_product():
    g = torch.Generator().manual_seed(0)
    for n in (5, 300, 1030):
        p = torch.randn(n, 77, generator=g)
        acc = torch.zeros(n, n)
        op_gradients.add_gram(acc, p)
        op_gradients.add_gram(acc, p[:, :10])
        want = p @ p.T + p[:, :10] @ p[:, :10].T
        torch.testing.assert_close(op_gradients.symmetric(acc), want, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------ latency
class _FakeSession:
    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, 0

    def get_inputs(self):
        return [type("I", (), {"name": "x"})()]

    def run(self, _outputs, _feed):
        self.calls += 1
        time.sleep(self.seconds)


def test_latency_stops_at_the_time_budget_but_not_before_min_runs():
    a, b = _FakeSession(0.01), _FakeSession(0.01)
    out = compare_latency({"a": a, "b": b}, {"x": np.zeros(1)}, runs=50, warmup=1, max_seconds=0.0)
    assert out["a"]["runs"] == out["b"]["runs"] == 5 and a.calls == b.calls == 6
    assert out["a"]["runs_requested"] == 50 and out["a"]["max_seconds"] == 0.0


def test_latency_budget_stops_early_and_records_the_runs_made():
    a = _FakeSession(0.02)
    out = compare_latency({"a": a}, {"x": np.zeros(1)}, runs=200, warmup=0, max_seconds=0.3)
    assert 5 <= out["a"]["runs"] < 200 and a.calls == out["a"]["runs"]


def test_latency_without_budget_or_with_few_runs_does_them_all():
    a = _FakeSession(0.0)
    assert compare_latency({"a": a}, {"x": np.zeros(1)}, runs=12, warmup=2, max_seconds=None)["a"]["runs"] == 12
    b = _FakeSession(0.0)
    assert compare_latency({"b": b}, {"x": np.zeros(1)}, runs=3, warmup=0, max_seconds=0.0)["b"]["runs"] == 3


class _SlowAfterOther(_FakeSession):
    """Runs ``penalty`` seconds slower when another session ran just before it (the other's intra-op threads
    still spinning), as ORT sessions on a small CPU do."""
    log: list = []

    def __init__(self, name: str, seconds: float, penalty: float):
        super().__init__(seconds)
        self.name, self.penalty = name, penalty

    def run(self, outputs, feed):
        after_other = bool(self.log) and self.log[-1] != self.name
        self.log.append(self.name)
        self.calls += 1
        time.sleep(self.seconds + (self.penalty if after_other else 0.0))


def test_latency_alternates_the_order_so_neither_session_always_runs_second():
    _SlowAfterOther.log = []
    a, b = _SlowAfterOther("a", 0.002, 0.004), _SlowAfterOther("b", 0.002, 0.004)
    out = compare_latency({"a": a, "b": b}, {"x": np.zeros(1)}, runs=10, warmup=0, max_seconds=None)
    assert _SlowAfterOther.log[:6] == ["a", "b", "b", "a", "a", "b"]
    # identical sessions measure alike; with a fixed order b would be 3x slower than a
    assert 0.6 < out["b"]["median_ms"] / out["a"]["median_ms"] < 1.7
