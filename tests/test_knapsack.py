"""Greedy multiple-choice knapsack against an exact dynamic program."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bayesq_onnx.quant import knapsack


def _convex_block(rng: random.Random, k: int):
    """Costs increasing, risks decreasing and convex (decreasing marginal gains)."""
    costs, risks = [rng.randint(1, 4)], [rng.uniform(50, 100)]
    gain = rng.uniform(5, 20)
    for _ in range(k - 1):
        step = rng.randint(1, 4)
        costs.append(costs[-1] + step)
        risks.append(risks[-1] - gain * step)
        gain *= rng.uniform(0.2, 0.9)
    return costs, risks


@pytest.mark.parametrize("seed", range(40))
def test_greedy_equals_exact_at_breakpoints_of_convex_instances(seed):
    rng = random.Random(seed)
    blocks = [_convex_block(rng, rng.randint(2, 5)) for _ in range(rng.randint(2, 6))]
    costs, risks = [b[0] for b in blocks], [b[1] for b in blocks]
    # breakpoints: the budgets the greedy path passes through exactly
    choice = [0] * len(blocks)
    used = sum(c[0] for c in costs)
    budgets = [used]
    while True:
        best = None
        for b, (c, r) in enumerate(zip(costs, risks)):
            i = choice[b]
            if i + 1 < len(c):
                slope = (r[i] - r[i + 1]) / (c[i + 1] - c[i])
                if best is None or slope > best[0]:
                    best = (slope, b)
        if best is None:
            break
        b = best[1]
        used += costs[b][choice[b] + 1] - costs[b][choice[b]]
        choice[b] += 1
        budgets.append(used)
    for budget in budgets:
        pick = knapsack.greedy(costs, risks, budget)
        got = sum(r[i] for r, i in zip(risks, pick))
        want, _ = knapsack.exact(costs, risks, budget)
        assert got == pytest.approx(want, rel=1e-9)
        assert sum(c[i] for c, i in zip(costs, pick)) <= budget


block = st.lists(st.tuples(st.integers(1, 12), st.floats(0, 100)), min_size=1, max_size=5)


@given(st.lists(block, min_size=1, max_size=6), st.integers(0, 60))
def test_greedy_never_exceeds_the_budget_and_is_near_exact(blocks, extra):
    costs = [[c for c, _ in b] for b in blocks]
    risks = [[r for _, r in b] for b in blocks]
    budget = sum(min(c) for c in costs) + extra
    pick = knapsack.greedy(costs, risks, budget)
    assert sum(c[i] for c, i in zip(costs, pick)) <= budget
    got = sum(r[i] for r, i in zip(risks, pick))
    want, _ = knapsack.exact(costs, risks, budget)
    assert got >= want - 1e-9
    # never worse than the all-cheapest start
    start = sum(min(zip(c, r))[1] for c, r in zip(costs, risks))
    assert got <= start + 1e-9


def test_infeasible_budget():
    with pytest.raises(ValueError):
        knapsack.greedy([[4, 8]], [[1.0, 0.5]], 3)


def test_lower_hull_drops_dominated_and_concave_points():
    costs = [1, 2, 3, 4, 5]
    risks = [10, 9.5, 4, 3.9, 1]   # (2, 9.5) is above the hull; (4, 3.9) too
    assert knapsack.lower_hull(costs, risks) == [0, 2, 4]
    assert knapsack.lower_hull([1, 1, 2], [5, 3, 4]) == [1]  # same cost: the better one; worse-and-dearer: gone


def test_budget_is_used():
    """Many blocks with fine steps: the greedy ends within one step of the budget."""
    rng = random.Random(0)
    blocks = [_convex_block(rng, 4) for _ in range(50)]
    costs, risks = [b[0] for b in blocks], [b[1] for b in blocks]
    budget = sum(c[0] for c in costs) + 60
    pick = knapsack.greedy(costs, risks, budget)
    used = sum(c[i] for c, i in zip(costs, pick))
    assert budget - 4 < used <= budget


def _realistic_block(rng: random.Random):
    """One weight's candidate table as the planner builds it (non-convex in cost): uniform 2/3/4/8-bit per
    row and per 16 columns, per-row codebooks of 2/3/4 bits, FP16; exact stored bits of a small rows × cols
    weight, and risks that fall about 4× per code bit with a per-family factor and noise."""
    rows, cols = rng.choice([(2, 32), (4, 16), (4, 32), (8, 16)])
    n, sens = rows * cols, rng.lognormvariate(0, 1.5)
    table = []
    for b in (2, 3, 4, 8):
        table.append((n * b + rows * (16 + b), 1.0))                    # per row: fp16 scale + b-bit zero
        table.append((n * b + (n // 16) * (16 + b), 0.8))               # per 16 columns
    for b in (2, 3, 4):
        table.append((n * b + rows * 2**b * 16, 0.6))                   # per-row codebook of fp16 levels
    costs = [c for c, _ in table] + [16 * n]
    risks = [sens * n * f * 4.0 ** -(c // n) * rng.uniform(0.7, 1.3) for c, f in table] + [sens * n * 1e-9]
    return costs, risks


@pytest.mark.parametrize("seed", range(12))
def test_greedy_gap_on_realistic_nonconvex_tables(seed):
    """Tables like the real ones are not convex (a codebook beats the next uniform width at a lower cost,
    side information makes costs uneven). The greedy on each block's lower hull is within one hull step's
    risk of the LP relaxation, so within it of the exact optimum:
    risk_greedy − OPT ≤ max over blocks and hull steps of the step's risk decrease."""
    rng = random.Random(seed)
    blocks = [_realistic_block(rng) for _ in range(6)]
    costs, risks = [b[0] for b in blocks], [b[1] for b in blocks]
    total = sum(b[0][-1] // 16 for b in blocks)  # weights
    worst_step = 0.0
    for c, r in zip(costs, risks):
        hull = knapsack.lower_hull(c, r)
        worst_step = max([worst_step] + [r[i] - r[j] for i, j in zip(hull, hull[1:])])
    for bits in (2.5, 3.0, 3.5, 4.0, 5.0):
        budget = int(bits * total)
        if budget < sum(min(c) for c in costs):
            continue
        pick = knapsack.greedy(costs, risks, budget)
        got = sum(r[i] for r, i in zip(risks, pick))
        want, _ = knapsack.exact(costs, risks, budget)
        assert sum(c[i] for c, i in zip(costs, pick)) <= budget
        assert want - 1e-9 <= got <= want + worst_step + 1e-9
