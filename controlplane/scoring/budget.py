"""Budgets per pool: how much of each window is spent, which alert thresholds were crossed."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import Budget


@dataclass(frozen=True)
class WindowState:
    window: str  # "hour" | "day"
    limit: float
    spent: float
    period: float  # start of the calendar window (epoch seconds)

    @property
    def fraction(self) -> float:
        return self.spent / self.limit

    @property
    def exhausted(self) -> bool:
        return self.spent >= self.limit

    def as_dict(self) -> dict[str, float | str | bool]:
        return {"window": self.window, "limit": self.limit, "spent": round(self.spent, 6),
                "fraction": round(self.fraction, 4), "exhausted": self.exhausted}


def windows(budget: Budget, spent_hour: float, spent_day: float, hour_start: float, day_start: float) -> list[WindowState]:
    out = []
    if budget.hourly is not None:
        out.append(WindowState("hour", budget.hourly, spent_hour, hour_start))
    if budget.daily is not None:
        out.append(WindowState("day", budget.daily, spent_day, day_start))
    return out


@dataclass
class AlertBook:
    """Remembers which (pool, window, period, threshold) alerts were sent, so each fires once."""

    sent: set[tuple[str, str, float, float]] = field(default_factory=set)

    def due(self, pool: str, budget: Budget, state: WindowState) -> list[float]:
        """Thresholds newly crossed in this window (1.0 means exhausted)."""
        fresh = []
        for threshold in sorted({*budget.alert_thresholds, 1.0}):
            key = (pool, state.window, state.period, threshold)
            if state.fraction >= threshold and key not in self.sent:
                self.sent.add(key)
                fresh.append(threshold)
        return fresh
