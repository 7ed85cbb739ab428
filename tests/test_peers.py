"""External peers (benchmarks/peers.py) and the comparison benchmark (benchmarks/compare.py) on tiny models."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import compare
import peers
from tiny_models import conv_model, linear_model


def _calib(shape, n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=shape).astype(np.float32)} for _ in range(n)]


def _conv_matmul_model(seed: int = 0) -> onnx.ModelProto:
    """x[b,64,8,8] -> Conv(W[16,64,3,3]) -> GlobalAveragePool -> Flatten -> MatMul(W2[16,128]) -> y."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.1, (16, 64, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.1, (16, 128)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "w2"], ["y"], name="mm")]
    graph = helper.make_graph(
        nodes, "conv_mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 128])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def _stored_arrays_of_quantized_weights(model_bytes: bytes) -> dict[str, int]:
    """Independent read of the file: the bytes of every initializer a MatMulNBits (B, scales, zero points)
    or a weight DequantizeLinear (x, scale, zero point) reads."""
    proto = onnx.load_from_string(model_bytes)
    inits = {t.name: t for t in proto.graph.initializer}
    names = set()
    for n in proto.graph.node:
        if n.op_type == "MatMulNBits":
            names.update(n.input[1:4])
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None \
                and inits[n.input[0]].data_type not in (TensorProto.FLOAT, TensorProto.INT32):
            names.update(n.input[:3])

    def size(t: onnx.TensorProto) -> int:
        if t.HasField("raw_data"):
            return len(t.raw_data)
        if t.data_type in (TensorProto.INT4, TensorProto.UINT4):  # 4-bit values, two per byte
            return (int(np.prod(t.dims)) + 1) // 2
        return numpy_helper.to_array(t).nbytes

    return {k: size(inits[k]) for k in names if k in inits}


def test_matmul_nbits_accounting_by_hand():
    """K = N = 128, 4-bit, block 32: codes K·N/2 bytes, float32 scales N·K/32, uint4 zero points packed two a
    byte per column (N · ceil((K/32)/2)); the Gemm weight (32×128) stays FP32."""
    m = linear_model(k=128, n=128)
    fp = m.SerializeToString()
    scope = peers.scope_weights(fp)
    assert scope == {"w1": 128 * 128, "w2": 32 * 128}
    q, acc = peers.run_peer(peers.Peer("ort-rtn", 4, 32), fp, scope)
    codes, scales, zps = 128 * 128 // 2, 128 * (128 // 32) * 4, 128 * 2
    assert acc.arrays == {"w1_Q4": codes, "w1_scales": scales, "w1_zero_points": zps}
    assert acc.quantized_tensor_bytes == codes + scales + zps == 10496
    assert acc.quantized_weights == 128 * 128
    assert acc.all_in_bits == pytest.approx(8 * 10496 / 16384) == 5.125
    assert acc.scope_left_fp32 == {"w2": 4096}
    assert acc.coverage == pytest.approx(16384 / (16384 + 4096))
    assert acc.scope_bits == pytest.approx((8 * 10496 + 32 * 4096) / (16384 + 4096))
    assert acc.arrays == _stored_arrays_of_quantized_weights(q)
    x = _calib((4, 128))[0]
    ref = ort.InferenceSession(fp).run(None, x)[0]
    got = ort.InferenceSession(q).run(None, x)[0]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("peer", peers.all_peers(tuple(f for f in peers.FAMILIES if f not in ("nncf", "aimet"))),
                         ids=lambda p: p.label)
def test_every_peer_runs_or_is_reported(peer):
    """Each peer on the MatMul + Gemm model gives a file whose accounting is exactly its stored arrays, or
    raises (the benchmark reports that as a row with the error)."""
    m = linear_model(k=128, n=128)
    fp = m.SerializeToString()
    scope = peers.scope_weights(fp)
    calib = _calib((4, 128))
    try:
        q, acc = peers.run_peer(peer, fp, scope, calib)
    except Exception as exc:  # noqa: BLE001 - reported by compare.py; the short form must be one line
        assert peer.family in ("ort-kquant", "ort-hqq"), f"{peer.label} should run here: {exc}"
        assert "\n" not in compare.short_error(exc)
        return
    assert acc.arrays == _stored_arrays_of_quantized_weights(q)
    assert acc.quantized_tensor_bytes == sum(acc.arrays.values())
    assert 8 * acc.quantized_tensor_bytes / acc.quantized_weights == pytest.approx(acc.all_in_bits)
    assert acc.file_bytes == len(q) > acc.quantized_tensor_bytes
    if peer.family == "ort-static":
        assert acc.quantized_weights == 128 * 128 + 32 * 128 and acc.coverage == 1.0
        assert acc.other_quantized_bytes > 0  # activation scales / int32 bias: stored but not counted
    else:
        assert acc.quantized_weights == 128 * 128 and acc.coverage == pytest.approx(0.8)
        assert acc.all_in_bits > peer.bits  # scales and zero points cost bits


def test_rtn_accuracy_level_reaches_the_kernel():
    """``accuracy_level`` 4 is written on every MatMulNBits node (int8 activations inside the kernel); unset,
    it is 0 or absent (float compute); the label says which."""
    fp = linear_model(k=128, n=128).SerializeToString()
    levels = {}
    for acc in (None, 4):
        peer = peers.Peer("ort-rtn", 4, 32, acc)
        q = onnx.load_from_string(peer.quantize(fp))
        nodes = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
        assert nodes
        levels[peer.label] = {next((a.i for a in n.attribute if a.name == "accuracy_level"), 0) for n in nodes}
    assert levels == {"ort-rtn b4 bs32": {0}, "ort-rtn b4 bs32 acc4": {4}}
    labels = [p.label for p in peers.all_peers(("ort-rtn", "ort-hqq"), (4,), (32,), (None, 4))]
    assert labels == ["ort-rtn b4 bs32", "ort-rtn b4 bs32 acc4", "ort-hqq b4 bs32"]


def test_conv_coverage():
    """MatMulNBits leaves Conv weights in FP32: partial coverage on Conv + MatMul, a reported error on a
    Conv-only model; quantize_static covers the Conv (int4 per-channel: 4 + (32 + 4)/9·8/64 bits by hand)."""
    mixed = _conv_matmul_model().SerializeToString()
    scope = peers.scope_weights(mixed)
    assert scope == {"w": 16 * 64 * 9, "w2": 16 * 128}
    _, acc = peers.run_peer(peers.Peer("ort-rtn", 4, 32), mixed, scope)
    assert acc.quantized_weights == 16 * 128
    assert acc.scope_left_fp32 == {"w": 9216}
    assert acc.coverage == pytest.approx(2048 / (2048 + 9216))

    conv = conv_model().SerializeToString()
    scope = peers.scope_weights(conv)
    with pytest.raises(peers.PeerError, match="Conv"):
        peers.run_peer(peers.Peer("ort-rtn", 4, 32), conv, scope)
    _, acc = peers.run_peer(peers.Peer("ort-static", 4), conv, scope, _calib((2, 64, 8, 8)))
    # int4 codes packed (9216 / 2), 16 float32 scales, 16 int4 zero points packed (8 bytes)
    assert acc.arrays == {"w_quantized": 4608, "w_scale": 64, "w_zero_point": 8}
    assert acc.all_in_bits == pytest.approx(8 * (4608 + 64 + 8) / 9216)
    assert acc.coverage == 1.0 and acc.scope_left_fp32 == {}


def test_tensor_bytes_packs_sub_byte_types():
    t = helper.make_tensor("t", TensorProto.INT4, [3, 5], np.zeros(15, np.int8).tolist())
    assert not t.HasField("raw_data") and peers.tensor_bytes(t) == 8


def test_short_error_keeps_ort_check():
    exc = RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running MatMulNBits "
                       "node. Name:'mm_Q8' Status Message: /src/matmul_nbits.cc:1265 onnxruntime::Status "
                       "f(const Tensor*, Tensor*) const nbits_ == 2 || nbits_ == 4 was false. Only 2b and 4b "
                       "quantization is supported for unpacked compute for now")
    text = compare.short_error(exc)
    assert "mm_Q8" in text and "Only 2b and 4b" in text and len(text) <= 240


def test_compare_writes_one_row_per_method(tmp_path):
    from tiny_torch import tiny_bundle

    # speed rows at 6 bits: on the tiny model's narrow layers the blocked 4-bit form costs ≥ 5.4 bits all-in
    settings = compare.Settings(budgets=(4.0,), speed_budgets=(6.0,), methods=("bayesq", "rtn", "ort-rtn", "ort-kquant", "ort-static"),
                                calib_size=4, eval_size=4, latency_runs=1, latency_warmup=0, provider="cpu",
                                rtn_row_bits=(4,), rtn_groups=((64, 4),), peer_bits=(2, 4), peer_blocks=(32,))
    todo, _ = compare.jobs(settings)
    rows, ctx, notes = compare.run_compare(tiny_bundle(), "tiny", settings, log=lambda m: None)
    stem = tmp_path / "compare_tiny"
    md = compare.write_outputs(rows, ctx, notes, stem, "test")
    assert [r["method"] for r in rows] == ["fp32"] + [j.label for j in todo]
    by = {r["method"]: r for r in rows}
    for label in ("bayesq 4", "bayesq speed 6", "rtn b4 row", "ort-rtn b4 bs32",
                  "ort-static int8 per-channel (act uint8)"):
        assert not by[label]["error"], by[label]["error"]
        assert 0 < by[label]["all_in_bits"] < 32 and by[label]["latency_ratio"] > 0
    assert by["bayesq 4"]["all_in_bits"] <= 4.0 and by["bayesq 4"]["coverage"] == 1.0
    assert by["bayesq speed 6"]["all_in_bits"] <= 6.0
    assert by["ort-rtn b4 bs32"]["coverage"] < 1.0  # the tiny LM's conv and tied head stay FP32 there
    assert "does not divide" in by["rtn b4 g64"]["error"]  # 32 input channels: a row with the error
    assert "k-quant at 2 bits" in by["ort-kquant b2 bs32"]["error"]
    with open(stem.with_suffix(".csv")) as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(math.isnan(r["top1_agreement"]) == bool(r["error"]) for r in rows)


def test_compare_cli_quick(tmp_path):
    out = tmp_path / "cli"
    assert compare.main(["--model", "module:tiny_torch:tiny_bundle", "--quick", "--methods", "ort-static",
                         "--provider", "cpu", "--out", str(out)]) == 0
    for ext in (".md", ".csv", ".png"):
        assert out.with_suffix(ext).is_file()
    with open(out.with_suffix(".csv")) as fh:
        assert [r["method"] for r in csv.DictReader(fh)] == [
            "fp32", "ort-static int8 per-channel (act uint8)", "ort-static int4 per-channel (act uint8)"]


def test_cuda_check_without_gpu_exits_cleanly(capsys):
    """benchmarks/cuda_check.py: no usable CUDA EP → a clear message and exit 0; the IO-binding timer itself
    runs (on the CPU device) and returns the same outputs as a plain run."""
    import cuda_check

    from bayesq_onnx.runtime.session import cuda_status

    m = linear_model().SerializeToString()
    sessions = {k: ort.InferenceSession(m, providers=["CPUExecutionProvider"]) for k in ("fp32", "artifact")}
    feed = _calib((4, 64))[0]
    stats, outs = cuda_check.iobinding_latency(sessions, feed, "cpu", runs=3, warmup=1)
    assert set(stats) == {"fp32", "artifact"} and all(s["median_ms"] > 0 and s["runs"] == 3 for s in stats.values())
    np.testing.assert_array_equal(outs["artifact"], sessions["artifact"].run(None, feed)[0])
    if cuda_status()[0]:
        pytest.skip("a CUDA GPU is usable here: the full check is benchmarks/cuda_check.sh")
    assert cuda_check.main([]) == 0
    assert "CUDA check skipped" in capsys.readouterr().out


# ---- NNCF (benchmarks/nncf_peer.py in its own venv): accounting and repair on hand-built files shaped like its
# output, so these need neither nncf nor its venv --------------------------------------------------------------

def _pack_u4(values: np.ndarray) -> bytes:
    """ONNX's 4-bit packing of a flat array: element 2i in the low nibble of byte i, 2i+1 in the high one."""
    flat = np.asarray(values, np.uint8).ravel()
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _nncf_like_dq_model(seed: int = 0):
    """What NNCF writes at opset 21: w1 INT4_ASYM group 128 as a blocked DequantizeLinear (UINT4 codes [K, N], float
    scales and UINT4 zero points [K/128, N]) → MatMul → Add(bias); w2 its INT8_ASYM backup (per-channel UINT8
    DequantizeLinear); w3 left in float (backup mode none). Returns the model, its FP32 counterpart and the dequantized
    weights."""
    rng = np.random.default_rng(seed)
    k, n, m, o = 256, 64, 32, 64
    q1 = rng.integers(0, 16, (k, n)).astype(np.uint8)
    s1 = rng.uniform(0.005, 0.02, (k // 128, n)).astype(np.float32)
    z1 = rng.integers(0, 16, (k // 128, n)).astype(np.uint8)
    q2 = rng.integers(0, 256, (n, m)).astype(np.uint8)
    s2 = rng.uniform(0.001, 0.003, (m,)).astype(np.float32)
    z2 = rng.integers(100, 156, (m,)).astype(np.uint8)
    w3 = rng.normal(0, 0.1, (m, o)).astype(np.float32)
    bias = rng.normal(0, 0.1, (n,)).astype(np.float32)
    w1 = (q1.astype(np.float32) - np.repeat(z1, 128, 0)) * np.repeat(s1, 128, 0)
    w2 = (q2.astype(np.float32) - z2) * s2
    inits = [helper.make_tensor("w1_quantized", TensorProto.UINT4, [k, n], _pack_u4(q1), raw=True),
             numpy_helper.from_array(s1, "w1_scale"),
             helper.make_tensor("w1_zero_point", TensorProto.UINT4, list(z1.shape), _pack_u4(z1), raw=True),
             numpy_helper.from_array(bias, "b1"),
             helper.make_tensor("w2_quantized", TensorProto.UINT8, [n, m], q2.tobytes(), raw=True),
             numpy_helper.from_array(s2, "w2_scale"),
             helper.make_tensor("w2_zero_point", TensorProto.UINT8, [m], z2.tobytes(), raw=True),
             numpy_helper.from_array(w3, "w3")]
    nodes = [helper.make_node("DequantizeLinear", ["w1_quantized", "w1_scale", "w1_zero_point"], ["w1_dequantized"],
                              name="w1_DequantizeLinear", axis=0, block_size=128),
             helper.make_node("MatMul", ["x", "w1_dequantized"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("DequantizeLinear", ["w2_quantized", "w2_scale", "w2_zero_point"], ["w2_dequantized"],
                              name="w2_DequantizeLinear", axis=-1),
             helper.make_node("MatMul", ["r", "w2_dequantized"], ["h2"], name="mm2"),
             helper.make_node("MatMul", ["h2", "w3"], ["y"], name="mm3")]
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", o])])
    model = helper.make_model(helper.make_graph(nodes, "nncf_dq", *io, inits),
                              opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    fp_nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), nodes[2], nodes[3],
                helper.make_node("MatMul", ["r", "w2"], ["h2"], name="mm2"), nodes[6]]
    fp = helper.make_model(helper.make_graph(fp_nodes, "fp", *io, [
        numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(bias, "b1"), numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(w3, "w3")]), opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return model, fp


def test_nncf_dequantize_linear_accounting_by_hand():
    """NNCF's opset-21 form: UINT4 codes K·N/2 bytes, float32 scales 4 bytes per group, UINT4 zero points packed;
    the INT8 backup layer's codes, per-channel scales and zero points; the float layer is scope left in FP32.
    onnxruntime runs the file as written and gives the FP32 counterpart's outputs."""
    model, fp = _nncf_like_dq_model()
    scope = peers.scope_weights(fp.SerializeToString())
    assert scope == {"w1": 256 * 64, "w2": 64 * 32, "w3": 32 * 64}
    q = model.SerializeToString()
    acc = peers.peer_accounting(q, scope)
    assert acc.arrays == {"w1_quantized": 8192, "w1_scale": 2 * 64 * 4, "w1_zero_point": 64,
                          "w2_quantized": 2048, "w2_scale": 32 * 4, "w2_zero_point": 32}
    assert acc.arrays == _stored_arrays_of_quantized_weights(q)
    assert acc.quantized_weights == 256 * 64 + 64 * 32
    assert acc.all_in_bits == pytest.approx(8 * 10976 / 18432)
    assert acc.scope_left_fp32 == {"w3": 2048}
    assert acc.coverage == pytest.approx(18432 / (18432 + 2048))
    assert acc.scope_bits == pytest.approx((8 * 10976 + 32 * 2048) / (18432 + 2048))
    x = {"x": np.random.default_rng(1).normal(size=(4, 256)).astype(np.float32)}
    cfg = peers.Peer("nncf", 4, 128).session_config
    options = ort.SessionOptions()
    for key, value in cfg.items():
        options.add_session_config_entry(key, value)
    got = ort.InferenceSession(q, options, providers=["CPUExecutionProvider"]).run(None, x)[0]
    ref = ort.InferenceSession(fp.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_nncf_awq_mul_scale_is_a_weight_array():
    """An AWQ scale NNCF inserts as ``<node>/awq_mul`` (when it cannot fold it) is counted with the weights."""
    model, fp = _nncf_like_dq_model()
    scale = numpy_helper.from_array(np.full(64, 0.5, np.float32), "mm1/awq_mul_scale")
    model.graph.initializer.append(scale)
    mul = helper.make_node("Mul", ["r", "mm1/awq_mul_scale"], ["r_awq"], name="mm1/awq_mul")
    model.graph.node.insert(4, mul)
    model.graph.node[6].input[0] = "r_awq"
    acc = peers.peer_accounting(model.SerializeToString(), peers.scope_weights(fp.SerializeToString()))
    assert acc.arrays["mm1/awq_mul_scale"] == 256
    assert acc.quantized_tensor_bytes == 10976 + 256 and acc.quantized_weights == 18432


def _nncf_like_matmulnbits_model(seed: int = 0, k: int = 384, n: int = 16, block: int = 128):
    """What NNCF 3.4 writes below opset 21 for an INT4_ASYM group-128 MatMul followed by Add(bias): MatMulNBits
    with B [N, blocks, block/2], scales [N, blocks], uint8 zero points one per byte [N, blocks], the bias as its
    input 5, and the Add still in place. Returns the model and the reference (x -> x @ W + bias, bias once)."""
    rng = np.random.default_rng(seed)
    blocks = -(-k // block)
    q = rng.integers(0, 16, (n, blocks, block)).astype(np.uint8)
    s = rng.uniform(0.005, 0.02, (n, blocks)).astype(np.float32)
    z = rng.integers(0, 16, (n, blocks)).astype(np.uint8)
    bias = rng.normal(0, 0.1, (n,)).astype(np.float32)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    w = ((q.astype(np.float32) - z[..., None]) * s[..., None]).reshape(n, blocks * block)[:, :k].T  # [K, N]
    inits = [helper.make_tensor("w_quantized", TensorProto.UINT8, list(packed.shape), packed.tobytes(), raw=True),
             numpy_helper.from_array(s, "w_scale"),
             helper.make_tensor("w_zero_point", TensorProto.UINT8, [n, blocks], z.tobytes(), raw=True),
             numpy_helper.from_array(bias, "b")]
    nodes = [helper.make_node("MatMulNBits", ["x", "w_quantized", "w_scale", "w_zero_point", "", "b"], ["h"],
                              name="mm_compressed_matmul", domain="com.microsoft", K=k, N=n, bits=4,
                              block_size=block, accuracy_level=0),
             helper.make_node("Add", ["h", "b"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "nncf_nbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    return model, (lambda x: x @ w + bias), z


def test_nncf_matmulnbits_repair_keeps_the_numbers():
    """onnxruntime refuses NNCF's unpacked zero points; the repair packs them (values unchanged, the odd block's
    high nibble is padding), drops the duplicated bias, and the result computes x @ W + bias with the stored
    codes, scales and zero points. Accounting by hand, before and after; a second repair changes nothing."""
    model, reference, z = _nncf_like_matmulnbits_model()
    emitted = model.SerializeToString()
    with pytest.raises(Exception, match="zero_points"):
        ort.InferenceSession(emitted, providers=["CPUExecutionProvider"])
    repaired, fixes = peers.repair_nncf_matmulnbits(emitted)
    assert len(fixes) == 2 and "packed" in fixes[0] and "bias" in fixes[1]
    proto = onnx.load_from_string(repaired)
    zp = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "w_zero_point"))
    assert zp.shape == (16, 2)
    np.testing.assert_array_equal(zp & 15, z[:, 0::2])
    np.testing.assert_array_equal(zp[:, 0] >> 4, z[:, 1])
    assert list(proto.graph.node[0].input) == ["x", "w_quantized", "w_scale", "w_zero_point"]
    x = np.random.default_rng(2).normal(size=(5, 384)).astype(np.float32)
    got = ort.InferenceSession(repaired, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, reference(x), rtol=1e-4, atol=1e-4)
    # codes 384·16/2, scales 16·3 float32, zero points 16·2 packed (as emitted: 16·3)
    acc = peers.peer_accounting(repaired, {"w": 384 * 16})
    assert acc.arrays == {"w_quantized": 3072, "w_scale": 192, "w_zero_point": 32}
    assert acc.all_in_bits == pytest.approx(8 * 3296 / 6144) and acc.coverage == 1.0
    assert peers.peer_accounting(emitted, {}).all_in_bits == pytest.approx(8 * 3312 / 6144)
    assert peers.repair_nncf_matmulnbits(repaired) == (repaired, [])


def test_nncf_missing_venv_is_a_row_with_the_reason(tmp_path, monkeypatch):
    """No NNCF environment: every nncf row is a row whose error says how to make one; the run goes on."""
    monkeypatch.setenv("BAYESQ_NNCF_PYTHON", str(tmp_path / "no-venv" / "bin" / "python"))
    fp = linear_model(k=128, n=128).SerializeToString()
    with pytest.raises(peers.PeerError, match=r"nncf not installed: run `bash benchmarks/setup_nncf.sh`"):
        peers.run_peer(peers.Peer("nncf", 4, 128), fp, peers.scope_weights(fp))

    ctx = compare.Context(bundle=None, model_spec="tiny", settings=compare.Settings(methods=("nncf",)),
                          providers=["CPUExecutionProvider"], provider_note="", fp32_bytes=fp, export_s=0.0,
                          scope=peers.scope_weights(fp), fp_session=None, fp_start_s=0.0, reference=None,
                          headline="cosine_mean")

    class Bundle:
        calibration = _calib((4, 128))

    ctx.bundle = Bundle()
    todo, _ = compare.jobs(ctx.settings)
    assert [j.label for j in todo] == [p.label for p in peers.NNCF_POINTS]
    for job in todo:
        row = compare._row(job, ctx)
        with pytest.raises(peers.PeerError) as err:
            compare.run_peer(job, ctx, row)
        assert compare.short_error(err.value).startswith("PeerError: nncf not installed: run `bash benchmarks/")


def test_nncf_failure_is_reported_with_its_exception(tmp_path, monkeypatch):
    """NNCF refusing a setting (its ONNX backend has no INT3): the exception line of its traceback is the row's
    reason."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'Traceback (most recent call last):' >&2\n"
                    "echo '    raise nncf.ParameterNotSupportedError(msg)' >&2\n"
                    "echo 'nncf.errors.ParameterNotSupportedError: int3_sym is not supported.' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("BAYESQ_NNCF_PYTHON", str(fake))
    fp = linear_model(k=128, n=128).SerializeToString()
    peer = peers.Peer("nncf", 3, 128, symmetric=True)
    with pytest.raises(peers.PeerError, match=r"^nncf: nncf.errors.ParameterNotSupportedError: int3_sym is not supported"):
        peers.run_peer(peer, fp, peers.scope_weights(fp))


def test_nncf_points_and_calls(tmp_path):
    """Each point's options for benchmarks/nncf_peer.py: INT8 takes no group or ratio, data-aware points get the
    calibration; labels are distinct; the calibration file round-trips and splits into single examples."""
    import nncf_peer

    labels = [p.label for p in peers.NNCF_POINTS]
    assert len(set(labels)) == len(labels)
    by = {p.label: p for p in peers.NNCF_POINTS}
    assert by["nncf int8_asym per-channel"].nncf_arguments() == ["--mode", "int8_asym", "--ignored-types", "Gather"]
    assert by["nncf int4_asym g128 r0.8 awq+se"].nncf_arguments() == [
        "--mode", "int4_asym", "--ignored-types", "Gather", "--group-size", "128", "--ratio", "0.8", "--awq",
        "--scale-estimation"]
    assert by["nncf int4_asym per-channel awq+se all-layers"].nncf_arguments()[4:] == [
        "--group-size", "-1", "--awq", "--scale-estimation", "--all-layers"]
    assert [p.data_aware for p in peers.NNCF_POINTS] == [False, True, True, True, True, False, False, True]
    assert "ratio=0.8" in by["nncf int4_asym g128 r0.8 awq+se"].invocation
    assert peers.NNCF_POINTS[-1].opset is None and "as exported" in peers.NNCF_POINTS[-1].label
    assert peers.Peer("ort-rtn", 4, 32).session_config is None

    tmp = tmp_path / "c.npz"
    batches = [{"a": np.arange(6).reshape(3, 2), "m": np.ones((3, 2)), "label": np.zeros(3)},
               {"a": np.arange(4).reshape(1, 4)}]
    peers.write_calibration(tmp, batches, {"a", "m"})  # what the harness hands the subprocess
    back = nncf_peer.read_calibration(tmp)
    assert [sorted(b) for b in back] == [["a", "m"], ["a"]]
    nncf_peer.write_calibration(tmp_path / "d.npz", back)
    assert [sorted(b) for b in nncf_peer.read_calibration(tmp_path / "d.npz")] == [["a", "m"], ["a"]]
    np.testing.assert_array_equal(back[0]["a"], batches[0]["a"])
    items = nncf_peer.examples(back)
    assert len(items) == 4 and items[1]["a"].tolist() == [[2, 3]] and items[3]["a"].shape == (1, 4)


@pytest.mark.slow
@pytest.mark.skipif(not peers.nncf_python().is_file(), reason="no NNCF venv: bash benchmarks/setup_nncf.sh")
def test_nncf_real_run_both_forms():
    """With NNCF installed: its opset-21 file and its repaired as-exported MatMulNBits file hold the same weights
    and give the same outputs (data-free INT4_ASYM g128 on the MatMul; the Gemm goes to INT8 as the last layer)."""
    m = linear_model(k=256, n=128)
    fp = m.SerializeToString()
    scope = peers.scope_weights(fp)
    x = _calib((4, 256))[0]
    outs = {}
    for peer in (peers.Peer("nncf", 4, 128), peers.Peer("nncf", 4, 128, opset=None)):
        q, acc = peers.run_peer(peer, fp, scope)
        assert acc.coverage == 1.0 and acc.arrays == _stored_arrays_of_quantized_weights(q)
        options = ort.SessionOptions()
        for key, value in peer.session_config.items():
            options.add_session_config_entry(key, value)
        outs[peer.opset] = ort.InferenceSession(q, options, providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(outs[21], outs[None], rtol=1e-5, atol=1e-5)
    ref = ort.InferenceSession(fp).run(None, x)[0]
    assert np.abs(outs[21] - ref).max() < 0.1 * np.abs(ref).max()


# ---- AIMET (benchmarks/aimet_peer.py in its own venv) ----------------------------------------------------------

def test_aimet_missing_venv_is_a_row_with_the_reason(tmp_path, monkeypatch):
    """No AIMET environment: the aimet row is a row whose error says how to make one."""
    monkeypatch.setenv("BAYESQ_AIMET_PYTHON", str(tmp_path / "no-venv" / "bin" / "python"))
    fp = linear_model(k=128, n=128).SerializeToString()
    with pytest.raises(peers.PeerError, match=r"aimet not installed: run `bash benchmarks/setup_aimet.sh`"):
        peers.run_peer(peers.Peer("aimet", 4), fp, peers.scope_weights(fp), _calib((4, 128)))


def test_aimet_config_is_weight_only_per_channel_asymmetric(tmp_path):
    """The config handed to AIMET: its per-channel default with asymmetric weights, a scale per output channel
    on every weight op, float biases (activations are disabled on the sim itself)."""
    import aimet_peer

    default = {"defaults": {"ops": {"is_output_quantized": "True"}, "params": {"is_quantized": "True",
               "is_symmetric": "True"}, "per_channel_quantization": "False"},
               "params": {"bias": {"is_quantized": "False"}}, "op_type": {"Conv": {"per_channel_quantization": "True"}},
               "supergroups": [{"op_list": ["Conv", "Relu"]}]}
    path = tmp_path / "default_config_per_channel.json"
    path.write_text(json.dumps(default))
    config = aimet_peer.weight_only_config(path)
    assert config["defaults"]["params"] == {"is_quantized": "True", "is_symmetric": "False"}
    assert all(config["op_type"][op] == {"per_channel_quantization": "True"} for op in aimet_peer.WEIGHT_OPS)
    assert config["params"]["bias"] == {"is_quantized": "False"} and config["supergroups"] == []
    assert peers.Peer("aimet", 4).label == f"aimet adaround int4 per-channel {peers.AIMET_ITERATIONS} it"
    assert "aimet" not in compare.DEFAULT_METHODS and "aimet" in compare.METHOD_FAMILIES
