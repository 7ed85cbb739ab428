"""Exact storage of integer codes: the numpy dtype each bit-width is stored as, and bit-packing for the rest.

2-, 4- and 8-bit codes are held as ml_dtypes ``(u)int2`` / ``(u)int4`` / numpy ``(u)int8`` arrays; ONNX
serializes the sub-byte ones packed (4 resp. 2 codes per byte). 3-, 5- and 6-bit codes have no ONNX dtype:
8 codes of ``b`` bits go into ``b`` bytes (one little-endian ``8b``-bit word, code ``k`` in bits
``b·k .. b·k + b − 1``), and the graph unpacks them with BitShift / BitwiseAnd (``bayesq.UnpackBits``).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

_UNSIGNED = {2: ml_dtypes.uint2, 4: ml_dtypes.uint4, 8: np.uint8}
_SIGNED = {2: ml_dtypes.int2, 4: ml_dtypes.int4, 8: np.int8}
_SUBBYTE_BITS = {np.dtype(ml_dtypes.uint2): 2, np.dtype(ml_dtypes.int2): 2,
                 np.dtype(ml_dtypes.uint4): 4, np.dtype(ml_dtypes.int4): 4}


def is_packed(bits: int) -> bool:
    """Whether ``bits``-bit codes are bit-packed into bytes (no native ONNX dtype holds them)."""
    return bits not in _UNSIGNED


def code_dtype(bits: int, signed: bool) -> np.dtype:
    """Storage dtype of ``bits``-bit codes (widths without one are bit-packed into uint8 instead)."""
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


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``bits``-bit codes (values ``0 .. 2^bits − 1``, any shape, row-major) into ``bits·⌈n/8⌉`` bytes:
    each run of 8 codes is the word ``Σ_k code_k · 2^(bits·k)``, stored little-endian in ``bits`` bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes")
    flat = np.asarray(codes).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"{bits}-bit codes must lie in 0..{2**bits - 1}")
    padded = np.zeros((math.ceil(flat.size / 8), 8), dtype=np.uint8)
    padded.reshape(-1)[: flat.size] = flat
    # one uint64 word per 8 codes, built column by column: 8 vector ops, memory ~2 bytes per code
    words = np.zeros(len(padded), dtype=np.uint64)
    for k in range(8):
        words |= padded[:, k].astype(np.uint64) << np.uint64(bits * k)
    return np.stack([(words >> np.uint64(8 * j)).astype(np.uint8) for j in range(bits)], axis=1).reshape(-1)


def unpack_bits(packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as uint8."""
    b = np.asarray(packed, dtype=np.uint8).reshape(-1, bits)
    words = np.zeros(len(b), dtype=np.uint64)
    for j in range(bits):
        words |= b[:, j].astype(np.uint64) << np.uint64(8 * j)
    mask = np.uint64(2**bits - 1)
    codes = np.stack([((words >> np.uint64(bits * k)) & mask).astype(np.uint8) for k in range(8)], axis=1)
    return codes.reshape(-1)[:n]
