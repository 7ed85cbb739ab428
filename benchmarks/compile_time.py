"""Wall time and peak memory of `bayesq compile` as a user runs it (a fresh process, analysis included),
with the report's per-stage breakdown. Prints a table, writes Markdown/CSV and a stacked bar plot.

    python benchmarks/compile_time.py                         # default model, method and budget
    python benchmarks/compile_time.py -- --bits 3.0 --risk mc # extra arguments go to `bayesq compile`
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("compile_args", nargs="*", help="arguments for `bayesq compile` (after --)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            out = Path(tmp) / f"run{i}"
            cmd = [sys.executable, "-m", "bayesq_onnx", "compile", "-q", "--out", str(out), *args.compile_args]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            report = json.loads((out / "report.json").read_text())
            row = {"run": i, "wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb),
                   "all_in_bits": round(report["bits"]["all_in"], 4),
                   report["headline"]["metric"]: round(report["headline"]["value"], 4)}
            row.update({f"{k} (s)": v for k, v in report["timings_s"].items()})
            rows.append(row)
    header = list(dict.fromkeys(k for r in rows for k in r))
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(r.get(h, "")) for h in header) + " |" for r in rows]
    text = "command: bayesq compile " + " ".join(args.compile_args) + "\n\n" + "\n".join(md) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_time.md").write_text(text)
    with open(args.out / "compile_time.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [h for h in header if h.endswith("(s)")]
    fig, ax = plt.subplots(figsize=(7, 3), dpi=110)
    left = 0.0
    for stage in stages:
        v = rows[-1][stage]
        ax.barh([0], [v], left=left, label=stage.replace(" (s)", ""))
        left += v
    ax.set_yticks([])
    ax.set_xlabel(f"seconds (process wall {rows[-1]['wall_s']} s)")
    ax.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    fig.tight_layout()
    fig.savefig(args.out / "compile_time.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
