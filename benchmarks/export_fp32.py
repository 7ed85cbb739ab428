"""Write a model source's FP32 ONNX export and its calibration / evaluation inputs as .npz files — the inputs
an `onnx:<file>` compile takes — so the ONNX path can be compared with the PyTorch path on the same model.

    python benchmarks/export_fp32.py digits-resnet --out /tmp/dx
    bayesq compile onnx:/tmp/dx/model.onnx --calib /tmp/dx/calib.npz --data /tmp/dx/eval.npz --bits 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx_ir as ir

from bayesq_onnx.export import fp32_model
from bayesq_onnx.models import load_model
from bayesq_onnx.models.base import SourceOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a model spec, e.g. digits-resnet or minilm")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--eval-size", type=int, default=1024)
    args = ap.parse_args()
    bundle = load_model(args.model, SourceOptions(calib_size=args.calib_size, eval_size=args.eval_size))
    args.out.mkdir(parents=True, exist_ok=True)
    ir.save(fp32_model(bundle)[0], args.out / "model.onnx")
    for name, batches in (("calib", bundle.calibration), ("eval", bundle.evaluation)):
        if any(b[k].shape[1:] != batches[0][k].shape[1:] for b in batches for k in b):
            raise SystemExit(f"{args.model}: batches of different shapes cannot be stacked into one .npz")
        np.savez(args.out / f"{name}.npz", **{k: np.concatenate([b[k] for b in batches]) for k in batches[0]})
    print(f"wrote {args.out}/model.onnx, calib.npz, eval.npz")


if __name__ == "__main__":
    main()
