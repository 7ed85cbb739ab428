"""What loading a model costs as people load it, against the FP32 model: peak and resident memory of a fresh
process at session start and after one run, and the session start time (docs/design.md §3.7: a quantized
artifact must load in no more memory than the FP32 model, and start within 1.5× its time).

Each model is loaded by :mod:`~bayesq_onnx.runtime.load_probe` in a child process of its own, so neither the
compile's memory nor the other model's mixes in; both children import the same modules, so the figures
compare like with like (the ``baseline`` of each, the process before its session, is reported too). Each
model is loaded :data:`LOADS` times and each figure is the median: one load can move a ratio near 1 by 10 %.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..errors import BayesQError

PROBE = Path(__file__).with_name("load_probe.py")
TIMEOUT_S = 900
LOADS = 3  # loads of each model per measurement (figures: the median)


class LoadProbeFailed(BayesQError):
    """The child process that loads a model failed (its last line of output says why)."""


def measure_load(model: Path, feed: dict[str, np.ndarray], providers: list[str],
                 config: dict[str, str] | None = None) -> dict:
    """Load ``model`` in a fresh process (ORT session with ``config`` entries on ``providers``), run ``feed``
    once; the probe's figures (MB and seconds, :mod:`~bayesq_onnx.runtime.load_probe`)."""
    with tempfile.TemporaryDirectory(prefix="bayesq-load-") as tmp:
        feed_path = Path(tmp) / "feed.npz"
        np.savez(feed_path, **feed)
        settings = json.dumps({"providers": providers, "config": config or {}})
        proc = subprocess.run([sys.executable, str(PROBE), str(model), str(feed_path), settings],
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0 or not proc.stdout.strip():
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LoadProbeFailed(f"loading {model.name} in a fresh process failed: {why}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_load(model: Path, feed: dict[str, np.ndarray], providers: list[str], config: dict[str, str] | None = None,
                loads: int = LOADS) -> dict:
    """:func:`measure_load` ``loads`` times, each figure the median over the loads (``loads`` and each
    load's figures in ``runs``): a process's peak and resident memory vary between loads of one model
    (measured on EfficientNet-Lite1's FP32 model: 170, 182 or 189 MB after one run, by which worker thread's
    allocator arena takes what), so one load can decide a ratio near 1."""
    runs = [measure_load(model, feed, providers, config) for _ in range(loads)]
    return {**_median(runs), "runs": runs}


def load_versus_fp32(fp_path: Path, q_path: Path, feed: dict[str, np.ndarray], providers: list[str],
                     q_config: dict[str, str] | None = None, loads: int = LOADS) -> dict:
    """The FP32 model (plain session) and the artifact (its own session settings) each loaded ``loads`` times
    on the same feed, alternately, by :func:`measure_load`; the median of each figure, and the ratios
    artifact / FP32 of the medians of the whole process's peak, its resident memory after the run, and the
    session start time -- the memory section of a report. ``ratio_range``: the least and greatest ratio
    over the pairs of loads, how far one load could have moved it."""
    fp_runs, q_runs = [], []
    for _ in range(loads):  # alternating, so that anything else on the machine reaches both alike
        fp_runs.append(measure_load(fp_path, feed, providers))
        q_runs.append(measure_load(q_path, feed, providers, q_config))
    fp32, quantized = _median(fp_runs), _median(q_runs)

    def ratio(a: dict, b: dict, stage: str, key: str) -> float | None:
        x, y = (a[stage][key], b[stage][key]) if stage else (a[key], b[key])
        return x / y if x is not None and y else None

    keys = {"peak": ("after_run", "peak_mb"), "resident": ("after_run", "resident_mb"),
            "session_start": (None, "session_start_s")}
    pairs = {name: [ratio(q, f, *k) for q, f in zip(q_runs, fp_runs)] for name, k in keys.items()}
    shapes = ", ".join(f"{k} {'×'.join(map(str, v.shape))}" for k, v in feed.items())
    return {"fp32": fp32, "quantized": quantized, "feed": shapes, "providers": providers, "loads": loads,
            "ratio": {name: ratio(quantized, fp32, *k) for name, k in keys.items()},
            "ratio_range": {name: ([min(v), max(v)] if None not in v else None) for name, v in pairs.items()}}


def _median(runs: list[dict]) -> dict:
    """The figures of several loads merged key by key: numbers to their median, ``None`` where any is."""
    out = {}
    for key, first in runs[0].items():
        values = [r[key] for r in runs]
        if isinstance(first, dict):
            out[key] = _median(values)
        else:
            out[key] = None if any(v is None for v in values) else float(np.median(values))
    return out
