"""Latency measurement (runtime/latency.py): time budget, minimum runs, alternating order."""

from __future__ import annotations

import time

import numpy as np

from bayesq_onnx.runtime.latency import compare_latency


class _FakeSession:
    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, 0

    def get_inputs(self):
        return [type("I", (), {"name": "x"})()]

    def run(self, _outputs, _feed):
        self.calls += 1
        time.sleep(self.seconds)


def test_latency_stops_at_the_time_budget_but_not_before_min_runs():
    a, b = _FakeSession(0.01), _FakeSession(0.01)
    out = compare_latency({"a": a, "b": b}, {"x": np.zeros(1)}, runs=50, warmup=1, max_seconds=0.0)
    assert out["a"]["runs"] == out["b"]["runs"] == 5 and a.calls == b.calls == 6
    assert out["a"]["runs_requested"] == 50 and out["a"]["max_seconds"] == 0.0


def test_latency_budget_stops_early_and_records_the_runs_made():
    a = _FakeSession(0.02)
    out = compare_latency({"a": a}, {"x": np.zeros(1)}, runs=200, warmup=0, max_seconds=0.3)
    assert 5 <= out["a"]["runs"] < 200 and a.calls == out["a"]["runs"]


def test_latency_without_budget_or_with_few_runs_does_them_all():
    a = _FakeSession(0.0)
    assert compare_latency({"a": a}, {"x": np.zeros(1)}, runs=12, warmup=2, max_seconds=None)["a"]["runs"] == 12
    b = _FakeSession(0.0)
    assert compare_latency({"b": b}, {"x": np.zeros(1)}, runs=3, warmup=0, max_seconds=0.0)["b"]["runs"] == 3


class _SlowAfterOther(_FakeSession):
    """Runs ``penalty`` seconds slower when another session ran just before it (the other's intra-op threads
    still spinning), as ORT sessions on a small CPU do."""
    log: list = []

    def __init__(self, name: str, seconds: float, penalty: float):
        super().__init__(seconds)
        self.name, self.penalty = name, penalty

    def run(self, outputs, feed):
        after_other = bool(self.log) and self.log[-1] != self.name
        self.log.append(self.name)
        self.calls += 1
        time.sleep(self.seconds + (self.penalty if after_other else 0.0))


def test_latency_alternates_the_order_so_neither_session_always_runs_second():
    _SlowAfterOther.log = []
    a, b = _SlowAfterOther("a", 0.002, 0.004), _SlowAfterOther("b", 0.002, 0.004)
    out = compare_latency({"a": a, "b": b}, {"x": np.zeros(1)}, runs=10, warmup=0, max_seconds=None)
    assert _SlowAfterOther.log[:6] == ["a", "b", "b", "a", "a", "b"]
    # identical sessions measure alike; with a fixed order b would be 3x slower than a
    assert 0.6 < out["b"]["median_ms"] / out["a"]["median_ms"] < 1.7
