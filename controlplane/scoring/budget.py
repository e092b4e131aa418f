"""Budgets as a pure function: spend so far + each pool's budget + the clock -> a verdict.

No I/O and no memory of its own: which alerts were already sent comes in and
goes out as a set, so a caller can persist it, and tests can drive any clock.
Windows are calendar hours and days in UTC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..config import Budget

HOUR = 3600
DAY = 86400

AlertKey = tuple[str, str, float, float]  # pool, window, start of the window, threshold


def period_start(now: float, window: str) -> float:
    """Budgets run on calendar hours and days, in UTC."""
    size = HOUR if window == "hour" else DAY
    return now - now % size


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


@dataclass(frozen=True)
class Alert:
    """A threshold newly crossed: what the webhook is told."""

    pool: str
    window: str
    threshold: float  # 1.0 means exhausted
    spent: float
    limit: float
    action: str | None  # the pool's on_exhausted, only when exhausted

    @property
    def kind(self) -> str:
        return "budget_exhausted" if self.threshold >= 1.0 else "budget_threshold"

    @property
    def message(self) -> str:
        text = (f"pool {self.pool!r} has spent {self.spent:.4f} of its {self.window}ly budget "
                f"{self.limit:g} ({self.spent / self.limit:.0%})")
        return text + (f"; action: {self.action}" if self.action else "")

    def details(self) -> dict[str, Any]:
        return {"pool": self.pool, "window": self.window, "threshold": self.threshold, "spent": self.spent,
                "limit": self.limit, "action": self.action}


@dataclass(frozen=True)
class BudgetVerdict:
    windows: Mapping[str, tuple[WindowState, ...]] = field(default_factory=lambda: MappingProxyType({}))
    due: tuple[Alert, ...] = ()  # to send now
    alerted: frozenset[AlertKey] = frozenset()  # to pass to the next evaluation
    shifted: frozenset[str] = frozenset()  # pools whose traffic goes to their cheapest backend
    rejected: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # pool -> why 429

    def action(self, pool: str) -> str | None:
        return "rejecting" if pool in self.rejected else "shifted_to_cheapest" if pool in self.shifted else None


def windows(budget: Budget, spent_hour: float, spent_day: float, hour_start: float, day_start: float
            ) -> list[WindowState]:
    out = []
    if budget.hourly is not None:
        out.append(WindowState("hour", budget.hourly, spent_hour, hour_start))
    if budget.daily is not None:
        out.append(WindowState("day", budget.daily, spent_day, day_start))
    return out


def evaluate(
    budgets: Mapping[str, Budget | None],
    cost_by_hour: Mapping[tuple[int, str], float],
    now: float,
    alerted: frozenset[AlertKey] = frozenset(),
) -> BudgetVerdict:
    """Each pool's windows at `now`, the alerts newly due, and which pools shift or reject.

    `cost_by_hour` is spend per (hour number since the epoch, pool); hours
    older than today may be left out. `alerted` holds what was already sent;
    the verdict's `alerted` keeps only keys of the current windows, so it
    stays small however long the process runs.
    """
    hour, day = period_start(now, "hour"), period_start(now, "day")
    this_hour, first_hour_of_day = int(hour // HOUR), int(day // HOUR)
    spent_hour: dict[str, float] = {}
    spent_day: dict[str, float] = {}
    for (h, pool), cost in cost_by_hour.items():
        if first_hour_of_day <= h <= this_hour:
            spent_day[pool] = spent_day.get(pool, 0.0) + cost
            if h == this_hour:
                spent_hour[pool] = spent_hour.get(pool, 0.0) + cost
    all_windows: dict[str, tuple[WindowState, ...]] = {}
    due: list[Alert] = []
    keep: set[AlertKey] = set()
    shifted: set[str] = set()
    rejected: dict[str, str] = {}
    for pool, budget in budgets.items():
        if budget is None:
            continue
        states = tuple(windows(budget, spent_hour.get(pool, 0.0), spent_day.get(pool, 0.0), hour, day))
        all_windows[pool] = states
        for state in states:
            for threshold in sorted({*budget.alert_thresholds, 1.0}):
                if state.fraction < threshold:
                    continue
                key = (pool, state.window, state.period, threshold)
                keep.add(key)
                if key not in alerted:
                    due.append(Alert(pool, state.window, threshold, state.spent, state.limit,
                                     budget.on_exhausted if threshold >= 1.0 else None))
        spent_out = [s for s in states if s.exhausted]
        if not spent_out:
            continue
        if budget.on_exhausted == "reject":
            w = spent_out[0]
            rejected[pool] = (f"the {w.window}ly budget of pool {pool!r} ({w.limit:g}) is exhausted "
                              f"(spent {w.spent:.4f}); try again in the next {w.window}")
        else:
            shifted.add(pool)
    current = {hour, day}
    keep |= {k for k in alerted if k[2] in current and k[0] in all_windows}
    return BudgetVerdict(
        windows=MappingProxyType(all_windows), due=tuple(due), alerted=frozenset(keep),
        shifted=frozenset(shifted), rejected=MappingProxyType(rejected),
    )
