"""The budget verdict as a pure function (spend + budgets + clock), and the controller around it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from controlplane.config import Budget, parse_config
from controlplane.controllers.budgets import BudgetController
from controlplane.reconciler import Reconciler
from controlplane.scoring.budget import HOUR, evaluate
from controlplane.scoring.ledger import SpendBook
from controlplane.state import DesiredState
from controlplane.xds.server import SnapshotCache

# 2026-03-14 10:00:00 UTC
T0 = datetime(2026, 3, 14, 10, tzinfo=UTC).timestamp()
H0 = int(T0 // HOUR)
MIDNIGHT = datetime(2026, 3, 15, tzinfo=UTC).timestamp()

HOURLY_SHIFT = Budget(hourly=10.0)
HOURLY_REJECT = Budget(hourly=10.0, on_exhausted="reject")
DAILY_REJECT = Budget(daily=50.0, on_exhausted="reject")


@pytest.mark.parametrize(
    ("budget", "spend", "now", "hour_spent", "day_spent", "shifted", "rejected"),
    [
        pytest.param(HOURLY_SHIFT, {H0: 4.0}, T0 + 60, 4.0, None, False, False, id="under"),
        pytest.param(HOURLY_SHIFT, {H0: 10.0}, T0 + 60, 10.0, None, True, False, id="exactly-exhausted-shifts"),
        pytest.param(HOURLY_REJECT, {H0: 12.0}, T0 + 60, 12.0, None, False, True, id="exhausted-rejects"),
        pytest.param(HOURLY_REJECT, {H0: 12.0}, T0 + HOUR - 0.001, 12.0, None, False, True, id="last-instant-of-hour"),
        pytest.param(HOURLY_REJECT, {H0: 12.0}, T0 + HOUR, 0.0, None, False, False, id="hour-rollover-reopens"),
        pytest.param(HOURLY_REJECT, {H0 - 1: 12.0}, T0 + 60, 0.0, None, False, False, id="last-hour-does-not-count"),
        pytest.param(DAILY_REJECT, {H0 - 10: 30.0, H0: 25.0}, T0 + 60, None, 55.0, False, True, id="day-sums-hours"),
        pytest.param(DAILY_REJECT, {H0 - 11: 30.0, H0: 25.0}, T0 + 60, None, 25.0, False, False,
                     id="yesterday-does-not-count"),
        pytest.param(DAILY_REJECT, {int(MIDNIGHT // HOUR) - 1: 60.0}, MIDNIGHT - 1, None, 60.0, False, True,
                     id="last-second-of-day"),
        pytest.param(DAILY_REJECT, {int(MIDNIGHT // HOUR) - 1: 60.0}, MIDNIGHT, None, 0.0, False, False,
                     id="day-rollover-at-utc-midnight"),
    ],
)
def test_verdict_table(budget, spend, now, hour_spent, day_spent, shifted, rejected) -> None:
    verdict = evaluate({"chat": budget, "free": None}, {(h, "chat"): c for h, c in spend.items()}, now)
    by_window = {w.window: w.spent for w in verdict.windows["chat"]}
    assert by_window.get("hour") == hour_spent
    assert by_window.get("day") == day_spent
    assert "free" not in verdict.windows
    assert ("chat" in verdict.shifted) is shifted
    assert ("chat" in verdict.rejected) is rejected
    assert verdict.action("chat") == ("rejecting" if rejected else "shifted_to_cheapest" if shifted else None)
    if rejected:
        assert "budget of pool 'chat'" in verdict.rejected["chat"] and "exhausted" in verdict.rejected["chat"]


def test_spend_of_other_pools_is_not_counted() -> None:
    verdict = evaluate({"chat": HOURLY_REJECT}, {(H0, "embed"): 100.0, (H0, "chat"): 1.0}, T0)
    assert verdict.windows["chat"][0].spent == 1.0 and not verdict.rejected


def test_alerts_are_due_once_and_name_the_action() -> None:
    budget = Budget(hourly=10.0, alert_thresholds=[0.5], on_exhausted="reject")
    first = evaluate({"chat": budget}, {(H0, "chat"): 6.0}, T0)
    assert [(a.threshold, a.kind, a.action) for a in first.due] == [(0.5, "budget_threshold", None)]
    again = evaluate({"chat": budget}, {(H0, "chat"): 7.0}, T0 + 1, first.alerted)
    assert again.due == ()
    exhausted = evaluate({"chat": budget}, {(H0, "chat"): 11.0}, T0 + 2, again.alerted)
    (alert,) = exhausted.due
    assert (alert.threshold, alert.kind, alert.action) == (1.0, "budget_exhausted", "reject")
    assert alert.message == "pool 'chat' has spent 11.0000 of its hourly budget 10 (110%); action: reject"
    assert alert.details() == {"pool": "chat", "window": "hour", "threshold": 1.0, "spent": 11.0, "limit": 10.0,
                               "action": "reject"}


def test_alerted_keys_of_past_windows_are_forgotten() -> None:
    budget = Budget(hourly=10.0, alert_thresholds=[0.5])
    first = evaluate({"chat": budget}, {(H0, "chat"): 6.0}, T0)
    assert len(first.alerted) == 1
    later = evaluate({"chat": budget}, {(H0, "chat"): 6.0}, T0 + HOUR, first.alerted)
    assert later.alerted == frozenset() and later.due == ()
    removed = evaluate({}, {(H0, "chat"): 6.0}, T0, first.alerted)
    assert removed.alerted == frozenset(), "a pool that lost its budget keeps no alert state"


# -- the controller: pure verdict + the alert side effect ------------------------------------------------


class Sent:
    def __init__(self) -> None:
        self.alerts: list[tuple[str, dict]] = []

    def send(self, kind: str, message: str, **details: object) -> None:
        self.alerts.append((kind, details))


CONFIG = parse_config("""
pools:
  chat:
    budget: {hourly: 10, alert_thresholds: [0.5], on_exhausted: reject}
    backends: {a: {url: "http://127.0.0.1:9001"}}
""")


def controller(book: SpendBook) -> tuple[BudgetController, Sent]:
    sent = Sent()
    return BudgetController(book, sent, Reconciler(SnapshotCache(), DesiredState(config=CONFIG))), sent


def test_a_restart_does_not_repeat_alerts() -> None:
    book = SpendBook()
    book.add(T0 + 1, "chat", "a", "", 10, 10, 6.0)
    ctl, sent = controller(book)
    assert ctl.check(T0 + 2) is False
    assert [d["threshold"] for _, d in sent.alerts] == [0.5]

    # The process restarts: the spend is read back from the ledger, the book of sent alerts is not.
    restarted, sent_after = controller(book)
    restarted.check(T0 + 3, send=False)  # what App does before serving
    restarted.check(T0 + 4)
    assert sent_after.alerts == []
    book.add(T0 + 5, "chat", "a", "", 10, 10, 5.0)
    assert restarted.check(T0 + 6) is True, "exhausted with on_exhausted: reject changes what Envoy does"
    assert [(k, d["threshold"]) for k, d in sent_after.alerts] == [("budget_exhausted", 1.0)]
    assert "chat" in restarted.verdict.rejected
    assert "chat" in restarted.reconciler.state.rejected, "proposed: Envoy answers 429 for the pool"
    # The next hour opens the pool again.
    assert restarted.check(T0 + HOUR) is True and not restarted.verdict.rejected
    assert not restarted.reconciler.state.rejected

