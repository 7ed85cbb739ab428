"""What loading a model costs as people load it, against the FP32 model: peak and resident memory of a fresh
process at session start and after one run, and the session start time (docs/design.md §3.7: a quantized
artifact must load in no more memory than the FP32 model, and start within 1.5× its time).

Each model is loaded by :mod:`~bayesq_onnx.runtime.load_probe` in a child process of its own, so neither the
compile's memory nor the other model's mixes in; both children import the same modules, so the figures
compare like with like (the ``baseline`` of each, the process before its session, is reported too).
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


def load_versus_fp32(fp_path: Path, q_path: Path, feed: dict[str, np.ndarray], providers: list[str],
                     q_config: dict[str, str] | None = None) -> dict:
    """:func:`measure_load` of the FP32 model (plain session) and the artifact (its own session settings) on
    the same feed, with the ratios artifact / FP32 of the whole process's peak, its resident memory after
    the run, and the session start time — the memory section of a report."""
    fp32 = measure_load(fp_path, feed, providers)
    quantized = measure_load(q_path, feed, providers, q_config)

    def ratio(stage: str, key: str) -> float | None:
        a, b = quantized[stage][key], fp32[stage][key]
        return a / b if a is not None and b else None

    shapes = ", ".join(f"{k} {'×'.join(map(str, v.shape))}" for k, v in feed.items())
    return {"fp32": fp32, "quantized": quantized, "feed": shapes, "providers": providers,
            "ratio": {"peak": ratio("after_run", "peak_mb"), "resident": ratio("after_run", "resident_mb"),
                      "session_start": quantized["session_start_s"] / fp32["session_start_s"]}}
