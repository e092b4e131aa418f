"""Weights the operator wrote (what round_robin, weighted and least_request push as they are), and the
quota cap every strategy's shares pass through last.

Nothing in scoring knows about protobufs or gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..config import Pool

EPSILON = 1e-9


def pool_weights(pool: Pool) -> dict[str, int]:
    if pool.strategy == "round_robin":
        return {name: 1 for name in pool.backends}
    # weighted and least_request both honour the operator's weights
    return {name: backend.weight for name, backend in pool.backends.items()}


@dataclass(frozen=True)
class Capped:
    shares: dict[str, float]
    binding: frozenset[str]  # lowered to their cap
    feasible: bool  # False: the caps add up to less than all the traffic, and `shares` are the ones given


def cap_shares(shares: Mapping[str, float], caps: Mapping[str, float]) -> Capped:
    """Shares (summing to 1) with no backend above its cap (a share of the same traffic): what a capped
    backend gives up goes to the uncapped ones in proportion to their shares, again until none is over.

    A backend with no share takes nothing. When the caps cannot hold all the traffic, the shares are
    returned as given (feasible False): moving traffic around would only move the overflow."""
    fixed: dict[str, float] = {}
    free = {n for n, s in shares.items() if s > 0}
    while True:
        remaining = 1.0 - sum(fixed.values())
        base = sum(shares[n] for n in free)
        if base <= 0:
            if remaining > EPSILON:
                return Capped(dict(shares), frozenset(), False)
            scaled: dict[str, float] = {}
        else:
            scaled = {n: shares[n] / base * remaining for n in free}
        over = {n for n, s in scaled.items() if s > caps.get(n, float("inf")) + EPSILON}
        if not over:
            out = {n: 0.0 for n in shares}
            out.update(scaled)
            out.update(fixed)
            return Capped(out, frozenset(fixed), True)
        for n in over:
            fixed[n] = caps[n]
            free.discard(n)
