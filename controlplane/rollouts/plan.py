"""What a rollout asks of Envoy right now, and how that changes a pool's EDS weights: pure functions.

The controller (controller.py) turns each rollout's state into a `RolloutPlan` in the desired state; the
xDS builders read the plan. A plan is a function of the persisted rollout state and the config only,
so a restarted control plane rebuilds the very same resources (Envoy sees no change).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..config.model import Pool

SHADOW_SUFFIX = "~shadow"  # the shadow cluster of pool P is "P~shadow" (pool names cannot hold '~')
SHADOW_HEADER = "x-llm-lb-shadow"  # set on mirrored requests only: the attempts log keeps their entries
USER_HEADER = "x-llm-lb-user"  # the A/B user, copied from the pool's user_header for the access log
RESOLUTION = 10_000  # the tier's other weights are scaled to at least this total: shares exact to 0.01%
FULL_WEIGHT = 1_000_000  # a candidate at 100%: the rest of its tier keeps weight 1 (retries still go there)


@dataclass(frozen=True)
class RolloutPlan:
    mode: str  # canary | shadow | ab: the stage the rollout is in
    candidate: str
    share: float  # the candidate's share of its tier's traffic, 0..1; 0: not in the pool's endpoints
    mirror: float = 0.0  # the share of the pool's requests mirrored to the candidate (shadow), 0..1


Plans = Mapping[str, RolloutPlan]  # pool -> its rollout's plan; a pool without one is scored as usual


def shadow_cluster(pool: str) -> str:
    return pool + SHADOW_SUFFIX


def shadow_pool(name: str) -> str | None:
    """The pool a shadow cluster belongs to; None for any other cluster."""
    return name[: -len(SHADOW_SUFFIX)] if name.endswith(SHADOW_SUFFIX) else None


def weights(pool: Pool, scored: Mapping[str, int], plan: RolloutPlan | None, drained: frozenset[str]
            ) -> Mapping[str, int]:
    """The pool's EDS weights with the candidate at its planned share of its tier.

    The candidate's own score is ignored: the other backends of its tier keep the ratios scoring gave
    them and together take 1 - share. A backend out of rotation (drained, cooling) takes nothing, so it
    does not count. With no other backend left in the tier, the candidate takes the tier alone."""
    if plan is None:
        return scored
    out = {name: scored.get(name, backend.weight) for name, backend in pool.backends.items()}
    candidate = plan.candidate
    if candidate not in pool.backends:
        return out
    if plan.share <= 0:
        out[candidate] = 0  # left out of the endpoints: in-flight requests finish
        return out
    tier = pool.backends[candidate].priority
    others = {n: w for n, w in out.items()
              if n != candidate and w > 0 and n not in drained and pool.backends[n].priority == tier}
    total = sum(others.values())
    if plan.share >= 1:
        out.update(dict.fromkeys(others, 1))
        out[candidate] = FULL_WEIGHT
    elif total:
        # Scaled up first, so a 1% step of a tier weighted 1:1 is 1 in 100, not 1 in 3.
        scale = max(1, -(-RESOLUTION // total))
        out.update({n: w * scale for n, w in others.items()})
        out[candidate] = max(1, round(total * scale * plan.share / (1 - plan.share)))
    else:
        out[candidate] = 1
    return out
