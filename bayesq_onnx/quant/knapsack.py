"""Multiple-choice knapsack for mixed precision (docs/design.md §3.5): one candidate per block, total stored bits
within the budget, total risk as small as possible.

Greedy on lower convex hulls: every block starts at its cheapest candidate; the upgrade with the largest
risk reduction per extra bit, ``(R_cur − R_next) / (C_next − C_cur)`` along the block's lower convex hull
of (cost, risk), is taken while it fits. This is optimal for the LP relaxation and exact at every
breakpoint when risks are convex in cost. Bits the hull steps leave unused are then spent on any
upgrade (hull or not) that still fits, best risk reduction per bit first.

Pure Python over a few hundred (block, candidate) pairs — never per weight.
"""

from __future__ import annotations

import heapq
from typing import Sequence


def lower_hull(costs: Sequence[float], risks: Sequence[float]) -> list[int]:
    """Indices of the lower convex hull of (cost, risk), cheapest first, risk strictly decreasing."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], risks[i]))
    pareto: list[int] = []
    for i in order:  # keep only points that reduce risk compared to everything cheaper
        if not pareto or risks[i] < risks[pareto[-1]]:
            if pareto and costs[i] == costs[pareto[-1]]:
                pareto[-1] = i
            else:
                pareto.append(i)
    hull: list[int] = []
    for i in pareto:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a→i: not convex, drop it
            cross = (costs[b] - costs[a]) * (risks[i] - risks[a]) - (risks[b] - risks[a]) * (costs[i] - costs[a])
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def greedy(costs: Sequence[Sequence[float]], risks: Sequence[Sequence[float]], budget: float) -> list[int]:
    """Candidate index per block. Raises ValueError when even the cheapest choice exceeds ``budget``."""
    n = len(costs)
    choice = [min(range(len(c)), key=lambda i: (c[i], risks[b][i])) for b, c in enumerate(costs)]
    used = sum(costs[b][choice[b]] for b in range(n))
    if used > budget + 1e-9:
        raise ValueError(f"the cheapest candidates need {used:.0f} bits; the budget is {budget:.0f}")
    hulls = [lower_hull(costs[b], risks[b]) for b in range(n)]
    position = [hulls[b].index(choice[b]) if choice[b] in hulls[b] else 0 for b in range(n)]
    heap: list[tuple[float, int, int]] = []

    def push(b: int) -> None:
        h, p = hulls[b], position[b]
        if p + 1 < len(h):
            cur, nxt = h[p], h[p + 1]
            slope = (risks[b][cur] - risks[b][nxt]) / (costs[b][nxt] - costs[b][cur])
            heapq.heappush(heap, (-slope, b, nxt))

    for b in range(n):
        push(b)
    while heap:
        _, b, nxt = heapq.heappop(heap)
        extra = costs[b][nxt] - costs[b][choice[b]]
        if used + extra <= budget + 1e-9:
            used += extra
            choice[b] = nxt
            position[b] += 1
            push(b)
        # an upgrade that does not fit is dropped; cheaper upgrades of other blocks may still fit
    return _spend_leftover(costs, risks, budget, choice, used)


def _spend_leftover(costs, risks, budget, choice, used) -> list[int]:
    """Take any risk-reducing upgrade that fits, best reduction per extra bit first, until none fits."""
    while True:
        best = None
        for b, (c, r) in enumerate(zip(costs, risks)):
            cur = choice[b]
            for i in range(len(c)):
                extra = c[i] - c[cur]
                gain = r[cur] - r[i]
                if gain > 0 and extra > 0 and used + extra <= budget + 1e-9:
                    score = gain / extra
                    if best is None or score > best[0]:
                        best = (score, b, i, extra)
                elif gain > 0 and extra <= 0:  # cheaper and better: always take
                    score = float("inf")
                    if best is None or score > best[0]:
                        best = (score, b, i, extra)
        if best is None:
            return choice
        _, b, i, extra = best
        choice[b] = i
        used += extra


def exact(costs: Sequence[Sequence[int]], risks: Sequence[Sequence[float]], budget: int) -> tuple[float, list[int]]:
    """Exact minimum total risk by dynamic programming over integer costs (for tests on small instances)."""
    inf = float("inf")
    best = {0: (0.0, [])}
    for c, r in zip(costs, risks):
        nxt: dict[int, tuple[float, list[int]]] = {}
        for used, (risk, picks) in best.items():
            for i, (ci, ri) in enumerate(zip(c, r)):
                u = used + ci
                if u <= budget and risk + ri < nxt.get(u, (inf, None))[0]:
                    nxt[u] = (risk + ri, picks + [i])
        best = nxt
    if not best:
        raise ValueError("infeasible")
    return min(best.values(), key=lambda v: v[0])
