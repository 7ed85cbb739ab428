"""What the benchmark scripts share: a fresh ``bayesq compile`` process, timed, with its own peak memory;
and result rows (dicts) written as a Markdown table and a CSV."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


def timed_compile(args: list[str], out: Path) -> tuple[float, float, dict]:
    """Run ``bayesq compile ARGS -q --out OUT`` in a fresh process: wall seconds, the peak resident MiB of
    that one process (``wait4``, not the running maximum over all children), and its report."""
    cmd = [sys.executable, "-m", "bayesq_onnx", "compile", *args, "-q", "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed")
    return wall, usage.ru_maxrss / 1024, json.loads((out / "report.json").read_text())


def columns_of(rows: list[dict]) -> list[str]:
    """Every key of the rows, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r))


def markdown_table(rows: list[dict], columns: list[str] | None = None,
                   fmt: Callable[[str, object], str] = lambda key, value: str(value)) -> str:
    """``rows`` as a Markdown table over ``columns`` (default: all), a missing cell empty."""
    cols = columns or columns_of(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(c, r[c]) if c in r else "" for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    """``rows`` as CSV with every key as a column."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns_of(rows))
        w.writeheader()
        w.writerows(rows)
