"""Latency of an artifact as users load it: `ort.InferenceSession(path)` with no options, against the FP32
model in the same kind of session (issue 15 item 1: a size artifact at <= 1.02x FP32).

    bayesq compile digits-resnet --bits 3.0 --out /tmp/dg
    python benchmarks/default_session.py /tmp/dg/model.onnx --model digits-resnet [--latency-batch 8]

Sessions, timed in interleaved rounds (alternating order, as `bayesq compile` measures; median and p90):

* ``fp32``: the model's FP32 export (``--reference FILE`` to give one), default session;
* ``artifact``: the artifact, default session -- what a user gets;
* ``artifact, recorded config``: with the session settings its metadata records (``bayesq.ort_session_config``;
  ``{}`` for size artifacts, so the same as the row above), shown only when they differ from none;
* ``DequantizeLinear form``: the same artifact with every ``bayesq.DequantizeAffine`` / ``DequantizeSymmetric``
  decode written back as the ``DequantizeLinear`` (+ Cast) it replaced (same stored arrays), default session:
  the form size artifacts had before, which ORT's default QDQ handling keeps unfolded.

Each row also gives the session start time and the number of ops left in the graph ORT runs (written with
``optimized_model_filepath`` at the default optimization level) that are not in the FP32 graph: 0 when
every decode folded. Writes ``default_session_<model>_b<batch>.md``/``.csv``/``.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_io import markdown_table, write_csv  # noqa: E402

from bayesq_onnx.runtime.latency import compare_latency  # noqa: E402

DEQUANTIZE = ("DequantizeAffine", "DequantizeSymmetric")


def dequantize_linear_form(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with each arithmetic uniform decode replaced by the DequantizeLinear it computes: same stored
    arrays (scale / zero point reshaped back to the DequantizeLinear layout: scalar, 1-D per row, blocked)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {t.name: t for t in out.graph.initializer}
    nodes = []
    for node in out.graph.node:
        if node.domain != "bayesq" or node.op_type not in DEQUANTIZE:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        grouped, shape = list(attrs["grouped_shape"]), list(attrs["shape"])
        scale = inits[node.input[1]]
        dims, kwargs = list(scale.dims), {}
        if len(dims) == len(grouped) and len(grouped) == len(shape) + 1:  # blocked: drop the size-1 axis
            axis = next(i for i, (g, s) in enumerate(zip(grouped, shape)) if g != s)
            new_dims = dims[:axis + 1] + dims[axis + 2:]
            kwargs = {"axis": axis, "block_size": grouped[axis + 1]}
        elif dims:  # per row: 1-D along the row axis (the one that is not 1; with one row, a size-1 axis)
            axis = next((i for i, d in enumerate(dims) if d != 1), None)
            axis = axis if axis is not None else next(i for i, d in enumerate(shape) if d == 1)
            new_dims, kwargs = [dims[axis]], {"axis": axis}
        else:
            new_dims = []
        for name in node.input[1:]:
            del inits[name].dims[:]
            inits[name].dims.extend(new_dims)
        fp16 = attrs["precision"] == onnx.TensorProto.FLOAT16
        dq_out = node.output[0] + "/dq" if fp16 else node.output[0]
        nodes.append(helper.make_node("DequantizeLinear", list(node.input), [dq_out], name=node.name + "/dq",
                                      **kwargs))
        if fp16:
            nodes.append(helper.make_node("Cast", [dq_out], [node.output[0]], to=onnx.TensorProto.FLOAT))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {(n.domain, n.op_type) for n in out.graph.node}
    keep = [f for f in out.functions if (f.domain, f.name) in used or f.name not in DEQUANTIZE]
    del out.functions[:]
    out.functions.extend(keep)
    return out


def session(path: Path, config: dict[str, str], optimized: Path) -> tuple[ort.InferenceSession, float]:
    """A session with no options but ``config`` (which users pass none of), and its start time."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    options.optimized_model_filepath = str(optimized)
    start = time.perf_counter()
    s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return s, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path, help="DIR/model.onnx written by `bayesq compile`")
    ap.add_argument("--model", required=True, help="the MODEL spec it was compiled from (feed; FP32 export)")
    ap.add_argument("--reference", type=Path, help="the FP32 .onnx (default: export --model)")
    ap.add_argument("--latency-batch", type=int, default=8)
    ap.add_argument("--latency-seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    from bayesq_onnx.models import load_model
    from bayesq_onnx.models.base import SourceOptions

    bundle = load_model(args.model, SourceOptions(calib_size=8, eval_size=8, latency_batch=args.latency_batch,
                                                  latency_seq=args.latency_seq))
    proto = onnx.load(args.artifact)
    meta = {p.key: p.value for p in proto.metadata_props}
    recorded = json.loads(meta.get("bayesq.ort_session_config", "{}"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.reference:
            fp_path = args.reference
        else:
            import onnx_ir as ir

            from bayesq_onnx.export import fp32_model

            fp_path = tmp / "fp32.onnx"
            ir.save(fp32_model(bundle)[0], fp_path)
        variants = {"fp32": (fp_path, {}), "artifact": (args.artifact, {})}
        if recorded:
            variants["artifact, recorded config"] = (args.artifact, recorded)
        if any(n.domain == "bayesq" and n.op_type in DEQUANTIZE for n in proto.graph.node):
            dq_path = tmp / "dq_form.onnx"
            onnx.save(dequantize_linear_form(proto), dq_path)
            variants["DequantizeLinear form"] = (dq_path, {})
        sessions, starts, left = {}, {}, {}
        for label, (path, config) in variants.items():
            opt = tmp / f"opt{len(sessions)}.onnx"
            sessions[label], starts[label] = session(path, config, opt)
            left[label] = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
        # the decoded artifact computes the same thing in every session form
        outs = {k: s.run(None, {i.name: bundle.latency_feed[i.name] for i in s.get_inputs()})[0]
                for k, s in sessions.items() if k != "fp32"}
        first = next(iter(outs.values()))
        assert all(np.array_equal(o, first) or np.allclose(o, first, rtol=1e-4, atol=1e-5) for o in outs.values())
        lat = compare_latency(sessions, bundle.latency_feed, runs=args.runs, warmup=args.warmup,
                              max_seconds=args.max_seconds)
        sizes = {k: Path(p).stat().st_size / 1e6 for k, (p, _) in variants.items()}
    fp_ms = lat["fp32"]["median_ms"]
    rows = []
    for label, (_, config) in variants.items():
        extra = left[label] - left["fp32"]
        rows.append({"session": label, "options": json.dumps(config) if config else "none",
                     "median_ms": round(lat[label]["median_ms"], 3), "p90_ms": round(lat[label]["p90_ms"], 3),
                     "x_fp32": round(lat[label]["median_ms"] / fp_ms, 3), "start_s": round(starts[label], 3),
                     "file_mb": round(sizes[label], 3),
                     "ops_left_not_in_fp32": ", ".join(f"{k}×{v}" for k, v in sorted(extra.items())) or "0"})
    feed = ", ".join(f"{k} {'×'.join(map(str, v.shape))}" for k, v in bundle.latency_feed.items())
    text = (f"model: {args.model}; artifact: {args.artifact} (all-in bits {meta.get('bayesq.all_in_bits', '?')}); "
            f"feed: {feed}; onnxruntime {ort.__version__}, CPU EP, default session options; "
            f"{lat['fp32']['runs']} interleaved rounds after {args.warmup} warm-up runs, median\n"
            f"command: python benchmarks/default_session.py {' '.join(sys.argv[1:])}\n\n" + markdown_table(rows))
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"default_session_{args.model.replace(':', '_').replace('/', '_')}_b{args.latency_batch}"
    (args.out / f"{stem}.md").write_text(text)
    write_csv(rows, args.out / f"{stem}.csv")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.5 * len(rows)), dpi=110)
    labels = [r["session"] for r in rows][::-1]
    ratios = [r["x_fp32"] for r in rows][::-1]
    ax.barh(labels, ratios, color=["#4c72b0" if "DequantizeLinear" not in lb else "#c44e52" for lb in labels])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(1.02, color="k", lw=0.8, ls=":")
    for y, r in enumerate(ratios):
        ax.text(r, y, f" {r:.3f}×", va="center", fontsize=8)
    ax.set_xlabel(f"median latency / FP32 ({args.model}, {feed}, default ORT session)")
    ax.set_xlim(0, max(ratios) * 1.2)
    fig.tight_layout()
    fig.savefig(args.out / f"{stem}.png")
    print(f"wrote {args.out}/{stem}.md, .csv, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
