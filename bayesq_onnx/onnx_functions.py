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

_UINT8, _UINT32, _INT64, _FLOAT = 2, 12, 7, 1


@onnxscript.script(_bq, default_opset=op)
def UnpackBits(packed, bits: int, shape: Sequence[int]):
    """Unpack ``bits``-bit codes (3, 5, 6: widths with no ONNX dtype; :func:`bayesq_onnx.quant.packing.pack_bits`):
    ``bits`` bytes hold 8 codes, code k in bits ``bits·k .. bits·k + bits − 1`` of the little-endian word.

    Code k lies within the two bytes ``i = ⌊bits·k/8⌋`` and ``i + 1`` (``bits`` ≤ 8), so it is
    ``((byte_i | byte_{i+1} << 8) >> (bits·k mod 8)) & (2^bits − 1)`` in uint32: no wider intermediate, which
    keeps ORT's constant folding of large tensors small. Returns uint8 codes reshaped to ``shape`` (the
    padding codes of the last word dropped).
    """
    width = op.Constant(value_int=bits)
    rows = op.Concat(op.Constant(value_ints=[-1]), op.Reshape(width, op.Constant(value_ints=[1])), axis=0)
    byte_rows = op.Reshape(packed, rows)
    first_bit = op.Mul(op.Range(op.Constant(value_int=0), op.Constant(value_int=8), op.Constant(value_int=1)), width)
    eight = op.Constant(value_int=8)
    low = op.Div(first_bit, eight)
    high = op.Min(op.Add(low, op.Constant(value_int=1)), op.Sub(width, op.Constant(value_int=1)))
    word = op.BitwiseOr(op.Cast(op.Gather(byte_rows, low, axis=1), to=_UINT32),
                        op.BitShift(op.Cast(op.Gather(byte_rows, high, axis=1), to=_UINT32),
                                    op.Cast(eight, to=_UINT32), direction="LEFT"))
    one = op.Cast(op.Constant(value_int=1), to=_UINT32)
    mask = op.Sub(op.BitShift(one, op.Cast(width, to=_UINT32), direction="LEFT"), one)
    codes = op.BitwiseAnd(op.BitShift(word, op.Cast(op.Mod(first_bit, eight), to=_UINT32), direction="RIGHT"), mask)
    target = op.Constant(value_ints=shape)
    count = op.ReduceProd(target, keepdims=1)
    flat = op.Slice(op.Reshape(codes, op.Constant(value_ints=[-1])), op.Constant(value_ints=[0]), count)
    return op.Cast(op.Reshape(flat, target), to=_UINT8)


@onnxscript.script(_bq, default_opset=op)
def CodebookLookup(codes, levels, grouped_shape: Sequence[int], pre_shape: Sequence[int], perm: Sequence[int]):
    """Decode a codebook weight: ``W = transpose(reshape(levels[table(r), codes[r, c]], pre_shape), perm)``.

    ``codes`` (any integer dtype) reshape to ``grouped_shape = [n_tables, rows_per_table, cols]``;
    ``levels`` is ``[n_tables, 1, 2^b]`` float16, broadcast over the rows of its table.
    """
    idx = op.Reshape(op.Cast(codes, to=_INT64), op.Constant(value_ints=grouped_shape))
    table_shape = op.Concat(op.Shape(idx, start=0, end=2), op.Shape(levels, start=2, end=3), axis=0)
    w = op.GatherElements(op.Expand(levels, table_shape), idx, axis=2)
    w = op.Transpose(op.Reshape(w, op.Constant(value_ints=pre_shape)), perm=perm)
    return op.Cast(w, to=_FLOAT)


@onnxscript.script(_bq, default_opset=op)
def DequantizeAffine(codes, scale, zero_point, grouped_shape: Sequence[int], shape: Sequence[int], precision: int):
    """Decode a uniform weight with a zero point: ``W = reshape(round((q − z)·s), shape)``, the value
    ``DequantizeLinear`` computes, in ops that ORT's default session constant-folds.

    ``codes`` (any integer dtype) are cast to float and reshaped to ``grouped_shape`` (the weight's shape,
    with the input-channel axis split into [groups, group_size] for blocked scales); ``scale`` and
    ``zero_point`` are stored in a shape that broadcasts against it. The float32 product is rounded to the
    scale's element type ``precision`` (as ``DequantizeLinear``'s output is) and returned as float.
    """
    q = op.Reshape(op.Cast(codes, to=_FLOAT), op.Constant(value_ints=grouped_shape))
    w = op.Mul(op.Sub(q, op.Cast(zero_point, to=_FLOAT)), op.Cast(scale, to=_FLOAT))
    w = op.Cast(op.Cast(w, to=precision), to=_FLOAT)
    return op.Reshape(w, op.Constant(value_ints=shape))


@onnxscript.script(_bq, default_opset=op)
def DequantizeSymmetric(codes, scale, grouped_shape: Sequence[int], shape: Sequence[int], precision: int):
    """:func:`DequantizeAffine` without a zero point (signed codes): ``W = reshape(round(q·s), shape)``."""
    q = op.Reshape(op.Cast(codes, to=_FLOAT), op.Constant(value_ints=grouped_shape))
    w = op.Mul(q, op.Cast(scale, to=_FLOAT))
    w = op.Cast(op.Cast(w, to=precision), to=_FLOAT)
    return op.Reshape(w, op.Constant(value_ints=shape))


FUNCTIONS = {"UnpackBits": UnpackBits, "CodebookLookup": CodebookLookup,
             "DequantizeAffine": DequantizeAffine, "DequantizeSymmetric": DequantizeSymmetric}


def add_function(model: ir.Model, name: str) -> None:
    """Add function ``name`` to the model (once), importing the model's own default-domain opset."""
    key = (DOMAIN, name, "")
    if key in model.functions:
        return
    fn = ir.serde.deserialize_function(FUNCTIONS[name].to_function_proto())
    fn.opset_imports[""] = model.opset_imports[""]
    model.functions[key] = fn
    model.opset_imports[DOMAIN] = DOMAIN_VERSION
