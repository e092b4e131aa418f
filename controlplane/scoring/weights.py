"""Weights the operator wrote: what round_robin, weighted and least_request push as they are.

Nothing in scoring knows about protobufs or gRPC.
"""

from __future__ import annotations

from ..config import Pool


def pool_weights(pool: Pool) -> dict[str, int]:
    if pool.strategy == "round_robin":
        return {name: 1 for name in pool.backends}
    # weighted and least_request both honour the operator's weights
    return {name: backend.weight for name, backend in pool.backends.items()}
