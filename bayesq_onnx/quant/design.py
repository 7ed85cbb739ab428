"""Quantizer design that minimizes the posterior-expected, precision-weighted distortion (DESIGN §3.3).

For a block with trained weights ``μ_i``, posterior precisions ``λ_i = Λ_ii`` and posterior standard
deviations ``s_i = sqrt(T / λ_i)`` (``T``: posterior temperature; ``T = 0`` designs on ``μ`` alone):

    D(Q) = Σ_i λ_i · E_{w_i ~ N(μ_i, s_i²)} [(Q(w_i) − w_i)²]

is the expected loss increase (second order) of quantizing a weight drawn from the posterior. Its
closed form per weight is :func:`bayesq_onnx.bayes.gaussian.expected_sq_error`.

* ``uniform``: for each row (or group) the clipping range ``[α·min, α·max]`` is searched over a grid of
  ``α``; scale and zero point follow from the range; the ``α`` with the least ``D`` wins.
* ``codebook``: weighted Lloyd (1-D k-means) per table: cells by nearest level, each level the
  ``λ``-weighted mean of its cell — with ``s > 0`` the *posterior* mean, ``Σ λ E[w; cell] / Σ λ P(cell)`` —
  started from the Lloyd–Max levels of N(0, 1) scaled to the table's weighted mean and spread.

Codes are always the nearest grid point of ``μ`` (or of the error-fed-back target, :mod:`.feedback`).
Everything is vectorized over rows; rows are processed in chunks to bound memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..bayes import gaussian
from . import codebook as cb
from . import uniform

CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # α ∈ {1.00, 0.95, …, 0.50}
_SOFT_MAX_LEVELS = 16   # posterior-expected (soft) objectives for ≤ 4 bits; 8-bit grids are fine-grained
_CHUNK_ELEMENTS = 2**25


def _temperature_sd(lam: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        return torch.zeros_like(lam)
    return torch.sqrt(temperature / lam.clamp_min(1e-30))


@dataclass
class UniformGrid:
    """Affine grid per row / group: ``ŵ = (q − z)·s``. ``scale``/``zero``: ``[rows, n_groups]``."""

    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    scale_dtype: torch.dtype

    def quantize(self, w: torch.Tensor, rows: slice, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes and their values for the sub-block ``w = W[rows, cols]``."""
        s, z = self._expand(rows, cols)
        lo, hi = uniform.code_range(self.bits, self.symmetric)
        q = (torch.round(w / s) + z).clamp(lo, hi)
        return q.to(torch.int16), ((q - z) * s).to(self.scale_dtype).float()

    def _expand(self, rows: slice, cols: slice):
        s, z = self.scale[rows], self.zero[rows]
        if self.group_size == 0:
            return s[:, :1], z[:, :1]
        idx = torch.arange(cols.start or 0, cols.stop) // self.group_size
        return s[:, idx], z[:, idx]


@dataclass
class CodebookGrid:
    """``levels [n_tables, 2^b]`` (float16 values, sorted), ``rows_per_table`` rows read each table."""

    levels: torch.Tensor
    rows_per_table: int

    def quantize(self, w: torch.Tensor, rows: slice, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        start = rows.start or 0
        table = cb.table_index(self.levels.shape[0] * self.rows_per_table, self.rows_per_table)
        lv = self.levels[table[start:start + w.shape[0]]]
        codes = _nearest(w, lv)
        return codes.to(torch.int16), torch.gather(lv, 1, codes)


def _nearest(w: torch.Tensor, sorted_levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (rows of ``sorted_levels`` pair with rows of ``w``)."""
    mids = (sorted_levels[:, 1:] + sorted_levels[:, :-1]) / 2
    return torch.searchsorted(mids.contiguous(), w.contiguous())


# ---------------------------------------------------------------------------------------------------
def fit_uniform(w2: torch.Tensor, lam: torch.Tensor, bits: int, group_size: int, *, symmetric: bool = False,
                scale_dtype: torch.dtype = torch.float16, temperature: float = 1.0,
                ratios: tuple[float, ...] = CLIP_RATIOS) -> tuple[UniformGrid, torch.Tensor]:
    """Search the clipping ratio per row/group; returns the grid and ``D`` per row/group ``[rows, n_groups]``.

    Ratio α clips the min-max range to ``[α·min, α·max]`` (asymmetric) or ``α·max|w|`` (symmetric); the
    scale and zero point follow as in :func:`uniform.minmax_params`, rounded to their storage dtype.
    """
    g_w = uniform.grouped(w2.float(), group_size)                          # [R, G, n]
    g_lam = uniform.grouped(lam.float(), group_size)
    soft = temperature > 0 and 2**bits <= _SOFT_MAX_LEVELS
    g_sd = _temperature_sd(g_lam, temperature) if soft else None
    lo_code, hi_code = uniform.code_range(bits, symmetric)
    k = torch.arange(lo_code, hi_code + 1, dtype=torch.float32)
    if symmetric:
        top, bottom = g_w.abs().amax(-1), None
    else:
        top, bottom = g_w.amax(-1).clamp(min=0.0), g_w.amin(-1).clamp(max=0.0)
    best_d = torch.full(g_w.shape[:2], float("inf"))
    best_s = torch.ones(g_w.shape[:2])
    best_z = torch.zeros(g_w.shape[:2])
    for ratio in ratios:
        if symmetric:
            scale = uniform.round_scale(ratio * top / max(hi_code, 1), scale_dtype)
            zero = torch.zeros_like(scale)
        else:
            scale = uniform.round_scale(ratio * (top - bottom) / (hi_code - lo_code), scale_dtype)
            zero = torch.round(-ratio * bottom / scale).clamp(lo_code, hi_code)
        d = _grid_distortion(g_w, g_lam, g_sd, scale, zero, k, scale_dtype)
        better = d < best_d
        best_d = torch.where(better, d, best_d)
        best_s = torch.where(better, scale, best_s)
        best_z = torch.where(better, zero, best_z)
    return UniformGrid(best_s, best_z, bits, group_size, symmetric, scale_dtype), best_d


def _grid_distortion(g_w, g_lam, g_sd, scale, zero, k, scale_dtype) -> torch.Tensor:
    """Σ λ·E[(Q(w) − w)²] per row/group for the uniform grids ``(k − z)·s`` (values rounded as stored);
    ``g_sd = None`` is the point design (nearest-level error, no cell integrals)."""
    if g_sd is None:
        q = (torch.round(g_w / scale[..., None]) + zero[..., None]).clamp_(k[0], k[-1])
        err = ((q - zero[..., None]) * scale[..., None]).to(scale_dtype).float() - g_w
        return (g_lam * err * err).sum(-1)
    out = torch.empty(g_w.shape[:2])
    rows = max(1, _CHUNK_ELEMENTS // max(1, g_w[0].numel() * k.numel()))
    for r in range(0, g_w.shape[0], rows):
        sl = slice(r, r + rows)
        levels = ((k - zero[sl][..., None]) * scale[sl][..., None]).to(scale_dtype).float()  # [r, G, K]
        levels = levels[:, :, None, :].expand(*g_w[sl].shape, k.numel())
        e = gaussian.expected_sq_error(g_w[sl], g_sd[sl], levels)
        out[sl] = (g_lam[sl] * e).sum(-1)
    return out


# ---------------------------------------------------------------------------------------------------
def fit_codebook(w2: torch.Tensor, lam: torch.Tensor, bits: int, rows_per_table: int, *,
                 temperature: float = 1.0, iters: int = 25) -> tuple[CodebookGrid, torch.Tensor]:
    """Weighted (posterior) Lloyd per table; returns the grid (float16 levels) and ``D`` per table."""
    rows, cols = w2.shape
    t = rows // rows_per_table
    x = w2.float().reshape(t, rows_per_table * cols)
    lw = lam.float().reshape(t, -1).clamp_min(1e-30)
    soft = temperature > 0 and 2**bits <= _SOFT_MAX_LEVELS
    sd = _temperature_sd(lw, temperature) if soft else torch.zeros_like(lw)
    mean = (lw * x).sum(1, keepdim=True) / lw.sum(1, keepdim=True)
    spread = torch.sqrt((lw * (x - mean) ** 2).sum(1, keepdim=True) / lw.sum(1, keepdim=True)).clamp_min(1e-12)
    unit, _ = gaussian.lloyd_max(bits)
    levels = mean + spread * torch.tensor(unit, dtype=torch.float32)                 # [T, K]
    for _ in range(iters):
        num, den = _lloyd_statistics(x, lw, sd, levels, soft)
        new = torch.where(den > 0, num / den.clamp_min(1e-30), levels)
        new, _ = torch.sort(new, dim=1)
        # converged once no level moves by more than a thousandth of its table's spread
        done = bool(((new - levels).abs() <= 1e-3 * spread).all())
        levels = new
        if done:
            break
    levels = levels.to(torch.float16).float()
    levels, _ = torch.sort(levels, dim=1)
    d = _codebook_distortion(x, lw, sd, levels)
    return CodebookGrid(levels, rows_per_table), d


def _lloyd_statistics(x, lw, sd, levels, soft):
    """Per level: Σ λ·E[w; cell] and Σ λ·P(cell) (hard cells when not ``soft``)."""
    k = levels.shape[1]
    if not soft:
        codes = _nearest(x, levels)
        num = torch.zeros_like(levels).scatter_add_(1, codes, lw * x)
        den = torch.zeros_like(levels).scatter_add_(1, codes, lw)
        return num, den
    num = torch.zeros_like(levels)
    den = torch.zeros_like(levels)
    step = max(1, _CHUNK_ELEMENTS // max(1, x.shape[0] * k))
    for c in range(0, x.shape[1], step):
        sl = slice(c, c + step)
        lv = levels[:, None, :].expand(x.shape[0], x[:, sl].shape[1], k)
        prob, partial, _ = gaussian.cell_moments(x[:, sl], sd[:, sl].clamp_min(1e-30), lv)
        num += (lw[:, sl, None] * partial).sum(1)
        den += (lw[:, sl, None] * prob).sum(1)
    return num, den


def _codebook_distortion(x, lw, sd, levels) -> torch.Tensor:
    k = levels.shape[1]
    out = torch.zeros(x.shape[0])
    step = max(1, _CHUNK_ELEMENTS // max(1, x.shape[0] * k))
    for c in range(0, x.shape[1], step):
        sl = slice(c, c + step)
        lv = levels[:, None, :].expand(x.shape[0], x[:, sl].shape[1], k)
        out += (lw[:, sl] * gaussian.expected_sq_error(x[:, sl], sd[:, sl], lv)).sum(1)
    return out
