"""Codebook (non-uniform scalar) quantization: each row, or each group of rows, owns ``2^b`` levels.

``ŵ[r, c] = levels[r // rows_per_table, codes[r, c]]``, the lookup the ONNX ``GatherElements`` function does.
"""

from __future__ import annotations

import torch


def table_index(rows: int, rows_per_table: int) -> torch.Tensor:
    """Which table each row reads: ``r // rows_per_table``."""
    if rows_per_table < 1 or rows % rows_per_table:
        raise ValueError(f"{rows_per_table} rows per table does not divide {rows} rows")
    return torch.arange(rows) // rows_per_table


def dequantize(codes: torch.Tensor, levels: torch.Tensor, rows_per_table: int) -> torch.Tensor:
    """Look codes up in their row's table; float32 ``[rows, cols]``."""
    tables = levels.float()[table_index(codes.shape[0], rows_per_table)]  # [rows, 2^b]
    return torch.gather(tables, 1, codes.long())


def nearest_codes(w2: torch.Tensor, levels: torch.Tensor, rows_per_table: int) -> torch.Tensor:
    """Index of the nearest level for every weight (ties to the lower level); int16 ``[rows, cols]``.

    Levels are sorted per table, so the nearest one is found by comparing against the midpoints.
    """
    lv = levels.float()[table_index(w2.shape[0], rows_per_table)]
    lv_sorted, order = torch.sort(lv, dim=1)
    mids = (lv_sorted[:, 1:] + lv_sorted[:, :-1]) / 2
    pos = torch.searchsorted(mids.contiguous(), w2.float().contiguous(), right=False)
    return torch.gather(order, 1, pos).to(torch.int16)
