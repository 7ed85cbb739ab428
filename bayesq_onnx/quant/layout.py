"""How a stored weight tensor maps to the canonical ``[rows, cols]`` matrix the quantizers work on.

Rows are output channels (the unit that gets its own scale or codebook); columns are everything a row
multiplies (input features, or input channels × kernel taps). Every layout is one permutation plus one
reshape, so a single mechanism serves MatMul, Gemm, Conv and Gather weights:

    canonical = W.transpose(argsort(perm)).reshape(rows, cols)
    W         = canonical.reshape(pre_shape).transpose(perm)

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

    @staticmethod
    def for_consumer(op_type: str, shape: tuple[int, ...], *, trans_b: bool = False) -> "WeightLayout":
        """Layout of a weight consumed by ``op_type``.

        MatMul B is ``[K, N]`` (rows are the N columns); Gemm B is ``[K, N]`` or, with transB, ``[N, K]``;
        Conv W is ``[O, I, k1, k2, ...]``; a Gather table is ``[V, D]`` (one row per embedding vector).
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
        if op_type in ("Conv", "ConvTranspose"):
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
        return self.pre_shape[0]

    @property
    def cols(self) -> int:
        return int(np.prod(self.pre_shape[1:]))

    @property
    def in_channels(self) -> int:
        """Length of the input-channel axis (the axis groups are formed along)."""
        return self.pre_shape[-1]

    @property
    def row_axis(self) -> int:
        """Axis of the original tensor that indexes rows (DequantizeLinear ``axis`` for per-row scales)."""
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
