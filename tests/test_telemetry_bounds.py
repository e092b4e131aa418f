"""Hostile usage blocks, cut streams and feedback through the real parse() + Telemetry path: every served
request is charged, no count can be a lie past the rules, and the engine, the book and the ledger agree."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from controlplane.config import Config, parse_config
from controlplane.scoring.engine import Engine, request_cost
from controlplane.scoring.ledger import SpendBook, SqliteLedger
from controlplane.telemetry.accesslog import (
    CHARS_PER_TOKEN,
    COMPLETION_ALLOWANCE,
    MAX_TOKENS,
    PROMPT_ALLOWANCE,
    parse,
)
from controlplane.telemetry.ingest import Telemetry
from controlplane.telemetry.requests import RequestIndex

from .test_accesslog import entry

PRICES = {"a": {"input_per_1k": 0.5, "output_per_1k": 1.5}, "b": {"input_per_1k": 0.1, "output_per_1k": 0.2}}


def config() -> Config:
    return parse_config(yaml.safe_dump({"pools": {"chat": {"backends": {
        name: {"url": f"http://127.0.0.1:{9001 + i}", "cost": cost} for i, (name, cost) in enumerate(PRICES.items())
    }}}}))


def telemetry() -> tuple[Telemetry, Engine, SpendBook]:
    cfg = config()
    engine = Engine()
    engine.sync(cfg)
    book = SpendBook()
    return Telemetry(engine, book, RequestIndex(), lambda: cfg), engine, book


HOSTILE: list[object] = [1e18, 1e20, float("inf"), float("-inf"), float("nan"), -5, 12.5, "12", True,
                         MAX_TOKENS + 1, MAX_TOKENS, 9_999_999, PROMPT_ALLOWANCE + 10_000]


def hostile_entries() -> list:
    """Each hostile value as prompt and as completion, on both backends; plus honest and failed requests."""
    out = []
    n = 0
    for backend in ("a", "b"):
        for value in HOSTILE:
            for usage in ({"prompt_tokens": value, "completion_tokens": 20}, {"prompt_tokens": 30,
                                                                                "completion_tokens": value}):
                n += 1
                out.append(entry(backend=backend, usage=usage, request_bytes=800, response_bytes=400,
                                 last_byte_ms=300.0, request_id=f"h{n}"))
        out.append(entry(backend=backend, usage={"prompt_tokens": 40, "completion_tokens": 10}, request_bytes=800,
                         response_bytes=400, request_id=f"{backend}-honest"))
        out.append(entry(backend=backend, status=503, usage={"prompt_tokens": 1e18}, request_id=f"{backend}-503"))
    return out


def test_hostile_usage_is_estimated_counted_and_every_served_request_charged() -> None:
    tel, engine, book = telemetry()
    entries = hostile_entries()
    observations = [parse(e) for e in entries]  # none raises
    assert tel.observe_batch(observations) == 0
    for obs in observations:
        assert 0 <= obs.prompt_tokens <= 800 + PROMPT_ALLOWANCE and 0 <= obs.completion_tokens <= 400 + \
            COMPLETION_ALLOWANCE + 3000, obs
        assert isinstance(obs.prompt_tokens, int) and isinstance(obs.completion_tokens, int)
    total = book.total()
    per_backend = len(HOSTILE) * 2 + 1  # the 503s are not charged
    assert {k: s.requests for k, s in total.items()} == {("chat", "a"): per_backend, ("chat", "b"): per_backend}
    # every hostile value is suspicious, as prompt and as completion: even those under the cap (MAX_TOKENS,
    # 9,999,999, PROMPT_ALLOWANCE + 10,000) are more than 800 / 400 bytes and 300 ms allow
    # (and the 503's 1e18: not charged, but a backend that said it is still counted)
    suspicious = 2 * len(HOSTILE) + 1
    assert sum(1 for obs in observations if obs.usage_suspicious) == 2 * suspicious
    assert engine.usage_suspicious == {("chat", "a"): suspicious, ("chat", "b"): suspicious}
    explained = engine.explain("chat")["backends"]
    assert explained["a"]["usage_suspicious"] == explained["b"]["usage_suspicious"] == suspicious
    # the worst a hostile block can do: the body plus the allowances
    worst = request_cost(config().pools["chat"].backends["a"], 800 + PROMPT_ALLOWANCE, 20)
    assert total[("chat", "a")].cost <= per_backend * worst


def test_a_count_within_the_rules_is_trusted() -> None:
    tel, engine, book = telemetry()
    obs = parse(entry(usage={"prompt_tokens": 800 + PROMPT_ALLOWANCE, "completion_tokens": 7}, request_bytes=800))
    tel.observe_batch([obs])
    assert book.total()[("chat", "a")].prompt_tokens == 800 + PROMPT_ALLOWANCE
    assert engine.usage_suspicious == {}


def test_engine_book_and_ledger_agree_whatever_the_usage(tmp_path: Path) -> None:
    tel, engine, book = telemetry()
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    try:
        cut = entry(backend="a", usage={"content_chunks": 9}, request_bytes=800, response_bytes=9000,
                    request_id="cut")
        cut.common_properties.response_flags.upstream_request_timeout = True
        assert tel.observe_batch([parse(e) for e in [*hostile_entries(), cut]]) == 0
        ledger.add(book.take_pending())  # what the flusher does
        in_ledger, in_book = ledger.spend(0), book.total()
        assert set(in_ledger) == set(in_book) == {("chat", "a"), ("chat", "b")}
        for key in in_book:
            st = engine.stats[key]
            assert in_ledger[key].requests == in_book[key].requests
            assert in_ledger[key].prompt_tokens == in_book[key].prompt_tokens
            assert in_ledger[key].completion_tokens == in_book[key].completion_tokens
            assert math.isclose(in_ledger[key].cost, in_book[key].cost, rel_tol=1e-9)
            assert math.isclose(st.cost, in_book[key].cost, rel_tol=1e-9), key
            # the engine counts tokens of successes only (its per-request mix); the cut stream is the
            # one charged request that is not a success
            cut_tokens = (800 // CHARS_PER_TOKEN, 9) if key == ("chat", "a") else (0, 0)
            assert st.prompt_tokens + cut_tokens[0] == in_book[key].prompt_tokens
            assert st.completion_tokens + cut_tokens[1] == in_book[key].completion_tokens
        reloaded = SpendBook.load(ledger, 0).total()
        assert {k: (s.requests, s.prompt_tokens, s.completion_tokens) for k, s in reloaded.items()} == \
            {k: (s.requests, s.prompt_tokens, s.completion_tokens) for k, s in in_ledger.items()}
    finally:
        ledger.close()


def test_a_stream_cut_short_is_a_failure_that_is_charged() -> None:
    tel, engine, book = telemetry()
    e = entry(backend="a", status=200, usage={"content_chunks": 50}, request_bytes=4000, response_bytes=20_000,
              last_byte_ms=30_000.0)
    e.common_properties.response_flags.upstream_request_timeout = True
    e.response.response_code_details = "response_timeout"  # the route's timeout: no attempt entry has it
    tel.observe_batch([parse(e)])
    st = engine.stats[("chat", "a")]
    assert (st.requests, st.errors, st.latency_ewma_ms) == (1, 1, None), "an error, not a latency sample"
    spent = book.total()[("chat", "a")]
    assert (spent.requests, spent.prompt_tokens, spent.completion_tokens) == (1, 1000, 50)
    assert spent.cost == pytest.approx(request_cost(config().pools["chat"].backends["a"], 1000, 50))
    assert st.cost == pytest.approx(spent.cost)


def test_a_failure_without_an_answer_is_not_charged() -> None:
    tel, engine, book = telemetry()
    e = entry(backend="a", status=504, request_bytes=4000)
    e.common_properties.response_flags.upstream_request_timeout = True
    e.response.response_code_details = "response_timeout"
    tel.observe_batch([parse(e)])
    assert engine.stats[("chat", "a")].errors == 1 and book.total() == {} and engine.stats[("chat", "a")].cost == 0


def test_feedback_is_taken_once_per_request() -> None:
    tel, engine, _ = telemetry()
    tel.observe_batch([parse(entry(backend="a", request_id="r1"))])
    assert tel.feedback("r1", 0.0)["status"] == "applied"
    quality = engine.stats[("chat", "a")].quality
    for _ in range(3):
        assert tel.feedback("r1", 0.0)["status"] == "duplicate"
    assert engine.stats[("chat", "a")].quality == quality and engine.stats[("chat", "a")].feedback_n == 1

    assert tel.feedback("r2", 1.0)["status"] == "pending"
    assert tel.feedback("r2", 0.0)["status"] == "duplicate", "also while the first waits"
    tel.observe_batch([parse(entry(backend="b", request_id="r2"))])
    assert engine.stats[("chat", "b")].feedback_n == 1 and engine.stats[("chat", "b")].quality > 0.5
    assert tel.feedback("r2", 0.0)["status"] == "duplicate"


def test_feedback_for_a_backend_since_removed_is_not_an_error() -> None:
    tel, engine, _ = telemetry()
    tel.observe_batch([parse(entry(backend="b", request_id="r1"))])
    engine.sync(parse_config(yaml.safe_dump({"pools": {"chat": {"backends": {"a": {"url": "http://127.0.0.1:9001"}}}}})))
    assert tel.feedback("r1", 0.5) == {"request_id": "r1", "status": "applied", "pool": "chat", "backend": "b",
                                       "quality": None}


def test_huge_client_request_ids_are_not_kept() -> None:
    tel, _, book = telemetry()
    big = "x" * 50_000
    tel.observe_batch([parse(entry(backend="a", request_id=big))])
    assert book.total()[("chat", "a")].requests == 1, "served and charged, only not indexed"
    assert tel.requests.lookup(big) is None and not tel.requests._served
