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

  nncf        NNCF's ``nncf.compress_weights`` (ONNX backend), run in NNCF's own virtual environment by
              ``benchmarks/nncf_peer.py`` in a subprocess: INT4_ASYM per group (64/128) or per channel (all layers)
              with AWQ and scale estimation on the bundle's calibration batches, 4/8-bit data-aware mixed precision (ratio < 1),
              INT8_ASYM per channel; data-free INT4_ASYM g128; INT3_SYM (which its ONNX backend refuses). Setup:
              ``bash benchmarks/setup_nncf.sh`` makes ``.venv-nncf`` (nncf 3.4.0, onnx 1.23.2, the CPU onnxruntime
              1.31.1, pinned in benchmarks/nncf-requirements.txt); ``BAYESQ_NNCF_PYTHON`` points at another
              interpreter. Without it the nncf rows are rows with the reason ("not installed: run ...").

  aimet       AIMET's AdaRound (``aimet_onnx`` 2.42.0, ONNX in, ONNX QDQ out), run in AIMET's own virtual
              environment by ``benchmarks/aimet_peer.py``: weights per-channel asymmetric int4 (AIMET's
              min-max encodings, then AdaRound's learned rounding layer by layer on the calibration batches,
              :data:`AIMET_ITERATIONS` steps per layer, stated in the row), activations float (every activation
              quantizer of its sim disabled); its QDQ file stores int4 codes → ``DequantizeLinear`` with a float32
              scale and an int4 zero point per output channel. Setup: ``bash benchmarks/setup_aimet.sh`` makes
              ``.venv-aimet`` (aimet-onnx, the CPU onnxruntime, torch from the project's constraints);
              ``BAYESQ_AIMET_PYTHON`` points at another interpreter.

MatMulNBits peers quantize only MatMul nodes with a constant 2-D B; Conv and Gemm weights stay FP32 there,
which :func:`peer_accounting` reports as coverage (the fraction of our scope's weights the peer quantized).

NNCF and onnxruntime 1.31.1. For a model below opset 21 (the pipeline exports opset 20) NNCF's ONNX backend writes
a grouped weight as ``com.microsoft.MatMulNBits``, and that file does not load: NNCF stores the 4-bit zero points
one per byte, shape [N, blocks], where MatMulNBits takes uint8 zero points packed two per byte, [N, ceil(blocks/2)]
("MatMulNBits PrePack: zero_points initializer shape {384,3} does not match attribute-derived shape [768] or
[384,2]"); it also passes the bias of the Add that follows the MatMul to MatMulNBits's bias input and leaves that
Add in place, so the bias would be added twice. Two ways to run it, both without changing a stored number:

* the default (``Peer.opset`` 21): the FP32 model is converted to opset 21 (``onnx.version_converter``) before
  NNCF sees it; NNCF then writes standard ``DequantizeLinear`` (blocked, UINT4 codes and UINT4 zero points, packed
  as ONNX packs 4-bit types; per-channel UINT8 for 8-bit layers) → ``MatMul``, which onnxruntime loads as written.
  Nothing of NNCF's output is touched. ORT fuses DequantizeLinear → MatMul into MatMulNBits at session start;
  the rows run it with ``session.qdq_matmulnbits_accuracy_level`` 0 (float compute, :attr:`Peer.session_config`;
  ORT's default 4 quantizes activations to int8 inside the kernel). Per-channel INT4 needs this path: at opset 20
  NNCF writes a UINT4 DequantizeLinear, which opset 20 does not allow.
* ``Peer.opset`` None (the model's own opset, the label says "as exported"): NNCF's MatMulNBits file, repaired by
  :func:`repair_nncf_matmulnbits`: each unpacked zero-point array is packed two per byte (block 2j in the low
  nibble, 2j+1 in the high nibble, as MatMulNBits reads them; the values are unchanged), and the bias input of a
  MatMulNBits whose output goes only to an Add of that same bias is dropped (the Add still adds it once). The
  accounting is of the repaired file (the one evaluated); the as-emitted file's figure is in the row's note.
  Checked on MiniLM (data-free INT4_ASYM g128): the 35 repaired MatMulNBits hold exactly the codes, scales and zero
  points of the opset-21 file, and both files give the same outputs; with the bias left doubled the cosine to
  FP32 falls from 0.960 to 0.787.

Accounting "the same way" as ours (docs/design.md §2): all-in bits = 8 · bytes of every stored array that encodes a
quantized weight (codes, scales, zero points, g_idx) / number of weights the peer quantized. Which arrays
those are is read from the peer's own graph: MatMulNBits inputs B, scales, zero_points, g_idx (weights:
K·N from its attributes); DequantizeLinear whose integer initializer feeds a weight input (MatMul B, Gemm
B, Conv W) with its scale and zero point (weights: the size of that initializer). Activation Q/DQ scales and
int32 biases (quantize_static) are not weight arrays and are listed apart. NNCF's files are read by the same two
rules (its INT4 layers are MatMulNBits or blocked DequantizeLinear, its INT8 backup layers per-channel
DequantizeLinear); an AWQ scale NNCF could not fold into a preceding weight is a ``Mul`` named ``*/awq_mul`` with a
constant, counted as a weight array too (NNCF finds no AWQ pattern in MiniLM, so there is none there). Layers NNCF
leaves in float (``backup_mode`` none, ignored scope) are scope weights left in FP32.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

# the same per-array byte count as our own artifacts' accounting
from bayesq_onnx.report import tensor_bytes

Batch = dict[str, np.ndarray]

FAMILIES = ("ort-rtn", "ort-hqq", "ort-kquant", "ort-static", "nncf", "aimet")
NBITS = (2, 4, 8)
BLOCKS = (32, 128)

HERE = Path(__file__).resolve().parent
NNCF_SCRIPT = HERE / "nncf_peer.py"
NNCF_SETUP = "bash benchmarks/setup_nncf.sh"
NNCF_TIMEOUT_S = 3600
AIMET_SCRIPT = HERE / "aimet_peer.py"
AIMET_SETUP = "bash benchmarks/setup_aimet.sh"
AIMET_TIMEOUT_S = 4 * 3600
AIMET_ITERATIONS = 200  # AdaRound steps per layer (AIMET's default 10 000 takes hours per model on a 2-core CPU)

# (op type, index of its weight input) -- the consumers our scope quantizes (docs/design.md §2)
_WEIGHT_SLOTS = {"MatMul": 1, "Gemm": 1, "Conv": 1}


class PeerError(RuntimeError):
    """A peer that cannot produce a compressed model here (unsupported setting or op), with the reason."""


@dataclass(frozen=True)
class Peer:
    family: str                    # one of FAMILIES
    bits: int
    block_size: int | None = None  # MatMulNBits block / NNCF group along K; None for per-channel
    accuracy_level: int | None = None  # ort-rtn only: MatMulNBits compute (None/0: float; 4: int8 activations)
    # nncf only
    symmetric: bool = False        # INT<b>_SYM instead of INT<b>_ASYM
    ratio: float | None = None     # share of the ratio-defining layers in the primary precision (< 1: 4/8 mixed)
    awq: bool = False
    scale_estimation: bool = False
    all_layers: bool = False       # the last MatMul in the primary precision too (NNCF's default: INT8 backup)
    opset: int | None = 21         # the FP32 model converted to this opset first; None: as exported (see above)
    iterations: int = AIMET_ITERATIONS  # aimet only: AdaRound steps per layer

    @property
    def data_aware(self) -> bool:
        return self.awq or self.scale_estimation or (self.ratio is not None and self.ratio < 1)

    @property
    def nncf_mode(self) -> str:
        return f"int{self.bits}_{'sym' if self.symmetric else 'asym'}"

    @property
    def label(self) -> str:
        if self.family == "aimet":
            return f"aimet adaround int{self.bits} per-channel {self.iterations} it"
        if self.family == "ort-static":
            return f"ort-static int{self.bits} per-channel (act uint8)"
        if self.family == "nncf":
            parts = ["nncf", self.nncf_mode, f"g{self.block_size}" if self.block_size else "per-channel"]
            if self.ratio is not None:
                parts.append(f"r{self.ratio:g}")
            algos = [a for a, on in (("awq", self.awq), ("se", self.scale_estimation)) if on]
            if algos:
                parts.append("+".join(algos))
            if self.all_layers:
                parts.append("all-layers")
            if self.opset is None:
                parts.append("as exported (MatMulNBits, repaired)")
            return " ".join(parts)
        acc = "" if self.accuracy_level is None else f" acc{self.accuracy_level}"
        return f"{self.family} b{self.bits} bs{self.block_size}{acc}"

    @property
    def series(self) -> str:
        """One line in compare.py's plot."""
        if self.family == "nncf":
            if self.opset is None:
                return "nncf as exported"
            return "nncf data-aware" if self.data_aware else "nncf data-free"
        return self.family if self.block_size is None else f"{self.family} bs{self.block_size}"

    @property
    def session_config(self) -> dict[str, str] | None:
        """Session settings its rows are evaluated with (None: ORT defaults). NNCF: float compute in the
        MatMulNBits that ORT fuses its DequantizeLinear → MatMul into (ORT's default there is accuracy level 4,
        int8 activations), as NNCF's own MatMulNBits form asks (accuracy_level=0) and as the other weight-only
        rows compute; with it the opset-21 file and the repaired MatMulNBits file give the same outputs."""
        return {"session.qdq_matmulnbits_accuracy_level": "0"} if self.family == "nncf" else None

    def nncf_arguments(self) -> list[str]:
        """benchmarks/nncf_peer.py's options for this peer (the calibration file is added by the caller)."""
        args = ["--mode", self.nncf_mode, "--ignored-types", "Gather"]
        if self.bits < 8:  # INT8 modes take neither a group size nor a ratio (NNCF refuses them)
            args += ["--group-size", str(self.block_size or -1)]
            if self.ratio is not None:
                args += ["--ratio", f"{self.ratio:g}"]
        args += ["--awq"] if self.awq else []
        args += ["--scale-estimation"] if self.scale_estimation else []
        args += ["--all-layers"] if self.all_layers else []
        return args

    @property
    def invocation(self) -> str:
        """How the peer is called, in words a reader can paste."""
        if self.family == "aimet":
            return (f"QuantizationSimModel(model, param_type='int{self.bits}', quant_scheme='min_max', config_file="
                    "<default_config_per_channel.json, weights asymmetric>) with every activation quantizer disabled; "
                    f"Adaround.apply_adaround(sim, <calibration batches>, num_iterations={self.iterations}); "
                    "sim.to_onnx_qdq(prequantize_constants=True)")
        if self.family == "nncf":
            kw = [f"mode=CompressWeightsMode.{self.nncf_mode.upper()}"]
            if self.bits < 8:
                kw.append(f"group_size={self.block_size or -1}")
                if self.ratio is not None:
                    kw.append(f"ratio={self.ratio:g}")
            if self.awq:
                kw.append("awq=True")
            if self.scale_estimation:
                kw.append("scale_estimation=True")
            if self.all_layers:
                kw.append("all_layers=True")
            if self.data_aware:
                kw.append("dataset=nncf.Dataset(<one item per calibration example>), subset_size=<all of them>")
            kw.append("ignored_scope=IgnoredScope(types=['Gather'])")
            model = "model" if self.opset is None else f"onnx.version_converter.convert_version(model, {self.opset})"
            return f"nncf.compress_weights({model}, {', '.join(kw)})"
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
        return self._quantize(fp32, calibration)[0]

    def _quantize(self, fp32: bytes | Path, calibration: list[Batch] | None = None) -> tuple[bytes, list[str]]:
        """The quantized model and notes on how it was obtained (NNCF: the repair, what its log said)."""
        model_bytes = Path(fp32).read_bytes() if isinstance(fp32, (str, Path)) else fp32
        if self.family == "nncf":
            return _nncf(model_bytes, self, calibration)
        if self.family == "aimet":
            return _aimet(model_bytes, self, calibration)
        with _quiet():
            if self.family == "ort-static":
                return _quantize_static(model_bytes, self.bits, calibration), []
            return _matmul_nbits(model_bytes, self.family, self.bits, self.block_size, self.accuracy_level), []


# NNCF's points on MiniLM's all-in scale (fp32 scales, 4-bit zero points; NNCF's default keeps the last MatMul in
# INT8, all_layers=False, +0.2 bits there): INT4 g128 ≈ 4.5 bits, g64 ≈ 4.75, per channel with all_layers ≈ 4.1
# (the nearest it comes to a 4-bit budget), 4/8 mixed at ratio 0.8 ≈ 5.3, INT8 per channel ≈ 8.1. INT3_SYM would
# sit near our 3-bit budgets: NNCF's ONNX backend refuses it, so that row carries the reason.
NNCF_POINTS = (
    Peer("nncf", 4, 128),                                            # data-free
    Peer("nncf", 4, 128, awq=True, scale_estimation=True),
    Peer("nncf", 4, 64, awq=True, scale_estimation=True),
    Peer("nncf", 4, None, awq=True, scale_estimation=True, all_layers=True),  # per channel, last layer too
    Peer("nncf", 4, 128, ratio=0.8, awq=True, scale_estimation=True),  # data-aware 4/8 mixed precision
    Peer("nncf", 8, None),                                           # INT8_ASYM per channel (data-free only)
    Peer("nncf", 3, 128, symmetric=True),
    Peer("nncf", 4, 128, awq=True, scale_estimation=True, opset=None),  # as exported: MatMulNBits, repaired
)


def all_peers(families: tuple[str, ...] = FAMILIES, bits: tuple[int, ...] = NBITS,
              blocks: tuple[int, ...] = BLOCKS, rtn_accuracy_levels: tuple[int | None, ...] = (None,)) -> list[Peer]:
    """Each peer at its native points: MatMulNBits families at bits × blocks (ort-rtn also at each of
    ``rtn_accuracy_levels``), quantize_static at int8/int4, NNCF at :data:`NNCF_POINTS`."""
    out = []
    for family in families:
        if family == "nncf":
            out += list(NNCF_POINTS)
        elif family == "aimet":
            out.append(Peer(family, 4))
        elif family == "ort-static":
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


def _venv_python(variable: str, venv: str) -> Path:
    """A peer environment's interpreter: ``$variable``, else ``venv`` at the repository root."""
    env = os.environ.get(variable)
    return Path(env) if env else HERE.parent / venv / "bin" / "python"


def nncf_python() -> Path:
    """The interpreter of NNCF's environment: ``$BAYESQ_NNCF_PYTHON``, else ``.venv-nncf``."""
    return _venv_python("BAYESQ_NNCF_PYTHON", ".venv-nncf")


def aimet_python() -> Path:
    """The interpreter of AIMET's environment: ``$BAYESQ_AIMET_PYTHON``, else ``.venv-aimet``."""
    return _venv_python("BAYESQ_AIMET_PYTHON", ".venv-aimet")


def _run_peer_script(name: str, cmd: list[str], timeout_s: int) -> subprocess.CompletedProcess:
    """Run a peer's script in its own environment (PYTHONPATH cleared: nothing of this project's leaks in). A
    timeout or a failure is a :class:`PeerError` with the script's own last error line; on success the last
    line of its stdout is its JSON record."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONPATH": ""})
    except subprocess.TimeoutExpired as exc:
        raise PeerError(f"{name} ran past {timeout_s} s") from exc
    if proc.returncode != 0:
        raise PeerError(f"{name}: {_last_error_line(proc.stderr) or _last_error_line(proc.stdout) or f'exit {proc.returncode}'}")
    return proc


def _nncf(model_bytes: bytes, peer: Peer, calibration: list[Batch] | None) -> tuple[bytes, list[str]]:
    """NNCF's compressed model, run in NNCF's environment; repaired for onnxruntime when written as MatMulNBits."""
    python = nncf_python()
    if not python.is_file():
        raise PeerError(f"nncf not installed: run `{NNCF_SETUP}` (makes .venv-nncf; or set BAYESQ_NNCF_PYTHON to "
                        f"an interpreter with nncf), no {python}")
    model = onnx.load_from_string(model_bytes)
    notes = []
    if peer.opset is not None:
        have = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if have < peer.opset:
            from onnx import version_converter

            try:
                model = version_converter.convert_version(model, peer.opset)
            except Exception as exc:  # noqa: BLE001 - the converter's own message is the reason
                raise PeerError(f"onnx.version_converter could not take the model from opset {have} to "
                                f"{peer.opset}: {' '.join(str(exc).split())[:200]}") from exc
            notes.append(f"FP32 model converted from opset {have} to {peer.opset} for NNCF")
    if peer.data_aware and not calibration:
        raise PeerError(f"{peer.label} needs calibration batches")
    with tempfile.TemporaryDirectory(prefix="bayesq-nncf-") as tmp:
        src, dst, calib = Path(tmp) / "fp32.onnx", Path(tmp) / "nncf.onnx", Path(tmp) / "calib.npz"
        src.write_bytes(model.SerializeToString())
        cmd = [str(python), str(NNCF_SCRIPT), "--fp32", str(src), "--out", str(dst), *peer.nncf_arguments()]
        if peer.data_aware:
            write_calibration(calib, calibration, {i.name for i in model.graph.input})
            cmd += ["--calib", str(calib)]
        proc = _run_peer_script("nncf", cmd, NNCF_TIMEOUT_S)
        emitted = dst.read_bytes()
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    data = f"{info['items']} calibration items" if info["items"] else "data-free"
    notes.insert(0, f"nncf {info['nncf']} (onnx {info['onnx']}, onnxruntime {info['onnxruntime']} in its venv): "
                    f"compress_weights {info['seconds']:.1f} s, {data}")
    if peer.awq and "No matching patterns were found for applying AWQ" in proc.stdout + proc.stderr:  # nncf logs to stdout
        notes.append("AWQ found no matching pattern in this graph and was skipped (nncf log)")
    repaired, fixes = repair_nncf_matmulnbits(emitted)
    if fixes:
        before = peer_accounting(emitted, {})
        notes.append(f"repaired for onnxruntime: {'; '.join(fixes)}; as emitted {before.all_in_bits:.3f} all-in bits")
    return repaired, notes


def _aimet(model_bytes: bytes, peer: Peer, calibration: list[Batch] | None) -> tuple[bytes, list[str]]:
    """AIMET's AdaRound QDQ model (benchmarks/aimet_peer.py), run in AIMET's environment, not modified here."""
    python = aimet_python()
    if not python.is_file():
        raise PeerError(f"aimet not installed: run `{AIMET_SETUP}` (makes .venv-aimet; or set BAYESQ_AIMET_PYTHON "
                        f"to an interpreter with aimet-onnx), no {python}")
    if not calibration:
        raise PeerError(f"{peer.label} needs calibration batches")
    model = onnx.load_from_string(model_bytes)
    with tempfile.TemporaryDirectory(prefix="bayesq-aimet-") as tmp:
        src, dst, calib = Path(tmp) / "fp32.onnx", Path(tmp) / "aimet.onnx", Path(tmp) / "calib.npz"
        src.write_bytes(model_bytes)
        write_calibration(calib, calibration, {i.name for i in model.graph.input})
        cmd = [str(python), str(AIMET_SCRIPT), "--fp32", str(src), "--out", str(dst), "--calib", str(calib),
               "--bits", str(peer.bits), "--iterations", str(peer.iterations)]
        proc = _run_peer_script("aimet", cmd, AIMET_TIMEOUT_S)
        emitted = dst.read_bytes()
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return emitted, [f"aimet_onnx {info['aimet_onnx']} (onnxruntime {info['onnxruntime']} in its venv): AdaRound "
                     f"{info['iterations']} iterations per layer on {info['items']} calibration items in "
                     f"{info['batches']} batches, {info['seconds']:.0f} s; weights per-channel asymmetric "
                     f"int{peer.bits} (float32 scale, int{peer.bits} zero point), activations float"]


def write_calibration(path: Path, calibration: list[Batch], names: set[str]) -> None:
    """The model's inputs of each batch in the .npz layout ``nncf_peer.read_calibration`` reads (the NNCF and
    AIMET scripts both)."""
    np.savez(path, **{f"b{i}__{k}": v for i, b in enumerate(calibration) for k, v in b.items() if k in names})


def _last_error_line(stderr: str) -> str:
    """The exception line of a Python traceback (``pkg.Error: message``), else the last non-empty line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and "━" not in ln]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if ":" in ln and " " not in head and (head.endswith(("Error", "Exception")) or "." in head):
            return ln
    return lines[-1] if lines else ""


def repair_nncf_matmulnbits(model_bytes: bytes) -> tuple[bytes, list[str]]:
    """Make NNCF's MatMulNBits nodes loadable by onnxruntime without changing a stored value.

    * zero points: NNCF stores 4-bit zero points one per byte as uint8 [N, blocks]; MatMulNBits reads uint8 zero
      points packed, [N, ceil(blocks · bits / 8)], block 2j in the low nibble and 2j+1 in the high one (the last
      high nibble of an odd block count is padding, never read). Packed here; every value kept.
    * bias: NNCF passes the bias of the Add after the MatMul as MatMulNBits's bias input and keeps that Add, which
      would add it twice; the bias input is dropped where the node's output feeds only an Add of the same bias.

    Returns the model (the input bytes themselves when nothing needed repair) and what was done, in words.
    """
    proto = onnx.load_from_string(model_bytes)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    packed, unbiased = 0, 0
    for node in graph.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        k, n, bits, block = (int(attrs[a]) for a in ("K", "N", "bits", "block_size"))
        blocks = -(-k // block)
        zp = inits.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        if (zp is not None and zp.data_type == onnx.TensorProto.UINT8 and bits == 4
                and int(np.prod(zp.dims)) == n * blocks and blocks > 1):
            values = onnx.numpy_helper.to_array(zp).reshape(n, blocks)
            if values.max(initial=0) > 15:
                raise PeerError(f"{node.name}: zero points above 15 in a 4-bit MatMulNBits")
            if blocks % 2:
                values = np.concatenate([values, np.zeros((n, 1), np.uint8)], axis=1)
            nibbles = (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8)
            zp.CopyFrom(onnx.numpy_helper.from_array(nibbles, zp.name))
            packed += 1
        bias = node.input[5] if len(node.input) > 5 else ""
        users = consumers.get(node.output[0], [])
        if bias and len(users) == 1 and users[0].op_type == "Add" and bias in users[0].input \
                and node.output[0] in users[0].input:
            del node.input[5:]
            while node.input and not node.input[-1]:  # trailing empty optional inputs (g_idx)
                del node.input[-1]
            unbiased += 1
    if not (packed or unbiased):
        return model_bytes, []
    fixes = []
    if packed:
        fixes.append(f"4-bit zero points of {packed} MatMulNBits packed two per byte (values unchanged)")
    if unbiased:
        fixes.append(f"bias input dropped from {unbiased} MatMulNBits whose following Add adds the same bias")
    return proto.SerializeToString(), fixes


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
    notes: list[str] = field(default_factory=list)  # how the file was obtained (NNCF: its log, the repair)

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
                "scope_left_fp32": self.scope_left_fp32, "other_quantized_bytes": self.other_quantized_bytes,
                "notes": self.notes}


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
        elif node.op_type == "Mul" and node.name.endswith("/awq_mul"):
            # NNCF's AWQ scale on the activation, where it could not fold it into a preceding weight
            count(node.input)
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
    q, notes = peer._quantize(fp32, calibration)
    acc = peer_accounting(q, scope)
    acc.notes = notes
    if not acc.quantized_weights:
        ops = sorted({n.op_type for n in onnx.load_from_string(fp32).graph.node if n.op_type in _WEIGHT_SLOTS})
        raise PeerError(f"{peer.label} quantized none of the {acc.scope_weights:,} weights in scope "
                        f"(their consumers here: {', '.join(ops) or 'none'}); the file stays FP32")
    return q, acc


if __name__ == "__main__":  # print how each peer is called
    for p in all_peers():
        print(f"{p.label:40s} {p.invocation}")
