"""Quantizer design that minimizes the posterior-expected, precision-weighted distortion (docs/design.md §3.3).

For a block with trained weights ``μ_i``, posterior precisions ``λ_i = Λ_ii`` and posterior standard
deviations ``s_i = sqrt(T / λ_i)`` (``T``: posterior temperature; ``T = 0`` designs on ``μ`` alone):

    D(Q) = Σ_i λ_i · E_{w_i ~ N(μ_i, s_i²)} [(Q(w_i) − w_i)²]

is the expected loss increase (second order) of quantizing a weight drawn from the posterior. Its
closed form per weight is :func:`bayesq_onnx.bayes.gaussian.expected_sq_error`.

* ``uniform``: for each row (or group) the clipping range ``[α·min, α·max]`` is searched over a grid of
  ``α``; scale and zero point follow from the range; the ``α`` with the least ``D`` wins. A per-tensor grid
  (``group_size =`` :data:`~bayesq_onnx.quant.uniform.TENSOR`) is the same search with the whole tensor as
  one row: one ``α`` minimizing ``D`` summed over every weight.
* ``codebook``: weighted Lloyd (1-D k-means) per table: cells by nearest level, each level the
  ``λ``-weighted mean of its cell — with ``s > 0`` the *posterior* mean, ``Σ λ E[w; cell] / Σ λ P(cell)`` —
  started from the Lloyd–Max levels of N(0, 1) scaled to the table's weighted mean and spread. With hard
  cells (``s = 0``) each table is sorted once (shared by the bit widths of a tensor) and every iteration
  reads its cell sums off float64 prefix sums at the cell bounds. A table shared by several rows (up to
  all of them) is fitted on the union of its rows' weights.

Codes are always the nearest grid point of ``μ`` (or of the error-fed-back target, :mod:`.feedback`).
Everything is vectorized over rows; rows are processed in chunks to bound memory.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..bayes import gaussian
from . import codebook as cb
from . import uniform
from .feedback import one_thread

CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # α ∈ {1.00, 0.95, …, 0.50}
_SOFT_MAX_LEVELS = 16   # posterior-expected (soft) objectives for ≤ 4 bits; 8-bit grids are fine-grained
_CHUNK_ELEMENTS = 2**25
_POINT_CHUNK = 2**18    # weights per block of the point-design clipping search (two 1 MiB buffers)


def _temperature_sd(lam: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        return torch.zeros_like(lam)
    return torch.sqrt(temperature / lam.clamp_min(1e-30))


@dataclass
class UniformGrid:
    """Affine grid per row / group: ``ŵ = (q − z)·s``. ``scale``/``zero``: ``[rows, n_groups]``, or ``[1, 1]``
    for a per-tensor grid (``group_size = TENSOR``), which every row and column reads."""

    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool

    def quantize(self, w: torch.Tensor, rows: slice, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes and their values for the sub-block ``w = W[rows, cols]``."""
        s, z = self._expand(rows, cols)
        lo, hi = uniform.code_range(self.bits, self.symmetric)
        q = (torch.round(w / s) + z).clamp(lo, hi)
        return q.to(torch.int16), (q - z) * s

    def columns(self, cols: torch.Tensor) -> "_UniformColumns":
        """The grid of the listed columns (all rows), expanded once for column-by-column rounding."""
        lo, hi = uniform.code_range(self.bits, self.symmetric)
        if self.group_size in (0, uniform.TENSOR):  # per tensor: s, z [1] broadcast over the rows
            s, z = self.scale[:, 0].contiguous(), self.zero[:, 0].contiguous()
            return _UniformColumns(None, None, s, z, lo, hi)
        idx = cols // self.group_size
        return _UniformColumns(self.scale[:, idx].T.contiguous(), self.zero[:, idx].T.contiguous(), None, None,
                               lo, hi)

    def _expand(self, rows: slice, cols: slice):
        if self.group_size == uniform.TENSOR:
            return self.scale, self.zero  # [1, 1]: the same grid for any sub-block
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

    def columns(self, cols: torch.Tensor) -> "_CodebookColumns":
        """The per-row tables (all rows), looked up once for column-by-column rounding (every column of
        a row reads the same table, so ``cols`` does not matter)."""
        lv = self.levels[cb.table_index(self.levels.shape[0] * self.rows_per_table, self.rows_per_table)]
        return _CodebookColumns(lv, ((lv[:, 1:] + lv[:, :-1]) / 2).contiguous())


@dataclass
class _UniformColumns:
    """:meth:`UniformGrid.columns`: per-column scales/zeros ``[n_cols, rows]`` (``None`` for a per-row grid,
    whose single column ``s``/``z`` ``[rows]`` serves every column, or a per-tensor one: ``[1]``)."""

    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    s: torch.Tensor | None
    z: torch.Tensor | None
    lo: int
    hi: int

    def quantize(self, j: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and values of column ``j`` (``w [rows]``), exactly as :meth:`UniformGrid.quantize`."""
        s, z = (self.s, self.z) if self.scales is None else (self.scales[j], self.zeros[j])
        q = (torch.round(w / s) + z).clamp_(self.lo, self.hi)
        return q, (q - z) * s


@dataclass
class _CodebookColumns:
    """:meth:`CodebookGrid.columns`: each row's sorted levels ``[rows, K]`` and their midpoints."""

    levels: torch.Tensor
    mids: torch.Tensor

    def quantize(self, j: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and values of one column ``w [rows]``, exactly as :meth:`CodebookGrid.quantize`: the
        number of midpoints below ``w`` is ``searchsorted(mids, w)`` (ties to the lower level)."""
        codes = (self.mids < w[:, None]).sum(1, keepdim=True)
        return codes[:, 0], torch.gather(self.levels, 1, codes)[:, 0]


def _nearest(w: torch.Tensor, sorted_levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (rows of ``sorted_levels`` pair with rows of ``w``)."""
    mids = (sorted_levels[:, 1:] + sorted_levels[:, :-1]) / 2
    return torch.searchsorted(mids.contiguous(), w.contiguous())


# ---------------------------------------------------------------------------------------------------
def fit_uniform(w2: torch.Tensor, lam: torch.Tensor, bits: int, group_size: int, *, symmetric: bool = False,
                scale_dtype: torch.dtype = torch.float16, temperature: float = 1.0,
                ratios: tuple[float, ...] = CLIP_RATIOS) -> tuple[UniformGrid, torch.Tensor]:
    """Search the clipping ratio per row/group; returns the grid and ``D`` per row/group ``[rows, n_groups]``
    (``[1, 1]`` with ``group_size = TENSOR``: one ratio for the whole tensor).

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
    grids = []
    for ratio in ratios:
        if symmetric:
            scale = uniform.round_scale(ratio * top / max(hi_code, 1), scale_dtype)
            zero = torch.zeros_like(scale)
        else:
            scale = uniform.round_scale(ratio * (top - bottom) / (hi_code - lo_code), scale_dtype)
            zero = torch.round(-ratio * bottom / scale).clamp(lo_code, hi_code)
        grids.append((scale, zero))
    if soft:
        dists = [_grid_distortion(g_w, g_lam, g_sd, scale, zero, k) for scale, zero in grids]
    else:
        dists = _point_distortions(g_w, g_lam, grids, k)
    for (scale, zero), d in zip(grids, dists):
        better = d < best_d
        best_d = torch.where(better, d, best_d)
        best_s = torch.where(better, scale, best_s)
        best_z = torch.where(better, zero, best_z)
    return UniformGrid(best_s, best_z, bits, group_size, symmetric), best_d


def _point_distortions(g_w, g_lam, grids, k) -> torch.Tensor:
    """Point-design :func:`_grid_distortion` of every ``(scale, zero)`` in ``grids``, ``[len(grids), R, G]``.

    Blocks of rows (about ``_POINT_CHUNK`` weights) go through all the grids while they are in cache,
    in two reused buffers; each row's sum is computed exactly as on the whole tensor."""
    out = torch.empty(len(grids), *g_w.shape[:2])
    step = max(1, _POINT_CHUNK // max(1, g_w[0].numel()))
    buffers = torch.empty_like(g_w[:step]), torch.empty_like(g_w[:step])
    for r in range(0, g_w.shape[0], step):
        sl = slice(r, min(r + step, g_w.shape[0]))
        n = sl.stop - sl.start
        for i, (scale, zero) in enumerate(grids):
            out[i, sl] = _grid_distortion(g_w[sl], g_lam[sl], None, scale[sl], zero[sl], k,
                                          (buffers[0][:n], buffers[1][:n]))
    return out


def _grid_distortion(g_w, g_lam, g_sd, scale, zero, k, buffers=None) -> torch.Tensor:
    """Σ λ·E[(Q(w) − w)²] per row/group for the uniform grids ``(k − z)·s``;
    ``g_sd = None`` is the point design (nearest-level error, no cell integrals).

    The point design works in place in two buffers shaped like ``g_w`` and computes, bit for bit, the
    same ``λ·err·err`` as ``err = (clamp(round(w/s) + z, lo, hi) − z)·s − w``: with integer-valued
    ``round(w/s)`` and ``z``, ``clamp(r + z, lo, hi) − z`` is exactly ``clamp(r, lo − z, hi − z)``."""
    if g_sd is None:
        err, tmp = buffers if buffers is not None else (torch.empty_like(g_w), torch.empty_like(g_w))
        s, z = scale[..., None], zero[..., None]
        torch.div(g_w, s, out=err).round_()
        torch.clamp(err, k[0] - z, k[-1] - z, out=err)
        err.mul_(s)
        err.sub_(g_w)
        torch.mul(g_lam, err, out=tmp).mul_(err)
        return tmp.sum(-1)
    out = torch.zeros(g_w.shape[:2])
    per_row = g_w[0].numel() * k.numel()
    rows = max(1, _CHUNK_ELEMENTS // max(1, per_row))
    # a row longer than a chunk (a per-tensor grid of a large tensor) is summed over column chunks
    n = g_w.shape[-1]
    step = n if per_row <= _CHUNK_ELEMENTS else max(1, _CHUNK_ELEMENTS // (g_w.shape[1] * k.numel()))
    for r in range(0, g_w.shape[0], rows):
        sl = slice(r, r + rows)
        levels = (k - zero[sl][..., None]) * scale[sl][..., None]  # [r, G, K]
        for c in range(0, n, step):
            cs = slice(c, c + step)
            lv = levels[:, :, None, :].expand(*g_w[sl, :, cs].shape, k.numel())
            e = gaussian.expected_sq_error(g_w[sl, :, cs], g_sd[sl, :, cs], lv)
            out[sl] += (g_lam[sl, :, cs] * e).sum(-1)
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
    mean = (lw * x).sum(1, keepdim=True) / lw.sum(1, keepdim=True)
    spread = torch.sqrt((lw * (x - mean) ** 2).sum(1, keepdim=True) / lw.sum(1, keepdim=True)).clamp_min(1e-12)
    unit, _ = gaussian.lloyd_max(bits)
    levels = mean + spread * torch.tensor(unit, dtype=torch.float32)                 # [T, K]
    if not soft:
        levels, d = _hard_lloyd(_SortedTables.of(w2, x, lw), levels, spread, iters)
        return CodebookGrid(levels, rows_per_table), d
    sd = _temperature_sd(lw, temperature)
    levels = _lloyd(lambda lv: _lloyd_statistics(x, lw, sd, lv), levels, spread, iters)
    d = _codebook_distortion(x, lw, sd, levels)
    return CodebookGrid(levels, rows_per_table), d


def _lloyd(statistics, levels: torch.Tensor, spread: torch.Tensor, iters: int) -> torch.Tensor:
    """Weighted Lloyd iterations, hard or soft by ``statistics(levels) -> (Σ λ·E[w; cell], Σ λ·P(cell))``
    per level: each level moves to ``num / den`` (an empty cell keeps its level), levels re-sorted; stops
    once no level moves by more than a thousandth of its table's spread, or after ``iters``. Returns the
    levels rounded to float16 (as stored), sorted."""
    for _ in range(iters):
        num, den = statistics(levels)
        tiny = 1e-300 if den.dtype == torch.float64 else 1e-30
        new = torch.where(den > 0, num / den.clamp_min(tiny), levels.to(den.dtype)).float()
        new, _ = torch.sort(new, dim=1)
        done = bool(((new - levels).abs() <= 1e-3 * spread).all())
        levels = new
        if done:
            break
    levels = levels.to(torch.float16).float()
    levels, _ = torch.sort(levels, dim=1)
    return levels


@dataclass
class _SortedTables:
    """Each table's weights sorted once, with float64 prefix sums of ``λ``, ``λw`` and ``λw²``
    (``[T, n + 1]``, leading zero): the hard-cell Lloyd statistics of any set of levels are then prefix
    differences at the cell bounds, ``O(K log n)`` per table instead of ``O(n log K)`` per iteration."""

    xs: torch.Tensor            # [T, n] sorted weights
    p0: torch.Tensor
    p1: torch.Tensor
    p2: torch.Tensor

    # The sort depends on the weights only, so the bit widths of one tensor share it (one entry, keyed
    # by the caller's tensor object and its in-place version counter).
    _cache = {}

    @classmethod
    def of(cls, w2: torch.Tensor, x: torch.Tensor, lw: torch.Tensor) -> "_SortedTables":
        c = cls._cache
        hit = (c.get("ref") is not None and c["ref"]() is w2 and c["version"] == w2._version
               and c["shape"] == tuple(x.shape))
        if hit:
            xs, order = c["sorted"]
        else:
            c.clear()
            xs, order = torch.sort(x, dim=1)
            xs = xs.contiguous()  # searchsorted wants a contiguous boundary (a sort of a transposed view is not)

            def forget(ref):  # the tensor is gone: drop its sort unless a newer entry replaced it
                if c.get("ref") is ref:
                    c.clear()

            c.update(ref=weakref.ref(w2, forget), version=w2._version, shape=tuple(x.shape), sorted=(xs, order))
        lws = lw.gather(1, order).double()
        lwx = lws * xs.double()
        zero = torch.zeros(x.shape[0], 1, dtype=torch.float64)
        return cls(xs, *(torch.cat([zero, v.cumsum(1)], dim=1) for v in (lws, lwx, lwx * xs.double())))

    def bounds(self, levels: torch.Tensor) -> torch.Tensor:
        """Prefix positions ``[T, K + 1]`` of the nearest-level cells of sorted ``levels``: a weight ``w``
        belongs to cell ``#{mids < w}`` (ties to the lower level, as :func:`_nearest`), so cell ``k`` ends
        after the weights ``≤ mids[k]``."""
        mids = ((levels[:, 1:] + levels[:, :-1]) / 2).contiguous()
        inner = torch.searchsorted(self.xs, mids, right=True)
        return torch.cat([torch.zeros_like(inner[:, :1]), inner, torch.full_like(inner[:, :1], self.xs.shape[1])], 1)

    @staticmethod
    def cell_sums(prefix: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
        v = prefix.gather(1, bounds)
        return v[:, 1:] - v[:, :-1]

    def lloyd_statistics(self, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per level, hard cells, float64: ``(Σ λw, Σ λ)`` over its nearest-level cell."""
        b = self.bounds(levels)
        return self.cell_sums(self.p1, b), self.cell_sums(self.p0, b)


def _hard_lloyd(tables: _SortedTables, levels: torch.Tensor, spread: torch.Tensor, iters: int):
    """Weighted Lloyd with hard cells (``T = 0``, or grids too fine for the soft objective): each level
    moves to the ``λ``-weighted mean of its cell (:func:`_lloyd`, as the soft loop); the cell sums are
    exact up to float64 round-off."""
    with one_thread():  # every step is small: O(T·K) values
        levels = _lloyd(tables.lloyd_statistics, levels, spread, iters)
        # D = Σ_cells Σ λ (w − c)² = Σ_cells (Σλw² − 2c Σλw + c² Σλ), in float64
        b = tables.bounds(levels)
        c = levels.double()
        d = (tables.cell_sums(tables.p2, b) - 2 * c * tables.cell_sums(tables.p1, b)
             + c * c * tables.cell_sums(tables.p0, b))
    return levels, d.clamp_min(0).sum(1).float()


def _lloyd_statistics(x, lw, sd, levels):
    """Per level: Σ λ·E[w; cell] and Σ λ·P(cell) under the posteriors ``N(x, sd²)`` (soft cells)."""
    k = levels.shape[1]
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
