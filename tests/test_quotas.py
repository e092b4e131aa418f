"""Backend quotas: the cap on shares, the pool's measured rate, and a 429's Retry-After taking a backend out."""

from __future__ import annotations

import asyncio
import textwrap
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from controlplane.config import Config, parse_config
from controlplane.controllers.quotas import MAX_COOLING, Cooling, in_rotation, retry_after_seconds
from controlplane.controllers.scoring import ScoringLoop
from controlplane.reconciler import Reconciler, build
from controlplane.scoring.engine import QUOTA_TARGET, Engine
from controlplane.scoring.stats import RateWindow
from controlplane.scoring.weights import cap_shares
from controlplane.state import Cooldown, DesiredState
from controlplane.telemetry.accesslog import parse, parse_attempt
from controlplane.xds import typeurls
from controlplane.xds.server import SnapshotCache

from .loop_fakes import Budgets, Requests
from .test_accesslog import entry
from .test_telemetry_bounds import telemetry

ADDRESSES = {"127.0.0.1": "127.0.0.1"}


def make_config(backends: str, strategy: str = "weighted", extra: str = "") -> Config:
    return parse_config(f"""
pools:
  chat:
    strategy: {strategy}
{textwrap.indent(textwrap.dedent(extra).strip(), "    ") if extra.strip() else ""}
    backends:
{textwrap.indent(textwrap.dedent(backends).strip(), "      ")}
""")


THREE = """
  a: {url: "http://127.0.0.1:9001", max_requests_per_minute: 60}
  b: {url: "http://127.0.0.1:9002"}
  c: {url: "http://127.0.0.1:9003"}
"""


def engine_for(config: Config) -> Engine:
    engine = Engine()
    engine.sync(config)
    return engine


def traffic(engine: Engine, per_round: int, rounds: int, start: float = 0.0, interval: float = 2.0,
            tokens: tuple[int, int] = (0, 0), pool: str = "chat") -> float:
    """`per_round` requests spread over the pool's backends every `interval` seconds, each round recomputed."""
    names = list(engine.config.pools[pool].backends)
    t = start
    engine.recompute(pools=frozenset({pool}), now=t)  # starts the clock
    for _ in range(rounds):
        for i in range(per_round):
            engine.observe_request(pool, names[i % len(names)], True, 50.0, *tokens)
        t += interval
        engine.recompute(pools=frozenset({pool}), now=t)
    return t


# -- the cap ----------------------------------------------------------------------------------------------

def test_a_capped_backend_gives_its_overflow_to_the_others_in_proportion() -> None:
    result = cap_shares({"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 0.2})
    assert result.feasible and result.binding == {"a"}
    assert result.shares == pytest.approx({"a": 0.2, "b": 0.48, "c": 0.32})  # 0.3 more, split 3:2


def test_overflow_that_pushes_another_over_its_cap_moves_on_again() -> None:
    result = cap_shares({"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 0.2, "b": 0.4})
    assert result.feasible and result.binding == {"a", "b"}
    assert result.shares == pytest.approx({"a": 0.2, "b": 0.4, "c": 0.4})
    assert sum(result.shares.values()) == pytest.approx(1.0)


def test_when_every_backend_is_capped_the_shares_stay_as_given() -> None:
    shares = {"a": 0.6, "b": 0.4}
    result = cap_shares(shares, {"a": 0.3, "b": 0.5})  # room for 80% of the traffic at most
    assert not result.feasible and result.shares == shares and result.binding == frozenset()


def test_a_backend_with_no_share_takes_no_overflow() -> None:
    assert not cap_shares({"a": 1.0, "b": 0.0}, {"a": 0.5}).feasible
    result = cap_shares({"a": 0.9, "b": 0.1, "c": 0.0}, {"a": 0.5})
    assert result.shares == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.0})


def test_caps_that_do_not_bind_change_nothing() -> None:
    result = cap_shares({"a": 0.25, "b": 0.75}, {"a": 0.3})
    assert result.feasible and result.binding == frozenset()
    assert result.shares == pytest.approx({"a": 0.25, "b": 0.75})


# -- the pool's rate ----------------------------------------------------------------------------------------

def test_the_first_roll_starts_the_clock_and_the_rate_is_unknown_below_the_minimum() -> None:
    window = RateWindow()
    window.roll(0.0, {"a": (100, 0)})  # counted before the clock started: unknown span, dropped
    assert window.rate is None
    window.roll(2.0, {"a": (3, 0)})
    assert window.rate is None, "3 requests: too few to cap on"
    window.roll(4.0, {"a": (10, 0)})
    assert window.rate is not None and window.rate.rpm == pytest.approx(300.0)  # the first bucket left out


def test_a_surge_is_seen_within_a_round_and_a_lull_relaxes_slowly() -> None:
    window = RateWindow()
    window.roll(0.0, {})
    t = 0.0
    for _ in range(8):  # 60 rpm for 16 s
        t += 2
        window.roll(t, {"a": (2, 0)})
    assert window.rate is not None and window.rate.rpm == pytest.approx(60.0)
    t += 2
    window.roll(t, {"a": (10, 0), "b": (0, 0)})  # 300 rpm now
    assert window.rate.rpm >= 180.0, "the latest 4 s count: a surge caps at once"
    for _ in range(2):
        t += 2
        window.roll(t, {"a": (10, 0)})
    assert window.rate.rpm == pytest.approx(300.0)
    t += 2
    window.roll(t, {"a": (2, 0)})  # back to 60 rpm: the 15 s window still remembers the surge
    assert window.rate.rpm > 150.0
    for _ in range(8):
        t += 2
        window.roll(t, {"a": (2, 0)})
    assert window.rate.rpm == pytest.approx(60.0)


def test_a_full_quiet_window_is_a_known_zero_and_old_buckets_go() -> None:
    window = RateWindow()
    for t in range(0, 20, 2):
        window.roll(float(t), {})
    assert window.rate is not None and window.rate.rpm == 0.0
    window.roll(20.0, {"a": (1, 0)})
    assert window.rate is not None and window.rate.rpm == pytest.approx(30.0)  # a full window: known, if small
    assert window.rate.per_backend == {"a": pytest.approx(30.0)}


# -- the engine -----------------------------------------------------------------------------------------------

def test_no_cap_before_the_pool_rate_is_known() -> None:
    engine = engine_for(make_config(THREE))
    engine.recompute(now=0.0)
    assert engine.weights()["chat"] == {"a": 1, "b": 1, "c": 1}, "static weights, as the operator wrote them"
    explained = engine.explain("chat")
    assert explained["traffic"]["known"] is False
    assert explained["backends"]["a"]["quota"] == {
        "max_requests_per_minute": 60, "max_tokens_per_minute": None, "max_share": None, "projected_rpm": None,
        "projected_tpm": None, "observed_rpm": None, "binding": False, "tier_over_quota": False}
    assert explained["backends"]["b"]["quota"] is None


def test_a_static_strategy_is_capped_once_traffic_shows_the_quota_would_be_passed() -> None:
    engine = engine_for(make_config(THREE))
    traffic(engine, per_round=10, rounds=1)  # 5 rps = 300 rpm
    cap = QUOTA_TARGET * 60 / 300
    assert engine.weights()["chat"] == {"a": round(cap * 1000), "b": 410, "c": 410}
    explained = engine.explain("chat")
    quota = explained["backends"]["a"]["quota"]
    assert quota["binding"] is True and quota["max_share"] == pytest.approx(cap)
    assert quota["projected_rpm"] == pytest.approx(54.0)
    assert "capped at 18.0%" in explained["backends"]["a"]["reason"]
    assert "60 requests/min" in explained["backends"]["a"]["reason"]
    assert "traffic of backends at their quota" in explained["backends"]["b"]["reason"]
    assert explained["traffic"]["known"] is True and explained["traffic"]["rpm"] == pytest.approx(300.0)


def test_round_robin_and_a_telemetry_strategy_are_capped_too() -> None:
    for strategy in ("round_robin", "health_aware", "cost_optimized"):
        engine = engine_for(make_config(THREE, strategy))
        traffic(engine, per_round=20, rounds=2)  # 600 rpm
        w = engine.weights()["chat"]
        share = w["a"] / sum(w.values())
        assert share == pytest.approx(QUOTA_TARGET * 60 / 600, abs=0.002), (strategy, w)
        assert w["b"] == pytest.approx(w["c"], abs=2)


def test_the_cap_lifts_when_the_traffic_drops() -> None:
    engine = engine_for(make_config(THREE))
    t = traffic(engine, per_round=10, rounds=2)
    assert engine.pools["chat"].binding == {"a"}
    traffic(engine, per_round=2, rounds=9, start=t)  # 60 rpm: a third of it is 20 rpm, far under the quota
    assert engine.pools["chat"].binding == frozenset()
    assert engine.weights()["chat"] == {"a": 1, "b": 1, "c": 1}


def test_a_tokens_quota_caps_by_the_pool_token_rate() -> None:
    backends = """
      a: {url: "http://127.0.0.1:9001", max_tokens_per_minute: 6000}
      b: {url: "http://127.0.0.1:9002"}
    """
    engine = engine_for(make_config(backends))
    traffic(engine, per_round=5, rounds=2, tokens=(60, 20))  # 150 rpm x 80 tokens = 12,000 tpm
    w = engine.weights()["chat"]
    assert w["a"] / sum(w.values()) == pytest.approx(QUOTA_TARGET * 6000 / 12000, abs=0.002)
    quota = engine.explain("chat")["backends"]["a"]["quota"]
    assert quota["binding"] and quota["projected_tpm"] == pytest.approx(0.45 * 12000, rel=0.01)
    assert "6000 tokens/min" in engine.explain("chat")["backends"]["a"]["reason"]


def test_failed_requests_count_for_the_rate_but_not_for_tokens() -> None:
    backends = """
      a: {url: "http://127.0.0.1:9001", max_tokens_per_minute: 6000}
      b: {url: "http://127.0.0.1:9002"}
    """
    engine = engine_for(make_config(backends))
    engine.recompute(now=0.0)
    for _ in range(10):
        engine.observe_request("chat", "b", False, 10.0, 1000, 1000)  # a 429: nothing served, nothing counted
    engine.recompute(now=2.0)
    rate = engine.pools["chat"].window.rate
    assert rate is not None and rate.rpm == pytest.approx(300.0) and rate.tpm == 0.0


def test_when_every_backend_is_at_its_quota_the_strategy_shares_stay_and_explain_says_so() -> None:
    backends = """
      a: {url: "http://127.0.0.1:9001", max_requests_per_minute: 60}
      b: {url: "http://127.0.0.1:9002", max_requests_per_minute: 60}
    """
    engine = engine_for(make_config(backends))
    traffic(engine, per_round=10, rounds=1)  # 300 rpm into 2 x 60
    assert engine.weights()["chat"] == {"a": 1, "b": 1}
    explained = engine.explain("chat")
    assert explained["traffic"]["over_quota_tiers"] == [0]
    for name in ("a", "b"):
        assert explained["backends"][name]["quota"]["tier_over_quota"] is True
        assert explained["backends"][name]["quota"]["binding"] is False
        assert "cannot hold" in explained["backends"][name]["reason"]


def test_the_overflow_stays_in_the_tier_and_a_lone_capped_backend_is_noted() -> None:
    backends = """
      a: {url: "http://127.0.0.1:9001", max_requests_per_minute: 60}
      b: {url: "http://127.0.0.1:9002", priority: 1}
    """
    engine = engine_for(make_config(backends))
    traffic(engine, per_round=10, rounds=1)
    assert engine.weights()["chat"] == {"a": 1, "b": 1}  # weights cannot move traffic across tiers
    assert engine.explain("chat")["traffic"]["over_quota_tiers"] == [0]


def test_backends_out_of_rotation_take_no_overflow() -> None:
    engine = engine_for(make_config(THREE))
    engine.set_rotation(frozenset({("chat", "c")}), {})
    traffic(engine, per_round=10, rounds=1)
    w = engine.weights()["chat"]
    in_rotation = w["a"] + w["b"]  # Envoy sends c nothing: a's share is of a and b only
    assert w["a"] / in_rotation == pytest.approx(QUOTA_TARGET * 60 / 300, abs=0.002)


def test_a_tightening_cap_goes_out_past_hysteresis_a_loosening_one_waits() -> None:
    engine = engine_for(make_config(THREE, "health_aware", extra="scoring: {hysteresis: 0.1}"))
    t = traffic(engine, per_round=10, rounds=8)
    before = engine.weights()["chat"]["a"]
    t = traffic(engine, per_round=12, rounds=2, start=t)  # 360 rpm: cap 0.15 instead of 0.18
    assert engine.weights()["chat"]["a"] < before * 0.9
    tightened = engine.weights()["chat"]["a"]
    traffic(engine, per_round=11, rounds=8, start=t)  # 330 rpm: a looser cap, within hysteresis
    assert engine.weights()["chat"]["a"] == tightened


def test_a_reload_between_rounds_keeps_the_measured_rate() -> None:
    engine = engine_for(make_config(THREE))
    traffic(engine, per_round=10, rounds=2)
    edited = make_config(THREE.replace("max_requests_per_minute: 60", "max_requests_per_minute: 30"))
    engine.sync(edited)
    engine.recompute()  # as the reloader does: no clock
    w = engine.weights()["chat"]
    assert w["a"] / sum(w.values()) == pytest.approx(QUOTA_TARGET * 30 / 300, abs=0.002)


# -- Retry-After ----------------------------------------------------------------------------------------------

NOW = 1_700_000_000.0


@pytest.mark.parametrize(("raw", "seconds"), [
    ("3", 3.0), (" 120 ", 120.0), ("1.5", 1.5), ("0", None), ("0.0", None),
    ("301", MAX_COOLING), ("99999999", MAX_COOLING),
    ("-5", None), ("1e3", None), ("", None), ("soon", None), ("3 s", None), ("nan", None), ("inf", None),
    (format_datetime(datetime.fromtimestamp(NOW + 42, UTC), usegmt=True), 42.0),
    (format_datetime(datetime.fromtimestamp(NOW - 42, UTC), usegmt=True), None),  # already past
    (format_datetime(datetime.fromtimestamp(NOW + 3600, UTC), usegmt=True), MAX_COOLING),
    ("Tue, 14 Nov 2023 22:13:30 -0000", 10.0),  # no zone: GMT, as HTTP dates are
    ("Tue, 14 Nov 2023 22:13:30 +0100", None),  # an hour earlier in UTC: past
    ("Sun, 99 Foo 2023 99:99:99 GMT", None),
])
def test_retry_after_seconds(raw: str, seconds: float | None) -> None:
    assert retry_after_seconds(raw, NOW) == (pytest.approx(seconds) if seconds is not None else None)


# -- cooling ----------------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def cooling_for(config: Config, **state: object) -> tuple[Cooling, Reconciler, Clock]:
    reconciler = Reconciler(SnapshotCache(), DesiredState(config=config, addresses=ADDRESSES).replace(**state))
    clock = Clock()
    return Cooling(reconciler, clock=clock), reconciler, clock


def endpoint_health(state: DesiredState) -> dict[str, str]:
    cla = build(state).resources[typeurls.ENDPOINT]["chat"]
    return {e.metadata.filter_metadata["llm_lb"]["backend"]: type(e).DESCRIPTOR.fields_by_name[
        "health_status"].enum_type.values_by_number[e.health_status].name
        for loc in cla.endpoints for e in loc.lb_endpoints}


def test_a_429_with_retry_after_drains_the_backend_until_then() -> None:
    cooling, reconciler, clock = cooling_for(make_config(THREE))
    assert cooling.observe("chat", "a", "3")
    cooldown = reconciler.state.cooling[("chat", "a")]
    assert cooldown == Cooldown(NOW + 3, NOW, "3")
    assert endpoint_health(reconciler.state) == {"a": "DRAINING", "b": "UNKNOWN", "c": "UNKNOWN"}
    assert in_rotation(reconciler.state, "chat") == ["b", "c"]
    clock.now += 2.9
    assert not cooling.expire()
    clock.now += 0.2
    assert cooling.expire()
    assert dict(reconciler.state.cooling) == {}
    assert endpoint_health(reconciler.state) == {"a": "UNKNOWN", "b": "UNKNOWN", "c": "UNKNOWN"}


def test_a_later_retry_after_extends_and_an_earlier_one_changes_nothing() -> None:
    cooling, reconciler, clock = cooling_for(make_config(THREE))
    cooling.observe("chat", "a", "10")
    clock.now += 1
    assert not cooling.observe("chat", "a", "5")  # ends before the current one
    assert cooling.observe("chat", "a", "20")
    assert reconciler.state.cooling[("chat", "a")] == Cooldown(NOW + 21, NOW, "20")
    assert cooling.cooled == 1


def test_the_last_backend_in_rotation_is_never_cooled() -> None:
    cooling, reconciler, _ = cooling_for(make_config(THREE), drained=frozenset({("chat", "c")}))
    assert cooling.observe("chat", "b", "30")
    assert not cooling.observe("chat", "a", "30"), "b cooling and c drained: a is all the pool has"
    assert cooling.kept == 1 and set(reconciler.state.cooling) == {("chat", "b")}
    scored_out, _, _ = cooling_for(make_config(THREE), weights={"chat": {"a": 500, "b": 500, "c": 0}})
    assert scored_out.observe("chat", "a", "30")
    assert not scored_out.observe("chat", "b", "30"), "c is scored out of EDS: b is the last"


def test_garbage_and_unknown_backends_cool_nothing() -> None:
    cooling, reconciler, _ = cooling_for(make_config(THREE))
    assert not cooling.observe("chat", "a", "tomorrow")
    assert not cooling.observe("chat", "nope", "3")
    assert not cooling.observe("other", "a", "3")
    assert cooling.ignored == 1 and dict(reconciler.state.cooling) == {}


def test_a_drain_of_the_rest_brings_cooling_backends_back_early() -> None:
    cooling, reconciler, _ = cooling_for(make_config(THREE))
    cooling.observe("chat", "a", "60")
    reconciler.propose(drained=frozenset({("chat", "b"), ("chat", "c")}))  # an operator drains the rest
    assert cooling.expire()
    assert dict(reconciler.state.cooling) == {}


def test_a_reload_that_removes_a_cooling_backend_forgets_it() -> None:
    cooling, reconciler, _ = cooling_for(make_config(THREE))
    cooling.observe("chat", "a", "60")
    reconciler.propose(config=make_config(THREE.replace('a: {url: "http://127.0.0.1:9001", '
                                                        'max_requests_per_minute: 60}', "")))
    assert cooling.expire() and dict(reconciler.state.cooling) == {}


def test_cooling_rebuilds_only_endpoints() -> None:
    first = DesiredState(config=make_config(THREE), addresses=ADDRESSES)
    before = build(first)
    second = first.replace(cooling={("chat", "a"): Cooldown(NOW + 3, NOW, "3")})
    after = build(second, before, first)
    assert second.changed(first) == {"cooling"}
    for t in (typeurls.CLUSTER, typeurls.LISTENER, typeurls.ROUTE):
        assert after.version(t) == before.version(t)
    assert after.version(typeurls.ENDPOINT) != before.version(typeurls.ENDPOINT)
    assert build(second).versions == after.versions
    longer = second.replace(cooling={("chat", "a"): Cooldown(NOW + 9, NOW, "9")})
    assert build(longer, after, second).version(typeurls.ENDPOINT) == after.version(typeurls.ENDPOINT)


def test_the_access_log_hook_sees_a_429_with_retry_after_only() -> None:
    """From the attempts log: a 429 Envoy retried elsewhere is seen (the request's entry cools nothing)."""
    tel, _, _ = telemetry()
    seen: list[tuple[str, str, str]] = []
    tel.rate_limited = lambda *args: seen.append(args)
    limited = entry(status=429, backend="a")
    limited.response.response_headers["retry-after"] = "3"
    plain_429 = entry(status=429, backend="b")
    served = entry(status=200, backend="b")
    served.response.response_headers["retry-after"] = "3"
    assert tel.observe_attempts([parse_attempt(e) for e in (limited, plain_429, served)]) == 0
    assert seen == [("chat", "a", "3")]
    assert tel.observe_batch([parse(e) for e in (limited, plain_429, served)]) == 0
    assert seen == [("chat", "a", "3")], "the request's entry: counted from its attempt's"


def test_explain_shows_cooling_and_the_scoring_loop_rescores_at_once() -> None:
    config = make_config(THREE)
    engine = engine_for(config)
    reconciler = Reconciler(SnapshotCache(), DesiredState(config=config, addresses=ADDRESSES))

    loop = ScoringLoop(engine, Budgets(), Requests(), reconciler, clock=lambda: 0.0)  # type: ignore[arg-type]
    loop.start()  # the pool's rate is measured from here
    loop.step(0.0)
    for _ in range(10):
        engine.observe_request("chat", "b", True, 10.0)
    loop.step(2.1)  # due: rolls the window (10 requests in 2.1 s)
    assert engine.pools["chat"].binding == {"a"}
    reconciler.propose(cooling={("chat", "c"): Cooldown(NOW + 3, NOW, "3")})
    loop.step(2.2)  # not due, but c left rotation: a's cap is now shared with b alone
    w = reconciler.state.weights["chat"]
    assert w["a"] / (w["a"] + w["b"]) == pytest.approx(QUOTA_TARGET * 60 / (10 * 60 / 2.2), abs=0.003)  # 10 in 2.2 s
    explained = engine.explain("chat")["backends"]["c"]
    assert explained["cooling"] == {"until": NOW + 3, "since": NOW, "retry_after": "3"}
    assert explained["reason"].startswith("cooling: answered 429 with Retry-After '3'")


def test_the_cooling_timer_runs() -> None:
    async def scenario() -> None:
        cooling, reconciler, clock = cooling_for(make_config(THREE))
        cooling.tick = 0.01
        cooling.observe("chat", "a", "1")
        task = asyncio.create_task(cooling.run())
        clock.now += 1.5
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not reconciler.state.cooling:
                break
        task.cancel()
        assert dict(reconciler.state.cooling) == {}

    asyncio.run(scenario())
