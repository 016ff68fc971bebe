"""Types per tensor group under a size budget, minimising the predicted total KLD (the sum of each group's measured
sensitivity at its type, measure/sensitivity.py).

Solver: the multiple-choice knapsack, solved exactly by dynamic programming over the budget in units of at most
1/20000 of it. Each option's bytes are rounded up to whole units, so the choice never exceeds the budget, and it is
optimal among the choices whose rounded sizes fit: it can miss the true optimum only by the rounding, at most one
unit (budget / 20000) per group. (A Lagrangian relaxation with pairwise exchange repair missed the optimum by a
quarter on small instances, where the best answer moves four groups at once.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ImpqError

UNITS = 20000


@dataclass(frozen=True)
class Option:
    type: str
    bytes: int                     # the group's bytes in the file at this type (fallbacks counted)
    kld: float                     # the group's measured sensitivity at this type


def allocate(options: list[list[Option]], budget_bytes: int) -> list[int]:
    """The chosen option's index per group, within `budget_bytes` in total."""
    smallest = sum(min(o.bytes for o in opts) for opts in options)
    if budget_bytes < smallest:
        raise ImpqError(None, f"size budget {budget_bytes} bytes is below the smallest possible {smallest} bytes "
                              "(every group at its smallest candidate type)")
    unit = max(1, math.ceil(budget_bytes / UNITS))
    capacity = budget_bytes // unit
    costs = [[math.ceil(o.bytes / unit) for o in opts] for opts in options]
    if sum(min(c) for c in costs) > capacity:
        # within a unit per group of the smallest mix, which fits: nothing else can be told apart at this resolution
        return [min(range(len(opts)), key=lambda i: opts[i].bytes) for opts in options]
    best = np.zeros(capacity + 1)                      # best[c]: the least KLD of the groups so far within c units
    picks = np.zeros((len(options), capacity + 1), dtype=np.int8)
    for g, opts in enumerate(options):
        candidates = np.full((len(opts), capacity + 1), np.inf)
        for i, (option, cost) in enumerate(zip(opts, costs[g])):
            if cost <= capacity:
                candidates[i, cost:] = best[:capacity + 1 - cost] + option.kld
        picks[g] = candidates.argmin(0)
        best = candidates.min(0)
    choice, c = [], capacity
    for g in reversed(range(len(options))):
        i = int(picks[g, c])
        choice.append(i)
        c -= costs[g][i]
    return choice[::-1]
