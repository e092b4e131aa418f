"""The scoring loop: each pool rescored on its own `scoring.interval`, budgets checked, weights proposed."""

from __future__ import annotations

import asyncio
import logging
import time

from ..reconciler import Reconciler
from ..scoring.engine import Engine
from ..telemetry.requests import RequestIndex
from .budgets import BudgetController

log = logging.getLogger("controlplane.scoring")


class ScoringLoop:
    def __init__(self, engine: Engine, budgets: BudgetController, requests: RequestIndex, reconciler: Reconciler,
                 tick: float = 0.1) -> None:
        self.engine = engine
        self.budgets = budgets
        self.requests = requests
        self.reconciler = reconciler
        self.tick = tick
        self._due: dict[str, float] = {}

    def start(self) -> None:
        """Before serving: budgets as they stand (no alerts repeated), then weights from them."""
        self.budgets.check(send=False)
        self.engine.recompute(self.budgets.verdict.shifted)
        self.reconciler.propose(weights=self.engine.weights())

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                self.step(time.monotonic())
            except Exception:
                log.exception("scoring failed; weights unchanged")

    def step(self, now: float) -> None:
        config = self.reconciler.state.config
        pools = frozenset(
            name for name, pool in config.pools.items()
            if now >= self._due.setdefault(name, now + pool.scoring.interval.total_seconds())
        )
        if not pools:
            return
        for name in pools:
            self._due[name] = now + config.pools[name].scoring.interval.total_seconds()
        self.budgets.check()
        self.requests.expire()
        if self.engine.recompute(self.budgets.verdict.shifted, pools):
            self.reconciler.propose(weights=self.engine.weights())
