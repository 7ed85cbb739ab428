"""Latency of two sessions measured side by side on the same feed."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

MIN_RUNS = 5


def compare_latency(sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray],
                    runs: int = 20, warmup: int = 3, max_seconds: float | None = 20.0,
                    min_runs: int = MIN_RUNS) -> dict[str, dict]:
    """Median and p90 wall time per run (ms) for each session.

    Runs are interleaved after ``warmup`` runs each, in alternating order (a, b, b, a, a, b, ...), so
    drift in machine load affects every session alike and the ratio stays meaningful on a shared machine.
    The order alternates because a session's intra-op threads keep spinning for a while after its run and
    take CPU from whichever session runs next: on a run of a few milliseconds a fixed order made the same
    FP32 model measure 1.2–1.4× slower than itself in second place. ``runs`` is the most rounds
    made: once ``max_seconds`` (warm-up included; ``None``: no limit) have passed, the measurement stops
    after the current round, but never before ``min_runs`` rounds (or ``runs``, if fewer). ``runs`` in
    the result is the number of rounds actually timed; ``runs_requested`` and ``max_seconds`` say what
    was asked.
    """
    times: dict[str, list[float]] = {k: [] for k in sessions}
    feeds = {k: {i.name: feed[i.name] for i in s.get_inputs()} for k, s in sessions.items()}
    start = time.perf_counter()
    for _ in range(warmup):
        for k, s in sessions.items():
            s.run(None, feeds[k])
    floor = min(runs, min_runs)
    done = 0
    order = list(sessions.items())
    for done in range(1, runs + 1):
        for k, s in (order if done % 2 else order[::-1]):
            t = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append((time.perf_counter() - t) * 1e3)
        if done >= floor and max_seconds is not None and time.perf_counter() - start >= max_seconds:
            break
    return {k: {"median_ms": float(np.median(v)) if v else float("nan"),
                "p90_ms": float(np.percentile(v, 90)) if v else float("nan"), "runs": done,
                "runs_requested": runs, "max_seconds": max_seconds, "warmup": warmup} for k, v in times.items()}


def latency_versus_fp32(fp32: ort.InferenceSession, quantized: ort.InferenceSession, feed: dict[str, np.ndarray],
                        provider: str, runs: int = 20, warmup: int = 3, max_seconds: float | None = 20.0) -> dict:
    """:func:`compare_latency` of the FP32 and quantized sessions plus the median ratio quantized / FP32 and a
    description of the feed — the latency section of a report."""
    latency = compare_latency({"fp32": fp32, "quantized": quantized}, feed, runs=runs, warmup=warmup,
                              max_seconds=max_seconds)
    shapes = ", ".join(f"{k} {'×'.join(map(str, v.shape))}" for k, v in feed.items())
    latency.update(ratio=latency["quantized"]["median_ms"] / latency["fp32"]["median_ms"], feed=shapes,
                   provider=provider)
    return latency
