"""How far K-FAC's diagonal is from the exact diagonal Fisher, per weight tensor.

K-FAC "expand" (``--curvature kfac``, the default) takes ``F ≈ G ⊗ A`` with ``A`` the input second moment over
tokens and ``G = mean_items Σ_tokens δ δᵀ``: it assumes the output gradients at different tokens (sequence
positions, or a conv's spatial positions) of one item uncorrelated. ``--curvature diag`` computes ``F_ii``
exactly from per-item gradients ``g = Σ_tokens δ ⊗ a``. Depthwise convs and embedding tables get the exact
diagonal under both, so the planner compares their risks with K-FAC layers' risks. This script fits both forms
on the same calibration items (same target samples) and prints, per tensor, the ratio of Fisher masses
``Σ F_ii(exact) / Σ G_rr·A_cc (K-FAC)``: 1 where K-FAC's scale is right, > 1 where the positions' gradients are
correlated and K-FAC underestimates the curvature.

    python benchmarks/kfac_scale.py                                          # MiniLM, 64 calibration items
    PYTHONPATH=. python benchmarks/kfac_scale.py --model module:benchmarks.cnn_photos:efficientnet_lite1

Writes ``benchmarks/results/kfac_scale_<model>.{csv,md,png}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_io import markdown_table, write_csv  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def fisher_mass_ratios(model: str, items: int, seed: int = 0) -> tuple[list[dict], dict]:
    """One row per weight tensor bound to a traced op: its shape, the form K-FAC used for it, the Fisher mass of
    each form and their ratio; and timings."""
    from bayesq_onnx.analysis.fit_posterior import FitLaplacePosterior
    from bayesq_onnx.bayes.laplace import LaplaceOptions
    from bayesq_onnx.config import CompileConfig
    from bayesq_onnx.export import fp32_model
    from bayesq_onnx.models import load_model
    from bayesq_onnx.models.base import SourceOptions
    from bayesq_onnx.passes.collect_weights import CollectWeightsPass

    bundle = load_model(model, SourceOptions(calib_size=items, eval_size=8, seed=seed))
    onnx_model, _ = fp32_model(bundle)
    collect = CollectWeightsPass(scope="all")
    collect(onnx_model)
    weights = collect.weights
    fits, timings = {}, {}
    for form in ("kfac", "diag"):
        start = time.perf_counter()
        # N as the compile sets it: the data term then dwarfs τ, which fisher_mass subtracts as a scalar
        options = LaplaceOptions(curvature=form, n_data=CompileConfig().n_data, seed=seed)
        fits[form] = FitLaplacePosterior(bundle, options)(weights)
        timings[f"{form}_fit_s"] = round(time.perf_counter() - start, 1)
    rows = []
    for name in sorted(set(fits["kfac"]) & set(fits["diag"]), key=list(weights).index):
        kfac, exact = fits["kfac"][name], fits["diag"][name]
        mass_k, mass_d = kfac.fisher_mass, exact.fisher_mass  # Σ N·F_ii (K-FAC's: its Kronecker diagonal)
        rows.append({"tensor": name, "shape": "×".join(map(str, weights[name].layout.shape)),
                     "kfac_form": "kronecker" if kfac.A is not None else "exact diagonal",
                     "fisher_mass_kfac": f"{mass_k:.4g}", "fisher_mass_exact": f"{mass_d:.4g}",
                     "exact_over_kfac": round(mass_d / mass_k, 3) if mass_k > 0 else float("nan")})
    return rows, timings


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8.0, 0.16 * len(rows)), 3.6))
    colors = ["tab:blue" if r["kfac_form"] == "kronecker" else "tab:gray" for r in rows]
    ax.bar(range(len(rows)), [r["exact_over_kfac"] for r in rows], color=colors)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks([])
    ax.set_xlabel("weight tensors as the compile collects them (gray: exact diagonal in both forms)")
    ax.set_ylabel("Fisher mass, exact / K-FAC")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--items", type=int, default=64, help="calibration items")
    args = parser.parse_args(argv)
    rows, timings = fisher_mass_ratios(args.model, args.items)
    stem = args.model.rsplit(":", 1)[-1].replace("/", "_")
    RESULTS.mkdir(exist_ok=True)
    table = markdown_table(rows)
    kron = [r["exact_over_kfac"] for r in rows if r["kfac_form"] == "kronecker"]
    summary = (f"{args.model}, {args.items} calibration items: {len(kron)} Kronecker tensors, exact / K-FAC "
               f"Fisher mass from {min(kron):.3g} to {max(kron):.3g} (median {statistics.median(kron):.3g}); "
               f"fits {timings}")
    command = f"`python benchmarks/kfac_scale.py --model {args.model} --items {args.items}`"
    (RESULTS / f"kfac_scale_{stem}.md").write_text(f"# K-FAC vs exact diagonal Fisher: {args.model}\n\n{table}\n\n"
                                                  f"- {summary}\n- command: {command}\n")
    write_csv(rows, RESULTS / f"kfac_scale_{stem}.csv")
    plot(rows, RESULTS / f"kfac_scale_{stem}.png", f"{stem}, {args.items} calibration items: exact / K-FAC Fisher mass")
    print(table)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
