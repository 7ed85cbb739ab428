"""External peers, run as their authors ship them (nothing reimplemented), and their accounting.

Each peer takes the FP32 ONNX model the pipeline exports and returns the quantized model's bytes:

  ort-rtn     onnxruntime's ``MatMulNBitsQuantizer`` with ``DefaultWeightOnlyQuantConfig`` (block-wise
              asymmetric min-max round-to-nearest, C++ kernels), bits 2/4/8, block 32/128
  ort-hqq     ``MatMulNBitsQuantizer`` with ``HQQWeightOnlyQuantConfig`` (half-quadratic optimization of
              scales/zero points), bits 2/4/8, block 32/128
  ort-kquant  ``MatMulNBitsQuantizer`` with ``KQuantWeightOnlyQuantConfig`` (llama.cpp-style k-quant search
              via onnxruntime's bundled neural_compressor ``rtn_quantize``), bits 2/4/8, block 32/128
  ort-static  ``quantize_static`` in QDQ format, per-channel weights QInt8 / QInt4 (symmetric), activations
              QUInt8 calibrated by MinMax on the bundle's calibration batches: **it quantizes activations too**
              (at the inputs and outputs of the quantized MatMul/Gemm/Conv); onnxruntime 1.31.1 has no
              weight-only mode for quantize_static

MatMulNBits peers quantize only MatMul nodes with a constant 2-D B; Conv and Gemm weights stay FP32 there,
which :func:`peer_accounting` reports as coverage (the fraction of our scope's weights the peer quantized).

Accounting "the same way" as ours (docs/design.md §2): all-in bits = 8 · bytes of every stored array that encodes a
quantized weight (codes, scales, zero points, g_idx) / number of weights the peer quantized. Which arrays
those are is read from the peer's own graph: MatMulNBits inputs B, scales, zero_points, g_idx (weights:
K·N from its attributes); DequantizeLinear whose integer initializer feeds a weight input (MatMul B, Gemm
B, Conv W) with its scale and zero point (weights: the size of that initializer). Activation Q/DQ scales and
int32 biases (quantize_static) are not weight arrays and are listed apart.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

# the same per-array byte count as our own artifacts' accounting
from bayesq_onnx.report import tensor_bytes

Batch = dict[str, np.ndarray]

FAMILIES = ("ort-rtn", "ort-hqq", "ort-kquant", "ort-static")
NBITS = (2, 4, 8)
BLOCKS = (32, 128)

# (op type, index of its weight input) -- the consumers our scope quantizes (docs/design.md §2)
_WEIGHT_SLOTS = {"MatMul": 1, "Gemm": 1, "Conv": 1}


class PeerError(RuntimeError):
    """A peer that cannot produce a compressed model here (unsupported setting or op), with the reason."""


@dataclass(frozen=True)
class Peer:
    family: str                    # one of FAMILIES
    bits: int
    block_size: int | None = None  # MatMulNBits block along K; None for per-channel QDQ
    accuracy_level: int | None = None  # ort-rtn only: MatMulNBits compute (None/0: float; 4: int8 activations)

    @property
    def label(self) -> str:
        if self.family == "ort-static":
            return f"ort-static int{self.bits} per-channel (act uint8)"
        acc = "" if self.accuracy_level is None else f" acc{self.accuracy_level}"
        return f"{self.family} b{self.bits} bs{self.block_size}{acc}"

    @property
    def invocation(self) -> str:
        """How the peer is called, in words a reader can paste."""
        if self.family == "ort-rtn":
            return ("MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig("
                    f"block_size={self.block_size}, "
                    f"bits={self.bits}, is_symmetric=False, accuracy_level={self.accuracy_level})).process()")
        if self.family == "ort-hqq":
            return (f"MatMulNBitsQuantizer(model, algo_config=HQQWeightOnlyQuantConfig(block_size={self.block_size}, "
                    f"bits={self.bits})).process()")
        if self.family == "ort-kquant":
            return (f"MatMulNBitsQuantizer(model, block_size={self.block_size}, "
                    "algo_config=KQuantWeightOnlyQuantConfig("
                    f"customized_weight_config={{<every MatMul>: {{'bits': {self.bits}}}}})).process()")
        return (f"quantize_static(model, out, reader, quant_format=QDQ, per_channel=True, "
                f"weight_type=QInt{self.bits}, activation_type=QUInt8, op_types_to_quantize=[MatMul, Gemm, Conv], "
                f"extra_options={{MatMulConstBOnly: True, QDQOpTypePerChannelSupportToAxis: {{MatMul: 1}}}})")

    def quantize(self, fp32: bytes | Path, calibration: list[Batch] | None = None) -> bytes:
        """The peer's quantized model (serialized) from the FP32 model (bytes or a file)."""
        model_bytes = Path(fp32).read_bytes() if isinstance(fp32, (str, Path)) else fp32
        with _quiet():
            if self.family == "ort-static":
                return _quantize_static(model_bytes, self.bits, calibration)
            return _matmul_nbits(model_bytes, self.family, self.bits, self.block_size, self.accuracy_level)


def all_peers(families: tuple[str, ...] = FAMILIES, bits: tuple[int, ...] = NBITS,
              blocks: tuple[int, ...] = BLOCKS, rtn_accuracy_levels: tuple[int | None, ...] = (None,)) -> list[Peer]:
    """Each peer at its native points: MatMulNBits families at bits × blocks (ort-rtn also at each of
    ``rtn_accuracy_levels``), quantize_static at int8/int4."""
    out = []
    for family in families:
        if family == "ort-static":
            out += [Peer(family, b) for b in (8, 4)]
        elif family == "ort-rtn":
            out += [Peer(family, b, bs, acc) for b in bits for bs in blocks for acc in rtn_accuracy_levels]
        else:
            out += [Peer(family, b, bs) for b in bits for bs in blocks]
    return out


# ---- the quantizers ------------------------------------------------------------------------------------

def _matmul_nbits(model_bytes: bytes, family: str, bits: int, block_size: int,
                  accuracy_level: int | None = None) -> bytes:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        KQuantWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load_from_string(model_bytes)
    if family == "ort-rtn":
        quantizer = MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(
            block_size=block_size, bits=bits, is_symmetric=False, accuracy_level=accuracy_level))
    elif family == "ort-hqq":
        quantizer = MatMulNBitsQuantizer(model, algo_config=HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits))
    elif family == "ort-kquant":
        if bits not in (4, 8):
            # onnxruntime's bundled neural_compressor rtn_quantize builds MatMulNBits for 4 and 8 bits only; at
            # other widths it writes a fake-quantized FP32 weight back (the file stays FP32 size).
            raise PeerError(f"k-quant at {bits} bits: onnxruntime {_ort_version()}'s neural_compressor rtn_quantize "
                            "emits MatMulNBits for 4/8 bits only and otherwise stores a fake-quantized FP32 weight")
        # the k-quant path takes bits per node (its template is 4-bit) and the block from the quantizer itself
        names = [n.name for n in model.graph.node if n.op_type == "MatMul"]
        quantizer = MatMulNBitsQuantizer(model, block_size=block_size, algo_config=KQuantWeightOnlyQuantConfig(
            customized_weight_config={n: {"bits": bits} for n in names}))
    else:
        raise ValueError(f"unknown MatMulNBits family {family!r}")
    quantizer.process()
    return quantizer.model.model.SerializeToString()


def _quantize_static(model_bytes: bytes, bits: int, calibration: list[Batch] | None) -> bytes:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if not calibration:
        raise PeerError("quantize_static needs calibration batches")
    if bits not in (4, 8):
        raise PeerError(f"quantize_static takes int4 or int8 weights, not {bits} bits")
    names = {i.name for i in onnx.load_from_string(model_bytes).graph.input}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{k: v for k, v in b.items() if k in names} for b in calibration])

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory(prefix="bayesq-peer-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "q.onnx"
        # a path, not a ModelProto: with int4 weights quantize_static re-saves the proto with external data in
        # a directory it has already removed
        src.write_bytes(model_bytes)
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8 if bits == 8 else QuantType.QInt4,
                        op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                        extra_options={"MatMulConstBOnly": True, "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}})
        # load with any external data pulled in, so the bytes are self-contained
        return onnx.load(str(dst)).SerializeToString()


@contextlib.contextmanager
def _quiet():
    """The quantizers log every node at INFO and print progress bars: keep the benchmark's output readable."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# ---- accounting ----------------------------------------------------------------------------------------

@dataclass
class PeerAccounting:
    file_bytes: int
    quantized_tensor_bytes: int              # bytes of the arrays that encode quantized weights
    quantized_weights: int                   # weights the peer quantized
    arrays: dict[str, int]                   # those arrays: name -> bytes
    tensors: dict[str, int]                  # quantized weight (codes initializer or node) -> weights
    scope_weights: int                       # weights in our scope (CollectWeightsPass on the FP32 model)
    scope_left_fp32: dict[str, int] = field(default_factory=dict)  # scope weights the peer left as float
    other_quantized_bytes: int = 0           # activation Q/DQ parameters, int32 biases: not weight arrays

    @property
    def all_in_bits(self) -> float:
        return 8 * self.quantized_tensor_bytes / self.quantized_weights if self.quantized_weights else math.nan

    @property
    def coverage(self) -> float:
        """Fraction of our scope's weights the peer quantized (1 when it leaves none of them in float)."""
        if not self.scope_weights:
            return math.nan
        return 1.0 - sum(self.scope_left_fp32.values()) / self.scope_weights

    @property
    def scope_bits(self) -> float:
        """All-in bits over the peer's quantized weights plus our scope's weights it left in FP32 (at 32 bits):
        what the peer stores for the weights we quantize."""
        left = sum(self.scope_left_fp32.values())
        n = self.quantized_weights + left
        return (8 * self.quantized_tensor_bytes + 32 * left) / n if n else math.nan

    def to_json(self) -> dict:
        return {"file_bytes": self.file_bytes, "quantized_tensor_bytes": self.quantized_tensor_bytes,
                "quantized_weights": self.quantized_weights, "all_in_bits": self.all_in_bits,
                "coverage": self.coverage, "scope_bits": self.scope_bits, "arrays": self.arrays,
                "scope_left_fp32": self.scope_left_fp32, "other_quantized_bytes": self.other_quantized_bytes}


def scope_weights(fp32: bytes | onnx.ModelProto, scope: str = "linear") -> dict[str, int]:
    """Our quantization scope on the FP32 model (the pipeline's CollectWeightsPass): name -> weights."""
    import onnx_ir as ir

    from bayesq_onnx.passes.collect_weights import CollectWeightsPass

    proto = onnx.load_from_string(fp32) if isinstance(fp32, bytes) else fp32
    collect = CollectWeightsPass(scope=scope)
    collect(ir.serde.deserialize_model(proto))
    return {name: w.size for name, w in collect.weights.items()}


def peer_accounting(model_bytes: bytes, scope: dict[str, int]) -> PeerAccounting:
    """Measure from the peer's file which arrays encode quantized weights and how many weights they hold.

    ``scope``: our scope on the FP32 model (:func:`scope_weights`); scope weights still present in the peer's
    file as float initializers are counted as left in FP32.
    """
    proto = onnx.load_from_string(model_bytes)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    arrays: dict[str, int] = {}
    tensors: dict[str, int] = {}

    def count(names) -> None:
        for name in names:
            if name and name in inits:
                arrays[name] = tensor_bytes(inits[name])

    for node in graph.node:
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            # inputs: A, B, scales, zero_points?, g_idx?, bias? -- bias is not a weight array (docs/design.md §2)
            count(node.input[1:5])
            tensors[node.input[1]] = int(attrs["K"]) * int(attrs["N"])
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            x = inits[node.input[0]]
            if x.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT32):
                continue
            feeds_weight = any(_WEIGHT_SLOTS.get(c.op_type) == i and c.domain in ("", "ai.onnx")
                               for c, i in consumers.get(node.output[0], []))
            if feeds_weight:
                count(node.input[:3])
                tensors[node.input[0]] = int(np.prod(x.dims))
    other = {name for node in graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
             for name in node.input if name in inits and name not in arrays}
    left = {name: n for name, n in scope.items()
            if name in inits and inits[name].data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
            and name in consumers}
    return PeerAccounting(file_bytes=len(model_bytes), quantized_tensor_bytes=sum(arrays.values()),
                          quantized_weights=sum(tensors.values()), arrays=arrays, tensors=tensors,
                          scope_weights=sum(scope.values()), scope_left_fp32=left,
                          other_quantized_bytes=sum(tensor_bytes(inits[n]) for n in other))


def run_peer(peer: Peer, fp32: bytes, scope: dict[str, int], calibration: list[Batch] | None = None
             ) -> tuple[bytes, PeerAccounting]:
    """Quantize with ``peer`` and account for its file; :class:`PeerError` when it quantized nothing."""
    q = peer.quantize(fp32, calibration)
    acc = peer_accounting(q, scope)
    if not acc.quantized_weights:
        ops = sorted({n.op_type for n in onnx.load_from_string(fp32).graph.node if n.op_type in _WEIGHT_SLOTS})
        raise PeerError(f"{peer.label} quantized none of the {acc.scope_weights:,} weights in scope "
                        f"(their consumers here: {', '.join(ops) or 'none'}); the file stays FP32")
    return q, acc


if __name__ == "__main__":  # print how each peer is called
    for p in all_peers():
        print(f"{p.label:40s} {p.invocation}")
