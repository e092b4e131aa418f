"""Stand-ins for what the scoring loop reads besides the engine and the reconciler (unit tests only)."""

from __future__ import annotations


class Budgets:
    class verdict:  # noqa: N801 - stands in for BudgetVerdict
        shifted: frozenset[str] = frozenset()

    def check(self, send: bool = True) -> None:
        pass


class Requests:
    def expire(self) -> None:
        pass
