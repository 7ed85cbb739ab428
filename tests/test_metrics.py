"""Task metrics and the bootstrap interval on the headline."""

from __future__ import annotations

import numpy as np
import pytest

from bayesq_onnx.models.metrics import bootstrap_interval, classification_metric, output_fidelity


def _noisy_pair(n: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    reference = rng.normal(size=(n, 16))
    return reference, reference + noise * rng.normal(size=(n, 16))


def test_interval_brackets_the_value_and_narrows_with_items():
    widths = []
    for n in (64, 1024):
        reference, candidate = _noisy_pair(n, 0.5)
        value = output_fidelity(reference, candidate)["cosine_mean"]
        lo, hi = bootstrap_interval(output_fidelity, reference, candidate, "cosine_mean")
        assert lo < value < hi
        widths.append(hi - lo)
    # the standard error shrinks as 1/sqrt(n): 16x the items, about a quarter of the width
    assert 0.15 < widths[1] / widths[0] < 0.4


def test_interval_is_deterministic_and_degenerate_when_items_agree():
    reference, candidate = _noisy_pair(128, 0.3)
    first = bootstrap_interval(output_fidelity, reference, candidate, "cosine_mean", seed=3)
    assert first == bootstrap_interval(output_fidelity, reference, candidate, "cosine_mean", seed=3)
    assert bootstrap_interval(output_fidelity, reference, reference, "cosine_mean") == pytest.approx((1.0, 1.0))


def test_labelled_metric_resamples_its_labels_with_the_items():
    """A metric holding labels gets the resampled rows: top-1 of a perfect classifier stays exactly 1."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 200)
    logits = np.eye(5)[labels] * 10.0
    metric = classification_metric(labels)
    assert bootstrap_interval(metric, logits, logits, "top1") == (1.0, 1.0)
    # half the items wrong: the interval covers 0.5 and is not degenerate
    wrong = logits.copy()
    wrong[::2] = np.roll(wrong[::2], 1, axis=1)
    lo, hi = bootstrap_interval(metric, logits, wrong, "top1")
    assert lo < 0.5 < hi and hi - lo > 0.05
