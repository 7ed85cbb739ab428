"""Mixed precision on the tiny model: exact budgets, constraints, overrides, bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from bayesq_onnx.analysis.fit_posterior import FitLaplacePosterior
from bayesq_onnx.analysis.mc_risk import MonteCarloRisk
from bayesq_onnx.bayes.laplace import LaplaceOptions
from bayesq_onnx.config import CompileConfig
from bayesq_onnx.errors import UserError
from bayesq_onnx.pipeline import compile_model
from bayesq_onnx.plan import QuantizedTensor
from bayesq_onnx.planning import candidates
from bayesq_onnx.planning.bayesq import PlanBayesQ
from tiny_torch import tiny_bundle


@pytest.fixture(scope="module")
def analysed(tiny_exported):
    bundle, bindings, weights = tiny_exported
    return bundle, bindings, weights, FitLaplacePosterior(bundle, LaplaceOptions(curvature="kfac"))(weights)


def test_placeholder_cost_equals_fitted_cost(analysed):
    from bayesq_onnx.planning.tensor_design import design_tensor

    _, _, weights, post = analysed
    for w in weights.values():
        for cand in candidates.for_target(w, "size"):
            fitted = design_tensor(w, post[w.name], cand, curvature="diag")
            assert QuantizedTensor.placeholder(w.name, w.layout, cand).stored_bits() == fitted.stored_bits()


def test_plan_reports_the_input_shrinkage_of_its_posteriors(analysed):
    """A tensor whose posterior pulled A toward its diagonal says by how much in the plan (the report's
    ``plan.tensors``); the others carry no such key."""
    _, _, weights, post = analysed
    name = sorted(post)[0]
    post = {**post, name: dataclasses.replace(post[name], info={**post[name].info, "input_shrinkage": 0.25})}
    plan = PlanBayesQ(4.0, post, candidates.allowed(weights))(weights)
    assert {n: t.info.get("input_shrinkage") for n, t in plan.tensors.items()} == \
        {n: 0.25 if n == name else None for n in plan.tensors}


@pytest.mark.parametrize("budget", [2.5, 3.0, 3.5, 4.0, 6.0])
def test_budget_is_met_and_used(analysed, budget):
    _, _, weights, post = analysed
    allowed = candidates.allowed(weights)
    plan = PlanBayesQ(budget, post, allowed)(weights)
    assert plan.all_in_bits <= budget + 1e-9
    assert plan.all_in_bits > budget - 0.5  # three small tensors: the steps between candidates are coarse
    assert {t.info["candidates"] for t in plan.tensors.values()} == {len(allowed[n]) for n in allowed}


def test_more_budget_never_raises_risk(analysed):
    _, _, weights, post = analysed
    allowed = candidates.allowed(weights)
    risks = [sum(t.info["risk"] for t in PlanBayesQ(b, post, allowed)(weights).tensors.values())
             for b in (2.5, 3.0, 4.0, 5.0)]
    assert risks == sorted(risks, reverse=True)


def test_nearest_rounding_is_nearest_on_the_same_grid(analysed):
    """``rounding="nearest"`` keeps the designed grid and takes the nearest codes; ``"feedback"`` (K-FAC)
    takes other codes on that grid, with less error in the posterior metric it compensates in."""
    from bayesq_onnx.planning.tensor_design import canonical_mu, design_grid, round_on_grid

    _, _, weights, post = analysed
    compared = 0
    for w in weights.values():
        cand = next(c for c in candidates.for_target(w, "size") if c.family == "uniform" and c.bits == 4)
        mu = canonical_mu(w)
        grid, dist = design_grid(w, post[w.name], cand, mu=mu)
        near = round_on_grid(w, post[w.name], cand, grid, dist, curvature="kfac", rounding="nearest")
        fed = round_on_grid(w, post[w.name], cand, grid, dist, curvature="kfac")
        codes, _ = grid.quantize(mu, slice(0, w.layout.rows), slice(0, w.layout.cols))
        np.testing.assert_array_equal(near.codes, codes.numpy())
        np.testing.assert_array_equal(near.scale, fed.scale)
        assert near.info["curvature"] == "nearest"
        assert fed.info["curvature"] == ("kfac" if post[w.name].A is not None else "diag")
        if post[w.name].A is not None:
            assert fed.info["whitened_error"] < near.info["whitened_error"]
            compared += 1
    assert compared >= 2


def test_unknown_rounding_is_refused():
    with pytest.raises(UserError, match="rounding"):
        CompileConfig(rounding="stochastic").validate()


def test_infeasible_budgets(analysed):
    _, _, weights, post = analysed
    allowed = candidates.allowed(weights)
    with pytest.raises(UserError, match="cannot be met"):
        PlanBayesQ(1.5, post, allowed)(weights)
    with pytest.raises(UserError, match="cannot be met"):
        PlanBayesQ(17.0, post, allowed)(weights)


def test_infeasible_budget_names_a_range_that_excludes_it(analysed):
    """Every weight pinned to one candidate makes lo = hi, a hair below a round budget: the message must not
    read "between 4.000 and 4.000" for a budget of 4."""
    _, _, weights, _ = analysed
    pinned = {n: ([c for c in cands if c.label.startswith("uint4-row")] or cands)[:1]
              for n, cands in candidates.allowed(weights).items()}
    lo, hi = candidates.budget_range(weights, pinned)
    assert lo == hi
    budget = hi + 2e-5
    with pytest.raises(UserError, match="cannot be met") as err:
        candidates.check_budget(budget, weights, pinned)
    low, high = (float(x) for x in str(err.value).split("between ")[1].split(" all-in")[0].split(" and "))
    assert low <= high < budget and abs(high - hi) < 1e-4


def test_targets_restrict_candidates(analysed):
    _, _, weights, _ = analysed
    speed = candidates.allowed(weights, target="speed")
    assert {"conv.weight", "proj.weight"} <= set(speed)  # both kinds below are checked
    for name, cands in speed.items():
        if set(weights[name].consumers) == {"MatMul"}:  # stored for MatMulNBits
            assert all(c.family == "uniform" and c.bits in (4, 8) and c.kernel == "nbits" for c in cands)
        else:  # no DequantizeLinear that would run on every call: forms that fold at session start
            assert {c.family for c in cands} <= {"codebook", "float"}
    cuda = candidates.allowed(weights, target="cuda")
    assert all(c.bits in (4, 8, 16) for cs in cuda.values() for c in cs)


def test_keep_first_last_pins_to_8_bit(analysed):
    _, _, weights, post = analysed
    order = sorted(weights, key=lambda n: weights[n].first_use)
    allowed = candidates.allowed(weights, keep_first_last=True)
    assert allowed[order[0]] == [candidates.PIN] and allowed[order[-1]] == [candidates.PIN]
    plan = PlanBayesQ(8.5, post, allowed)(weights)
    assert plan.tensors[order[0]].candidate.label == plan.tensors[order[-1]].candidate.label == "uint8-row"


def test_keep_first_last_under_speed_keeps_the_fast_forms(analysed):
    """Under --target speed the pins are forms ORT runs fast: a fused 8-bit MatMul, FP16 elsewhere."""
    _, _, weights, _ = analysed
    order = sorted(weights, key=lambda n: weights[n].first_use)
    allowed = candidates.allowed(weights, target="speed", keep_first_last=True)
    for name in (order[0], order[-1]):
        (pin,) = allowed[name]
        if set(weights[name].consumers) == {"MatMul"}:
            assert (pin.family, pin.bits, pin.kernel) == ("uniform", 8, "nbits")
        else:
            assert pin == candidates.Candidate("float", 16)
    # the tiny model's first and last layers are not MatMuls: the MatMulNBits pin (size and speed alike) directly
    nbits8 = candidates.nbits_candidates(weights["proj.weight"], (8,))[0]
    assert nbits8.kernel == "nbits" and nbits8.bits == 8
    assert candidates.pin_for(weights["proj.weight"], "speed") == candidates.pin_for(weights["proj.weight"], "size") == nbits8
    assert candidates.pin_for(weights["conv.weight"], "size") == candidates.PIN


def test_overrides(tmp_path, analysed):
    _, _, weights, post = analysed
    path = tmp_path / "o.json"
    path.write_text(json.dumps({"conv.*": ["uint4-g32", "codebook3-row"], "proj.weight": ["fp16"]}))
    allowed = candidates.allowed(weights, overrides=candidates.load_overrides(path))
    assert [c.label for c in allowed["conv.weight"]] == ["uint4-g32", "codebook3-row"]
    assert [c.label for c in allowed["proj.weight"]] == ["fp16"]
    path.write_text(json.dumps({"nothing.*": ["uint4-row"]}))
    with pytest.raises(UserError, match="matches no quantized tensor"):
        candidates.allowed(weights, overrides=candidates.load_overrides(path))
    path.write_text(json.dumps({"conv.*": ["uint7-row"]}))
    with pytest.raises(UserError, match="unknown candidate 'uint7-row'"):
        candidates.load_overrides(path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        candidates.load_overrides(path)
    path.write_text(json.dumps({"proj.weight": ["uint4-g128"]}))  # 32 input channels: no group of 128
    with pytest.raises(UserError, match="fits"):
        candidates.allowed(weights, overrides=candidates.load_overrides(path))
    order = sorted(weights, key=lambda n: weights[n].first_use)
    path.write_text(json.dumps({order[0]: ["uint4-row"]}))
    with pytest.raises(UserError, match="`keep_first_last`"):
        candidates.allowed(weights, overrides=candidates.load_overrides(path), keep_first_last=True)


def test_labels_roundtrip():
    for label, cand in candidates.LABELS.items():
        assert cand.label == label and candidates.parse(label) == cand


def test_monte_carlo_risk_tracks_the_closed_form(analysed):
    bundle, bindings, weights, post = analysed
    allowed = candidates.allowed(weights)
    mc = MonteCarloRisk(bundle, bindings, items=16)
    plan = PlanBayesQ(3.5, post, allowed, mc_risk=mc)(weights)
    table = plan.settings["risk_table"]
    assert plan.settings["risk"] == "mc" and mc.forward_passes > 0
    for name, rows in table.items():
        mc_r = [r["risk_mc"] for r in rows]
        closed = [r["risk_closed"] for r in rows]
        assert all(v >= 0 for v in mc_r)
        # the 2-bit candidates are riskier than the 8-bit ones under both measures
        two = [i for i, r in enumerate(rows) if r["candidate"].startswith("uint2")]
        eight = [i for i, r in enumerate(rows) if r["candidate"].startswith("uint8")]
        assert min(mc_r[i] for i in two) > max(mc_r[i] for i in eight)
        assert min(closed[i] for i in two) > max(closed[i] for i in eight)
    # restoring the parameters: the module is unchanged after the risk runs
    import torch

    fresh = tiny_bundle()
    for (n, p), (_, q) in zip(bundle.module.named_parameters(), fresh.module.named_parameters()):
        assert torch.equal(p, q), n


def test_compile_default_method_writes_report_with_risks(tmp_path):
    config = CompileConfig(model="tiny", bits=3.5, out=tmp_path / "out", latency_runs=1,
                           memory_loads=1, latency_warmup=0)
    report = compile_model(config, bundle=tiny_bundle()).report
    assert report["plan"]["method"] == "bayesq"
    assert report["bits"]["all_in"] <= 3.5 and report["bits"]["all_in"] == pytest.approx(report["bits"]["all_in_from_file"])
    for t in report["plan"]["tensors"]:
        assert {"risk", "fisher_mass", "whitened_error", "candidate"} <= set(t)
    assert (tmp_path / "out" / "bits.png").exists()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| risk | Fisher mass |" in md and md.count("| `") == len(report["plan"]["tensors"])


def test_compile_infeasible_budget_writes_nothing(tmp_path):
    config = CompileConfig(model="tiny", bits=1.2, out=tmp_path / "out")
    with pytest.raises(UserError, match="cannot be met"):
        compile_model(config, bundle=tiny_bundle())
    assert not (tmp_path / "out").exists()
