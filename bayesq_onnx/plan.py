"""The plan: for every quantized tensor, its candidate and the exact values the artifact stores.

A plan is what planners produce and what the rewrite consumes. Its accounting is the project's single
source of truth for bits (docs/design.md §2): every stored array — codes, scales, zero points, codebook levels —
is counted at the size it occupies in the ONNX file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from .quant import codebook, packing, uniform
from .quant.layout import WeightLayout
from .quant.uniform import TENSOR

FAMILIES = ("uniform", "codebook", "float")
NBITS = "nbits"
KERNELS = ("", NBITS)
NBITS_BITS = (2, 4, 8)  # the widths MatMulNBits's CPU kernel runs
from .choices import CODE_BITS  # noqa: F401 (re-exported)
_SCALE_DTYPES = {"float16": (np.float16, torch.float16), "float32": (np.float32, torch.float32)}


@dataclass(frozen=True, order=True)
class Candidate:
    """One quantizer choice for a block (docs/design.md §2).

    ``group_size``: for ``uniform``, input channels sharing one scale (0 = one scale per row);
    for ``codebook``, rows sharing one table (1 = a table per row). :data:`TENSOR` (both families): one
    scale and zero point, or one table, for the whole tensor. ``float`` keeps the weight in floating point
    at ``bits`` ∈ {16, 32}.

    ``kernel``: ``""`` stores the weight for a decode in standard ops (folded at session start);
    ``"nbits"`` (uniform 2/4/8-bit MatMul weights, blocks of a power of two ≥ 16 along the input) stores it
    in the layout of ONNX Runtime's ``MatMulNBits``, which multiplies from the packed codes: the weight stays
    compressed in memory (:meth:`QuantizedTensor.stored` says what that layout costs).
    """

    family: str
    bits: int
    group_size: int = 0
    symmetric: bool = False
    scale_dtype: str = "float16"
    kernel: str = ""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; expected one of {FAMILIES}")
        allowed = (16, 32) if self.family == "float" else CODE_BITS
        if self.bits not in allowed:
            raise ValueError(f"{self.family} cannot use {self.bits} bits; allowed: {allowed}")
        if self.family == "codebook" and self.group_size < 1 and not self.per_tensor:
            raise ValueError("a codebook needs group_size >= 1 rows per table (or TENSOR)")
        if self.family == "uniform" and self.group_size < 0 and not self.per_tensor:
            raise ValueError("a uniform grid needs group_size >= 0 input channels per scale (or TENSOR)")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale dtype must be one of {tuple(_SCALE_DTYPES)}")
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r}; expected one of {KERNELS}")
        if self.kernel == NBITS and (self.family != "uniform" or self.bits not in NBITS_BITS or self.per_tensor):
            raise ValueError("MatMulNBits stores uniform 2/4/8-bit codes per row or per group")

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return _SCALE_DTYPES[self.scale_dtype][1]

    @property
    def per_tensor(self) -> bool:
        """One scale and zero point (uniform) or one table (codebook) shared by the whole tensor."""
        return self.family != "float" and self.group_size == TENSOR

    def rows_per_table(self, layout: WeightLayout) -> int:
        """Codebook: rows reading each table (all of them for a per-tensor table)."""
        return layout.rows if self.per_tensor else self.group_size

    def block(self, layout: WeightLayout) -> int:
        """Input channels sharing a scale: the group, or the whole row."""
        return self.group_size or layout.cols

    def fits(self, layout: WeightLayout) -> bool:
        """Whether the candidate can store a weight of this layout: uniform groups must divide the input
        channels, codebook row groups the rows; a per-tensor grid fits any layout. ``nbits``: a 2-D weight
        (rows = N outputs, cols = K inputs) whose block is a power of two ≥ 16 dividing K."""
        if self.kernel == NBITS:
            block = self.block(layout)
            return len(layout.shape) == 2 and block >= 16 and not block & (block - 1) and layout.cols % block == 0
        if self.per_tensor:
            return True
        if self.family == "uniform" and self.group_size:
            return layout.in_channels % self.group_size == 0
        if self.family == "codebook":
            return layout.rows % self.group_size == 0
        return True

    @property
    def label(self) -> str:
        if self.family == "float":
            return f"fp{self.bits}"
        if self.family == "codebook":
            per = "tensor" if self.per_tensor else "row" if self.group_size == 1 else f"{self.group_size}rows"
            return f"codebook{self.bits}-{per}"
        per = "tensor" if self.per_tensor else "row" if self.group_size == 0 else f"g{self.group_size}"
        scale = "-s32" if self.scale_dtype == "float32" else ""
        kernel = f"-{self.kernel}" if self.kernel else ""
        return f"{'int' if self.symmetric else 'uint'}{self.bits}-{per}{scale}{kernel}"

    def to_json(self) -> dict:
        return {"family": self.family, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "scale_dtype": self.scale_dtype, "kernel": self.kernel,
                "label": self.label}


@dataclass
class QuantizedTensor:
    """A weight tensor as the artifact stores it.

    Arrays are canonical ``[rows, cols]`` (see :mod:`bayesq_onnx.quant.layout`): ``codes`` int16;
    uniform: ``scale`` and ``zero`` float32 ``[rows, n_groups]``, ``[1, 1]`` per tensor (scale values
    exactly representable in ``scale_dtype``); codebook: ``levels`` float16 ``[n_tables, 2^bits]``;
    float: ``values``.
    """

    name: str
    layout: WeightLayout
    candidate: Candidate
    codes: np.ndarray | None = None
    scale: np.ndarray | None = None
    zero: np.ndarray | None = None
    levels: np.ndarray | None = None
    values: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @classmethod
    def placeholder(cls, name: str, layout: WeightLayout, candidate: Candidate) -> "QuantizedTensor":
        """Zero-valued arrays of the right shapes: its :meth:`stored_bits` is the candidate's exact cost."""
        rows, cols, c = layout.rows, layout.cols, candidate
        if c.family == "float":
            return cls(name, layout, c, values=np.zeros(layout.shape, np.float32))
        codes = np.zeros((rows, cols), np.int16)
        if c.family == "codebook":
            tables = rows // c.rows_per_table(layout)
            return cls(name, layout, c, codes=codes, levels=np.zeros((tables, 2**c.bits), np.float16))
        shape = (1, 1) if c.per_tensor else (rows, 1 if c.group_size == 0 else cols // c.group_size)
        return cls(name, layout, c, codes=codes, scale=np.ones(shape, np.float32), zero=np.zeros(shape, np.float32))

    @property
    def n_weights(self) -> int:
        return int(np.prod(self.layout.shape))

    # ---- numerics -------------------------------------------------------------------------------
    def dequantize(self) -> np.ndarray:
        """The float32 weight the decoded graph computes, in the original layout."""
        c = self.candidate
        if c.family == "float":
            return self.values.astype(np.float16 if c.bits == 16 else np.float32).astype(np.float32)
        if c.family == "uniform":
            w2 = uniform.dequantize(torch.from_numpy(self.codes), torch.from_numpy(self.scale),
                                    torch.from_numpy(self.zero), c.group_size)
        else:
            w2 = codebook.dequantize(torch.from_numpy(self.codes), torch.from_numpy(self.levels),
                                     c.rows_per_table(self.layout))
        return self.layout.from_canonical(w2.numpy())

    # ---- storage --------------------------------------------------------------------------------
    def stored(self, broadcast: bool = False) -> dict[str, np.ndarray]:
        """Role -> array exactly as written to the ONNX file (dtype and layout).

        ``codes`` in the original layout (3/5/6-bit: packed bytes of that layout, ``[runs, bits]``: 8 codes per
        row). uniform: ``scale`` and ``zero_point`` shaped for ``DequantizeLinear`` (scalars per tensor, 1-D per
        row, blocked otherwise; no zero point for symmetric 2/4/8-bit). codebook: ``levels`` ``[n_tables, 1, 2^b]``.

        ``broadcast=True`` (the standard-op decodes, which ORT folds at session start): the same arrays, same
        bytes in the same order, shaped for a decode with no reshape it can avoid (every reshape ORT folds is
        a copy it holds until folding ends): natively stored uniform codes in :meth:`grouped_shape`, with
        ``scale`` and ``zero_point`` shaped to broadcast against them (per row, size-1 axes except the row
        axis; per group, the blocked shape with a size-1 axis inserted after the input-channel axis). Only the
        dims differ, so :meth:`stored_bits` is the same for both.
        """
        c, lay = self.candidate, self.layout
        if c.family == "float":
            return {"values": self.values.astype(np.float16 if c.bits == 16 else np.float32)}
        if c.kernel == NBITS:
            return self._stored_nbits()
        if c.family == "codebook":
            codes = _store_codes(lay.from_canonical(self.codes), c.bits, signed=False)
            return {"codes": codes, "levels": self.levels.astype(np.float16)[:, None, :]}
        packed = packing.is_packed(c.bits)
        # bit-packed codes are unpacked to uint8 in-graph, so signed packed grids are stored shifted by 2^(b−1)
        offset = 2 ** (c.bits - 1) if (packed and c.symmetric) else 0
        signed = c.symmetric and not packed
        codes = lay.from_canonical(self.codes.astype(np.int16) + offset)
        out = {"codes": _store_codes(codes, c.bits, signed=signed)}
        if broadcast and not packed:
            out["codes"] = out["codes"].reshape(self.grouped_shape())
        scale, zero = self.scale, self.zero + offset
        if c.per_tensor:
            scale, zero = scale.reshape(()), zero.reshape(())
        elif c.group_size == 0:
            scale, zero = scale[:, 0], zero[:, 0]
        else:
            last = lay.in_channels // c.group_size
            scale, zero = lay.from_canonical(scale, last), lay.from_canonical(zero, last)
        if broadcast and not c.per_tensor:
            if c.group_size == 0:
                # per row: [rows] unflattened over the row axes (several for an Einsum weight), in their
                # original order, size 1 along the others
                axes = lay.row_axes
                order = tuple(int(i) for i in np.argsort(axes))
                dims = [1] * len(lay.shape)
                for axis in axes:
                    dims[axis] = lay.shape[axis]
                scale, zero = (a.reshape([lay.shape[x] for x in axes]).transpose(order).reshape(dims)
                               for a in (scale, zero))
            else:
                scale, zero = np.expand_dims(scale, lay.group_axis + 1), np.expand_dims(zero, lay.group_axis + 1)
        out["scale"] = _contiguous(scale.astype(_SCALE_DTYPES[c.scale_dtype][0]))
        if not signed:
            zdtype = np.dtype(np.uint8) if packed else packing.code_dtype(c.bits, signed=False)
            out["zero_point"] = _contiguous(zero.astype(np.int16).astype(zdtype))
        return out

    def _stored_nbits(self) -> dict[str, np.ndarray]:
        """``MatMulNBits``'s inputs for a MatMul B ``[K, N]``: ``codes`` ``[N, K/block, block·bits/8]`` uint8, each
        block's codes packed from the lowest bits up; ``scale`` ``[N, K/block]``; ``zero_point`` (asymmetric)
        ``[N, ⌈(K/block)·bits/8⌉]`` uint8, packed the same way with each row padded to whole bytes (the
        padding is stored, so it is counted). Symmetric codes are stored offset by ``2^(bits−1)``, the zero
        point MatMulNBits assumes when none is given."""
        c, lay = self.candidate, self.layout
        offset = 2 ** (c.bits - 1) if c.symmetric else 0
        n_rows, n_blocks = lay.rows, lay.cols // c.block(lay)
        codes = packing.pack_bits((self.codes.astype(np.int16) + offset).astype(np.uint8), c.bits)
        out = {"codes": codes.reshape(n_rows, n_blocks, -1),
               "scale": _contiguous(self.scale.astype(_SCALE_DTYPES[c.scale_dtype][0]).reshape(n_rows, n_blocks))}
        if not c.symmetric:
            per_byte = 8 // c.bits
            padded = np.zeros((n_rows, -(-n_blocks // per_byte) * per_byte), np.uint8)
            padded[:, :n_blocks] = self.zero.astype(np.int16).reshape(n_rows, n_blocks)
            out["zero_point"] = packing.pack_bits(padded, c.bits)[: padded.size // per_byte].reshape(n_rows, -1)
        return out

    def row_gatherable(self) -> bool:
        """Whether the tensor can be stored as rows that a ``Gather`` reads and decodes one by one (an embedding
        table read only by Gather stays packed in memory; :meth:`stored_rows`): a 2-D table in its stored
        row order, rows of a whole number of packing words (cols divisible by 8), codes of at most 6 bits
        (``bayesq.UnpackWords`` reads a word of 8 codes as one 48-bit integer), and a per-row side array
        (uniform with a zero point per row or per group, a codebook per row, or FP16 values)."""
        c, lay = self.candidate, self.layout
        if len(lay.shape) != 2 or lay.perm != (0, 1) or lay.cols % 8:
            return False
        if c.family == "float":
            return c.bits == 16
        if c.bits > 6:
            return False
        if c.family == "codebook":
            return c.group_size == 1
        return not c.per_tensor and not c.symmetric

    def stored_rows(self) -> dict[str, np.ndarray]:
        """:meth:`stored` for a :meth:`row_gatherable` tensor, with the codes as ``[rows, cols·bits/8]`` uint8:
        each row's codes packed by :func:`~bayesq_onnx.quant.packing.pack_bits` (for 2 and 4 bits the same
        bytes as the ONNX sub-byte types). Same number of bytes as :meth:`stored`, so the same
        :meth:`stored_bits`."""
        out = self.stored()
        if self.candidate.family != "float":
            rows = packing.pack_bits(self.codes.astype(np.uint8), self.candidate.bits).reshape(self.layout.rows, -1)
            if rows.nbytes != packing.stored_nbytes(out["codes"]):
                raise ValueError(f"{self.name}: row-packed codes take {rows.nbytes} bytes, stored "
                                 f"{packing.stored_nbytes(out['codes'])}")
            out["codes"] = rows
        return out

    def grouped_shape(self) -> list[int]:
        """Uniform: the weight's shape with its input-channel axis split into ``[groups, group_size]`` for
        per-group scales (the codes' shape in the arithmetic decode, against ``stored(broadcast=True)``
        scales); the weight's shape otherwise."""
        shape, c = list(self.layout.shape), self.candidate
        if c.family != "uniform" or c.per_tensor or c.group_size == 0:
            return shape
        axis = self.layout.group_axis
        return shape[:axis] + [shape[axis] // c.group_size, c.group_size] + shape[axis + 1:]

    def level_axis(self) -> int:
        """The axis a decode by table lookup gathers along: the weight's longest column axis, so that the
        per-row table broadcast along the others holds ``2^b / shape[axis]`` of the weight's elements."""
        shape, row_axes = self.layout.shape, self.layout.row_axes
        return max((a for a in range(len(shape)) if a not in row_axes), key=lambda a: shape[a])

    def affine_lookup(self) -> dict | None:
        """Uniform with a zero point, per row or per tensor, in the size and fold targets' decode: the attributes
        of ``bayesq.AffineLookup`` when its table of levels is no larger than the weight (``2^b`` at most the
        length of :meth:`level_axis`); otherwise ``None`` (``bayesq.DequantizeAffine`` decodes it)."""
        c, shape = self.candidate, self.layout.shape
        if c.family != "uniform" or c.symmetric or c.kernel == NBITS or c.group_size not in (0, TENSOR):
            return None
        axis, n_levels = self.level_axis(), 2 ** c.bits
        if n_levels > shape[axis]:
            return None
        return {"levels_shape": [n_levels if a == axis else 1 for a in range(len(shape))],
                "data_shape": [n_levels if a == axis else d for a, d in enumerate(shape)], "axis": axis}

    def lookup_shapes(self) -> dict:
        """Codebook: the attributes of ``bayesq.CodebookLookup`` for this tensor (its codes in the weight's own
        shape), gathering along :meth:`level_axis`; the row axes keep their canonical order until
        ``table_perm`` puts every axis in the weight's order."""
        lay, c = self.layout, self.candidate
        n_levels, per = 2 ** c.bits, c.rows_per_table(lay)
        rank, row_axes, axis = len(lay.shape), lay.row_axes, self.level_axis()
        return {"rows_shape": [lay.rows // per, per, n_levels],
                "table_shape": [*lay.pre_shape[:lay.row_dims], n_levels],
                "table_perm": [int(i) for i in np.argsort([*row_axes, axis])],
                "table_dims": [lay.shape[a] if a in row_axes else n_levels if a == axis else 1 for a in range(rank)],
                "data_shape": [n_levels if a == axis else lay.shape[a] for a in range(rank)],
                "axis": axis}

    def stored_bits(self) -> int:
        return 8 * sum(packing.stored_nbytes(a) for a in self.stored().values())

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.layout.shape), "candidate": self.candidate.to_json(),
                "weights": self.n_weights, "stored_bits": self.stored_bits(),
                "all_in_bits": self.stored_bits() / self.n_weights, **self.info}


def _contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` C-contiguous, a 0-d array kept 0-d (``np.ascontiguousarray`` makes it 1-D, which would no longer
    be the scalar scale / zero point of per-tensor ``DequantizeLinear``)."""
    return np.array(a, order="C", copy=True) if a.ndim == 0 else np.ascontiguousarray(a)


def _store_codes(codes: np.ndarray, bits: int, *, signed: bool) -> np.ndarray:
    if packing.is_packed(bits):  # one row per run of 8 codes: the shape bayesq.UnpackRuns reads, no reshape
        return packing.pack_bits(codes.astype(np.uint8), bits).reshape(-1, bits)
    return np.ascontiguousarray(codes.astype(np.int16).astype(packing.code_dtype(bits, signed)))


@dataclass
class Plan:
    """All quantized tensors of a model plus the method that chose them."""

    method: str
    tensors: dict[str, QuantizedTensor]
    settings: dict = field(default_factory=dict)

    @property
    def n_weights(self) -> int:
        return sum(t.n_weights for t in self.tensors.values())

    @property
    def stored_bits(self) -> int:
        return sum(t.stored_bits() for t in self.tensors.values())

    @property
    def all_in_bits(self) -> float:
        """Stored bits of every array of every planned tensor / planned weights (docs/design.md §2)."""
        return self.stored_bits / max(self.n_weights, 1)

    def all_in_bits_over(self, names: Iterable[str]) -> float:
        """:attr:`all_in_bits` over the tensors ``names`` only (e.g. the Linear/Conv weights peers quantize)."""
        tensors = [self.tensors[n] for n in names]
        return sum(t.stored_bits() for t in tensors) / max(sum(t.n_weights for t in tensors), 1)

    @property
    def nominal_bits(self) -> float:
        """Code bits only (what a paper would quote)."""
        return sum(t.candidate.bits * t.n_weights for t in self.tensors.values()) / max(self.n_weights, 1)

    @property
    def min_opset(self) -> int:
        """Lowest default-domain opset that runs every stored dtype and attribute: 25 for (U)INT2 tensors,
        21 for (U)INT4 and ``block_size``, else 19 (float16 scales, bitwise unpacking, Shape start/end)."""
        opset = 19
        for t in self.tensors.values():
            c = t.candidate
            if c.family == "float":
                continue
            if c.kernel:  # MatMulNBits (com.microsoft) reads uint8 arrays
                continue
            if c.bits == 2:
                opset = max(opset, 25)
            elif c.bits == 4 or (c.family == "uniform" and c.group_size > 0):
                opset = max(opset, 21)
        return opset

    def to_json(self) -> dict:
        return {"method": self.method, "settings": self.settings, "weights": self.n_weights,
                "stored_bits": self.stored_bits, "all_in_bits": self.all_in_bits,
                "nominal_bits": self.nominal_bits,
                "tensors": [self.tensors[k].to_json() for k in sorted(self.tensors)]}

