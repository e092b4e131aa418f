"""Per-client accounting: spend per client in the book and the ledger (and an old ledger migrated), the
spool's client, the window math, client budgets, tokens per minute, rejections by reason, the combined
blocks, and what status, cost and metrics show."""

from __future__ import annotations

import dataclasses
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane import metrics
from controlplane.config import ClientBudget, parse_config
from controlplane.controllers.clients import NO_CLIENT, ClientController, Clock, rejection
from controlplane.reconciler import Reconciler
from controlplane.reports import clients_status, cost_report
from controlplane.scoring.budget import (
    BUDGET_EXHAUSTED,
    DAY,
    HOUR,
    TOKENS_EXCEEDED,
    evaluate_clients,
    merge_blocks,
    period_start,
    seconds_left,
)
from controlplane.scoring.engine import Engine
from controlplane.scoring.ledger import Spend, SpendBook, SqliteLedger
from controlplane.state import DesiredState
from controlplane.telemetry.accesslog import Observation
from controlplane.telemetry.ingest import Telemetry
from controlplane.telemetry.requests import RequestIndex
from controlplane.telemetry.spool import KEY_CLIENT, parse_line
from controlplane.xds import resources
from controlplane.xds.server import SnapshotCache

from .test_metrics_units import fake_views
from .test_spool import line, make_spool, write_lines

T0 = datetime(2026, 3, 14, 15, 0, tzinfo=UTC).timestamp()  # the start of an hour
H0 = int(T0 // HOUR)
ENV = {"WEB_KEY": "web-key-0123456789abcdef", "BATCH_KEY": "batch-key-0123456789abcdef",
       "FREE_KEY": "free-key-0123456789abcdef"}
CONFIG = parse_config("""
clients:
  web:
    key: ${WEB_KEY}
    limits: {requests_per_minute: 600, tokens_per_minute: 1000}
    budget: {hourly: 1.0, daily: 5.0}
  batch:
    key: ${BATCH_KEY}
    budget: {daily: 2.0, alert_thresholds: [0.5]}
  free:
    key: ${FREE_KEY}
pools:
  chat:
    backends:
      a: {url: "http://127.0.0.1:9001", cost: {input_per_1k: 1.0, output_per_1k: 2.0}}
""", env=ENV)
OPEN = parse_config("""
pools:
  chat:
    backends:
      a: {url: "http://127.0.0.1:9001"}
""")


# -- the window math and the block merge ------------------------------------------------------------------

def test_calendar_windows_and_the_time_left_in_them() -> None:
    assert period_start(T0 + 61.5, "minute") == T0 + 60
    assert period_start(T0 + 61.5, "hour") == T0
    assert period_start(T0 + 61.5, "day") == T0 - 15 * HOUR
    assert seconds_left(T0 + 0.2, "minute") == 60, "whole seconds, rounded up"
    assert seconds_left(T0 + 59.9, "minute") == 1
    assert seconds_left(T0 + 60, "minute") == 60, "a new minute has all of it"
    assert seconds_left(T0 - 0.0001, "minute") == 1, "never 0: Retry-After is at least a second"
    assert seconds_left(T0 + 1800, "hour") == 1800
    assert seconds_left(T0, "day") == 9 * HOUR


def test_a_budget_block_wins_over_a_token_block() -> None:
    budget = {"web": (BUDGET_EXHAUSTED, "budget", 600)}
    tokens = {"web": (TOKENS_EXCEEDED, "tokens", 20), "batch": (TOKENS_EXCEEDED, "tokens", 20)}
    assert merge_blocks(budget, tokens) == {"web": budget["web"], "batch": tokens["batch"]}
    assert merge_blocks({}, {}) == {}


# -- the ledger and the book ------------------------------------------------------------------------------

def test_the_ledger_keeps_spend_per_client(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    try:
        ledger.record(T0, "chat", "a", 10, 20, 0.5, model="m", client="web")
        ledger.record(T0 + 1, "chat", "a", 10, 20, 0.25, model="m", client="web")
        ledger.record(T0 + 2, "chat", "a", 1, 1, 1.0, model="m", client="batch")
        ledger.record(T0 - HOUR, "chat", "a", 1, 1, 2.0, model="m", client="web")
        ledger.record(T0 + 3, "chat", "a", 1, 1, 4.0, model="m")  # no clients configured
        assert ledger.spend_per_client(T0) == {"web": Spend(2, 20, 40, 0.75), "batch": Spend(1, 1, 1, 1.0),
                                               "": Spend(1, 1, 1, 4.0)}
        assert ledger.spend_per_client(0)["web"] == Spend(3, 21, 41, 2.75)
        assert ledger.spend(T0) == {("chat", "a"): Spend(4, 22, 42, 5.75)}, "pools sum over clients"
        assert ledger.spend_per_model(T0) == {("chat", "a", "m"): Spend(4, 22, 42, 5.75)}
        assert (H0, "chat", "a", "m", "web", 2, 20, 40, 0.75) in ledger.hours(T0)
    finally:
        ledger.close()


SCHEMA_WITH_MODEL = """CREATE TABLE spend (
    hour INTEGER NOT NULL, pool TEXT NOT NULL, backend TEXT NOT NULL, model TEXT NOT NULL DEFAULT '',
    requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, cost REAL NOT NULL,
    PRIMARY KEY (hour, pool, backend, model))"""
SCHEMA_SPOOL = """CREATE TABLE spool (
    id INTEGER PRIMARY KEY CHECK (id = 0), generation INTEGER NOT NULL, covered INTEGER NOT NULL,
    done TEXT NOT NULL, recovered_requests INTEGER NOT NULL, recovered_prompt_tokens INTEGER NOT NULL,
    recovered_completion_tokens INTEGER NOT NULL, recovered_cost REAL NOT NULL)"""


def test_a_ledger_written_before_clients_loads_every_row_and_its_spool_count(tmp_path: Path) -> None:
    """The ledger as the previous release wrote it (spend per model, a spool count): migrated in place."""
    path = tmp_path / "ledger.sqlite3"
    db = sqlite3.connect(str(path))
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(SCHEMA_WITH_MODEL)
    db.execute(SCHEMA_SPOOL)
    db.execute("INSERT INTO spool VALUES (0, 3, 17, 'spool.1.jsonl', 2, 20, 40, 0.5)")
    rows = [(H0 - 100, "chat", "a", "gpt-4o", 5, 50, 60, 5.0), (H0, "chat", "a", "", 2, 20, 30, 2.0)]
    db.executemany("INSERT INTO spend VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()
    ledger = SqliteLedger(path)
    try:
        assert sorted(ledger.hours(0)) == sorted((*r[:4], "", *r[4:]) for r in rows), "nothing lost"
        state = ledger.spool_state()
        assert (state.generation, state.covered, state.done) == (3, 17, ("spool.1.jsonl",)), "the spool row kept"
        assert ledger.spend_per_client(0) == {"": Spend(7, 70, 90, 7.0)}
        ledger.record(T0 + 1, "chat", "a", 1, 1, 0.5, client="web")  # a row next to the migrated one
        ledger.record(T0 + 2, "chat", "a", 1, 1, 0.25)  # adds to the migrated row (client '')
        assert ledger.spend_per_client(T0) == {"": Spend(3, 21, 31, 2.25), "web": Spend(1, 1, 1, 0.5)}
        book = SpendBook.load(ledger, T0)
        assert book.by_client() == {"web": Spend(1, 1, 1, 0.5)}, "spend of no client is not a client's"
        assert book.total()[("chat", "a")] == Spend(9, 72, 92, 7.75)
    finally:
        ledger.close()
    check = sqlite3.connect(str(path))
    try:
        info = list(check.execute("PRAGMA table_info(spend)"))
        key = [row[1] for row in sorted(info, key=lambda r: r[5]) if row[5]]
        tables = {row[0] for row in check.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        check.close()
    assert key == ["hour", "pool", "backend", "model", "client"]
    assert tables == {"spend", "spool"}, "no table left over from the migration"
    again = SqliteLedger(path)  # opening a migrated file changes nothing
    try:
        assert again.spend_per_client(0)["web"] == Spend(1, 1, 1, 0.5)
    finally:
        again.close()


def test_the_book_keeps_clients_apart_and_pending_rows_carry_them() -> None:
    book = SpendBook()
    book.add(T0 + 1, "chat", "a", "m", 10, 20, 0.5, "web")
    book.add(T0 + 2, "chat", "a", "m", 10, 20, 0.5, "web")
    book.add(T0 - 1, "chat", "a", "m", 1, 1, 1.0, "web")  # the hour before
    book.add(T0 + 3, "chat", "a", "m", 1, 1, 0.25, "batch")
    book.add(T0 + 4, "chat", "a", "m", 1, 1, 2.0)  # no client
    assert book.by_client() == {"web": Spend(3, 21, 41, 2.0), "batch": Spend(1, 1, 1, 0.25)}
    assert book.by_client(T0) == {"web": Spend(2, 20, 40, 1.0), "batch": Spend(1, 1, 1, 0.25)}
    assert book.cost_by_client_hour() == {(H0, "web"): 1.0, (H0 - 1, "web"): 1.0, (H0, "batch"): 0.25}
    assert book.total()[("chat", "a")] == Spend(5, 23, 43, 4.25), "pools sum over clients"
    rows = book.take_pending()
    assert sorted(rows) == sorted([(H0, "chat", "a", "m", "web", 2, 20, 40, 1.0),
                                   (H0 - 1, "chat", "a", "m", "web", 1, 1, 1, 1.0),
                                   (H0, "chat", "a", "m", "batch", 1, 1, 1, 0.25),
                                   (H0, "chat", "a", "m", "", 1, 1, 1, 2.0)])
    book.give_back(rows)
    assert book.pending == 4
    book.prune(T0 + 49 * HOUR)
    assert book.by_client(0) == {} and book.by_client()["web"].requests == 3, "hours pruned, totals kept"


def test_the_book_loads_client_spend_from_the_ledger(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    book = SpendBook()
    for at, client in ((T0, "web"), (T0 + 1, "web"), (T0 - 100 * HOUR, "web"), (T0, "batch"), (T0, "")):
        book.add(at, "chat", "a", "m", 1, 2, 0.5, client)
    try:
        ledger.add(book.take_pending())
        loaded = SpendBook.load(ledger, T0)
    finally:
        ledger.close()
    assert loaded.by_client() == book.by_client()
    assert loaded.cost_by_client_hour() == {(H0, "web"): 1.0, (H0, "batch"): 0.5}, "only the hours kept"
    assert loaded.take_pending() == []


# -- the spool carries the client -------------------------------------------------------------------------

def test_the_spool_line_names_the_client_and_recovery_charges_it(tmp_path: Path) -> None:
    spool_log = resources.spool_log("/tmp/spool.jsonl")
    assert "%REQ(x-llm-client):256%" in str(spool_log.typed_config.value)
    assert KEY_CLIENT == "client"
    assert parse_line(line()).client == "", "a line written before lines had the client"
    record = line()[:-1] + ', "client": "web"}'
    assert parse_line(record).client == "web"
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    try:
        spool, book, _ = make_spool(tmp_path, ledger)
        write_lines(spool.path, ["a"] * 2)
        with open(spool.path, "a", encoding="utf-8") as f:
            for _ in range(3):
                f.write(line("a")[:-1] + ', "client": "web"}\n')
            f.write(line("a")[:-1] + ', "client": null}\n')
        book.count_spooled(1)
        assert spool.recover().requests == 5
        assert {k: s.requests for k, s in ledger.spend_per_client(0).items()} == {"": 2, "web": 3}
        assert book.by_client()["web"].requests == 3, "the book holds what was recovered"
    finally:
        ledger.close()


# -- client budgets -----------------------------------------------------------------------------------------

def test_client_budgets_alert_block_and_roll_over() -> None:
    budgets = {name: c.budget for name, c in CONFIG.clients.items()}
    spent = {(H0, "web"): 0.95, (H0 - 1, "web"): 3.0, (H0, "batch"): 1.0}
    verdict = evaluate_clients(budgets, spent, T0 + 60)
    assert [(a.client, a.window, a.threshold, a.kind) for a in verdict.due] == [
        ("web", "hour", 0.7, "client_budget_threshold"), ("web", "hour", 0.9, "client_budget_threshold"),
        ("web", "day", 0.7, "client_budget_threshold"),  # 3.95 of 5.0 today
        ("batch", "day", 0.5, "client_budget_threshold")]
    assert "client 'web' has spent 0.9500 of its hourly budget 1 (95%)" in verdict.due[0].message
    assert verdict.due[0].details() == {"client": "web", "window": "hour", "threshold": 0.7, "spent": 0.95,
                                        "limit": 1.0}
    assert "free" not in verdict.windows and verdict.blocked == {}
    spent[(H0, "web")] = 1.0
    again = evaluate_clients(budgets, spent, T0 + 120, verdict.alerted)
    assert [(a.client, a.threshold, a.kind) for a in again.due] == [("web", 1.0, "client_budget_exhausted")]
    code, message, retry_after = again.blocked["web"]
    assert code == BUDGET_EXHAUSTED and retry_after == HOUR - 120
    assert message == ("the hourly budget of client 'web' (1) is exhausted; requests are accepted again when "
                       "the hour ends (2026-03-14 16:00 UTC)")
    later = evaluate_clients(budgets, spent, T0 + 600, again.alerted)
    assert later.due == () and later.blocked["web"][:2] == again.blocked["web"][:2], "the same words all hour"
    assert later.blocked["web"][2] == HOUR - 600
    next_hour = evaluate_clients(budgets, spent, T0 + HOUR, later.alerted)
    assert next_hour.blocked == {} and next_hour.due == ()
    assert next_hour.windows["web"][1].spent == pytest.approx(4.0), "the day still counts the old hours"


def test_when_the_day_is_exhausted_too_the_block_lasts_the_day() -> None:
    budgets = {"web": ClientBudget(hourly=1.0, daily=2.0)}
    verdict = evaluate_clients(budgets, {(H0, "web"): 1.5, (H0 - 1, "web"): 1.0}, T0)
    code, message, retry_after = verdict.blocked["web"]
    assert "daily budget of client 'web' (2)" in message and retry_after == DAY - 15 * HOUR


# -- the controller: tokens per minute, rejections, budgets, one combined mapping ------------------------

class Sent:
    def __init__(self) -> None:
        self.alerts: list[tuple[str, str, dict[str, Any]]] = []

    def send(self, kind: str, message: str, **details: Any) -> None:
        self.alerts.append((kind, message, details))


class FixedClock(Clock):
    def __init__(self, now: float) -> None:
        super().__init__()
        self.now = now

    def __call__(self) -> float:
        return self.now


def controller(config: Any = CONFIG, now: float = T0 + 1) -> tuple[ClientController, SpendBook, Sent, FixedClock]:
    book, sent, clock = SpendBook(), Sent(), FixedClock(now)
    reconciler = Reconciler(SnapshotCache(), DesiredState(config=config))
    ctl = ClientController(book, sent, reconciler, clock)
    ctl.check(send=False)
    return ctl, book, sent, clock


def served(client: str, prompt: int = 100, completion: int = 200, status: int = 200) -> Observation:
    return Observation("r", "chat", "a", status, 10.0, None, prompt, completion, False, "", None, "m", "m",
                       client=client)


def refused(client: str, status: int, flags: str = "", route: str = "") -> Observation:
    return Observation("r", "", "", status, 1.0, None, 0, 0, True, flags, None, "", "", client=client, route=route)


def test_tokens_per_minute_block_at_the_limit_and_lift_at_the_minute() -> None:
    ctl, _, _, clock = controller()
    blocked = lambda: dict(ctl.reconciler.state.blocked)  # noqa: E731
    for _ in range(3):
        ctl.observe(served("web"), T0 + 10)  # 300 tokens each
    assert ctl.tokens_this_minute() == {"web": 900} and blocked() == {}
    ctl.observe(served("free"), T0 + 10)  # no token limit: not counted
    ctl.observe(served("web", status=503), T0 + 10)  # not charged: no tokens
    ctl.observe(served("web"), T0 + 10.4)  # 1200 >= 1000
    code, message, retry_after = blocked()["web"]
    assert code == TOKENS_EXCEEDED and retry_after == 50
    assert "client 'web' has used 1200 tokens this minute" in message and "tokens_per_minute limit is 1000" in message
    ctl.observe(served("web"), T0 + 11)  # in flight when the block went out: counted, the block unchanged
    assert blocked()["web"] == (code, message, retry_after) and ctl.tokens_this_minute()["web"] == 1500
    ctl.observe(refused("web", 429, route="client/web"), T0 + 12)
    assert ctl.counters()["web"].rejected["tokens"] == 1
    clock.now = T0 + 60.01  # the timer at the minute's end
    ctl.check()
    assert blocked() == {} and ctl.tokens_this_minute() == {}
    ctl.observe(refused("web", 429, route="client/web"), T0 + 60.2)  # a late entry of a blocked request
    assert ctl.counters()["web"].rejected["tokens"] == 2, "still counted as tokens once the block is lifted"
    ctl.observe(served("web", 500, 500), T0 + 119)
    assert "web" in blocked(), "a count of its own per minute"
    ctl.observe(served("web"), T0 + 120)  # an entry of the next minute rolls it over before the timer does
    assert blocked() == {} and ctl.tokens_this_minute() == {"web": 300}


def test_rejections_by_reason() -> None:
    assert rejection(refused("", 401), None) == "auth"
    assert rejection(refused("web", 429, flags="rate_limited"), None) == "rate"  # the gRPC log's name
    assert rejection(refused("web", 429, flags="RL"), None) == "rate"  # the file log's
    assert rejection(refused("web", resources.RATE_LIMITED_STATUS), None) == "rate"
    assert rejection(refused("web", 429, route="client/web"), BUDGET_EXHAUSTED) == "budget"
    assert rejection(refused("web", 429, route="client/web"), TOKENS_EXCEEDED) == "tokens"
    assert rejection(refused("web", 429, route="chat"), None) is None, "a pool's budget, not the client's"
    assert rejection(refused("web", 503, flags="upstream_overflow"), None) is None
    assert rejection(refused("web", 404, route="unknown-model:/"), None) is None
    ctl, _, _, _ = controller()
    for obs in (refused("", 401), refused("", 401), refused("web", 429, flags="rate_limited"),
                refused("web", 404), served("web")):
        ctl.observe(obs, T0 + 5)
    counts = ctl.counters()
    assert counts[NO_CLIENT].requests == 2 and counts[NO_CLIENT].rejected == {"auth": 2, "rate": 0, "budget": 0,
                                                                             "tokens": 0}
    assert counts["web"].requests == 3 and counts["web"].rejected["rate"] == 1


def test_without_clients_nothing_is_counted() -> None:
    ctl, _, _, _ = controller(OPEN)
    ctl.observe(refused("", 503, flags="upstream_overflow"), T0)
    ctl.observe(refused("", 401), T0)
    assert ctl.counters() == {} and dict(ctl.reconciler.state.blocked) == {}


def test_budget_blocks_alerts_and_the_combined_mapping() -> None:
    ctl, book, sent, clock = controller()
    book.add(T0 + 2, "chat", "a", "m", 1, 1, 0.95, "web")
    ctl.check()
    assert [(k, d["client"], d["threshold"]) for k, _, d in sent.alerts] == [
        ("client_budget_threshold", "web", 0.7), ("client_budget_threshold", "web", 0.9)]
    for _ in range(4):
        ctl.observe(served("web"), T0 + 3)  # over its tokens per minute too
    assert dict(ctl.reconciler.state.blocked)["web"][0] == TOKENS_EXCEEDED
    book.add(T0 + 4, "chat", "a", "m", 1, 1, 0.1, "web")
    clock.now = T0 + 5
    ctl.check()
    block = dict(ctl.reconciler.state.blocked)["web"]
    assert block[0] == BUDGET_EXHAUSTED, "the budget's block wins"
    assert sent.alerts[-1][0] == "client_budget_exhausted" and "client 'web'" in sent.alerts[-1][1]
    assert ctl.blocks()[1]["web"][0] == TOKENS_EXCEEDED, "both are kept; Envoy is sent the budget's"
    clock.now = T0 + 30
    ctl.check()
    assert dict(ctl.reconciler.state.blocked)["web"] == block, "unchanged while the window lasts: no push"
    assert len(sent.alerts) == 3, "each alert once per window"
    ctl.observe(refused("web", 429, route="client/web"), T0 + 31)
    assert ctl.counters()["web"].rejected["budget"] == 1
    clock.now = T0 + HOUR + 1
    ctl.check()
    assert dict(ctl.reconciler.state.blocked) == {}, "a new hour (and a new minute) lifts both"


def test_a_restart_does_not_repeat_client_alerts_but_blocks_at_once() -> None:
    book, sent = SpendBook(), Sent()
    book.add(T0 + 2, "chat", "a", "m", 1, 1, 1.5, "web")
    ctl = ClientController(book, sent, Reconciler(SnapshotCache(), DesiredState(config=CONFIG)), FixedClock(T0 + 9))
    ctl.check(send=False)
    assert sent.alerts == [] and dict(ctl.reconciler.state.blocked)["web"][0] == BUDGET_EXHAUSTED
    ctl.check()
    assert sent.alerts == []


def test_a_raised_limit_lifts_a_token_block() -> None:
    ctl, _, _, _ = controller()
    for _ in range(4):
        ctl.observe(served("web"), T0 + 3)
    assert "web" in ctl.reconciler.state.blocked
    web = CONFIG.clients["web"]
    limits = web.limits.model_copy(update={"tokens_per_minute": 5000})
    raised = CONFIG.model_copy(update={"clients": {**CONFIG.clients, "web": web.model_copy(update={"limits": limits})}})
    ctl.reconciler.propose(config=raised)
    ctl.check()
    assert "web" not in ctl.reconciler.state.blocked


def test_the_test_clock_reads_its_offset_file(tmp_path: Path) -> None:
    path = tmp_path / "offset"
    clock = Clock(path)
    clock.refresh()
    assert clock.offset == 0.0, "no file: no offset"
    path.write_text("3600.5\n")
    clock.refresh()
    assert clock.offset == 3600.5 and abs(clock() - (datetime.now(UTC).timestamp() + 3600.5)) < 1
    path.write_text("soon")
    clock.refresh()
    assert clock.offset == 3600.5, "unreadable: the last offset stays"
    path.write_text("")
    clock.refresh()
    assert clock.offset == 0.0
    plain = Clock()
    plain.refresh()
    assert plain.offset == 0.0


# -- ingest: who is counted, and spend charged to the client -----------------------------------------------

def test_ingest_hands_the_clients_their_entries_and_charges_them() -> None:
    book, engine = SpendBook(), Engine()
    engine.sync(CONFIG)
    seen: list[tuple[str, float]] = []
    telemetry = Telemetry(engine, book, RequestIndex(), lambda: CONFIG, clock=lambda: T0 + 7)
    telemetry.clients = lambda obs, at: seen.append((obs.client or obs.route, at))
    anonymous = served("")
    telemetry.observe_batch([served("web"), anonymous, refused("", 401, route="x"), refused("web", 429)])
    assert seen == [("web", T0 + 7), ("x", T0 + 7), ("web", T0 + 7)], "with a client, or answered by Envoy"
    assert book.by_client() == {"web": Spend(1, 100, 200, pytest.approx(0.5))}
    assert book.cost_by_client_hour() == {(H0, "web"): pytest.approx(0.5)}, "at the (test) clock's hour"


# -- what operators see ------------------------------------------------------------------------------------

def views_with_clients() -> tuple[Any, ClientController]:
    ctl, book, _, _ = controller()
    book.add(T0 + 2, "chat", "a", "m", 10, 20, 0.5, "web")
    book.add(T0 - DAY, "chat", "a", "m", 1, 2, 0.25, "gone")  # a client since removed from the config
    for _ in range(4):
        ctl.observe(served("web"), T0 + 3)
    ctl.observe(refused("", 401), T0 + 3)
    ctl.observe(refused("web", 429, flags="rate_limited"), T0 + 3)
    ctl.check()
    state = DesiredState(config=CONFIG)
    views = dataclasses.replace(fake_views(), state=lambda: state, published=lambda: state, spend=book, clients=ctl,
                                now=lambda: T0 + 10)
    return views, ctl


def test_status_shows_each_client_without_its_key() -> None:
    views, _ = views_with_clients()
    clients = clients_status(views)
    assert set(clients) == {"web", "batch", "free", NO_CLIENT}
    web = clients["web"]
    assert web["requests"] == 5 and web["rejected"] == {"auth": 0, "rate": 1, "budget": 0, "tokens": 0}
    assert web["tokens"] == {"prompt": 10, "completion": 20} and web["tokens_this_minute"] == 1200
    assert web["spend"] == {"hour": 0.5, "day": 0.5, "total": 0.5}
    assert web["blocked"] == TOKENS_EXCEEDED
    assert web["limits"] == {"requests_per_minute": 600, "tokens_per_minute": 1000,
                             "budget": {"hourly": 1.0, "daily": 5.0}}
    assert clients["free"]["blocked"] is None and clients["free"]["limits"]["budget"] is None
    assert clients[NO_CLIENT] == {"requests": 1, "rejected": {"auth": 1, "rate": 0, "budget": 0, "tokens": 0}}
    assert not any(key in str(clients) for key in ENV.values())
    views = dataclasses.replace(views, state=lambda: DesiredState(config=OPEN))
    assert clients_status(views) == {}, "no clients configured: nothing to show"


def test_cost_shows_each_client_with_its_budget_windows() -> None:
    views, _ = views_with_clients()
    report = cost_report(views, T0 + 10)
    clients = report["clients"]
    assert set(clients) == {"web", "batch", "free", "gone"}
    web = clients["web"]
    assert (web["hour"], web["day"], web["total"], web["requests"], web["prompt_tokens"],
            web["completion_tokens"]) == (0.5, 0.5, 0.5, 1, 10, 20)
    assert [w["window"] for w in web["budget"]] == ["hour", "day"] and web["budget"][0]["spent"] == 0.5
    assert web["blocked"] == TOKENS_EXCEEDED and web["configured"] is True
    assert clients["gone"]["configured"] is False and clients["gone"]["total"] == 0.25
    assert clients["free"]["budget"] == [] and clients["free"]["total"] == 0.0


def test_metrics_per_client_with_bounded_labels() -> None:
    views, _ = views_with_clients()
    text = metrics.render(metrics.registry_for(views)).decode()
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for f in text_string_to_metric_families(text) for s in f.samples if s.name.startswith("llm_lb_client")}

    def one(name: str, **labels: str) -> float:
        return found[(name, tuple(sorted(labels.items())))]

    assert one("llm_lb_client_requests_total", client="web") == 5
    assert one("llm_lb_client_requests_total", client=NO_CLIENT) == 1
    assert one("llm_lb_client_rejections_total", client="web", reason="rate") == 1
    assert one("llm_lb_client_rejections_total", client=NO_CLIENT, reason="auth") == 1
    assert one("llm_lb_client_tokens_total", client="web", kind="prompt") == 10
    assert one("llm_lb_client_spend_total", client="web") == 0.5
    assert one("llm_lb_client_blocked", client="web", reason="tokens") == 1
    assert one("llm_lb_client_blocked", client="web", reason="budget") == 0
    assert one("llm_lb_client_budget_used_ratio", client="web", window="hour") == 0.5
    clients = {dict(labels).get("client") for _, labels in found}
    assert clients == {"web", "batch", "free", NO_CLIENT}, "configured names only (not 'gone')"
    plain = metrics.render(metrics.registry_for(fake_views())).decode()
    assert "llm_lb_client_" not in plain, "no clients configured: no client families"


def test_an_open_listener_reports_no_clients() -> None:
    views, _ = views_with_clients()
    views = dataclasses.replace(views, state=lambda: DesiredState(config=OPEN), spend=SpendBook())
    assert cost_report(views, T0)["clients"] == {}
