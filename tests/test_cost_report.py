"""`/v1/cost` as built from the in-memory spend book: per backend, and per model."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from controlplane.config import parse_config
from controlplane.reports import cost_report
from controlplane.scoring.budget import HOUR, BudgetVerdict
from controlplane.scoring.ledger import SpendBook
from controlplane.state import DesiredState

NOW = datetime(2026, 3, 14, 10, 30, tzinfo=UTC).timestamp()
HOUR_START = datetime(2026, 3, 14, 10, tzinfo=UTC).timestamp()

CONFIG = parse_config("""
pools:
  chat:
    backends: {a: {url: "http://127.0.0.1:9001"}, b: {url: "http://127.0.0.1:9002"}}
  embed:
    match: {prefix: /embed}
    backends: {e: {url: "http://127.0.0.1:9003"}}
""")


def report(book: SpendBook) -> dict[str, Any]:
    views = SimpleNamespace(spend=book, budgets=BudgetVerdict, state=lambda: DesiredState(config=CONFIG))
    return cost_report(views, NOW)  # type: ignore[arg-type]


def test_each_pool_reports_spend_per_model() -> None:
    book = SpendBook()
    book.add(HOUR_START + 1, "chat", "a", "gpt-4o", 100, 10, 1.0)
    book.add(HOUR_START + 2, "chat", "b", "gpt-4o", 200, 20, 2.0)  # same model, other backend: summed
    book.add(HOUR_START + 3, "chat", "a", "gpt-4o-mini", 50, 5, 0.25)
    book.add(HOUR_START - 2 * HOUR, "chat", "a", "gpt-4o", 1000, 100, 10.0)  # today, not this hour
    book.add(HOUR_START - 30 * HOUR, "chat", "b", "", 7, 7, 4.0)  # yesterday, and no model named
    chat = report(book)["pools"]["chat"]
    assert chat["models"] == {
        "gpt-4o": {"hour": 3.0, "day": 13.0, "total": 13.0, "requests": 3, "prompt_tokens": 1300,
                   "completion_tokens": 130},
        "gpt-4o-mini": {"hour": 0.25, "day": 0.25, "total": 0.25, "requests": 1, "prompt_tokens": 50,
                        "completion_tokens": 5},
        "(none)": {"hour": 0.0, "day": 0.0, "total": 4.0, "requests": 1, "prompt_tokens": 7, "completion_tokens": 7},
    }
    # the keys there were before are all still there, per backend over all models
    assert set(chat) == {"hour", "day", "budget", "action", "backends", "models"}
    assert chat["backends"]["a"] == {"hour": 1.25, "day": 11.25, "total": 11.25, "requests": 3,
                                     "prompt_tokens": 1150, "completion_tokens": 115}
    assert chat["backends"]["b"]["total"] == 6.0 and chat["backends"]["b"]["requests"] == 2
    assert (chat["hour"], chat["day"]) == (pytest.approx(3.25), pytest.approx(13.25))
    assert report(book)["pools"]["embed"]["models"] == {}, "a pool without spend has no models"


def test_a_model_named_like_the_no_model_label_is_not_lost() -> None:
    book = SpendBook()
    book.add(HOUR_START, "chat", "a", "", 1, 1, 1.0)
    book.add(HOUR_START, "chat", "a", "(none)", 1, 1, 2.0)
    assert report(book)["pools"]["chat"]["models"]["(none)"]["total"] == 3.0
