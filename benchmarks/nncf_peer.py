"""Run NNCF's ``nncf.compress_weights`` (ONNX backend) on an FP32 ONNX model, as NNCF ships it.

This script runs in NNCF's own virtual environment (``benchmarks/setup_nncf.sh`` makes it), not in the project's:
it imports only numpy, onnx and nncf, never ``bayesq_onnx``. ``benchmarks/peers.py`` calls it in a subprocess
and does the accounting and the evaluation in the main environment.

    .venv-nncf/bin/python benchmarks/nncf_peer.py --fp32 model.onnx --calib calib.npz --out q.onnx \\
        --mode int4_asym --group-size 128 --awq --scale-estimation --ignored-types Gather

Input ``--calib``: a .npz whose keys are ``b<index>__<input name>``, one entry per model input per calibration
batch (what :func:`write_calibration` writes). Each batch is split into single examples along axis 0 when every
input of the batch has the same leading size: NNCF's data-aware statistics (AWQ, scale estimation, mixed
precision) take one mean activation per dataset item, so one item per example is what its documentation's
examples feed.

Output: ``--out``, NNCF's model exactly as ``compress_weights`` returned it (not modified here), and on stdout one
JSON line: ``{"nncf": version, "onnxruntime": version, "seconds": ..., "items": ..., "call": "..."}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def read_calibration(path: Path) -> list[dict[str, np.ndarray]]:
    """The batches of a .npz written by :func:`write_calibration`, in order."""
    batches: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path) as data:
        for key in data.files:
            index, _, name = key.partition("__")
            batches.setdefault(int(index[1:]), {})[name] = data[key]
    return [batches[i] for i in sorted(batches)]


def write_calibration(path: Path, batches: list[dict[str, np.ndarray]]) -> None:
    """Calibration batches (name -> array) to a .npz :func:`read_calibration` reads."""
    np.savez(path, **{f"b{i}__{name}": np.asarray(v) for i, b in enumerate(batches) for name, v in b.items()})


def examples(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """One dataset item per example: each batch split along axis 0 where all its inputs share that size."""
    out = []
    for b in batches:
        sizes = {v.shape[0] if v.ndim else None for v in b.values()}
        if len(sizes) == 1 and None not in sizes:
            n = sizes.pop()
            out += [{k: v[i:i + 1] for k, v in b.items()} for i in range(n)]
        else:
            out.append(b)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", type=Path, required=True, help="the FP32 ONNX model")
    ap.add_argument("--out", type=Path, required=True, help="where to write NNCF's compressed model")
    ap.add_argument("--calib", type=Path, help="calibration batches (.npz); none: data-free compression")
    ap.add_argument("--mode", default="int4_asym", help="nncf.CompressWeightsMode value, e.g. int4_asym, int8_asym")
    ap.add_argument("--group-size", type=int, help="NNCF group_size (-1: per channel); default: NNCF's")
    ap.add_argument("--ratio", type=float, help="share of layers in the primary precision; default: NNCF's (1)")
    ap.add_argument("--awq", action="store_true")
    ap.add_argument("--scale-estimation", action="store_true")
    ap.add_argument("--all-layers", action="store_true", help="the last MatMul in the primary precision too")
    ap.add_argument("--backup-mode", help="nncf.BackupMode value (int8_asym, int8_sym, none); default: NNCF's")
    ap.add_argument("--sensitivity-metric", help="nncf.SensitivityMetric value; default: NNCF's")
    ap.add_argument("--subset-size", type=int, help="dataset items for statistics; default: all of them")
    ap.add_argument("--ignored-types", nargs="*", default=[], help="ONNX op types NNCF leaves alone (Gather: "
                    "embedding tables, outside the linear scope)")
    args = ap.parse_args(argv)

    import onnx

    import nncf

    model = onnx.load(str(args.fp32))
    kw: dict = {"mode": nncf.CompressWeightsMode(args.mode)}
    if args.group_size is not None:
        kw["group_size"] = args.group_size
    if args.ratio is not None:
        kw["ratio"] = args.ratio
    if args.awq:
        kw["awq"] = True
    if args.scale_estimation:
        kw["scale_estimation"] = True
    if args.all_layers:
        kw["all_layers"] = True
    if args.backup_mode is not None:
        kw["backup_mode"] = nncf.BackupMode(args.backup_mode)
    if args.sensitivity_metric is not None:
        kw["sensitivity_metric"] = nncf.SensitivityMetric(args.sensitivity_metric)
    if args.ignored_types:
        # validate=False: a model without any op of a listed type is not an error
        kw["ignored_scope"] = nncf.IgnoredScope(types=list(args.ignored_types), validate=False)
    items = 0
    if args.calib is not None:
        data = examples(read_calibration(args.calib))
        items = len(data)
        kw["dataset"] = nncf.Dataset(data)
        kw["subset_size"] = args.subset_size or items
    start = time.perf_counter()
    compressed = nncf.compress_weights(model, **kw)
    seconds = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(compressed, str(args.out))

    import onnxruntime

    shown = []
    for k, v in kw.items():
        if k == "dataset":
            shown.append(f"dataset=nncf.Dataset(<{items} items>)")
        elif k == "ignored_scope":
            shown.append(f"ignored_scope=nncf.IgnoredScope(types={list(args.ignored_types)})")
        elif hasattr(v, "value"):  # an NNCF enum
            shown.append(f"{k}={type(v).__name__}.{v.name}")
        else:
            shown.append(f"{k}={v!r}")
    call = "nncf.compress_weights(model, " + ", ".join(shown) + ")"
    print(json.dumps({"nncf": nncf.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
                      "seconds": seconds, "items": items, "call": call}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
