"""CUDA check (benchmarks/cuda_check.sh): compile MiniLM for the CUDA execution provider, validate it there,
and time FP32 vs the artifact on the CUDA EP with IO binding (inputs copied to the GPU once, outputs left on
the GPU). Installs nothing; without a usable CUDA EP it says why and exits 0.

    bash benchmarks/cuda_check.sh              # MiniLM, --target cuda --provider cuda --bits 4.5
    python benchmarks/cuda_check.py --bits 6   # the same, another budget

The budget defaults to 4.5 all-in bits: ``--target cuda`` allows uniform 4/8-bit and FP16 only, and its
cheapest plan on MiniLM (4-bit per row with FP16 scale and zero point) costs 4.039 bits, so 4.0 is out of reach.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def iobinding_latency(sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray], device: str = "cuda",
                      runs: int = 50, warmup: int = 10) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Median/p90 ms per ``run_with_iobinding`` for each session, runs interleaved (a, b, a, b, ...).

    Inputs are bound once as OrtValues on ``device`` (copied there before timing); outputs are bound to
    ``device`` (ORT allocates them there; nothing is copied back inside the timed region). The CUDA EP
    synchronizes its stream at the end of a run, and ``synchronize_outputs`` makes sure of it. Returns the
    timings and each session's first output (copied to the host after timing).
    """
    bindings, keep = {}, []
    for key, s in sessions.items():
        io = s.io_binding()
        for i in s.get_inputs():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feed[i.name]), device, 0)
            keep.append(value)  # the binding does not own it: keep it alive while timing
            io.bind_ortvalue_input(i.name, value)
        for o in s.get_outputs():
            io.bind_output(o.name, device)
        io.synchronize_inputs()
        bindings[key] = io
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(warmup):
        for k, s in sessions.items():
            s.run_with_iobinding(bindings[k])
    for _ in range(runs):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run_with_iobinding(bindings[k])
            bindings[k].synchronize_outputs()
            times[k].append((time.perf_counter() - start) * 1e3)
    outputs = {k: bindings[k].copy_outputs_to_cpu()[0] for k in sessions}
    stats = {k: {"median_ms": float(np.median(v)), "p90_ms": float(np.percentile(v, 90)), "runs": runs}
             for k, v in times.items()}
    return stats, outputs


def all_nodes_on(model: bytes | Path, providers: list[str], config: dict | None = None) -> tuple[bool, str]:
    """Whether a session on ``providers`` (not naming the CPU EP) starts with CPU fallback disabled, i.e. the
    provider takes every node; else ORT's reason."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    for k, v in (config or {}).items():
        options.add_session_config_entry(k, v)
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        ort.InferenceSession(str(model) if isinstance(model, Path) else model, options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - the reason is the answer
        return False, " ".join(str(exc).split())[:200]
    return True, f"every node on {providers[0]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=float, default=4.5)
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--eval-size", type=int, default=256)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", type=Path, help="also write the table as Markdown to this file")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="every step on the CPU EP instead (IO binding to CPU): tests this script where there is "
                         "no GPU; its timings are no CUDA check")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    print(f"onnxruntime {ort.__version__}; available providers: {', '.join(ort.get_available_providers())}")
    from bayesq_onnx.runtime.session import cuda_status

    usable, why = cuda_status()
    if args.dry_run_cpu:
        usable, why = True, f"dry run on the CPU EP (CUDA: {why})"
    if not usable:
        print(f"CUDA check skipped: {why}. Nothing to measure on this machine (exit 0).")
        return 0
    print(f"CUDA: {why}")

    from bayesq_onnx.config import CompileConfig
    from bayesq_onnx.models import load_model
    from bayesq_onnx.models.base import SourceOptions
    from bayesq_onnx.pipeline import compile_model
    from bayesq_onnx.progress import Reporter
    from bayesq_onnx.runtime.session import make_session, session_config_for

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compare import fp32_model_bytes

    options = SourceOptions(calib_size=args.calib_size, eval_size=args.eval_size, latency_batch=args.batch,
                            latency_seq=args.seq)
    bundle = load_model("minilm", options)
    with tempfile.TemporaryDirectory(prefix="bayesq-cuda-") as tmp:
        config = CompileConfig(model="minilm", bits=args.bits, provider="cpu" if args.dry_run_cpu else "cuda",
                               target="cuda",
                               calib_size=args.calib_size, eval_size=args.eval_size, latency_batch=args.batch,
                               latency_seq=args.seq, latency_runs=10, latency_warmup=3, out=Path(tmp) / "out")
        start = time.perf_counter()
        with Reporter() as rep:
            result = compile_model(config, rep, bundle=bundle)
        compile_s = time.perf_counter() - start
        report = result.report
        q_bytes = Path(result.artifact).read_bytes()
    fp_bytes = fp32_model_bytes(bundle)
    providers, device = ([CPU], "cpu") if args.dry_run_cpu else ([CUDA, CPU], "cuda")
    q_config = report["provider"].get("artifact_session_config", session_config_for("cuda"))
    fp_session, fp_start = make_session(fp_bytes, providers)
    q_session, q_start = make_session(q_bytes, providers, q_config)
    used = {k: s.get_providers()[0] for k, s in (("fp32", fp_session), ("artifact", q_session))}
    if args.dry_run_cpu:
        placement = dict.fromkeys(("fp32", "artifact"), (True, "dry run"))
    else:  # CUDA alone, CPU fallback off: the session starts only if the CUDA EP takes every node
        placement = {"fp32": all_nodes_on(fp_bytes, [CUDA]), "artifact": all_nodes_on(q_bytes, [CUDA], q_config)}
    stats, outs = iobinding_latency({"fp32": fp_session, "artifact": q_session}, bundle.latency_feed, device,
                                    runs=args.runs, warmup=args.warmup)
    # the IO-bound outputs agree with a plain run of the same session (the binding measures the real model)
    plain = q_session.run(None, dict(bundle.latency_feed))[0]
    bound_diff = float(np.abs(plain - outs["artifact"]).max())

    f = report["fidelity"]
    headline = report["headline"]["metric"]
    lat = report["latency"]
    feed = ", ".join(f"{k} {'×'.join(map(str, v.shape))}" for k, v in bundle.latency_feed.items())
    rows = [
        ("fp32", 32.0, len(fp_bytes), 1.0, stats["fp32"], fp_start, lat["fp32"]["median_ms"], used["fp32"],
         placement["fp32"]),
        (f"bayesq --target cuda {args.bits:g}", report["bits"]["all_in"], len(q_bytes), f[headline],
         stats["artifact"], q_start, lat["quantized"]["median_ms"], used["artifact"], placement["artifact"]),
    ]
    lines = [(f"| model | all-in bits | file MB | {headline} | IO-binding median ms | p90 ms | × FP32 | "
             "session.run median ms | session start s | provider | all nodes on it |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, bits, size, metric, st, start_s, plain_ms, prov, (on, note) in rows:
        lines.append(f"| {name} | {bits:.3f} | {size / 1e6:.2f} | {metric:.4f} | {st['median_ms']:.3f} | "
                     f"{st['p90_ms']:.3f} | {st['median_ms'] / stats['fp32']['median_ms']:.2f} | {plain_ms:.3f} | "
                     f"{start_s:.3f} | {prov} | {'yes' if on else 'no: ' + note} |")
    text = "\n".join([
        f"# CUDA check: MiniLM, {platform.node()}" + (" (DRY RUN on the CPU EP)" if args.dry_run_cpu else ""),
        "",
        *lines,
        "",
        (f"- compile (`--provider {config.provider} --target cuda --bits {args.bits:g}`, calib {args.calib_size}, eval "
        f"{args.eval_size}): {compile_s:.1f} s; validated on {report['provider']['used']} "
        f"({report['provider']['note']}); all-in from file {report['bits']['all_in_from_file']:.4f}"),
        f"- {headline} of the artifact vs FP32 on {args.eval_size} held-out sentences ({report['provider']['used']}); "
        "other: "
        + ", ".join(f"{k} {v:.4f}" for k, v in f.items() if isinstance(v, float) and k != headline),
        (f"- latency feed {feed}; IO binding: inputs as {device} OrtValues bound once, outputs bound to {device}; "
        f"{args.runs} interleaved runs after {args.warmup} warm-up; session.run column: the compile's own "
        "validation (host inputs/outputs, copies included)"),
        (f"- artifact session settings: {q_config}; max |IO-bound − plain run| of the artifact's output: "
         f"{bound_diff:.2e}"),
        f"- total {time.perf_counter() - t0:.1f} s",
    ]) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
