"""Run AIMET's AdaRound (``aimet_onnx``, weight-only, per-channel) on an FP32 ONNX model, as AIMET ships it.

This script runs in AIMET's own virtual environment (``benchmarks/setup_aimet.sh`` makes it), not in the
project's: it imports numpy, onnx, aimet_onnx and the calibration reader of its sibling ``nncf_peer.py``, never
``bayesq_onnx``. ``benchmarks/peers.py`` calls it in a
subprocess and does the accounting and the evaluation in the main environment.

    .venv-aimet/bin/python benchmarks/aimet_peer.py --fp32 model.onnx --calib calib.npz --out q.onnx \\
        --bits 4 --iterations 200

What it does, all with AIMET's own API:

* ``QuantizationSimModel(model, param_type=int<bits>, quant_scheme=min_max, config_file=...)`` with a config
  written here from AIMET's ``default_config_per_channel.json`` and changed to what the comparison needs:
  weights asymmetric (a zero point, like our uniform grids), one scale per output channel for Conv / Gemm /
  MatMul / ConvTranspose, biases float; then every activation quantizer of the sim disabled (weight-only:
  activations stay float, as in every row of the comparison);
* ``Adaround.apply_adaround(sim, inputs, num_iterations)`` on the calibration batches (AIMET's default is
  10 000 iterations per layer, hours on a CPU; ``--iterations`` says how many ran, and the row says so);
* ``sim.to_onnx_qdq(prequantize_constants=True)``: every weight as its integer codes → ``DequantizeLinear``
  with AIMET's per-channel scale and zero point, which onnxruntime runs as written and which the main
  environment counts (codes, scales, zero points) like every other peer.

Input ``--calib``: a .npz whose keys are ``b<index>__<input name>`` (``nncf_peer.write_calibration``'s layout),
one entry per model input per calibration batch. Output: ``--out`` and on stdout one JSON line:
``{"aimet_onnx": version, "onnxruntime": version, "seconds": ..., "batches": ..., "iterations": ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from nncf_peer import read_calibration  # numpy only: the same .npz layout as NNCF's

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def weight_only_config(per_channel_default: Path) -> dict:
    """AIMET's per-channel default config, changed to: asymmetric weights, per channel on every weight op,
    float biases. (AIMET's config refuses unquantized op outputs or model inputs; :func:`main` disables every
    activation quantizer of the sim instead.)"""
    config = json.loads(per_channel_default.read_text())
    config["defaults"]["params"] = {"is_quantized": "True", "is_symmetric": "False"}
    config["defaults"]["per_channel_quantization"] = "False"
    config["params"] = {"bias": {"is_quantized": "False"}}
    ops = config.setdefault("op_type", {})
    for op in WEIGHT_OPS:
        ops[op] = {"per_channel_quantization": "True"}
    config["supergroups"] = []
    return config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", type=Path, required=True, help="the FP32 ONNX model")
    ap.add_argument("--out", type=Path, required=True, help="where to write AIMET's QDQ model")
    ap.add_argument("--calib", type=Path, required=True, help="calibration batches (.npz)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=200, help="AdaRound steps per layer (AIMET's default: 10000)")
    args = ap.parse_args(argv)

    import onnx
    import onnxruntime

    import aimet_onnx
    from aimet_onnx.adaround.adaround_weight import Adaround
    from aimet_onnx.quantsim import QuantizationSimModel

    model = onnx.load(str(args.fp32))
    batches = read_calibration(args.calib)
    default = Path(aimet_onnx.__file__).parent / "common" / "quantsim_config" / "default_config_per_channel.json"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aimet-") as tmp:
        config_path = Path(tmp) / "weight_only_per_channel.json"
        config_path.write_text(json.dumps(weight_only_config(default)))
        sim = QuantizationSimModel(model, param_type=f"int{args.bits}", quant_scheme="min_max",
                                   config_file=str(config_path), providers=["CPUExecutionProvider"])
        for name in sim.activation_names:  # weight-only: every activation stays float
            if name in sim.qc_quantize_op_dict:
                sim.qc_quantize_op_dict[name].enabled = False
        sim.compute_encodings(batches)
        Adaround.apply_adaround(sim, batches, num_iterations=args.iterations)
        qdq = sim.to_onnx_qdq(prequantize_constants=True)
    seconds = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(qdq, str(args.out))
    print(json.dumps({"aimet_onnx": getattr(aimet_onnx, "__version__", "?"), "onnxruntime": onnxruntime.__version__,
                      "onnx": onnx.__version__, "seconds": seconds, "batches": len(batches),
                      "items": int(sum(next(iter(b.values())).shape[0] for b in batches)),
                      "iterations": args.iterations}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
