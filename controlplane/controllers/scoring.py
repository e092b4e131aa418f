"""The scoring loop: each pool rescored on its own `scoring.interval`, budgets checked, weights proposed.

A pool is also rescored at once (at the next tick) when a backend of it leaves or rejoins rotation
(drained, or cooling after a 429): quotas are shared among the backends Envoy can send to. Envoy's own
view of the hosts (ejected, failing active checks) is handed to the engine each step: such a backend
is never probed (scoring.probe_share).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from ..reconciler import Reconciler
from ..scoring.engine import Engine
from ..state import Drained
from ..telemetry.envoy_hosts import DRAINING, EJECTED, FAILING
from ..telemetry.requests import RequestIndex
from .budgets import BudgetController

log = logging.getLogger("controlplane.scoring")

ENVOY_OUT = {
    EJECTED: "ejected by Envoy's outlier detection",
    FAILING: "failing Envoy's active health checks",
    DRAINING: "draining in Envoy's view",
}


def envoy_out(states: Mapping[tuple[str, str], str]) -> dict[tuple[str, str], str]:
    """Envoy's host states (telemetry/envoy_hosts.py) -> the backends it sends nothing, and why."""
    return {key: ENVOY_OUT[state] for key, state in states.items() if state in ENVOY_OUT}


class ScoringLoop:
    def __init__(self, engine: Engine, budgets: BudgetController, requests: RequestIndex, reconciler: Reconciler,
                 tick: float = 0.1, clock: Callable[[], float] = time.monotonic,
                 envoy_states: Callable[[], Mapping[tuple[str, str], str]] = dict) -> None:
        self.engine = engine
        self.budgets = budgets
        self.requests = requests
        self.reconciler = reconciler
        self.tick = tick
        self.clock = clock
        self.envoy_states = envoy_states  # Envoy's view, (pool, backend) -> state; empty when unknown
        self._due: dict[str, float] = {}
        self._out: Drained = frozenset()  # out of rotation as of the last step

    def _rotation(self) -> frozenset[str]:
        """Tell the engine who is out of rotation; the pools where that changed since the last call."""
        state = self.reconciler.state
        self.engine.set_rotation(state.drained, state.cooling)
        self.engine.set_envoy_view(envoy_out(self.envoy_states()))
        out = state.out_of_rotation()
        if out == self._out:
            return frozenset()
        changed = frozenset(p for p, _ in out ^ self._out)
        self._out = out
        return changed

    def start(self) -> None:
        """Before serving: budgets as they stand (no alerts repeated), then weights from them."""
        self._rotation()
        self.budgets.check(send=False)
        self.engine.recompute(self.budgets.verdict.shifted, now=self.clock())  # pool rates are measured from now
        self.reconciler.propose(weights=self.engine.weights())

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                self.step(self.clock())
            except Exception:
                log.exception("scoring failed; weights unchanged")

    def step(self, now: float) -> None:
        config = self.reconciler.state.config
        moved = self._rotation()
        pools = frozenset(
            name for name, pool in config.pools.items()
            if now >= self._due.setdefault(name, now + pool.scoring.interval.total_seconds()) or name in moved
        )
        if not pools:
            return
        for name in pools:
            self._due[name] = now + config.pools[name].scoring.interval.total_seconds()
        self.budgets.check()
        self.requests.expire()
        if self.engine.recompute(self.budgets.verdict.shifted, pools, now):
            self.reconciler.propose(weights=self.engine.weights())
