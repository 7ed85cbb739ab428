"""Determinism across processes: the same inputs and --seed give a byte-identical model.onnx and the same plan
in two fresh interpreters. test_pipeline.py checks it within one process; here the two compiles differ in
what a single process cannot vary: Python's hash seed (set iteration order), torch/ORT thread pools started
anew, and they run at the same time, so their threads interleave differently."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# Measurements, not properties of the artifact: they differ between any two runs.
MEASURED = {"timings_s", "latency", "session_start_s", "memory"}


def _start(out: Path, hash_seed: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-m", "bayesq_onnx", "compile", "module:user_models:bundle",
                             "--method", "bayesq", "--bits", "3.5", "--seed", "0", "--out", str(out),
                             "--latency-runs", "1", "--memory-loads", "1", "-q"],
                            cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_bayesq_cli_is_byte_identical_across_processes(tmp_path):
    runs = {name: _start(tmp_path / name, seed) for name, seed in (("a", 1), ("b", 2))}
    for name, proc in runs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
    model = {n: hashlib.sha256((tmp_path / n / "model.onnx").read_bytes()).hexdigest() for n in runs}
    report = {n: json.loads((tmp_path / n / "report.json").read_text()) for n in runs}
    assert model["a"] == model["b"]
    assert report["a"]["plan"] == report["b"]["plan"]
    # the mixed-precision plan really is a mix (a budget between two bit-widths), so the knapsack ran
    assert len({t["candidate"]["label"] for t in report["a"]["plan"]["tensors"]}) > 1
    # everything else the report says about the artifact matches too; only --out and measurements differ
    for r in report.values():
        r["config"].pop("out")
        for key in MEASURED:
            r.pop(key)
    assert report["a"] == report["b"]
