"""What loading each artifact costs as people load it: `ort.InferenceSession(path)` in a fresh process, one
run of the model's latency batch, against the FP32 model (issue 28). Ours and the installed peers, side by side.

    python benchmarks/memory.py                                   # MiniLM
    PYTHONPATH=. python benchmarks/memory.py --model module:benchmarks.cnn_photos:efficientnet_lite1
    python benchmarks/memory.py --model digits-resnet

Rows (each artifact measured by bayesq_onnx/runtime/load_probe.py in a process of its own):

* ``fp32``: the model's FP32 export;
* ``bayesq <target>``: ``bayesq compile MODEL --bits B --target T`` (size, fold and speed; one fresh compile each);
* ``ort-rtn b4 bs32/bs128``: ONNX Runtime's own ``MatMulNBitsQuantizer`` (4-bit blocks, MatMul weights only,
  float compute), ``ort-static int8``: ``quantize_static`` QDQ per channel (activations quantized too),
  ``nncf int4_asym g128``: NNCF in its own venv (``bash benchmarks/setup_nncf.sh``); a peer that cannot run
  or quantizes nothing here is a row with the reason.

Columns: file MB; the whole process's peak (VmHWM) and resident (VmRSS) MB after the run, and the session
start, each the median of three loads in fresh processes and also as a ratio to FP32's; for our rows the compile's headline fidelity. Writes
``memory_<model>.md`` / ``.csv`` / ``.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_io import markdown_table, timed_compile, write_csv  # noqa: E402
from peers import Peer, PeerError, run_peer, scope_weights  # noqa: E402

from bayesq_onnx.export import fp32_model  # noqa: E402
from bayesq_onnx.models import load_model  # noqa: E402
from bayesq_onnx.models.base import SourceOptions  # noqa: E402
from bayesq_onnx.runtime.load_memory import LOADS, LoadProbeFailed, median_load  # noqa: E402

PEERS = (Peer("ort-rtn", 4, 32, 0), Peer("ort-rtn", 4, 128, 0), Peer("ort-static", 8),
         Peer("nncf", 4, 128, symmetric=False))


def _row(name: str, path: Path, feed: dict, providers: list[str], fp32: dict | None, **extra) -> dict:
    m = median_load(path, feed, providers)
    row = {"artifact": name, "file MB": round(path.stat().st_size / 1e6, 2),
           "peak MB": round(m["after_run"]["peak_mb"], 1), "resident MB": round(m["after_run"]["resident_mb"], 1),
           "session start s": round(m["session_start_s"], 3)}
    if fp32 is not None:
        row.update({"peak ×FP32": round(row["peak MB"] / fp32["peak MB"], 3),
                    "resident ×FP32": round(row["resident MB"] / fp32["resident MB"], 3),
                    "start ×FP32": round(row["session start s"] / fp32["session start s"], 2)})
    return {**row, **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--targets", nargs="+", default=["size", "fold", "speed"])
    ap.add_argument("--peers", nargs="*", default=[p.label for p in PEERS], help="peer labels to run")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    bundle = load_model(args.model, SourceOptions(calib_size=16, eval_size=16))
    feed, providers = dict(bundle.latency_feed), ["CPUExecutionProvider"]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bayesq-memory-") as tmp:
        fp_path = Path(tmp) / "fp32.onnx"
        fp_model = fp32_model(bundle)[0]
        ir.save(fp_model, fp_path)
        fp_bytes = fp_path.read_bytes()
        fp32 = _row("fp32", fp_path, feed, providers, None)
        rows.append({**fp32, "peak ×FP32": 1.0, "resident ×FP32": 1.0, "start ×FP32": 1.0})
        for target in args.targets:
            out = Path(tmp) / f"bayesq-{target}"
            wall, _, report = timed_compile([args.model, "--bits", str(args.bits), "--target", target], out)
            h = report["headline"]
            rows.append(_row(f"bayesq {target} {report['bits']['all_in']:.2f} bits", out / "model.onnx", feed,
                             providers, fp32, fidelity=f"{h['metric']} {h['value']:.4f}"))
        scope = scope_weights(fp_bytes)
        for peer in PEERS:
            if peer.label not in args.peers:
                continue
            try:
                q, acc = run_peer(peer, fp_bytes, scope, bundle.calibration)
            except (PeerError, Exception) as exc:  # noqa: BLE001 - a peer that fails is a row with the reason
                rows.append({"artifact": peer.label, "note": _one_line(exc)})
                continue
            path = Path(tmp) / f"{re.sub('[^A-Za-z0-9]+', '-', peer.label)}.onnx"
            path.write_bytes(q)
            try:
                rows.append(_row(peer.label, path, feed, providers, fp32,
                                 note=f"{acc.coverage:.0%} of the Conv/Gemm/MatMul weights quantized"))
            except LoadProbeFailed as exc:
                rows.append({"artifact": peer.label, "note": _one_line(exc)})

    name = re.sub("[^A-Za-z0-9_-]+", "_", args.model.split(":")[-1])
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"Memory at load, {args.model}: fresh process, plain ONNX Runtime {_ort()} session (CPU), one run "
              f"of {', '.join(f'{k} {chr(215).join(map(str, v.shape))}' for k, v in feed.items())}, median of "
              f"{LOADS} loads of each artifact; "
              f"`python benchmarks/memory.py --model {args.model}`\n\n")
    table = markdown_table(rows)
    (args.out / f"memory_{name}.md").write_text(header + table)
    write_csv(rows, args.out / f"memory_{name}.csv")
    _plot(rows, args.out / f"memory_{name}.png", args.model)
    print(header + table)


def _one_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _ort() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _plot(rows: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if "peak MB" in r]
    x = range(len(measured))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(measured)), 4))
    ax.bar([i - 0.2 for i in x], [r["peak MB"] for r in measured], 0.4, label="peak MB")
    ax.bar([i + 0.2 for i in x], [r["resident MB"] for r in measured], 0.4, label="resident after the run MB")
    ax.axhline(measured[0]["peak MB"], color="gray", linestyle="--", linewidth=1, label="FP32 peak")
    ax.set_xticks(list(x), [r["artifact"] for r in measured], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("MB (whole process)")
    ax.set_title(f"Memory at load: {model}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
