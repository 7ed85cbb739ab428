"""Calibration-only distillation (``--distill``, docs/design.md §3 step 6): the metric without and with it, the
posterior-predictive teacher against the FP32 teacher, and the time it adds. Prints a table, writes
Markdown/CSV and a plot.

Each case is a fresh ``bayesq compile`` process: once with ``--no-distill`` (its wall time is the baseline)
and once per teacher with ``--distill``. "without" and "with" come from the same report: the pipeline
validates the undistilled plan and the distilled artifact on the same held-out data against the same FP32
reference, so the two differ only by distillation.

    python benchmarks/distill.py                                    # MiniLM 3.0/2.5, digits-resnet 2.5
    python benchmarks/distill.py --case digits-resnet:2.5 -- --distill-steps 100
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_io import columns_of, markdown_table, timed_compile, write_csv  # noqa: E402

CASES = ("minilm:3.0", "minilm:2.5", "digits-resnet:2.5")
TEACHERS = ("posterior", "fp")


def _stage(report: dict, prefix: str) -> float:
    return sum(v for k, v in report["timings_s"].items() if k.startswith(prefix))


def run_case(case: str, extra: list[str], tmp: Path) -> list[dict]:
    model, bits = case.rsplit(":", 1)
    base_wall, _, base = timed_compile([model, "--bits", bits, *extra, "--no-distill"], tmp / "plain")
    headline = base["headline"]["metric"]
    rows = []
    for teacher in TEACHERS:
        wall, _, rep = timed_compile([model, "--bits", bits, *extra, "--distill", "--teacher", teacher], tmp / teacher)
        d = rep["distill"]
        if "skipped" in d:
            raise SystemExit(f"error: distillation skipped for {case}: {d['skipped']}")
        assert rep["bits"]["all_in"] == base["bits"]["all_in"], "distillation moved the budget"
        row = {"model": model, "budget": float(bits), "all_in_bits": round(rep["bits"]["all_in"], 4),
               "teacher": teacher, "teacher_used": d["teacher"], "metric": headline,
               "without": d["before"], "with": d["after"], "gain": d["after"] - d["before"]}
        for k, v in d["fidelity_before"].items():  # the other figures of the metric (NLL, ECE, ...)
            if k != headline and isinstance(v, float) and isinstance(rep["fidelity"].get(k), float):
                row[f"{k} without"], row[f"{k} with"] = v, rep["fidelity"][k]
        row.update({"steps": d["steps"], "best_step": d["best_step"], "max_steps": d["max_steps"],
                    "heldout_loss_before": d["heldout_loss_before"], "heldout_loss_after": d["heldout_loss_after"],
                    "distill_s": round(_stage(rep, "distill"), 1), "wall_s": round(wall, 1),
                    "wall_no_distill_s": round(base_wall, 1), "added_s": round(wall - base_wall, 1)})
        rows.append(row)
    return rows


# the Markdown table: the case, the headline and every other figure of the metric without → with (the FP32
# reference's own figures and the seconds' details stay in the CSV)
TABLE = ("model", "budget", "all_in_bits", "teacher", "teacher_used", "metric", "without", "with", "gain")
TABLE_TAIL = ("steps", "best_step", "distill_s", "wall_no_distill_s", "wall_s", "added_s")


def table_columns(rows: list[dict]) -> list[str]:
    keys = columns_of(rows)
    pairs = [k for k in keys if k.endswith((" without", " with")) and "fp32" not in k and "drop" not in k]
    return [*TABLE, *pairs, *TABLE_TAIL]


def _fmt(key: str, v) -> str:
    if isinstance(v, float) and key.endswith("_s"):
        return f"{v:.1f}"
    if isinstance(v, float) and key != "budget":
        return f"{v:.4f}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def write_outputs(rows: list[dict], stem: Path, command: str) -> str:
    text = f"command: `{command.strip()}`\n\n" + markdown_table(rows, table_columns(rows), _fmt)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text)
    write_csv(rows, stem.with_suffix(".csv"))
    plot(rows, stem.with_suffix(".png"))
    return text


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["model"], r["budget"], r["metric"]) for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 3.4), squeeze=False)
    for ax, (model, budget, metric) in zip(axes[0], cases):
        mine = [r for r in rows if (r["model"], r["budget"]) == (model, budget)]
        labels = ["without"] + [f"{r['teacher']} teacher" + ("" if r["teacher_used"] == r["teacher"] else
                                                           f"\n(guard: {r['teacher_used']} used)") for r in mine]
        values = [mine[0]["without"]] + [r["with"] for r in mine]
        ax.bar(labels, values, color=["#999999", "#1f77b4", "#ff7f0e"][: len(values)])
        low = min(values)
        ax.set_ylim(low - 0.2 * (max(values) - low + 1e-3), max(values) + 0.2 * (max(values) - low + 1e-3))
        ax.set_title(f"{model} @ {budget:g} bits")
        ax.set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs="+", default=list(CASES), help="MODEL:BITS pairs")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/distill"), help="output stem")
    ap.add_argument("compile_args", nargs="*", help="more arguments for every `bayesq compile` (after --)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(args.case):
            rows += run_case(case, args.compile_args, Path(tmp) / f"case{i}")
            print(f"done {case}", file=sys.stderr, flush=True)
    print(write_outputs(rows, args.out, "python benchmarks/distill.py " + " ".join(sys.argv[1:])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
