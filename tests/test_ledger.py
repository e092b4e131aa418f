"""The spend ledger (SQLite, hour buckets, persisted) and budget windows with their alerts."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controlplane.config import Budget
from controlplane.scoring.budget import DAY, HOUR, WindowState, evaluate, period_start, windows
from controlplane.scoring.ledger import Spend, SqliteLedger

T0 = datetime(2026, 3, 14, 15, 0, tzinfo=UTC).timestamp()  # the start of an hour


@pytest.fixture
def ledger(tmp_path: Path):
    db = SqliteLedger(tmp_path / "state" / "spend.sqlite")
    yield db
    db.close()


def test_spend_adds_up_per_pool_and_backend(ledger: SqliteLedger) -> None:
    ledger.record(T0 + 10, "chat", "a", 100, 50, 0.25)
    ledger.record(T0 + 20, "chat", "a", 200, 25, 0.5)
    ledger.record(T0 + 30, "chat", "b", 1, 2, 1.0)
    ledger.record(T0 + 40, "embed", "a", 7, 0, 0.01)
    spend = ledger.spend(T0)
    assert spend == {
        ("chat", "a"): Spend(2, 300, 75, pytest.approx(0.75)),
        ("chat", "b"): Spend(1, 1, 2, 1.0),
        ("embed", "a"): Spend(1, 7, 0, pytest.approx(0.01)),
    }
    assert set(ledger.spend(T0, pool="chat")) == {("chat", "a"), ("chat", "b")}
    assert ledger.spend(T0, pool="nope") == {}


def test_spend_counts_buckets_from_the_hour_holding_since(ledger: SqliteLedger) -> None:
    ledger.record(T0 - 1, "chat", "a", 1, 0, 1.0)  # previous hour
    ledger.record(T0 + 5, "chat", "a", 1, 0, 2.0)  # this hour, before `since`
    ledger.record(T0 + HOUR - 1, "chat", "a", 1, 0, 4.0)  # this hour, last second
    ledger.record(T0 + HOUR, "chat", "a", 1, 0, 8.0)  # next hour
    assert ledger.spend(T0 + 1800)[("chat", "a")].cost == pytest.approx(14.0)
    assert ledger.spend(T0 + 1800)[("chat", "a")].requests == 3
    assert ledger.spend(T0 - HOUR)[("chat", "a")].cost == pytest.approx(15.0)
    assert ledger.spend(T0 + HOUR)[("chat", "a")].cost == pytest.approx(8.0)
    assert ledger.spend(T0 + 2 * HOUR) == {}


def test_spend_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "spend.sqlite"
    first = SqliteLedger(path)
    first.record(T0, "chat", "a", 10, 20, 0.3)
    first.record(T0 + 1, "chat", "a", 1, 2, 0.1)
    first.close()
    second = SqliteLedger(path)
    try:
        assert second.spend(T0) == {("chat", "a"): Spend(2, 11, 22, pytest.approx(0.4))}
        second.record(T0 + 2, "chat", "a", 1, 1, 0.1)
        assert second.spend(T0)[("chat", "a")].requests == 3
    finally:
        second.close()
    assert path.exists()


def test_spend_per_model_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "spend.sqlite"
    first = SqliteLedger(path)
    first.record(T0, "chat", "a", 10, 20, 0.3, model="gpt-4o")
    first.record(T0 + 1, "chat", "a", 1, 2, 0.1, model="gpt-4o-mini")
    first.record(T0 + 2, "chat", "a", 5, 5, 0.5, model="gpt-4o")
    first.record(T0 + 3, "chat", "b", 1, 1, 0.01)  # no model
    first.close()
    second = SqliteLedger(path)
    try:
        assert second.spend_per_model(T0) == {
            ("chat", "a", "gpt-4o"): Spend(2, 15, 25, pytest.approx(0.8)),
            ("chat", "a", "gpt-4o-mini"): Spend(1, 1, 2, pytest.approx(0.1)),
            ("chat", "b", ""): Spend(1, 1, 1, pytest.approx(0.01)),
        }
        assert second.spend(T0) == {("chat", "a"): Spend(3, 16, 27, pytest.approx(0.9)),
                                    ("chat", "b"): Spend(1, 1, 1, pytest.approx(0.01))}, "summed over models"
        assert sorted(second.hours(T0)) == [
            (int(T0 // HOUR), "chat", "a", "gpt-4o", "", 2, 15, 25, pytest.approx(0.8)),
            (int(T0 // HOUR), "chat", "a", "gpt-4o-mini", "", 1, 1, 2, pytest.approx(0.1)),
            (int(T0 // HOUR), "chat", "b", "", "", 1, 1, 1, pytest.approx(0.01)),
        ]
        assert second.spend_per_model(T0 + HOUR) == {}
    finally:
        second.close()


OLD_SCHEMA = """CREATE TABLE spend (
    hour INTEGER NOT NULL, pool TEXT NOT NULL, backend TEXT NOT NULL,
    requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, cost REAL NOT NULL,
    PRIMARY KEY (hour, pool, backend))"""


def old_ledger(path: Path, rows: list[tuple]) -> None:
    """A ledger file as written before spend had a model."""
    db = sqlite3.connect(str(path))
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(OLD_SCHEMA)
    db.executemany("INSERT INTO spend VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()


def test_a_ledger_without_models_is_migrated_keeping_every_row(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    h = int(T0 // HOUR)
    old_rows = [(h - 100, "chat", "a", 5, 50, 60, 5.0), (h, "chat", "a", 2, 20, 30, 2.0),
                (h, "chat", "b", 1, 1, 1, 0.5), (h, "embed", "a", 3, 9, 0, 0.25)]
    old_ledger(path, old_rows)
    ledger = SqliteLedger(path)
    try:
        assert sorted(ledger.hours(0)) == sorted((r[0], r[1], r[2], "", "", *r[3:]) for r in old_rows), "nothing lost"
        assert ledger.spend(0)[("chat", "a")] == Spend(7, 70, 90, 7.0)
        ledger.record(T0 + 1, "chat", "a", 10, 10, 1.0, model="gpt-4o")  # a new row next to the migrated one
        ledger.record(T0 + 2, "chat", "a", 1, 1, 0.5)  # adds to the migrated row (model '')
        assert ledger.spend_per_model(T0) == {
            ("chat", "a", ""): Spend(3, 21, 31, 2.5),
            ("chat", "a", "gpt-4o"): Spend(1, 10, 10, 1.0),
            ("chat", "b", ""): Spend(1, 1, 1, 0.5),
            ("embed", "a", ""): Spend(3, 9, 0, 0.25),
        }
    finally:
        ledger.close()
    check = sqlite3.connect(str(path))
    try:
        columns = [row[1] for row in check.execute("PRAGMA table_info(spend)")]
        key = [row[1] for row in sorted(check.execute("PRAGMA table_info(spend)"), key=lambda r: r[5]) if row[5]]
        tables = {row[0] for row in check.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        check.close()
    assert "model" in columns and key == ["hour", "pool", "backend", "model", "client"]
    assert tables == {"spend", "spool"}, "no table left over from the migration"
    again = SqliteLedger(path)  # opening a migrated file changes nothing
    try:
        assert again.spend(0)[("chat", "a")] == Spend(9, 81, 101, 8.5)
    finally:
        again.close()


def test_a_failed_migration_leaves_the_old_ledger_as_it_was(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "ledger.sqlite3"
    old_ledger(path, [(int(T0 // HOUR), "chat", "a", 2, 20, 30, 2.0)])
    monkeypatch.setattr("controlplane.scoring.ledger._COLUMNS", "hour, pool, backend, model, nope")
    with pytest.raises(sqlite3.OperationalError):
        SqliteLedger(path)
    check = sqlite3.connect(str(path))
    try:
        assert [row[1] for row in check.execute("PRAGMA table_info(spend)")] == [
            "hour", "pool", "backend", "requests", "prompt_tokens", "completion_tokens", "cost"]
        assert check.execute("SELECT * FROM spend").fetchall() == [(int(T0 // HOUR), "chat", "a", 2, 20, 30, 2.0)]
        assert [r[0] for r in check.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["spend"]
    finally:
        check.close()
    monkeypatch.undo()
    ledger = SqliteLedger(path)  # and the next start migrates it
    try:
        assert ledger.spend_per_model(0) == {("chat", "a", ""): Spend(2, 20, 30, 2.0)}
    finally:
        ledger.close()


def test_spend_sum() -> None:
    assert Spend(1, 2, 3, 0.5) + Spend(10, 20, 30, 1.5) == Spend(11, 22, 33, 2.0)
    assert Spend() == Spend(0, 0, 0, 0.0)


@pytest.mark.parametrize(
    ("now", "window", "start"),
    [
        pytest.param(T0 + 1234.5, "hour", T0, id="hour-mid"),
        pytest.param(T0, "hour", T0, id="hour-exact"),
        pytest.param(T0 + 1234.5, "day", datetime(2026, 3, 14, tzinfo=UTC).timestamp(), id="day-utc-midnight"),
        pytest.param(datetime(2026, 3, 14, 23, 59, 59, tzinfo=UTC).timestamp(), "day",
                     datetime(2026, 3, 14, tzinfo=UTC).timestamp(), id="day-last-second"),
    ],
)
def test_period_start(now: float, window: str, start: float) -> None:
    assert period_start(now, window) == start
    assert (HOUR, DAY) == (3600, 86400)


# -- budgets ------------------------------------------------------------------------------------------

def test_windows_follow_the_configured_limits() -> None:
    both = windows(Budget(hourly=2.0, daily=10.0), 1.0, 5.0, T0, T0 - 15 * HOUR)
    assert both == [WindowState("hour", 2.0, 1.0, T0), WindowState("day", 10.0, 5.0, T0 - 15 * HOUR)]
    assert [w.window for w in windows(Budget(hourly=2.0), 1.0, 5.0, T0, T0)] == ["hour"]
    assert [w.window for w in windows(Budget(daily=3.0), 1.0, 5.0, T0, T0)] == ["day"]


@pytest.mark.parametrize(
    ("spent", "fraction", "exhausted"),
    [
        pytest.param(0.0, 0.0, False, id="nothing"),
        pytest.param(3.0, 0.75, False, id="three-quarters"),
        pytest.param(4.0, 1.0, True, id="exactly-the-limit"),
        pytest.param(5.0, 1.25, True, id="over"),
    ],
)
def test_window_state(spent: float, fraction: float, exhausted: bool) -> None:
    state = WindowState("hour", 4.0, spent, T0)
    assert state.fraction == pytest.approx(fraction)
    assert state.exhausted is exhausted
    assert state.as_dict() == {"window": "hour", "limit": 4.0, "spent": spent, "fraction": fraction,
                               "exhausted": exhausted}


class Book:
    """Carries the verdict's `alerted` set from one evaluation to the next, as the controller does."""

    def __init__(self) -> None:
        self.alerted: frozenset = frozenset()

    def due(self, pool: str, budget: Budget, state: WindowState) -> list[float]:
        hour = int(state.period // HOUR)
        verdict = evaluate({pool: budget}, {(hour, pool): state.spent}, state.period + 1, self.alerted)
        self.alerted |= {key for key in verdict.alerted if key[1] == state.window}
        return [a.threshold for a in verdict.due if a.window == state.window]


def test_alerts_fire_once_per_threshold_per_period() -> None:
    budget = Budget(hourly=10.0, alert_thresholds=[0.9, 0.5])
    book = Book()

    def due(spent: float, period: float = T0) -> list[float]:
        return book.due("chat", budget, WindowState("hour", 10.0, spent, period))

    assert due(4.0) == []
    assert due(5.0) == [0.5]
    assert due(6.0) == []
    assert due(9.5) == [0.9]
    assert due(9.9) == []
    assert due(10.0) == [1.0]  # exhausted
    assert due(20.0) == []
    # a new hour: every threshold may fire again, all at once when jumped over
    assert due(12.0, T0 + HOUR) == [0.5, 0.9, 1.0]
    assert due(12.0, T0 + HOUR) == []


def test_alerts_are_per_pool_and_window() -> None:
    budget = Budget(hourly=10.0, daily=10.0, alert_thresholds=[0.7])
    book = Book()
    assert book.due("chat", budget, WindowState("hour", 10.0, 8.0, T0)) == [0.7]
    assert book.due("chat", budget, WindowState("day", 10.0, 8.0, T0)) == [0.7]
    assert book.due("embed", budget, WindowState("hour", 10.0, 8.0, T0)) == [0.7]
    assert book.due("chat", budget, WindowState("hour", 10.0, 8.0, T0)) == []
