"""Alerts: the conditions as a pure function of hand-made inputs, and the Alerter's dedup, resolve, flap
guard, rate limit and bounded queue, driven by a fake clock (no real waiting)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controlplane.alerts import COOLDOWN_INTERVALS, Alerter, Condition, TokenBucket, WebhookError
from controlplane.config import Alerts, parse_config
from controlplane.controllers.alerting import AlertLoop, Inputs, NackView, evaluate, nacks_of, secret_values
from controlplane.controllers.budgets import BudgetController
from controlplane.controllers.reload import ConfigStatus
from controlplane.reconciler import Reconciler
from controlplane.scoring.budget import HOUR, BudgetVerdict
from controlplane.scoring.ledger import SpendBook
from controlplane.state import DesiredState
from controlplane.telemetry.envoy_hosts import ABSENT, DRAINING, EJECTED, FAILING, HEALTHY
from controlplane.telemetry.recent import Recent, Window
from controlplane.xds import typeurls
from controlplane.xds.server import AdsServer, Nack, NodeState, SnapshotCache, StreamState

T0 = datetime(2026, 3, 14, 10, tzinfo=UTC).timestamp()
HOOK = "http://127.0.0.1:9/hook"


class Clock:
    """Wall-clock seconds that move only when the code under test sleeps (or the test says so)."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds
        await asyncio.sleep(0)


class Hook:
    """A fake webhook: records (time, body); fails the first `fail` attempts."""

    def __init__(self, clock: Clock, fail: int = 0) -> None:
        self.clock, self.fail = clock, fail
        self.posts: list[tuple[float, dict[str, Any]]] = []
        self.attempts: list[float] = []

    async def __call__(self, url: str, timeout: float, body: bytes) -> None:
        assert url == HOOK
        self.attempts.append(self.clock())
        if self.fail:
            self.fail -= 1
            raise WebhookError("HTTP 503")
        self.posts.append((self.clock(), json.loads(body)))


class Settings:
    def __init__(self, **kw: Any) -> None:
        self.value = Alerts(**{"webhook": HOOK, "interval": timedelta(seconds=2), **kw})

    def __call__(self) -> Alerts:
        return self.value


def make(clock: Clock, hook: Hook | None = None, queue_limit: int = 1000, **settings: Any) -> Alerter:
    return Alerter(Settings(**settings), clock=clock, sleep=clock.sleep, post=hook or Hook(clock),
                   queue_limit=queue_limit)


def cond(kind: str = "backend_ejected", pool: str = "chat", backend: str | None = "a", **details: Any) -> Condition:
    key = ":".join(x for x in (kind, pool, backend) if x)
    return Condition(kind, key, f"{key} holds", pool, backend, details, f"{key} cleared")


def bodies(alerter: Alerter) -> list[dict[str, Any]]:
    """What waits in the queue (no loop runs in the synchronous tests), as the webhook would get it."""
    return [json.loads(e.body) for e in alerter._queue]


# -- dedup, resolve, hold, flap guard -------------------------------------------------------------------


def test_a_condition_fires_once_while_it_holds_and_resolves_once() -> None:
    clock = Clock()
    alerter = make(clock)
    for i in range(5):
        alerter.update([cond(share=i)], now=T0 + i)
    assert [b["event"] for b in bodies(alerter)] == ["firing"]
    assert alerter.active()[0]["details"] == {"share": 4}, "details follow the condition without a new event"
    alerter.update([], now=T0 + 10)
    alerter.update([], now=T0 + 11)
    firing, resolved = bodies(alerter)
    assert resolved["event"] == "resolved" and resolved["key"] == firing["key"] == "backend_ejected:chat:a"
    assert (firing["since"], resolved["since"], resolved["at"]) == (T0, T0, T0 + 10)
    assert resolved["duration_seconds"] == 10 and resolved["message"] == "backend_ejected:chat:a cleared"
    assert firing["severity"] == "warning" and firing["pool"] == "chat" and firing["backend"] == "a"
    assert firing["details"] == {"share": 0} and "share" not in firing
    assert alerter.active() == []
    assert (alerter.fired, alerter.resolved) == ({"backend_ejected": 1}, {"backend_ejected": 1})


def test_a_held_key_neither_resolves_nor_fires() -> None:
    alerter = make(Clock())
    alerter.update([cond()], now=T0)
    alerter.update([], hold={"backend_ejected:chat:a"}, now=T0 + 1)  # Envoy's view unknown for a moment
    assert [a["key"] for a in alerter.active()] == ["backend_ejected:chat:a"]
    alerter.update([], hold={"backend_ejected:chat:b"}, now=T0 + 2)
    assert alerter.active() == [] and [b["event"] for b in bodies(alerter)] == ["firing", "resolved"]


def test_flap_guard_holds_back_a_key_that_just_resolved() -> None:
    alerter = make(Clock())  # interval 2s: cooldown 10s
    cooldown = COOLDOWN_INTERVALS * 2
    alerter.update([cond()], now=T0)
    alerter.update([], now=T0 + 1)  # resolved at T0+1
    # Back and gone again within the cooldown: nothing at all is sent.
    alerter.update([cond()], now=T0 + 2)
    alerter.update([], now=T0 + 3)
    assert [b["event"] for b in bodies(alerter)] == ["firing", "resolved"]
    # Back and holding: fires once the cooldown after the resolve is over, with `since` when it came back.
    for t in range(4, 4 + cooldown):
        alerter.update([cond()], now=T0 + t)
    events = bodies(alerter)
    assert [b["event"] for b in events] == ["firing", "resolved", "firing"]
    assert events[-1]["at"] == T0 + 1 + cooldown and events[-1]["since"] == T0 + 4
    # Another key is not held back by this one's cooldown.
    alerter.update([cond(), cond(backend="b")], now=T0 + 14)
    assert bodies(alerter)[-1]["key"] == "backend_ejected:chat:b"


def test_no_webhook_tracks_and_logs_but_queues_nothing(caplog: pytest.LogCaptureFixture) -> None:
    alerter = make(Clock(), webhook=None)
    with caplog.at_level("INFO", logger="controlplane.alerts"):
        alerter.update([cond()], now=T0)
        assert alerter.active()[0]["delivery"] == "no_webhook"
        alerter.update([], now=T0 + 1)
    assert alerter.queued == 0 and alerter.fired == alerter.resolved == {"backend_ejected": 1}
    levels = [(r.levelname, r.getMessage().split(" ")[1]) for r in caplog.records]
    assert levels == [("WARNING", "FIRING"), ("INFO", "resolved")]


# -- the bounded queue ----------------------------------------------------------------------------------


def test_overflow_drops_the_oldest_firing_and_never_sends_its_resolve() -> None:
    alerter = make(Clock(), queue_limit=3)
    alerter.update([cond(backend="a")], now=T0)
    alerter.update([cond(backend="a"), cond(backend="b")], now=T0 + 1)
    alerter.update([cond(backend="b")], now=T0 + 2)  # a resolves: its resolve is queued
    assert [(b["event"], b["backend"]) for b in bodies(alerter)] == [("firing", "a"), ("firing", "b"), ("resolved", "a")]
    alerter.update([cond(backend="b"), cond(backend="c")], now=T0 + 3)  # full: a's firing goes, and its resolve
    assert [(b["event"], b["backend"]) for b in bodies(alerter)] == [("firing", "b"), ("firing", "c")]
    assert alerter.dropped == {"backend_ejected": 2}
    alerter.update([cond(backend="b"), cond(backend="c"), cond(backend="d")], now=T0 + 4)
    alerter.update([cond(backend="b"), cond(backend="c"), cond(backend="d"), cond(backend="e")], now=T0 + 5)
    assert [b["backend"] for b in bodies(alerter)] == ["c", "d", "e"]
    delivery = {a["backend"]: a["delivery"] for a in alerter.active()}
    assert delivery == {"b": "dropped", "c": "queued", "d": "queued", "e": "queued"}
    alerter.update([cond(backend="c"), cond(backend="d"), cond(backend="e")], now=T0 + 6)  # b clears
    assert "b" not in [b["backend"] for b in bodies(alerter)], "no resolve for a firing that was dropped"
    assert alerter.resolved == {"backend_ejected": 2} and alerter.counters()["dropped"] == {"backend_ejected": 3}


def test_overflow_of_resolves_only_drops_the_oldest_resolve() -> None:
    alerter = make(Clock(), queue_limit=2)
    alerter.update([cond(backend="a"), cond(backend="b")], now=T0)
    alerter._queue.clear()  # as if both firings went out
    alerter.update([], now=T0 + 1)
    alerter.update([cond(backend="c")], now=T0 + 2)
    assert [(b["event"], b["backend"]) for b in bodies(alerter)] == [("resolved", "b"), ("firing", "c")]


# -- delivery: rate limit, order, retries, stop ---------------------------------------------------------


def test_token_bucket_never_allows_more_than_max_per_minute_in_any_minute() -> None:
    for per_minute in (1, 2, 6, 30, 6000):
        bucket, now, taken = TokenBucket(), 0.0, []
        while len(taken) < 3 * per_minute + 5:
            wait = bucket.take(now, per_minute)
            if wait == 0:
                taken.append(now)
            else:
                now += wait
        for i in range(len(taken) - per_minute):
            assert taken[i + per_minute] - taken[i] >= 60 - 1e-6, (per_minute, i)
        assert taken[-1] <= 1.25 * 60 * len(taken) / per_minute, "and the allowance is used"


def test_events_go_out_in_order_as_tokens_refill() -> None:
    clock = Clock()
    hook = Hook(clock)
    alerter = make(clock, hook, max_per_minute=12)  # a burst of 2, then one every 60 / 11 s

    async def main() -> None:
        for i in range(10):
            alerter.update([cond(backend=f"b{j}") for j in range(i + 1)], now=clock())
        await alerter.drain()

    asyncio.run(main())
    assert [b["backend"] for _, b in hook.posts] == [f"b{j}" for j in range(10)]
    times = [t - T0 for t, _ in hook.posts]
    assert times[:2] == [0, 0] and times[2:] == pytest.approx([60 / 11 * k for k in range(1, 9)])
    assert alerter.sent == {"backend_ejected": 10} and alerter.queued == 0
    assert {a["delivery"] for a in alerter.active()} == {"sent"}


def test_a_failed_post_is_retried_with_backoff_each_attempt_taking_a_token() -> None:
    clock = Clock()
    hook = Hook(clock, fail=2)
    alerter = make(clock, hook, max_per_minute=6)  # a burst of 1, then one every 10 s

    async def main() -> None:
        alerter.update([cond()], now=clock())
        await alerter.drain()

    asyncio.run(main())
    assert [t - T0 for t in hook.attempts] == pytest.approx([0, 10, 20]), "the back-off is shorter than a token"
    assert alerter.sent == {"backend_ejected": 1} and alerter.failed == {}

    hook.fail = 3
    alerter.update([], now=clock())

    async def again() -> None:
        alerter._start_worker()
        await alerter.drain()

    asyncio.run(again())
    assert alerter.failed == {"backend_ejected": 1} and len(hook.attempts) == 6


def test_stop_sends_what_it_can_then_counts_the_rest_as_dropped() -> None:
    clock = Clock()
    hook = Hook(clock)
    real_sleep = asyncio.sleep

    async def slow_sleep(seconds: float) -> None:  # rate-limited: the stop's wait runs out first
        await real_sleep(0.05)
        clock.t += seconds

    alerter = Alerter(Settings(max_per_minute=6, timeout=timedelta(milliseconds=20)), clock=clock,
                      sleep=slow_sleep, post=hook)

    async def main() -> None:
        alerter.update([cond(backend="a"), cond(backend="b"), cond(backend="c")], now=clock())
        await alerter.drain()

    asyncio.run(main())
    assert [b["backend"] for _, b in hook.posts] == ["a"]
    assert alerter.dropped == {"backend_ejected": 2} and alerter.queued == 0


# -- one-shot events (budgets) --------------------------------------------------------------------------


def test_budget_events_keep_their_fields_and_exhaustion_resolves_when_its_window_ends() -> None:
    alerter = make(Clock())
    details = {"pool": "chat", "window": "hour", "spent": 5.0, "limit": 10.0, "action": None}
    alerter.send("budget_threshold", "half spent", threshold=0.5, **details)
    alerter.send("budget_exhausted", "all spent", threshold=1.0, **{**details, "action": "reject"})
    threshold, exhausted = bodies(alerter)
    assert threshold["key"] == "budget_threshold:chat:hour:0.5" and threshold["threshold"] == 0.5
    assert threshold["details"]["spent"] == threshold["spent"] == 5.0, "budget fields stay at the top level too"
    assert (exhausted["key"], exhausted["window"], exhausted["action"], exhausted["severity"]) == (
        "budget_exhausted:chat:hour", "hour", "reject", "critical")
    assert [a["key"] for a in alerter.active()] == ["budget_exhausted:chat:hour"], "thresholds are one-shot"
    alerter.update([], hold={"budget_exhausted:chat:hour"}, now=T0 + 1)  # still exhausted
    assert alerter.queued == 2
    alerter.update([], now=T0 + HOUR)  # the window rolled over
    resolved = bodies(alerter)[-1]
    assert resolved["event"] == "resolved" and resolved["key"] == "budget_exhausted:chat:hour"
    assert "within its hourly budget again" in resolved["message"]


def test_budget_controller_and_alert_loop_together() -> None:
    config = parse_config("""
pools:
  chat:
    budget: {hourly: 10, alert_thresholds: [0.5], on_exhausted: reject}
    backends: {a: {url: "http://127.0.0.1:9001"}}
""")
    clock = Clock()
    alerter = make(clock)
    book = SpendBook()
    budgets = BudgetController(book, alerter, Reconciler(SnapshotCache(), DesiredState(config=config)))
    book.add(T0 + 1, "chat", "a", "", 10, 10, 11.0)
    budgets.check(T0 + 2)

    def tick(now: float) -> None:
        verdict = evaluate(Inputs(config=config, hosts={}, window=lambda *_: Window(0, 0, None, None, None),
                                  budgets=budgets.verdict))
        alerter.update(verdict.conditions, verdict.hold, now)

    tick(T0 + 3)
    assert [(b["event"], b["kind"]) for b in bodies(alerter)] == [("firing", "budget_threshold"),
                                                                 ("firing", "budget_exhausted")]
    budgets.check(T0 + HOUR + 1)
    tick(T0 + HOUR + 2)
    assert [(b["event"], b["kind"]) for b in bodies(alerter)][-1] == ("resolved", "budget_exhausted")


def test_a_restart_never_resolves_an_exhaustion_it_did_not_send() -> None:
    alerter = make(Clock())
    alerter.update([], now=T0)  # the window that was exhausted before the restart rolled over
    assert alerter.queued == 0 and alerter.resolved == {}


# -- the conditions, from hand-made inputs --------------------------------------------------------------

CONFIG = parse_config("""
controlplane:
  api: {token: "${API_TOKEN}"}
pools:
  chat:
    alerts: {min_available: 0.6, max_error_rate: 0.2, max_p95_latency: 2s, min_requests: 10, window: 30s}
    backends:
      a: {url: "http://127.0.0.1:9001"}
      b: {url: "http://127.0.0.1:9002", api_key: "${B_KEY}"}
      c: {url: "http://127.0.0.1:9003", priority: 1}
""", env={"B_KEY": "sk-very-secret-key-123", "API_TOKEN": "t" * 32})
EMPTY = Window(0, 0, None, None, None)


def inputs(**kw: Any) -> Inputs:
    kw.setdefault("hosts", {("chat", b): HEALTHY for b in "abc"})
    kw.setdefault("window", lambda *_: EMPTY)
    return Inputs(config=CONFIG, **kw)


def keys(evaluation: Any) -> set[str]:
    return {c.key for c in evaluation.conditions}


def test_envoy_host_states_give_unhealthy_and_ejected() -> None:
    hosts = {("chat", "a"): FAILING, ("chat", "b"): EJECTED, ("chat", "c"): HEALTHY}
    ev = evaluate(inputs(hosts=hosts))
    assert keys(ev) == {"backend_unhealthy:chat:a", "backend_ejected:chat:b", "pool_availability:chat"}
    ejected = next(c for c in ev.conditions if c.kind == "backend_ejected")
    assert ejected.pool == "chat" and ejected.backend == "b" and ejected.details["url"] == "http://127.0.0.1:9002"
    assert "outlier detection" in ejected.message
    # Ejected, then failing its checks too (Envoy shows the worse reason): still ejected until routable again.
    ev = evaluate(inputs(hosts={**hosts, ("chat", "b"): FAILING}, active={"backend_ejected:chat:b"}))
    assert {"backend_unhealthy:chat:b", "backend_ejected:chat:b"} <= keys(ev)
    assert "backend_ejected:chat:a" not in keys(ev), "failing without an ejection first is only unhealthy"


def test_unknown_envoy_view_holds_backend_alerts() -> None:
    ev = evaluate(inputs(hosts={}))
    assert ev.conditions == ()
    assert {"backend_ejected:chat:a", "backend_unhealthy:chat:c", "pool_availability:chat"} <= ev.hold


def test_pool_availability_counts_the_hosts_envoy_lists() -> None:
    def availability(**states: str) -> Any:
        ev = evaluate(inputs(hosts={("chat", b): s for b, s in states.items()}))
        return next((c for c in ev.conditions if c.kind == "pool_availability"), None), ev.hold

    fired, _ = availability(a=HEALTHY, b=EJECTED, c=FAILING)
    assert fired is not None and fired.details["available"] == 1 and fired.details["listed"] == 3
    assert fired.severity == "critical" and "1 of 3" in fired.message
    assert availability(a=HEALTHY, b=HEALTHY, c=FAILING)[0] is None, "2 of 3 is over 0.6"
    fired, _ = availability(a=HEALTHY, b=DRAINING, c=FAILING)
    assert fired is not None and fired.details["listed"] == 2, "a drained host is the operator's choice"
    assert availability(a=HEALTHY, b=ABSENT, c=ABSENT)[0] is None
    fired, hold = availability(a=ABSENT, b=ABSENT, c=ABSENT)  # Envoy has not got the cluster yet
    assert fired is None and "pool_availability:chat" in hold
    fired, hold = availability(a=FAILING, b=FAILING)  # c not read yet
    assert fired is None and "pool_availability:chat" in hold


def test_error_rate_and_p95_need_enough_requests() -> None:
    windows = {"a": Window(10, 3, 0.1, 0.5, 0.6), "b": Window(9, 9, 0.1, 5.0, 6.0), "c": Window(40, 0, 1.0, 2.5, 3.0)}
    ev = evaluate(inputs(window=lambda pool, backend, seconds: windows[backend]))
    assert keys(ev) == {"error_rate:chat:a", "latency_p95:chat:c"}
    rate = next(c for c in ev.conditions if c.kind == "error_rate")
    assert rate.details["error_rate"] == 0.3 and rate.details["window_seconds"] == 30 and "30%" in rate.message
    p95 = next(c for c in ev.conditions if c.kind == "latency_p95")
    assert p95.details["p95_seconds"] == 2.5 and p95.details["threshold_seconds"] == 2.0
    assert {"error_rate:chat:b", "latency_p95:chat:b"} <= ev.hold, "9 requests: not judged, not cleared"
    idle = evaluate(inputs())
    assert idle.conditions == () and not any(k.startswith(("error_rate", "latency")) for k in idle.hold), \
        "no requests at all in the window: nothing failing to report"
    exact = evaluate(inputs(window=lambda *_: Window(10, 2, 0.1, 2.0, 2.0)))
    assert exact.conditions == (), "at the thresholds is not over them"


def test_envoy_nack_and_config_rejected_never_show_a_secret() -> None:
    key = "sk-very-secret-key-123"
    nack = NackView("envoy-1", "CDS", "v2", f"Proto constraint validation failed: header value 'Bearer {key}'")
    ev = evaluate(inputs(nacks=[nack], config_errors=["c.yaml:3: pool 'chat', field 'weight': bad", "second"],
                         config_path="c.yaml", rejected_edits=4, secrets=secret_values(CONFIG)))
    by_kind = {c.kind: c for c in ev.conditions}
    assert by_kind["envoy_nack"].key == "envoy_nack:envoy-1:CDS"
    assert by_kind["envoy_nack"].details["version"] == "v2" and by_kind["envoy_nack"].pool is None
    rejected = by_kind["config_rejected"]
    assert rejected.key == "config_rejected" and rejected.details["errors"][1] == "second"
    assert rejected.details["rejected_edits"] == 4 and "(and 1 more)" in rejected.message
    alerter = make(Clock())
    alerter.update(ev.conditions, now=T0)
    text = json.dumps(bodies(alerter)) + json.dumps(alerter.active())
    assert key not in text and "t" * 32 not in text and "[redacted]" in text


def test_secret_values_finds_every_key_and_token() -> None:
    assert secret_values(CONFIG) == {"sk-very-secret-key-123", "t" * 32}


def test_the_loop_reads_live_state_and_nacks_of_connected_envoys_only() -> None:
    ads = AdsServer(SnapshotCache())
    stream = StreamState(1, T0, nacked={typeurls.CLUSTER: Nack("v9", "bad cluster", T0)})
    ads._nodes["up"] = NodeState("up", open_streams={1: stream})
    ads._nodes["gone"] = NodeState("gone", last_closed=StreamState(2, T0, nacked={typeurls.ROUTE: Nack("v1", "x", T0)}))
    assert nacks_of(ads) == [NackView("up", "CDS", "v9", "bad cluster")]
    recent = Recent()
    for i in range(20):
        recent.observe(T0 - 1, "chat", "a", 503 if i % 2 else 200, not i % 2, 0.1)
    status = ConfigStatus(path=__import__("pathlib").Path("c.yaml"), digest="x")
    hosts = {("chat", "a"): EJECTED, ("chat", "b"): HEALTHY, ("chat", "c"): HEALTHY}
    clock = Clock()
    alerter = make(clock)
    loop = AlertLoop(alerter, lambda: CONFIG, lambda: hosts, recent, ads, lambda: status, BudgetVerdict,
                     clock=clock)
    loop.check()
    assert {a["key"] for a in alerter.active()} == {"backend_ejected:chat:a", "error_rate:chat:a",
                                                    "envoy_nack:up:CDS"}
    status.errors = ["c.yaml: bad"]
    hosts[("chat", "a")] = HEALTHY
    stream.nacked.clear()
    clock.t += 1
    loop.check()
    assert {a["key"] for a in alerter.active()} == {"error_rate:chat:a", "config_rejected"}
    assert [b["key"] for b in bodies(alerter) if b["event"] == "resolved"] == ["backend_ejected:chat:a",
                                                                              "envoy_nack:up:CDS"]
