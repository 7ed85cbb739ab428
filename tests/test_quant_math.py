"""Property tests for the pure quantization math (no ONNX involved)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bayesq_onnx.plan import Candidate, Plan, QuantizedTensor
from bayesq_onnx.quant import codebook, packing, uniform
from bayesq_onnx.quant.layout import WeightLayout


@given(st.sampled_from([3, 5, 6]), st.data())
def test_pack_bits_roundtrip_and_size(bits, data):
    codes = np.array(data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=200)), dtype=np.uint8)
    packed = packing.pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == bits * math.ceil(codes.size / 8)
    np.testing.assert_array_equal(packing.unpack_bits(packed, codes.size, bits), codes)


def test_pack_bits_bit_order():
    # code k sits in bits b·k .. b·k+b−1 of a little-endian 8b-bit word
    assert packing.pack_bits(np.array([1, 0, 0, 0, 0, 0, 0, 7], np.uint8), 3).tolist() == [0x01, 0x00, 0xE0]
    # 6 bits: 63 in the last code is bits 42..47, the top six bits of byte 5
    assert packing.pack_bits(np.array([1, 0, 0, 0, 0, 0, 0, 63], np.uint8), 6).tolist() == [1, 0, 0, 0, 0, 0xFC]
    # 5 bits: code 1 (value 31) straddles bytes 0 and 1 (bits 5..9)
    assert packing.pack_bits(np.array([0, 31], np.uint8), 5).tolist() == [0xE0, 0x03, 0, 0, 0]


@pytest.mark.parametrize("bits", [3, 5, 6])
def test_pack_bits_rejects_wide_codes(bits):
    with pytest.raises(ValueError):
        packing.pack_bits(np.array([2**bits], np.uint8), bits)


@pytest.mark.parametrize("dtype,bits", [(ml_dtypes.uint4, 4), (ml_dtypes.int4, 4), (ml_dtypes.uint2, 2),
                                        (ml_dtypes.int2, 2), (np.uint8, 8)])
@pytest.mark.parametrize("n", [1, 5, 64, 333])
def test_stored_nbytes_packs_subbyte(dtype, bits, n):
    assert packing.stored_nbytes(np.zeros(n, dtype)) == math.ceil(n * bits / 8)


shapes = st.sampled_from([("MatMul", (12, 8)), ("Gemm", (8, 12)), ("Conv", (6, 4, 3, 3)), ("Conv", (5, 8, 1)),
                          ("Gather", (10, 6))])


@given(shapes, st.integers(0, 2**31 - 1))
def test_layout_roundtrip(spec, seed):
    op, shape = spec
    lay = WeightLayout.for_consumer(op, shape, trans_b=(op == "Gemm"))
    w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    w2 = lay.to_canonical(w)
    assert w2.shape == (lay.rows, lay.cols)
    np.testing.assert_array_equal(lay.from_canonical(w2), w)
    np.testing.assert_array_equal(lay.to_canonical(torch.from_numpy(w)).numpy(), w2)


def test_layout_rows_are_output_channels():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)  # MatMul B: K=3 inputs, N=4 outputs
    lay = WeightLayout.for_consumer("MatMul", w.shape)
    assert (lay.rows, lay.cols, lay.row_axis, lay.group_axis) == (4, 3, 1, 0)
    np.testing.assert_array_equal(lay.to_canonical(w)[1], w[:, 1])
    conv = WeightLayout.for_consumer("Conv", (8, 16, 3, 3))
    assert (conv.rows, conv.cols, conv.in_channels, conv.row_axis, conv.group_axis) == (8, 144, 16, 0, 1)


@settings(deadline=None)
@given(st.sampled_from([2, 3, 4, 8]), st.sampled_from([0, 8]), st.booleans(), st.integers(0, 2**31 - 1))
def test_uniform_grid_properties(bits, group, symmetric, seed):
    w = torch.from_numpy(np.random.default_rng(seed).normal(0, 0.3, (6, 32)).astype(np.float32))
    scale, zero = uniform.minmax_params(w, bits, group, symmetric=symmetric, scale_dtype=torch.float16)
    assert torch.equal(scale, scale.to(torch.float16).float())  # storable exactly
    codes = uniform.quantize(w, scale, zero, bits, group, symmetric=symmetric)
    lo, hi = uniform.code_range(bits, symmetric)
    assert codes.min() >= lo and codes.max() <= hi
    w_hat = uniform.dequantize(codes, scale, zero, group)
    step = uniform.grouped(torch.ones_like(w), group) * scale[..., None]
    err = (uniform.grouped(w, group) - uniform.grouped(w_hat, group)).abs()
    # asymmetric min-max covers the whole range: round-to-nearest error is at most half a step, plus the
    # range lost to storing the scale as float16 (relative 2^-11 per step, over 2^b - 1 steps)
    if not symmetric:
        assert torch.all(err <= step / 2 + (2**bits - 1) * step * 2.0**-11 + 1e-7)
    # zero is exactly representable
    zero_hat = uniform.dequantize(zero.round().to(torch.int16).repeat_interleave(
        32 if group == 0 else group, dim=1), scale, zero, group)
    assert torch.all(zero_hat == 0)


def test_uniform_beats_nothing_and_improves_with_bits():
    w = torch.from_numpy(np.random.default_rng(0).normal(size=(64, 256)).astype(np.float32))
    errs = []
    for bits in (2, 3, 4, 8):
        s, z = uniform.minmax_params(w, bits, 0, symmetric=False, scale_dtype=torch.float32)
        q = uniform.quantize(w, s, z, bits, 0, symmetric=False)
        errs.append(float(((uniform.dequantize(q, s, z, 0) - w) ** 2).mean()))
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-4 < errs[0]


@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 2, 4]))
def test_codebook_nearest_codes_are_nearest(seed, rows_per_table):
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(rng.normal(size=(8, 20)).astype(np.float32))
    levels = torch.from_numpy(rng.normal(size=(8 // rows_per_table, 8)).astype(np.float32))
    codes = codebook.nearest_codes(w, levels, rows_per_table)
    w_hat = codebook.dequantize(codes, levels, rows_per_table)
    tables = levels[codebook.table_index(8, rows_per_table)]
    best = (w[..., None] - tables[:, None, :]).abs().amin(dim=-1)
    torch.testing.assert_close((w - w_hat).abs(), best)


def test_plan_accounting_counts_every_array():
    lay = WeightLayout.for_consumer("MatMul", (64, 32))  # 32 rows x 64 cols
    w = torch.randn(32, 64)
    s, z = uniform.minmax_params(w, 4, 16, symmetric=False, scale_dtype=torch.float16)
    q = uniform.quantize(w, s, z, 4, 16, symmetric=False)
    qt = QuantizedTensor("w", lay, Candidate("uniform", 4, 16), codes=q.numpy(), scale=s.numpy(), zero=z.numpy())
    groups = 32 * 4
    assert qt.stored_bits() == 2048 * 4 + groups * 16 + groups * 4
    plan = Plan("t", {"w": qt})
    assert plan.all_in_bits == pytest.approx(4 + (16 + 4) / 16)
    assert plan.nominal_bits == 4
    lv = np.zeros((8, 8), np.float16)
    cb = QuantizedTensor("w", lay, Candidate("codebook", 3, 4), codes=np.zeros((32, 64), np.int16), levels=lv)
    assert cb.stored_bits() == 3 * 8 * math.ceil(2048 / 8) + 8 * 8 * 16


def test_candidate_validation():
    with pytest.raises(ValueError):
        Candidate("uniform", 7)
    with pytest.raises(ValueError):
        Candidate("codebook", 4, 0)
    with pytest.raises(ValueError):
        Candidate("float", 8)
    assert Candidate("uniform", 4, 128).label == "uint4-g128"
