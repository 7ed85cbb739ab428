"""How a stored weight tensor maps to the canonical ``[rows, cols]`` matrix the quantizers work on.

Rows are output channels (the unit that gets its own scale or codebook); columns are everything a row
multiplies (input features, or input channels × kernel taps). Every layout is one permutation plus one
reshape, so a single mechanism serves MatMul, Gemm, Conv, ConvTranspose, Einsum, recurrent and Gather weights:

    canonical = W.transpose(argsort(perm)).reshape(rows, cols)
    W         = canonical.reshape(pre_shape).transpose(perm)

The first ``row_dims`` axes of ``pre_shape`` are the row axes (usually one; an Einsum weight whose output
features span several axes, e.g. ``[3, h, d, dh]`` read by ``btd,shde->sbhte``, has rows ``s·h·e``).

Input channels are always the *last* axis of ``pre_shape``, so contiguous groups of columns are groups of
input channels at a fixed kernel tap: exactly the blocks ONNX ``DequantizeLinear(block_size=...)`` forms
along the weight's input-channel axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WeightLayout:
    """Layout of one weight tensor as stored in the model."""

    shape: tuple[int, ...]
    perm: tuple[int, ...]  # canonical-unflattened axes -> original axes
    row_dims: int = 1      # leading axes of pre_shape that index rows

    def __post_init__(self):
        if not 1 <= self.row_dims < max(len(self.shape), 2):
            raise ValueError(f"row_dims {self.row_dims} leaves no column axis of shape {self.shape}")

    @staticmethod
    def from_axes(shape: tuple[int, ...], rows: tuple[int, ...], cols: tuple[int, ...]) -> "WeightLayout":
        """The layout whose rows are the original axes ``rows`` (outer first) and whose columns are ``cols``
        (the last of them is the input-channel axis groups are formed along)."""
        order = tuple(rows) + tuple(cols)
        if sorted(order) != list(range(len(shape))) or not rows or not cols:
            raise ValueError(f"axes {rows} + {cols} do not split shape {shape} into rows and columns")
        return WeightLayout(tuple(shape), tuple(int(i) for i in np.argsort(order)), len(rows))

    @staticmethod
    def for_consumer(op_type: str, shape: tuple[int, ...], *, trans_b: bool = False) -> "WeightLayout":
        """Layout of a weight consumed by ``op_type``.

        MatMul B is ``[K, N]`` (rows are the N columns); Gemm B is ``[K, N]`` or, with transB, ``[N, K]``;
        Conv W is ``[O, I, k1, k2, ...]``; a Gather table is ``[V, D]`` (one row per embedding vector).

        ConvTranspose W is ``[I, O/group, k1, k2, ...]``: rows are axis 1, columns ``(k..., I)``. With
        ``group`` 1 a row is one output channel. With ``group`` > 1 output channel ``g·O/group + j`` reads
        ``W[g·I/group:(g+1)·I/group, j]``, so canonical row ``j`` holds output channel ``j`` of every group
        (one slice per group along its columns): making rows exactly the output channels would need a
        reshape of axis 0 *before* the permutation, which the one-permutation-one-reshape form (and the
        in-graph decodes built on it) does not have. The layout is still exact (any layout reproduces the
        tensor); a row's scale or codebook is shared by ``group`` output channels, and a column group of
        ``I/group``-aligned size never straddles two groups.
        """
        rank = len(shape)
        if op_type == "MatMul" or (op_type == "Gemm" and not trans_b):
            if rank != 2:
                raise ValueError(f"{op_type} weight must be 2-D, got shape {shape}")
            return WeightLayout(tuple(shape), (1, 0))
        if op_type in ("Gemm", "Gather"):
            if rank != 2:
                raise ValueError(f"{op_type} weight must be 2-D, got shape {shape}")
            return WeightLayout(tuple(shape), (0, 1))
        if op_type == "ConvTranspose":
            if rank < 3:
                raise ValueError(f"ConvTranspose weight must be at least 3-D, got shape {shape}")
            return WeightLayout.from_axes(shape, (1,), (*range(2, rank), 0))
        if op_type == "Conv":
            if rank < 3:
                raise ValueError(f"Conv weight must be at least 3-D, got shape {shape}")
            # original [O, I, k...]; canonical-unflattened [O, k..., I]
            return WeightLayout(tuple(shape), (0, rank - 1, *range(1, rank - 1)))
        raise ValueError(f"no weight layout for op {op_type}")

    @property
    def inv_perm(self) -> tuple[int, ...]:
        return tuple(int(i) for i in np.argsort(self.perm))

    @property
    def pre_shape(self) -> tuple[int, ...]:
        """Shape of the canonical tensor before flattening: original axes in ``inv_perm`` order."""
        return tuple(self.shape[i] for i in self.inv_perm)

    @property
    def rows(self) -> int:
        return int(np.prod(self.pre_shape[:self.row_dims]))

    @property
    def cols(self) -> int:
        return int(np.prod(self.pre_shape[self.row_dims:]))

    @property
    def row_axes(self) -> tuple[int, ...]:
        """The original axes that index rows, outer first."""
        return tuple(self.perm.index(i) for i in range(self.row_dims))

    @property
    def in_channels(self) -> int:
        """Length of the input-channel axis (the axis groups are formed along)."""
        return self.pre_shape[-1]

    @property
    def row_axis(self) -> int:
        """Axis of the original tensor that indexes rows (DequantizeLinear ``axis`` for per-row scales); a
        layout with several row axes has none (:attr:`row_axes`)."""
        if self.row_dims != 1:
            raise ValueError(f"rows of shape {self.shape} span axes {self.row_axes}: no single row axis")
        return self.perm.index(0)

    @property
    def group_axis(self) -> int:
        """Axis of the original tensor holding input channels (DequantizeLinear ``axis`` with ``block_size``)."""
        return self.perm.index(len(self.perm) - 1)

    def to_canonical(self, w):
        """Original-layout array (numpy or torch) -> ``[rows, cols]``."""
        return _transpose(w, self.inv_perm).reshape(self.rows, self.cols)

    def from_canonical(self, w2, last_dim: int | None = None):
        """``[rows, cols']`` -> original layout; ``last_dim`` replaces the input-channel length.

        With ``last_dim = in_channels / group_size`` this maps per-group scales ``[rows, n_groups]`` to the
        shape ``DequantizeLinear`` expects for blocked scales.
        """
        pre = list(self.pre_shape)
        if last_dim is not None:
            pre[-1] = last_dim
        return _transpose(w2.reshape(pre), self.perm)


def _transpose(a, perm):
    if isinstance(a, np.ndarray):
        return np.transpose(a, perm)
    return a.permute(*perm)
