"""The GPTQ floor (bayesq_onnx/planning/floor.py): the held-out split, the budget GPTQ is held to, and which
plan ships."""

from __future__ import annotations

import numpy as np
import torch

import bayesq_onnx
from bayesq_onnx import CompileConfig
from bayesq_onnx.planning.floor import clearly_better, held_out_split, item_scores, ship_the_better


def test_held_out_split_keeps_one_batch_in_eight():
    assert held_out_split([1]) == ([1], []) and held_out_split([1, 2, 3]) == ([1, 2, 3], [])
    assert held_out_split([1, 2, 3, 4]) == ([1, 2, 3], [4])
    fit, held = held_out_split(list(range(8)))
    assert fit == list(range(7)) and held == [7]
    fit, held = held_out_split(list(range(17)))
    assert len(held) == 2 and fit + held == list(range(17))


def test_the_better_plan_ships_and_ties_keep_bayesq():
    class P:
        def __init__(self, method, bits):
            self.method, self.all_in_bits = method, bits

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20, 6))
    ours, gptq = P("bayesq", 4.0), P("gptq", 3.99)
    near, far = ref + 0.01 * rng.normal(size=ref.shape), ref + 0.5 * rng.normal(size=ref.shape)
    shipped, section = ship_the_better(ours, gptq, ref, lambda p: near if p is ours else far, categorical=False)
    assert shipped is ours and section["shipped"] == "bayesq" and section["gptq"]["score"] > section["bayesq"]["score"]
    shipped, _ = ship_the_better(ours, gptq, ref, lambda p: far if p is ours else near, categorical=True)
    assert shipped is gptq
    shipped, _ = ship_the_better(ours, gptq, ref, lambda p: near, categorical=True)
    assert shipped is ours
    assert np.allclose(item_scores(ref, ref, True), 0, atol=1e-12) and np.allclose(item_scores(ref, ref, False), 0)


def test_a_lead_within_the_noise_of_the_held_out_items_keeps_bayesq():
    rng = np.random.default_rng(1)
    ours = rng.exponential(size=16)
    # GPTQ better on average but worse on many items: not clearly better
    theirs = ours + rng.normal(scale=1.0, size=16) - 0.1
    assert theirs.mean() < ours.mean() and not clearly_better(theirs, ours)[0]
    # better on every item: clearly better
    assert clearly_better(ours * 0.5, ours)[0]


def test_a_compile_reports_the_floor_at_the_same_budget(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 64, generator=g) for _ in range(10)]
    r = bayesq_onnx.compile(model, data[:8], evaluation=data[8:],
                            config=CompileConfig(bits=3.0, out=tmp_path / "out", latency_runs=1, memory_loads=1)).report
    floor = r["floor"]
    assert floor["items"] == 16  # one of the eight calibration batches, held out of the fit
    assert floor["gptq"]["all_in_bits"] <= 3.0 + 1e-9 and floor["bayesq"]["all_in_bits"] <= 3.0 + 1e-9
    assert r["plan"]["method"] == floor["shipped"] and r["bits"]["all_in"] <= 3.0 + 1e-9
    off = bayesq_onnx.compile(model, data[:8], evaluation=data[8:],
                              config=CompileConfig(bits=3.0, floor="none", out=tmp_path / "off", latency_runs=1,
                                                   memory_loads=1))
    assert "floor" not in off.report and off.report["plan"]["method"] == "bayesq"
