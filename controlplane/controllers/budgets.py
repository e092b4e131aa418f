"""Budgets against the live spend: the verdict is pure (scoring/budget.py); sending alerts is the side effect here."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from ..reconciler import Reconciler
from ..scoring.budget import BudgetVerdict, evaluate
from ..scoring.ledger import SpendBook


class Sender(Protocol):
    def send(self, kind: str, message: str, **details: Any) -> None: ...


class BudgetController:
    """Proposes which pools Envoy answers 429 for; the scoring loop reads which pools shift."""

    def __init__(self, spend: SpendBook, alerter: Sender, reconciler: Reconciler,
                 clock: Callable[[], float] = time.time) -> None:
        self.spend = spend
        self.alerter = alerter
        self.reconciler = reconciler
        self.clock = clock  # the wall clock (a test may shift it: controllers/clients.Clock)
        self.verdict = BudgetVerdict()

    def check(self, now: float | None = None, send: bool = True) -> bool:
        """Re-evaluate; True when what Envoy must do (shift or reject a pool) changed.

        The first check after a start passes send=False: thresholds crossed
        before a restart were alerted then, so they are only noted.
        """
        now = self.clock() if now is None else now
        self.spend.prune(now)
        budgets = {name: pool.budget for name, pool in self.reconciler.state.config.pools.items()}
        before = self.verdict
        self.verdict = evaluate(budgets, self.spend.cost_by_hour(), now, before.alerted)
        if send:
            for alert in self.verdict.due:
                self.alerter.send(alert.kind, alert.message, **alert.details())
        self.reconciler.propose(rejected=self.verdict.rejected)  # no change, no rebuild
        return self.verdict.shifted != before.shifted or dict(self.verdict.rejected) != dict(before.rejected)
