"""Budgets as a pure function: spend so far + each pool's (or client's) budget + the clock -> a verdict.

No I/O and no memory of its own: which alerts were already sent comes in and
goes out as a set, so a caller can persist it, and tests can drive any clock.
Windows are calendar hours and days in UTC; a client's tokens per minute run
on calendar minutes (`period_start(now, "minute")`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from ..config import Budget, ClientBudget

MINUTE = 60
HOUR = 3600
DAY = 86400
_SIZES = {"minute": MINUTE, "hour": HOUR, "day": DAY}
PER = {"hour": "hourly", "day": "daily"}  # a window's budget, as the config names it

AlertKey = tuple[str, str, float, float]  # pool (or client), window, start of the window, threshold
Block = tuple[str, str, int]  # a client answered 429 by Envoy: (error code, message, Retry-After seconds)
BUDGET_EXHAUSTED = "budget_exhausted"  # the error code of a client over its budget
TOKENS_EXCEEDED = "tokens_per_minute_exceeded"  # the error code of a client over its tokens per minute


def period_start(now: float, window: str) -> float:
    """Budgets run on calendar hours and days, in UTC (token limits on calendar minutes)."""
    size = _SIZES[window]
    return now - now % size


def seconds_left(now: float, window: str) -> int:
    """Whole seconds until the window holding `now` ends, at least 1: a Retry-After."""
    size = _SIZES[window]
    return max(1, math.ceil(size - now % size))


def merge_blocks(budget: Mapping[str, Block], tokens: Mapping[str, Block]) -> dict[str, Block]:
    """One mapping for the route configuration: a client over its budget and its tokens per minute is
    answered with the budget's block (it lasts at least as long: the budget's window is the longer one)."""
    return {**tokens, **budget}


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
        text = (f"pool {self.pool!r} has spent {self.spent:.4f} of its {PER[self.window]} budget "
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


def windows(budget: Budget | ClientBudget, spent_hour: float, spent_day: float, hour_start: float, day_start: float
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
    spent_hour, spent_day = _spent(cost_by_hour, hour, day)
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
        for state, threshold, new in _crossed(pool, states, budget.alert_thresholds, alerted, keep):
            if new:
                due.append(Alert(pool, state.window, threshold, state.spent, state.limit,
                                 budget.on_exhausted if threshold >= 1.0 else None))
        spent_out = [s for s in states if s.exhausted]
        if not spent_out:
            continue
        if budget.on_exhausted == "reject":
            w = spent_out[0]
            rejected[pool] = (f"the {PER[w.window]} budget of pool {pool!r} ({w.limit:g}) is exhausted "
                              f"(spent {w.spent:.4f}); try again in the next {w.window}")
        else:
            shifted.add(pool)
    current = {hour, day}
    keep |= {k for k in alerted if k[2] in current and k[0] in all_windows}
    return BudgetVerdict(
        windows=MappingProxyType(all_windows), due=tuple(due), alerted=frozenset(keep),
        shifted=frozenset(shifted), rejected=MappingProxyType(rejected),
    )


def _spent(cost_by_hour: Mapping[tuple[int, str], float], hour: float, day: float
           ) -> tuple[dict[str, float], dict[str, float]]:
    """Per name (pool or client): spend this hour and today, from per-(hour number, name) costs."""
    this_hour, first_hour_of_day = int(hour // HOUR), int(day // HOUR)
    spent_hour: dict[str, float] = {}
    spent_day: dict[str, float] = {}
    for (h, name), cost in cost_by_hour.items():
        if first_hour_of_day <= h <= this_hour:
            spent_day[name] = spent_day.get(name, 0.0) + cost
            if h == this_hour:
                spent_hour[name] = spent_hour.get(name, 0.0) + cost
    return spent_hour, spent_day


def _crossed(name: str, states: tuple[WindowState, ...], thresholds: list[float], alerted: frozenset[AlertKey],
             keep: set[AlertKey]) -> list[tuple[WindowState, float, bool]]:
    """Every (window, threshold) crossed now (1.0: exhausted), and whether it is new (not in `alerted`);
    each key crossed goes into `keep`."""
    out = []
    for state in states:
        for threshold in sorted({*thresholds, 1.0}):
            if state.fraction < threshold:
                continue
            key = (name, state.window, state.period, threshold)
            keep.add(key)
            out.append((state, threshold, key not in alerted))
    return out


# -- clients ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientAlert:
    """A client's budget threshold newly crossed (1.0: exhausted, its requests now answered 429)."""

    client: str
    window: str
    threshold: float
    spent: float
    limit: float

    @property
    def kind(self) -> str:
        return "client_budget_exhausted" if self.threshold >= 1.0 else "client_budget_threshold"

    @property
    def message(self) -> str:
        text = (f"client {self.client!r} has spent {self.spent:.4f} of its {PER[self.window]} budget "
                f"{self.limit:g} ({self.spent / self.limit:.0%})")
        return text + ("; its requests are answered 429 until the window ends" if self.threshold >= 1.0 else "")

    def details(self) -> dict[str, Any]:
        return {"client": self.client, "window": self.window, "threshold": self.threshold, "spent": self.spent,
                "limit": self.limit}


@dataclass(frozen=True)
class ClientBudgetVerdict:
    windows: Mapping[str, tuple[WindowState, ...]] = field(default_factory=lambda: MappingProxyType({}))
    due: tuple[ClientAlert, ...] = ()  # to send now
    alerted: frozenset[AlertKey] = frozenset()  # to pass to the next evaluation
    blocked: Mapping[str, Block] = field(default_factory=lambda: MappingProxyType({}))  # client -> 429 block


def budget_block(client: str, state: WindowState, now: float) -> Block:
    """What Envoy answers a client whose budget window is exhausted. The message names the client, the
    window, the limit and when the window ends, and stays the same all window long (no route change per
    evaluation); Retry-After is the time left in the window as of `now`."""
    size = _SIZES[state.window]
    ends = datetime.fromtimestamp(state.period + size, UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (BUDGET_EXHAUSTED,
            f"the {PER[state.window]} budget of client {client!r} ({state.limit:g}) is exhausted; "
            f"requests are accepted again when the {state.window} ends ({ends})",
            seconds_left(now, state.window))


def evaluate_clients(
    budgets: Mapping[str, ClientBudget | None],
    cost_by_hour: Mapping[tuple[int, str], float],
    now: float,
    alerted: frozenset[AlertKey] = frozenset(),
) -> ClientBudgetVerdict:
    """As `evaluate`, per client: `cost_by_hour` is spend per (hour number, client). An exhausted client
    is blocked until the end of the exhausted window that ends last (the day's, when both are)."""
    hour, day = period_start(now, "hour"), period_start(now, "day")
    spent_hour, spent_day = _spent(cost_by_hour, hour, day)
    all_windows: dict[str, tuple[WindowState, ...]] = {}
    due: list[ClientAlert] = []
    keep: set[AlertKey] = set()
    blocked: dict[str, Block] = {}
    for client, budget in budgets.items():
        if budget is None:
            continue
        states = tuple(windows(budget, spent_hour.get(client, 0.0), spent_day.get(client, 0.0), hour, day))
        all_windows[client] = states
        for state, threshold, new in _crossed(client, states, budget.alert_thresholds, alerted, keep):
            if new:
                due.append(ClientAlert(client, state.window, threshold, state.spent, state.limit))
        spent_out = [s for s in states if s.exhausted]
        if spent_out:
            blocked[client] = budget_block(client, max(spent_out, key=lambda s: s.period + _SIZES[s.window]), now)
    current = {hour, day}
    keep |= {k for k in alerted if k[2] in current and k[0] in all_windows}
    return ClientBudgetVerdict(windows=MappingProxyType(all_windows), due=tuple(due), alerted=frozenset(keep),
                               blocked=MappingProxyType(blocked))
