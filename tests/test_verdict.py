"""The verdict (bayesq_onnx/verdict.py): the rule on synthetic outputs, and how it reaches people (CLI line,
Python warnings, `fail_on`)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import bayesq_onnx
from bayesq_onnx import BayesQWarning, CompileConfig, VerdictFailure
from bayesq_onnx.models.metrics import agreement_beyond_ties, output_fidelity
from bayesq_onnx.verdict import COLLAPSE_LOSS, HOLD_LOSS, at_least, derangement, judge, measure_for


def cosine(higher_is_better=True):
    return measure_for(output_fidelity, "cosine_mean", categorical=False, higher_is_better=higher_is_better)


def test_derangement_moves_every_item():
    for n in (2, 3, 10, 257):
        p = derangement(n, seed=n)
        assert sorted(p) == list(range(n)) and not np.any(p == np.arange(n))


def test_identical_holds_and_another_items_output_is_chance():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(64, 16))
    same = judge(cosine(), r, r.copy(), None)
    assert same["verdict"] == "holds" and same["loss"] == pytest.approx(0, abs=1e-12)
    # an artifact that answers with another input's FP32 output is chance by definition: loss 1
    other = judge(cosine(), r, r[derangement(64, 0)], None, seed=0)
    assert other["loss"] == pytest.approx(1.0) and other["verdict"] == "collapsed"


def test_loss_is_on_the_scale_between_fp32_and_chance():
    """The same perturbation is a small loss when items differ a lot, a large one when every output is
    nearly the same vector (a big shared component): the rule measures what tells inputs apart."""
    rng = np.random.default_rng(1)
    varied = rng.normal(size=(128, 32))
    noise = 0.1 * rng.normal(size=(128, 32))
    offset = varied * 0.05 + 3.0  # outputs that differ across items by little compared to their norm
    loose = judge(cosine(), varied, varied + noise, None)
    tight = judge(cosine(), offset, offset + noise, None)
    assert loose["verdict"] == "holds" and loose["loss"] < HOLD_LOSS
    assert tight["loss"] > 10 * loose["loss"] and tight["verdict"] == "collapsed"


def test_near_ties_do_not_decide_a_classifier_verdict():
    """Half the items are near-ties (top-2 margin 0.1) that the candidate flips: plain agreement is 0.5 but
    every confident item agrees, so the verdict holds."""
    rng = np.random.default_rng(2)
    n, k = 200, 10
    r = rng.normal(size=(n, k))
    labels = rng.integers(0, k, n)
    r[np.arange(n), labels] = r.max(1) + 3.0            # confident: margin ≥ 3
    tie = np.flatnonzero(np.arange(n) % 2 == 0)
    second = (labels[tie] + 1) % k
    r[tie, second] = r[tie, labels[tie]] - 0.1          # near-ties: margin 0.1
    c = r.copy()
    c[tie, second] = r[tie, labels[tie]] + 0.1          # ... flipped by the candidate
    assert (r.argmax(1) == c.argmax(1)).mean() == pytest.approx(0.5)
    figures = agreement_beyond_ties(r, c)
    assert figures["confident_agreement"] == 1.0 and figures["confident_items"] == n // 2
    got = judge(measure_for(output_fidelity, "", categorical=True), r, c, None)
    assert got["measure"] == "confident_agreement" and got["verdict"] == "holds"
    # the chance level of a classifier is the agreement with another item's FP32 answer: about 1/k here
    assert got["chance"] < 0.3


def test_logits_over_positions_count_every_position():
    rng = np.random.default_rng(3)
    r = rng.normal(size=(8, 5, 20)) * 4                  # [items, tokens, vocabulary]
    c = r.copy()
    c[:4] = rng.normal(size=(4, 5, 20)) * 4              # half the items answer at random
    got = judge(measure_for(output_fidelity, "", categorical=True), r, c, None)
    assert 0.3 < got["loss"] < 0.7


def test_reference_raises_the_tolerance_and_a_lower_is_better_metric():
    rng = np.random.default_rng(4)
    r = rng.normal(size=(100, 8))
    c = r + 0.35 * rng.normal(size=r.shape)
    alone = judge(cosine(), r, c, None)
    assert alone["verdict"] == "degraded", alone
    # data on which even 8-bit rounding loses as much: the artifact is as good as the near-lossless point
    with_ref = judge(cosine(), r, c, r + 0.3 * rng.normal(size=r.shape))
    assert with_ref["hold_loss"] > HOLD_LOSS and with_ref["verdict"] == "holds", with_ref
    # a metric where lower is better (relative L2): the same verdicts
    l2 = measure_for(output_fidelity, "relative_l2", categorical=False, higher_is_better=False)
    assert judge(l2, r, r.copy(), None)["verdict"] == "holds"
    assert judge(l2, r, r[derangement(100, 0)], None)["verdict"] == "collapsed"
    assert 0 < judge(l2, r, c, None)["loss"] < COLLAPSE_LOSS


def test_a_model_that_answers_the_same_for_every_input_is_unjudged():
    r = np.tile(np.arange(6.0), (10, 1))
    got = judge(cosine(), r, r + 0.01, None)
    assert got["verdict"] == "unjudged" and "cannot be told from chance" in got["line"]
    assert not at_least("unjudged", "degraded")


def test_at_least_orders_the_verdicts():
    assert at_least("collapsed", "degraded") and at_least("collapsed", "collapsed")
    assert at_least("degraded", "degraded") and not at_least("degraded", "collapsed")
    assert not at_least("holds", "degraded")


# ---- how it reaches people ----------------------------------------------------------------------------------

def _collapsing(tmp_path, **config):
    """A deep tanh network (tests/user_models.py::deep_tanh) at 2-bit round-to-nearest: collapses."""
    from user_models import deep_tanh

    model = deep_tanh()
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 64, generator=g) for _ in range(4)]
    return lambda: bayesq_onnx.compile(
        model, data[:3], evaluation=data[3:],
        config=CompileConfig(method="rtn", bits=2, out=tmp_path / "out", latency_runs=1,
                             memory_loads=1, latency_warmup=0, **config))


def test_the_api_raises_a_project_warning_and_fail_on_raises(tmp_path):
    compile_it = _collapsing(tmp_path)
    with pytest.warns(BayesQWarning, match="verdict: collapsed") as caught:
        result = compile_it()
    assert issubclass(BayesQWarning, UserWarning) and len(caught) >= 1
    assert result.report["verdict"]["verdict"] == "collapsed"
    assert result.report["reference_8bit"]["cosine_mean"] > 0.99  # 8-bit rounding of the same weights is fine
    md = (result.artifact.parent / "report.md").read_text()
    assert "## Verdict" in md and "**collapsed**" in md and "| 8-bit reference |" in md
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(BayesQWarning):
            _collapsing(tmp_path / "again")()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(VerdictFailure) as failed:
            _collapsing(tmp_path / "failing", fail_on="degraded")()
    assert failed.value.result.artifact.exists()  # the artifact and its report are written all the same


def test_cli_last_line_is_the_verdict_and_fail_on_exits_3(tmp_path):
    np.savez(tmp_path / "calib.npz", input=np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32))
    base = [sys.executable, "-m", "bayesq_onnx", "compile", "module:user_models:deep_tanh",
            "--calib", str(tmp_path / "calib.npz"), "--method", "rtn", "--latency-runs", "1",
            "--memory-loads", "1", "-q"]
    env_path = {"PYTHONPATH": str(__import__("pathlib").Path(__file__).parent)}
    import os

    env = {**os.environ, **env_path}
    ok = subprocess.run(base + ["--bits", "8", "--out", str(tmp_path / "a"), "--fail-on", "degraded"],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().splitlines()[-1].startswith("verdict: holds — cosine_mean")
    bad = subprocess.run(base + ["--bits", "2", "--out", str(tmp_path / "b"), "--fail-on", "degraded"],
                         capture_output=True, text=True, env=env)
    last = bad.stdout.strip().splitlines()[-1]
    assert bad.returncode == 3 and last.startswith("verdict: collapsed — cosine_mean"), (bad.stdout, bad.stderr)
    assert "--fail-on is degraded" in bad.stderr and (tmp_path / "b" / "model.onnx").exists()
