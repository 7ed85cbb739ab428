"""ONNX model-local functions that decode stored weights, authored with onnxscript.

They live in the ``bayesq`` domain, so a rewritten graph reads as one node per weight. Every op inside is
standard ONNX; runtimes inline the functions, and since all inputs are initializers ORT folds them into
plain float weights when the session starts -- in a session created with no options: none of them uses
``DequantizeLinear``, which ORT's default QDQ handling keeps unfolded.

What ORT's default constant folding folds (onnxruntime 1.31, CPU EP; checked by
``tests/test_default_session.py``): ``Cast`` from every code dtype (INT8/UINT8, INT4/UINT4, INT2/UINT2) to
float or int64, and float32 ``Reshape``/``Sub``/``Mul``/``GatherElements``/``Cast``. It cannot fold ops
with no CPU kernel for their input type: ``Reshape`` of INT4/UINT4/INT2 tensors (so codes are cast before
they are reshaped) and float16 ``Sub``/``Mul`` (so the arithmetic is float32 and only its result is rounded
to float16).
"""

from __future__ import annotations

from typing import Sequence

import onnx_ir as ir
import onnxscript
from onnxscript import opset19 as op

DOMAIN = "bayesq"
DOMAIN_VERSION = 1
_bq = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

_UINT8, _INT32, _INT64, _UINT64, _FLOAT = 2, 6, 7, 13, 1


@onnxscript.script(_bq, default_opset=op)
def UnpackRuns(packed, bits: int):
    """Unpack ``bits``-bit codes (:func:`bayesq_onnx.quant.packing.pack_bits`, stored ``[runs, bits]``: each row
    ``bits`` bytes holding 8 codes, code k in bits ``bits·k .. bits·k + bits − 1`` of the little-endian word) into
    uint8 ``[runs, 8]``.

    Code k lies within bytes ``i = ⌊bits·k/8⌋`` and ``h = min(i + 1, bits − 1)``: with ``s = bits·k mod 8`` it is
    ``((byte_i >> s) | (byte_h << t)) & (2^bits − 1)``, where ``t = 8 − s`` brings the high byte's low bits to
    position ``8 − s`` and, for a code that does not reach the next byte (``s + bits ≤ 8``: ``s = 0`` gets
    ``t = bits``), puts them at or above position ``bits``, where the mask drops them. Every shift is 1..7, all
    in uint8, so six ops of one byte per code: the intermediates ORT's constant folding holds stay small.
    """
    width = op.Constant(value_int=bits)
    eight = op.Constant(value_int=8)
    first_bit = op.Mul(op.Range(op.Constant(value_int=0), eight, op.Constant(value_int=1)), width)
    low = op.Div(first_bit, eight)
    high = op.Min(op.Add(low, op.Constant(value_int=1)), op.Sub(width, op.Constant(value_int=1)))
    shift = op.Mod(first_bit, eight)
    high_shift = op.Where(op.Equal(shift, op.Constant(value_int=0)), width, op.Sub(eight, shift))
    from_low = op.BitShift(op.Gather(packed, low, axis=1), op.Cast(shift, to=_UINT8), direction="RIGHT")
    from_high = op.BitShift(op.Gather(packed, high, axis=1), op.Cast(high_shift, to=_UINT8), direction="LEFT")
    mask = op.BitShift(op.Cast(op.Constant(value_int=255), to=_UINT8), op.Cast(op.Sub(eight, width), to=_UINT8),
                       direction="RIGHT")
    return op.BitwiseAnd(op.BitwiseOr(from_low, from_high), mask)


@onnxscript.script(_bq, default_opset=op)
def UnpackBits(packed, bits: int, shape: Sequence[int]):
    """:func:`UnpackRuns` reshaped to ``shape``, whose element count is a whole number of runs of 8 (no padding
    codes: one reshape, no slice)."""
    return op.Reshape(UnpackRuns(packed, bits=bits), op.Constant(value_ints=shape))


@onnxscript.script(_bq, default_opset=op)
def UnpackBitsPadded(packed, bits: int, shape: Sequence[int]):
    """:func:`UnpackBits` for a count that is not a multiple of 8: the padding codes of the last run dropped."""
    target = op.Constant(value_ints=shape)
    flat = op.Reshape(UnpackRuns(packed, bits=bits), op.Constant(value_ints=[-1]))
    return op.Reshape(op.Slice(flat, op.Constant(value_ints=[0]), op.ReduceProd(target, keepdims=1)), target)


@onnxscript.script(_bq, default_opset=op)
def UnpackWords(packed, bits: int, shape: Sequence[int]):
    """:func:`UnpackBits` for codes decoded on every call (rows a Gather reads): the same codes, about 4× faster.

    Each run of 8 codes is read as one word, ``w = Σ_j byte_j · 2^(8j)`` (uint64; the bytes' bit fields are
    disjoint, so their int64 sum is their OR: ReduceSum has no unsigned kernel), and code k is
    ``(w >> bits·k) & (2^bits − 1)``: two full-size ops instead of seven. ``bits`` ≤ 6: ORT's int64 ReduceSum
    is exact below 2^53 only (measured: it drops low bits of 64-bit words). Its uint64 intermediates take 8 bytes
    per code, which is why constant-folded decodes use :func:`UnpackBits` instead. ``shape`` may hold −1;
    every code is kept (rows of whole words have no padding).
    """
    width = op.Constant(value_int=bits)
    rows = op.Concat(op.Constant(value_ints=[-1]), op.Reshape(width, op.Constant(value_ints=[1])), axis=0)
    byte_shift = op.Cast(op.Mul(op.Range(op.Constant(value_int=0), width, op.Constant(value_int=1)),
                                op.Constant(value_int=8)), to=_UINT64)
    fields = op.BitShift(op.Cast(op.Reshape(packed, rows), to=_UINT64), byte_shift, direction="LEFT")
    word = op.Cast(op.ReduceSum(op.Cast(fields, to=_INT64), op.Constant(value_ints=[1]), keepdims=1), to=_UINT64)
    code_shift = op.Cast(op.Mul(op.Range(op.Constant(value_int=0), op.Constant(value_int=8), op.Constant(value_int=1)),
                                width), to=_UINT64)
    one = op.Cast(op.Constant(value_int=1), to=_UINT64)
    mask = op.Sub(op.BitShift(one, op.Cast(width, to=_UINT64), direction="LEFT"), one)
    codes = op.BitwiseAnd(op.BitShift(word, code_shift, direction="RIGHT"), mask)
    return op.Reshape(op.Cast(codes, to=_UINT8), op.Constant(value_ints=shape))


@onnxscript.script(_bq, default_opset=op)
def CodebookLookup(codes, levels, rows_shape: Sequence[int], table_shape: Sequence[int], table_perm: Sequence[int],
                   table_dims: Sequence[int], data_shape: Sequence[int], axis: int):
    """Decode a codebook weight: ``W[x] = levels[table(row(x)), codes[x]]``, as one ``GatherElements`` from the
    codes in the weight's own shape.

    ``levels`` ``[n_tables, 1, 2^b]`` float16 becomes a float table per row (``rows_shape`` =
    ``[n_tables, rows_per_table, 2^b]``), unflattened over the row axes (``table_shape``), its axes put in the
    weight's order with the level axis at ``axis`` (``table_perm``, ``table_dims``: size 1 on the other column
    axes), and broadcast to ``data_shape`` (the weight's shape with ``2^b`` at ``axis``, one of its column axes):
    ``GatherElements(data, codes, axis)`` then reads ``data[..., codes[x], ...] = levels[table(row(x)), codes[x]]``
    at every position ``x``. The folded intermediates are the int32 indices (4 bytes per weight) and the
    table (``2^b / W.shape[axis]`` of the weight's size): no reshape or transpose of anything weight-sized.
    """
    rows = op.Expand(op.Cast(levels, to=_FLOAT), op.Constant(value_ints=rows_shape))
    table = op.Transpose(op.Reshape(rows, op.Constant(value_ints=table_shape)), perm=table_perm)
    data = op.Expand(op.Reshape(table, op.Constant(value_ints=table_dims)), op.Constant(value_ints=data_shape))
    return op.GatherElements(data, op.Cast(codes, to=_INT32), axis=axis)


@onnxscript.script(_bq, default_opset=op)
def DequantizeAffine(codes, scale, zero_point):
    """Decode a uniform weight with a zero point: ``W = (q − z)·s`` in float32, the value ``DequantizeLinear``
    computes with a float32 scale, in ops that ORT's default session constant-folds.

    ``codes`` (any integer dtype) come in the weight's shape, its input-channel axis split into
    ``[groups, group_size]`` for blocked scales (the caller reshapes the result back); ``scale`` and
    ``zero_point`` are stored in a shape that broadcasts against them. With float16 scales the float32
    product is exact (:func:`bayesq_onnx.quant.uniform.dequantize`), so nothing is rounded back.
    """
    return op.Mul(op.Sub(op.Cast(codes, to=_FLOAT), op.Cast(zero_point, to=_FLOAT)), op.Cast(scale, to=_FLOAT))


@onnxscript.script(_bq, default_opset=op)
def AffineLookup(codes, scale, zero_point, levels_shape: Sequence[int], data_shape: Sequence[int], axis: int):
    """:func:`DequantizeAffine` of a grid with one scale and zero point per row (or per tensor) as one table
    lookup: the row's levels ``(k − z)·s`` for ``k = 0 .. 2^b − 1``, computed by the same float32 ops on the
    small table (so every weight gets the same bits as from :func:`DequantizeAffine`), broadcast to
    ``data_shape`` (the weight's shape with ``2^b`` at ``axis``, ``levels_shape`` holding ``2^b`` there and 1
    elsewhere), then ``GatherElements(data, codes, axis)``. Folded, it holds the int32 indices (4 bytes per
    weight) where :func:`DequantizeAffine` holds two float32 copies.
    """
    shape = op.Constant(value_ints=levels_shape)
    k = op.Reshape(op.Cast(op.Range(op.Constant(value_int=0), op.ReduceProd(shape, keepdims=0),
                                    op.Constant(value_int=1)), to=_FLOAT), shape)
    table = op.Mul(op.Sub(k, op.Cast(zero_point, to=_FLOAT)), op.Cast(scale, to=_FLOAT))
    data = op.Expand(table, op.Constant(value_ints=data_shape))
    return op.GatherElements(data, op.Cast(codes, to=_INT32), axis=axis)


@onnxscript.script(_bq, default_opset=op)
def DequantizeSymmetric(codes, scale):
    """:func:`DequantizeAffine` without a zero point (signed codes): ``W = q·s``."""
    return op.Mul(op.Cast(codes, to=_FLOAT), op.Cast(scale, to=_FLOAT))


@onnxscript.script(_bq, default_opset=op)
def GatheredShape(indices, row_shape: Sequence[int]):
    """``indices``' shape followed by the row length ``row_shape[1]``: the shape ``Gather(W, indices)`` has."""
    cols = op.Slice(op.Constant(value_ints=row_shape), op.Constant(value_ints=[1]), op.Constant(value_ints=[2]))
    return op.Concat(op.Shape(indices), cols, axis=0)


@onnxscript.script(_bq, default_opset=op)
def GatherAffine(codes, indices, scale, zero_point, bits: int, row_shape: Sequence[int],
                 grouped_shape: Sequence[int], side_shape: Sequence[int]):
    """``Gather(W, indices)`` for a uniform table ``W`` stored with a zero point, decoding only the rows read:
    the table stays packed in memory (folded at session start it would be held in float).

    ``codes`` ``[rows, cols·bits/8]`` uint8 (:func:`UnpackBits`' packing, a whole number of words per row,
    unpacked by :func:`UnpackWords`);
    ``scale`` and ``zero_point`` ``[rows, groups]`` (or ``[rows]``: one group per row); ``row_shape`` =
    ``[−1, cols]``, ``grouped_shape`` = ``[−1, groups, cols/groups]``, ``side_shape`` = ``[−1, groups, 1]``.
    The gathered rows decode as :func:`DequantizeAffine` decodes the whole table: the same values, bit for bit.
    """
    q = UnpackWords(op.Gather(codes, indices, axis=0), bits=bits, shape=grouped_shape)
    side = op.Constant(value_ints=side_shape)
    s = op.Reshape(op.Gather(scale, indices, axis=0), side)
    z = op.Reshape(op.Gather(op.Cast(zero_point, to=_FLOAT), indices, axis=0), side)
    return op.Reshape(DequantizeAffine(q, s, z), GatheredShape(indices, row_shape))


@onnxscript.script(_bq, default_opset=op)
def GatherCodebook(codes, indices, levels, bits: int, row_shape: Sequence[int]):
    """``Gather(W, indices)`` for a table ``W`` with a codebook per row, decoding only the rows read:
    ``W[i, c] = levels[i, 0, codes[i, c]]`` for each gathered row ``i`` (``codes`` packed as in
    :func:`GatherAffine`, ``levels`` ``[rows, 1, 2^b]`` float16), the values :func:`CodebookLookup` gives."""
    q = op.Cast(UnpackWords(op.Gather(codes, indices, axis=0), bits=bits, shape=row_shape), to=_INT32)
    tables = op.Reshape(op.Gather(levels, indices, axis=0),
                        op.Concat(op.Constant(value_ints=[-1]), op.Shape(levels, start=2, end=3), axis=0))
    w = op.Cast(op.GatherElements(tables, q, axis=1), to=_FLOAT)
    return op.Reshape(w, GatheredShape(indices, row_shape))


FUNCTIONS = {"UnpackRuns": UnpackRuns, "UnpackBits": UnpackBits, "UnpackBitsPadded": UnpackBitsPadded,
             "UnpackWords": UnpackWords, "CodebookLookup": CodebookLookup, "AffineLookup": AffineLookup, "DequantizeAffine": DequantizeAffine,
             "DequantizeSymmetric": DequantizeSymmetric, "GatherAffine": GatherAffine,
             "GatherCodebook": GatherCodebook, "GatheredShape": GatheredShape}
# the functions each one calls, added to a model with it
CALLS = {"UnpackBits": ("UnpackRuns",), "UnpackBitsPadded": ("UnpackRuns",),
         "GatherAffine": ("UnpackWords", "DequantizeAffine", "GatheredShape"),
         "GatherCodebook": ("UnpackWords", "GatheredShape")}


def add_function(model: ir.Model, name: str) -> None:
    """Add function ``name`` (and those it calls) to the model once, importing the model's own default-domain
    opset."""
    for callee in CALLS.get(name, ()):
        add_function(model, callee)
    key = (DOMAIN, name, "")
    if key in model.functions:
        return
    fn = ir.serde.deserialize_function(FUNCTIONS[name].to_function_proto())
    fn.opset_imports[""] = model.opset_imports[""]
    fn.opset_imports[DOMAIN] = DOMAIN_VERSION
    model.functions[key] = fn
    model.opset_imports[DOMAIN] = DOMAIN_VERSION
