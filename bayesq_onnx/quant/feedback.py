"""Rounding with error feedback: choose codes on a fixed grid so that the *whitened* error
``(ŵ − μ)ᵀ Λ (ŵ − μ)`` is small, not just each weight's own error (DESIGN §3.2).

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

import torch


def gptq_round(w2: torch.Tensor, hessian: torch.Tensor, grid, *, block: int = 128, damp: float = 0.01,
               act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ over the columns of ``w2 [rows, cols]`` with ``H = hessian [cols, cols]``.

    ``grid.quantize(w, rows, cols) -> (codes, values)`` is the fixed per-row grid. Dampening adds
    ``damp · mean(diag H)`` to the diagonal; columns whose input never varies (``H_jj = 0``) are quantized
    without feedback. Returns ``(codes int16, dequantized float32)``, both ``[rows, cols]``.
    """
    w = w2.float().clone()
    rows, cols = w.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    inv_perm = torch.argsort(perm)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    codes = torch.zeros(rows, cols, dtype=torch.int16)
    values = torch.zeros(rows, cols)
    all_rows = slice(0, rows)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        wb = w[:, i1:i2].clone()
        err = torch.zeros_like(wb)
        hb = hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = perm[i1 + j].item()
            c, v = grid.quantize(wb[:, j:j + 1], all_rows, slice(col, col + 1))
            codes[:, i1 + j], values[:, i1 + j] = c[:, 0], v[:, 0]
            e = (wb[:, j] - v[:, 0]) / hb[j, j]
            wb[:, j:] -= e[:, None] * hb[j, j:][None, :]
            err[:, j] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return codes[:, inv_perm], values[:, inv_perm]


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
