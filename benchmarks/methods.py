"""Method comparisons on one model, in one run, on the same data. Prints a table, writes it as Markdown and
CSV under benchmarks/results/, and plots the headline metric against all-in bits.

Suites:
  fixed    RTN vs bayesq-fixed (uniform, codebook) at 4/3/2 bits, and the posterior forms at 3 bits
  budgets  bayesq at all-in budgets 4.0/3.5/3.0/2.5 vs RTN and bayesq-fixed at the same or higher bits
  risk     bayesq at 3.0 bits with the closed-form, rounded-codes and Monte Carlo risks (rank correlation
           of closed-form and Monte Carlo)
  levers   what each part of the method buys at 4.0/3.0/2.5 bits (issue 14): the default; error feedback off;
           error propagation (sequential, fp-outputs); GPTQ at the same budget

    python benchmarks/methods.py --suite budgets
    python benchmarks/methods.py --suite fixed --quick     # small data slice, for a smoke run
    python benchmarks/methods.py --suite levers --scope all --bits 4.0 3.0
    PYTHONPATH=benchmarks python benchmarks/methods.py --suite levers --model module:cnn_photos:efficientnet_lite1
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_io import markdown_table, write_csv  # noqa: E402

from bayesq_onnx.config import CompileConfig
from bayesq_onnx.models import load_model
from bayesq_onnx.models.base import SourceOptions
from bayesq_onnx.pipeline import compile_model
from bayesq_onnx.progress import Reporter


def configs(suite: str, bits: list[float], risks: tuple[str, ...] = ("closed", "rounded", "mc")) -> list[tuple[str, dict]]:
    if suite == "budgets":
        rows = []
        for b in bits:
            up = int(math.ceil(b))
            rows += [("bayesq", dict(method="bayesq", bits=b)),
                     ("bayesq-fixed uniform kfac", dict(method="bayesq-fixed", bits=up, curvature="kfac")),
                     ("rtn", dict(method="rtn", bits=up))]
        return rows
    if suite == "levers":
        rows = []
        for b in bits:
            rows += [("bayesq (default)", dict(method="bayesq", bits=b)),
                     ("error feedback off", dict(method="bayesq", bits=b, rounding="nearest")),
                     ("propagate sequential", dict(method="bayesq", bits=b, propagate="sequential")),
                     ("propagate fp-outputs", dict(method="bayesq", bits=b, propagate="fp-outputs")),
                     ("gptq", dict(method="gptq", bits=b))]
        return rows
    if suite == "risk":
        return [(f"bayesq risk={r}", dict(method="bayesq", bits=b, risk=r)) for b in bits for r in risks]
    rows = []
    for b in map(int, bits):
        rows.append(("rtn", dict(method="rtn", bits=b)))
        rows.append(("bayesq-fixed uniform kfac", dict(method="bayesq-fixed", bits=b, family="uniform", curvature="kfac")))
        rows.append(("bayesq-fixed codebook kfac", dict(method="bayesq-fixed", bits=b, family="codebook", curvature="kfac")))
        if b == 3:
            for curv in ("diag", "lowrank"):
                rows.append((f"bayesq-fixed uniform {curv}", dict(method="bayesq-fixed", bits=b, family="uniform", curvature=curv)))
            rows.append(("bayesq-fixed uniform kfac T=1", dict(method="bayesq-fixed", bits=b, family="uniform", curvature="kfac", temperature=1.0)))
    return rows


def risk_rank_correlation(table: dict) -> float:
    """Mean over blocks of Spearman's ρ between closed-form and Monte Carlo risks of its candidates."""
    import numpy as np

    rhos = []
    for rows in table.values():
        a = np.array([r["risk_closed"] for r in rows])
        b = np.array([r["risk_mc"] for r in rows])
        if len(rows) > 2 and np.isfinite(b).all():
            ra, rb = a.argsort().argsort(), b.argsort().argsort()
            rhos.append(float(np.corrcoef(ra, rb)[0, 1]))
    return float(np.mean(rhos)) if rhos else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--suite", choices=("fixed", "budgets", "risk", "levers"), default="fixed")
    ap.add_argument("--bits", type=float, nargs="+", default=None,
                    help="fixed: 4 3 2; budgets: 4.0 3.5 3.0 2.5; risk: 3.0")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--eval-size", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="64 calibration / 128 evaluation items")
    ap.add_argument("--risks", nargs="+", choices=("closed", "rounded", "mc"), default=["closed", "rounded", "mc"],
                    help="risk suite: which risk estimates to compare")
    ap.add_argument("--scope", choices=("linear", "all"), default="linear",
                    help="weights in scope (linear: Conv/Gemm/MatMul, what peers quantize; all: + embedding tables)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    calib, evals = (64, 128) if args.quick else (args.calib_size, args.eval_size)
    bits = args.bits or {"fixed": [4, 3, 2], "budgets": [4.0, 3.5, 3.0, 2.5], "risk": [3.0],
                         "levers": [4.0, 3.0, 2.5]}[args.suite]
    bundle = load_model(args.model, SourceOptions(calib_size=calib, eval_size=evals))
    results, metric = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, kw) in enumerate(configs(args.suite, bits, tuple(args.risks))):
            config = CompileConfig(model=args.model, out=Path(tmp) / str(i), calib_size=calib, eval_size=evals,
                                   latency_runs=5, scope=args.scope, **kw)
            start = time.perf_counter()
            with Reporter(quiet=True) as rep:
                r = compile_model(config, rep, bundle=bundle).report
            wall = time.perf_counter() - start
            f, headline = r["fidelity"], r["headline"]
            metric = headline["metric"]
            analysis = sum(v for k, v in r["timings_s"].items() if k.startswith(("fit posterior", "plan")))
            row = {"method": label, "bits": kw["bits"], "all_in_bits": round(r["bits"]["all_in"], 4),
                   headline["metric"]: round(headline["value"], 4),
                   **{k: round(f[k], 4) for k in ("cosine_p5", "top10_overlap", "kl_mean") if k in f},
                   "analysis_s": round(analysis, 1), "compile_s": round(wall, 1)}
            if kw.get("risk") == "mc":
                row["risk_rank_corr"] = round(risk_rank_correlation(r["plan"]["settings"]["risk_table"]), 3)
            results.append(row)
            print(" | ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.suite}_{args.model.split(':')[-1]}"
    text = markdown_table(results)
    print(text)
    stem.with_suffix(".md").write_text(text)
    write_csv(results, stem.with_suffix(".csv"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for method in dict.fromkeys(r["method"] for r in results):
        pts = sorted((r["all_in_bits"], r[metric]) for r in results if r["method"] == method)
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xlabel("all-in bits per weight")
    ax.set_ylabel(f"{metric} (held-out)")
    ax.set_title(f"{args.model}: {args.suite}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
