"""Wall time and peak memory of `bayesq compile` as a user runs it (a fresh process, analysis included),
with the report's per-stage breakdown. Prints a table, writes Markdown/CSV and a stacked bar plot.

    python benchmarks/compile_time.py                         # default model, method and budget
    python benchmarks/compile_time.py --recipes fast default best   # one row per named recipe
    python benchmarks/compile_time.py -- --bits 3.0 --risk mc # extra arguments go to `bayesq compile`
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_io import columns_of, markdown_table, timed_compile, write_csv  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--recipes", nargs="+", default=["default"], help="`bayesq compile --recipe` values, a row each")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("compile_args", nargs="*", help="arguments for `bayesq compile` (after --)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            for i in range(args.runs):
                out = Path(tmp) / f"{recipe}{i}"
                wall, peak_mb, report = timed_compile(["--recipe", recipe, *args.compile_args], out)
                headline = report["headline"]
                validate = sum(v for k, v in report["timings_s"].items() if k.startswith("validate"))
                row = {"recipe": recipe, "run": i, "wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb),
                       "all_in_bits": round(report["bits"]["all_in"], 4),
                       "file_mb": round(report["sizes"]["artifact_bytes"] / 1e6, 2),
                       headline["metric"]: round(headline["value"], 4),
                       "ci95": "–".join(f"{v:.4f}" for v in headline["ci95"]), "eval_items": headline["items"],
                       "validate_share": round(validate / wall, 3)}
                row.update({f"{k} (s)": v for k, v in report["timings_s"].items()})
                rows.append(row)
    text = (f"command: python benchmarks/compile_time.py {' '.join(sys.argv[1:])}\n\n" + markdown_table(rows))
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_time.md").write_text(text)
    write_csv(rows, args.out / "compile_time.csv")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [h for h in columns_of(rows) if h.endswith("(s)")]
    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.5 * len(rows)), dpi=110)
    for y, row in enumerate(rows):
        left = 0.0
        for j, stage in enumerate(stages):
            v = row.get(stage, 0.0) or 0.0
            ax.barh([y], [v], left=left, color=f"C{j % 10}", label=stage.replace(" (s)", "") if y == 0 else None)
            left += v
    ax.set_yticks(range(len(rows)), [f"{r['recipe']} ({r['wall_s']} s)" for r in rows])
    ax.set_xlabel("seconds per stage (label: process wall)")
    ax.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    fig.tight_layout()
    fig.savefig(args.out / "compile_time.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
