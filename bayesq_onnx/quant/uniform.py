"""Affine (uniform) scalar quantization of a canonical ``[rows, cols]`` weight matrix.

Grid: a row (or a group of ``group_size`` consecutive columns of a row, or — ``group_size =`` :data:`TENSOR`
— the whole tensor) gets a scale ``s`` and an integer zero point ``z``; codes ``q ∈ [0, 2^b − 1]``
(asymmetric) or ``q ∈ [−2^(b−1), 2^(b−1) − 1]`` (symmetric, ``z = 0``) and the dequantized weight is
``ŵ = (q − z)·s``, exactly what ONNX ``DequantizeLinear`` computes with a float32 scale. Scales are rounded to
their storage dtype *before* the codes are chosen, so ``ŵ`` is what the artifact decodes, bit for bit.
"""

from __future__ import annotations

import torch

# The smallest positive float16 (a subnormal): a scale must survive storage as float16.
_MIN_SCALE = 2.0**-24
# ``group_size`` of a grid shared by the whole tensor: one scale and zero point (uniform), one table
# (codebook). Negative, so it never collides with a count of columns or rows.
TENSOR = -1


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Inclusive integer code range of a ``bits``-bit grid."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def grouped(w2: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[rows, cols]`` -> ``[rows, n_groups, group]``; ``group_size = 0`` means one group per row, and
    :data:`TENSOR` one group for the whole tensor, ``[1, 1, rows·cols]`` (the tensor as one long row, so
    every per-row fit and reduction serves the per-tensor grid unchanged)."""
    rows, cols = w2.shape
    if group_size == TENSOR:
        return w2.reshape(1, 1, rows * cols)
    if group_size == 0:
        return w2.reshape(rows, 1, cols)
    if cols % group_size:
        raise ValueError(f"group size {group_size} does not divide {cols} columns")
    return w2.reshape(rows, cols // group_size, group_size)


def round_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round scales to what storage keeps (float32 result), never to zero."""
    return scale.clamp_min(_MIN_SCALE).to(scale_dtype).to(torch.float32)


def minmax_params(
    w2: torch.Tensor, bits: int, group_size: int, *, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid per row / group: returns ``(scale, zero)``, each ``[rows, n_groups]`` (``[1, 1]`` for
    :data:`TENSOR`).

    Asymmetric: the range ``[min(w, 0), max(w, 0)]`` is split into ``2^b − 1`` steps,
    ``s = (max − min)/(2^b − 1)`` and ``z = round(−min/s)``, so zero is exactly representable.
    Symmetric: ``s = max|w| / (2^(b−1) − 1)`` (``max|w|`` for 1-bit-magnitude grids), ``z = 0``.
    """
    g = grouped(w2.float(), group_size)
    lo, hi = code_range(bits, symmetric)
    if symmetric:
        absmax = g.abs().amax(dim=-1)
        scale = round_scale(absmax / max(hi, 1), scale_dtype)
        zero = torch.zeros_like(scale)
    else:
        wmin = g.amin(dim=-1).clamp(max=0.0)
        wmax = g.amax(dim=-1).clamp(min=0.0)
        scale = round_scale((wmax - wmin) / (hi - lo), scale_dtype)
        zero = torch.round(-wmin / scale).clamp(lo, hi)
    return scale, zero


def quantize(
    w2: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, *, symmetric: bool
) -> torch.Tensor:
    """Nearest codes on the grid: ``q = clamp(round(w/s) + z, lo, hi)``; returns int16 ``[rows, cols]``."""
    lo, hi = code_range(bits, symmetric)
    g = grouped(w2.float(), group_size)
    q = torch.round(g / scale[..., None]) + zero[..., None]
    return q.clamp(lo, hi).to(torch.int16).reshape(w2.shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """``ŵ = (q − z)·s``: one float32 multiply, which every decode form (the arithmetic one,
    ``DequantizeLinear`` with its scale cast to float, ``MatMulNBits``) computes the same way. With float16
    scales (11 significant bits) and ``|q − z| < 2^8`` the product is exact in float32 (at most 19 bits), so no
    form rounds it to the scale's dtype."""
    g = grouped(codes.float(), group_size)
    w = (g - zero[..., None]) * scale[..., None]
    return w.reshape(codes.shape)
