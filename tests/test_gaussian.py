"""Closed-form Gaussian quantizer error: against Monte Carlo and against the published tables."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bayesq_onnx.bayes import gaussian

# Max (1960), "Quantizing for minimum distortion", Table I: mean squared error of the optimum
# (Lloyd–Max) quantizer for a unit Gaussian, and Table II: of the optimum uniform quantizer.
MAX_1960_LLOYD = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}
MAX_1960_UNIFORM = {1: (1.596, 0.3634), 2: (0.9957, 0.1188), 3: (0.5860, 0.03744), 4: (0.3352, 0.01154)}


@pytest.mark.parametrize("bits", sorted(MAX_1960_LLOYD))
def test_lloyd_max_matches_max_1960(bits):
    levels, mse = gaussian.lloyd_max(bits)
    assert f"{mse:.3g}" == f"{MAX_1960_LLOYD[bits]:.3g}"  # three significant digits
    assert len(levels) == 2**bits and list(levels) == sorted(levels)
    assert levels[-1] == pytest.approx(-levels[0], abs=1e-9)  # symmetric


@pytest.mark.parametrize("bits", sorted(MAX_1960_UNIFORM))
def test_optimal_uniform_step_matches_max_1960(bits):
    step, mse = gaussian.optimal_uniform_step(bits)
    want_step, want_mse = MAX_1960_UNIFORM[bits]
    assert step == pytest.approx(want_step, rel=2e-3)
    assert mse == pytest.approx(want_mse, rel=2e-3)


def test_tables_for_all_bit_widths_are_ordered():
    lloyd = [gaussian.lloyd_max(b)[1] for b in range(1, 9)]
    unif = [gaussian.optimal_uniform_step(b)[1] for b in range(1, 9)]
    assert lloyd == sorted(lloyd, reverse=True) and unif == sorted(unif, reverse=True)
    assert all(l <= u + 1e-12 for l, u in zip(lloyd, unif))  # the optimum is never worse than uniform


@pytest.mark.parametrize("seed", range(4))
def test_closed_form_matches_monte_carlo(seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(3, generator=g, dtype=torch.float64) * 0.5
    s = torch.rand(3, generator=g, dtype=torch.float64) * 0.6 + 0.05
    levels = torch.sort(torch.randn(3, 6, generator=g, dtype=torch.float64), dim=1).values
    exact = gaussian.expected_sq_error(m, s, levels)
    n = 2_000_000
    w = m[:, None] + s[:, None] * torch.randn(3, n, generator=g, dtype=torch.float64)
    nearest = levels[torch.arange(3)[:, None], (w[..., None] - levels[:, None, :]).abs().argmin(-1)]
    mc = ((nearest - w) ** 2).mean(1)
    torch.testing.assert_close(exact, mc, rtol=5e-3, atol=0)


@given(st.floats(-2, 2), st.floats(0.01, 1.0))
def test_cell_probabilities_sum_to_one(m, s):
    levels = torch.tensor([-1.0, -0.2, 0.3, 1.5], dtype=torch.float64)
    prob, partial, _ = gaussian.cell_moments(torch.tensor(m, dtype=torch.float64),
                                             torch.tensor(s, dtype=torch.float64), levels)
    assert float(prob.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(partial.sum()) == pytest.approx(m, abs=1e-9)  # Σ E[w; cell] = E[w]


def test_point_limit():
    m = torch.tensor([0.1, 0.9, -3.0])
    levels = torch.tensor([-1.0, 0.0, 1.0])
    point = gaussian.expected_sq_error(m, torch.zeros(3), levels)
    torch.testing.assert_close(point, torch.tensor([0.01, 0.01, 4.0]))
    tiny = gaussian.expected_sq_error(m.double(), torch.full((3,), 1e-4, dtype=torch.float64), levels.double())
    torch.testing.assert_close(tiny.float(), point, rtol=1e-2, atol=1e-6)
