"""Exact storage of integer codes: the numpy dtype each bit-width is stored as, and 3-bit bit-packing.

2- and 4-bit codes are held as ml_dtypes ``(u)int2`` / ``(u)int4`` arrays; ONNX serializes those packed
(4 resp. 2 codes per byte). 3-bit codes have no ONNX dtype: 8 codes go into 3 bytes (24 bits, little-endian,
code ``k`` in bits ``3k .. 3k+2``), and the graph unpacks them with BitShift / BitwiseAnd.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

_UNSIGNED = {2: ml_dtypes.uint2, 4: ml_dtypes.uint4, 8: np.uint8}
_SIGNED = {2: ml_dtypes.int2, 4: ml_dtypes.int4, 8: np.int8}
_SUBBYTE_BITS = {np.dtype(ml_dtypes.uint2): 2, np.dtype(ml_dtypes.int2): 2,
                 np.dtype(ml_dtypes.uint4): 4, np.dtype(ml_dtypes.int4): 4}


def code_dtype(bits: int, signed: bool) -> np.dtype:
    """Storage dtype of ``bits``-bit codes (3-bit codes are bit-packed into uint8 instead)."""
    table = _SIGNED if signed else _UNSIGNED
    if bits not in table:
        raise ValueError(f"no native {'signed' if signed else 'unsigned'} storage for {bits}-bit codes")
    return np.dtype(table[bits])


def stored_nbytes(a: np.ndarray) -> int:
    """Bytes the array occupies in an ONNX file (sub-byte dtypes packed)."""
    bits = _SUBBYTE_BITS.get(a.dtype)
    if bits is None:
        return int(a.nbytes)
    return math.ceil(a.size * bits / 8)


def pack3(codes: np.ndarray) -> np.ndarray:
    """Pack 3-bit codes (values 0..7, any shape, row-major) into ``3·⌈n/8⌉`` bytes."""
    flat = np.asarray(codes, dtype=np.uint32).reshape(-1)
    if flat.size and flat.max() > 7:
        raise ValueError("3-bit codes must lie in 0..7")
    padded = np.zeros(math.ceil(flat.size / 8) * 8, dtype=np.uint32)
    padded[: flat.size] = flat
    words = (padded.reshape(-1, 8) << (3 * np.arange(8, dtype=np.uint32))).sum(axis=1, dtype=np.uint32)
    out = np.stack([(words >> s) & 0xFF for s in (0, 8, 16)], axis=1)
    return out.astype(np.uint8).reshape(-1)


def unpack3(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack3`: the first ``n`` codes as uint8."""
    b = np.asarray(packed, dtype=np.uint32).reshape(-1, 3)
    words = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    codes = (words[:, None] >> (3 * np.arange(8, dtype=np.uint32))) & 7
    return codes.reshape(-1)[:n].astype(np.uint8)
