"""Rounding with error feedback: choose codes on a fixed grid so that the *whitened* error
``(ŵ − μ)ᵀ Λ (ŵ − μ)`` is small, not just each weight's own error (docs/design.md §3.2).

* :func:`gptq_round` — Kronecker / K-FAC metric ``Λ ∝ G ⊗ A``: per row the metric is the input factor
  ``A`` (GPTQ's ``H``), so columns are quantized one at a time and the error of column ``j`` is spread over
  the columns not yet quantized, ``W[:, j+1:] −= (w_j − q_j)/[H⁻¹]_jj · [H⁻¹]_{j, j+1:}`` (Frantar et al.
  2023), with the upper Cholesky factor of ``H⁻¹`` and lazy block updates. Rows are independent under
  this metric, so every step is vectorized over rows.
* :func:`lowrank_round` — ``Λ = D + U Uᵀ`` (diagonal plus low rank): coordinates are quantized in blocks;
  after fixing block ``B`` with change ``δ_B = q_B − w_B``, the remaining coordinates ``R`` move to their
  optimum given ``B``: ``w_R −= Λ_RR⁻¹ Λ_RB δ_B = D_R⁻¹ U_R M_R⁻¹ U_Bᵀ δ_B`` with
  ``M_R = I + U_Rᵀ D_R⁻¹ U_R`` (Woodbury), updated as blocks leave ``R``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def gptq_round(w2: torch.Tensor, hessian: torch.Tensor, grid, *, block: int = 128, damp: float = 0.01,
               act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ over the columns of ``w2 [rows, cols]`` with ``H = hessian [cols, cols]``.

    ``grid.quantize(w, rows, cols) -> (codes, values)`` is the fixed per-row grid; a grid with
    ``columns(col_indices)`` (:class:`~bayesq_onnx.quant.design.UniformGrid`, ``CodebookGrid``) hands out each
    block's columns expanded once, which gives the same codes and values. Dampening adds
    ``damp · mean(diag H)`` to the diagonal; columns whose input never varies (``H_jj = 0``) are quantized
    without feedback. Returns ``(codes int16, dequantized float32)``, both ``[rows, cols]``.
    """
    w = w2.float().clone()
    rows, cols = w.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    mean_diag = torch.mean(torch.diag(h))
    h += damp * mean_diag * torch.eye(cols, dtype=h.dtype)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    inv_perm = torch.argsort(perm)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _damped_inverse_cholesky(h, damp, mean_diag)
    codes = torch.zeros(rows, cols, dtype=torch.int16)
    values = torch.zeros(rows, cols)
    columns = getattr(grid, "columns", None)
    all_rows = slice(0, rows)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        # column-major block: column j of the block is the contiguous row wb[j]
        wb = w[:, i1:i2].T.contiguous()
        err = torch.empty_like(wb)
        cb = torch.empty(i2 - i1, rows, dtype=torch.int16)
        vb = torch.empty(i2 - i1, rows)
        hb = hinv[i1:i2, i1:i2]
        qb = columns(perm[i1:i2]) if columns is not None else None  # the block's grid, expanded once
        with one_thread():
            for j in range(i2 - i1):
                if qb is not None:
                    c, v = qb.quantize(j, wb[j])
                else:
                    col = perm[i1 + j].item()
                    c, v = grid.quantize(wb[j][:, None], all_rows, slice(col, col + 1))
                    c, v = c[:, 0], v[:, 0]
                cb[j], vb[j] = c, v
                e = torch.sub(wb[j], v, out=err[j]).div_(hb[j, j])
                wb[j:] -= hb[j, j:, None] * e[None, :]
        codes[:, i1:i2], values[:, i1:i2] = cb.T, vb.T
        w[:, i2:] -= err.T.contiguous() @ hinv[i1:i2, i2:]
    return codes[:, inv_perm], values[:, inv_perm]


def _damped_inverse_cholesky(h: torch.Tensor, damp: float, mean_diag: torch.Tensor) -> torch.Tensor:
    """:func:`inverse_cholesky_upper` of the dampened ``h`` (float64, changed in place), as float32.

    A second moment of low rank (fewer calibration tokens than columns) with a tiny dampening can lose
    positive definiteness to round-off: ten times the dampening is added until the factorization holds, as
    GPTQ's implementations do."""
    extra = max(damp, 1e-6)
    while True:
        try:
            return inverse_cholesky_upper(h).float()
        except torch.linalg.LinAlgError:
            if extra > 1.0:
                raise
            h += 9 * extra * mean_diag * torch.eye(h.shape[0], dtype=h.dtype)
            extra *= 10


@contextmanager
def one_thread():
    """Run a loop of small sequential steps on one intra-op thread (the GPTQ column recursion, Lloyd
    iterations, a fixed point). Each parallel op wakes the other threads and waits for them: on an idle
    machine that costs microseconds, on a loaded one up to a scheduler time slice (~10 ms) per op, which
    made such loops 10–100× slower than the work. Elementwise results do not depend on the thread count
    (reductions may differ in the last bit)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``) without forming ``H⁻¹``.

    With ``J`` the exchange matrix (reversal of rows/columns) and ``JHJ = LLᵀ``: ``H⁻¹ = J L⁻ᵀ L⁻¹ J =
    (J L⁻¹ J)ᵀ (J L⁻¹ J)``, and ``J L⁻¹ J`` is upper triangular with a positive diagonal, so by uniqueness
    it is the Cholesky factor. One Cholesky and one triangular inverse instead of GPTQ's
    ``cholesky(cholesky_inverse(cholesky(H)))`` (about 4× faster on 4608², same values to float64 round-off).
    """
    lower = torch.linalg.cholesky(h.flip(0, 1))
    return _lower_triangular_inverse(lower).flip(0, 1)


def _lower_triangular_inverse(lower: torch.Tensor, leaf: int = 512) -> torch.Tensor:
    """``L⁻¹`` by halves: ``[[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]]``, two matrix products per
    level (n³/3 multiply-adds in all, against n³/2 for a triangular solve with the identity, and at GEMM
    speed); blocks of at most ``leaf`` rows by a triangular solve."""
    n = lower.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype), upper=False)
    h = n // 2
    out = torch.zeros_like(lower)
    out[:h, :h] = a_inv = _lower_triangular_inverse(lower[:h, :h], leaf)
    out[h:, h:] = c_inv = _lower_triangular_inverse(lower[h:, h:], leaf)
    out[h:, :h] = -(c_inv @ (lower[h:, :h] @ a_inv))
    return out


def lowrank_round(w2: torch.Tensor, diag: torch.Tensor, u: torch.Tensor, grid, *,
                  blocks: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sequential rounding under ``Λ = diag + u uᵀ`` (``diag [rows, cols]``, ``u [rows·cols, k]``,
    both in canonical row-major order). Blocks are groups of whole rows."""
    w = w2.float().clone()
    rows, cols = w.shape
    d = diag.float().reshape(-1).clamp_min(1e-30)
    u = u.float()
    k = u.shape[1]
    ud = u / d[:, None]                                        # D⁻¹ U
    m = torch.eye(k, dtype=torch.float64) + (u.T.double() @ ud.double())
    flat = w.reshape(-1)
    codes = torch.zeros(rows, cols, dtype=torch.int16)
    values = torch.zeros(rows, cols)
    step = max(1, -(-rows // blocks))
    all_cols = slice(0, cols)
    for r1 in range(0, rows, step):
        r2 = min(r1 + step, rows)
        b = slice(r1 * cols, r2 * cols)
        c, v = grid.quantize(w[r1:r2], slice(r1, r2), all_cols)
        codes[r1:r2], values[r1:r2] = c, v
        delta = (v - w[r1:r2]).reshape(-1)                     # change made to the block
        m -= u[b].T.double() @ ud[b].double()                  # block B leaves R
        rest = slice(r2 * cols, rows * cols)
        if r2 < rows:
            coef = torch.linalg.solve(m, (u[b].T.double() @ delta.double())).float()
            flat[rest] -= ud[rest] @ coef
    return codes, values
