"""Block reconstruction (``--reconstruct``, bayesq_onnx/planning/reconstruct.py): the artifact without it and
with it under each ``--reconstruct-metric``, on the model's evaluation data, with the time it adds and the
block errors it reports. Prints a table, writes Markdown/CSV and a plot.

Each row is a fresh ``bayesq compile`` process at the same budget and seed; the plan before reconstruction is
the same in every row (same inputs, same seed), so the rows differ only by reconstruction.

    PYTHONPATH=. python benchmarks/reconstruct.py \\
        --case module:benchmarks.cnn_photos:efficientnet_lite1:4.0 -- --calib-size 256 --eval-size 256
    python benchmarks/reconstruct.py --case digits-resnet:3.0 --metrics mse
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_io import markdown_table, timed_compile, write_csv  # noqa: E402

METRICS = ("mse", "fisher", "fisher-items")
# the figures a row reports when the model's metric has them (classifiers: KL and agreement; others: headline)
FIGURES = ("kl_mean", "top1_agreement", "confident_agreement", "cosine_mean", "nll")


def run_case(case: str, metrics: list[str], extra: list[str], tmp: Path) -> list[dict]:
    model, bits = case.rsplit(":", 1)
    rows = []
    for metric in ["none", *metrics]:
        flags = [] if metric == "none" else ["--reconstruct", "--reconstruct-metric", metric]
        wall, peak, rep = timed_compile([model, "--bits", bits, *extra, *flags], tmp / metric)
        f = rep["fidelity"]
        row = {"model": model, "budget": float(bits), "all_in_bits": round(rep["bits"]["all_in"], 4),
               "reconstruct": metric, "headline": rep["headline"]["metric"], "value": rep["headline"]["value"],
               **{k: f[k] for k in FIGURES if isinstance(f.get(k), float)}, "verdict": rep["verdict"]["verdict"]}
        r = rep["plan"]["settings"].get("reconstruction")
        if r and "per_block" in r:
            blocks = r["per_block"]
            row.update({"blocks": r["blocks"], "codes_moved": sum(b["codes_moved"] for b in blocks),
                        "calib_error": f"{sum(b['error_before'] for b in blocks):.4g} → "
                                       f"{sum(b['error_after'] for b in blocks):.4g}",
                        "heldout_error": f"{sum(b['heldout_error_before'] for b in blocks):.4g} → "
                                         f"{sum(b['heldout_error_after'] for b in blocks):.4g}",
                        "reconstruct_s": round(r["seconds"], 1)})
        row.update({"wall_s": round(wall, 1), "peak_mib": round(peak)})
        rows.append(row)
        print(f"  {case} {metric}: {row['headline']} {row['value']:.4f}", file=sys.stderr, flush=True)
    return rows


def _fmt(key: str, v) -> str:
    if isinstance(v, float) and key.endswith("_s"):
        return f"{v:.1f}"
    if isinstance(v, float) and key not in ("budget",):
        return f"{v:.4f}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["model"], r["budget"]) for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(4.5 * len(cases), 3.4), squeeze=False)
    for ax, (model, budget) in zip(axes[0], cases):
        mine = [r for r in rows if (r["model"], r["budget"]) == (model, budget)]
        key = "kl_mean" if all("kl_mean" in r for r in mine) else "value"
        ax.bar([r["reconstruct"] for r in mine], [r[key] for r in mine],
               color=["#999999", "#1f77b4", "#ff7f0e", "#2ca02c"][: len(mine)])
        ax.set_title(f"{model.rsplit(':', 1)[-1]} @ {budget:g} bits", fontsize=9)
        ax.set_ylabel("KL(FP32 ‖ q)" if key == "kl_mean" else mine[0]["headline"])
        ax.set_xlabel("--reconstruct-metric (none: without)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs="+", default=["digits-resnet:3.0"], help="MODEL:BITS pairs")
    ap.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/reconstruct"), help="output stem")
    ap.add_argument("compile_args", nargs="*", help="more arguments for every `bayesq compile` (after --)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(args.case):
            rows += run_case(case, args.metrics, args.compile_args, Path(tmp) / f"case{i}")
    command = "python benchmarks/reconstruct.py " + " ".join(sys.argv[1:])
    text = f"command: `{command.strip()}`\n\n" + markdown_table(rows, None, _fmt)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    write_csv(rows, args.out.with_suffix(".csv"))
    plot(rows, args.out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
