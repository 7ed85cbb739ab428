"""External peers (benchmarks/peers.py) and the comparison benchmark (benchmarks/compare.py) on tiny models."""

from __future__ import annotations

import csv
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


@pytest.mark.parametrize("peer", peers.all_peers(), ids=lambda p: p.label)
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
