"""The scoring engine and per-backend stats: observations in, smoothed integer weights out."""

from __future__ import annotations

import json
import random
import textwrap

import pytest

from controlplane.config import Config, parse_config
from controlplane.scoring.engine import WEIGHT_SCALE, Engine, request_cost, to_weights
from controlplane.scoring.stats import ERROR_ALPHA, LATENCY_ALPHA, QUALITY_DECAY, BackendStats


def make_config(strategy: str = "weighted", scoring: str = "{}", extra: str = "", backends: str | None = None,
                env: dict[str, str] | None = None) -> Config:
    backends = backends or """
      a: {url: "http://127.0.0.1:9001", weight: 3, quality: 0.8, cost: {input_per_1k: 0.1, output_per_1k: 0.2}}
      b: {url: "http://127.0.0.1:9002", weight: 1, quality: 0.6, cost: {input_per_1k: 1.0, output_per_1k: 2.0}}
    """
    text = f"""
pools:
  chat:
    strategy: {strategy}
    scoring: {scoring}
{textwrap.indent(extra.strip(), "    ") if extra.strip() else ""}
    backends:
{textwrap.indent(textwrap.dedent(backends).strip(), "      ")}
"""
    return parse_config(text, env=env or {})


def engine_for(config: Config) -> Engine:
    engine = Engine()
    engine.sync(config)
    return engine


# -- BackendStats --------------------------------------------------------------------------------

def test_latency_ewma_starts_at_first_sample_then_moves_by_alpha() -> None:
    st = BackendStats(prior_quality=0.5, prior_weight=10)
    assert st.latency_ms is None and st.p95_ms is None
    st.observe(True, 100.0)
    assert st.latency_ewma_ms == 100.0
    st.observe(True, 200.0)
    assert st.latency_ewma_ms == pytest.approx(100.0 + LATENCY_ALPHA * 100.0)
    assert LATENCY_ALPHA == 0.1 and st.latency_ewma_ms == pytest.approx(110.0)


def test_failed_requests_count_as_errors_but_not_latency() -> None:
    st = BackendStats(prior_quality=0.5, prior_weight=10)
    st.observe(True, 100.0)
    st.observe(False, 99999.0)
    assert st.requests == 2 and st.errors == 1
    assert st.latency_ewma_ms == 100.0 and st.p95_ms == 100.0
    assert st.error_ewma == pytest.approx(ERROR_ALPHA)
    st.observe(False, 1.0)
    assert st.error_ewma == pytest.approx(1 - (1 - ERROR_ALPHA) ** 2)
    st.observe(True, 100.0)
    assert st.error_ewma == pytest.approx((1 - (1 - ERROR_ALPHA) ** 2) * (1 - ERROR_ALPHA))


def test_latency_falls_back_to_expected() -> None:
    st = BackendStats(prior_quality=0.5, prior_weight=10, expected_latency_ms=750.0)
    assert st.latency_ms == 750.0
    st.observe(True, 300.0)
    assert st.latency_ms == 300.0


@pytest.mark.parametrize(
    ("samples", "p95"),
    [
        pytest.param([42.0], 42.0, id="one"),
        pytest.param([float(i) for i in range(1, 101)], 95.0, id="1..100"),
        pytest.param([float(i) for i in range(20, 0, -1)], 19.0, id="20..1-reversed"),
        pytest.param([10.0] * 9 + [1000.0], 1000.0, id="ten-with-outlier"),
    ],
)
def test_p95(samples: list[float], p95: float) -> None:
    st = BackendStats(prior_quality=0.5, prior_weight=10)
    for s in samples:
        st.observe(True, s)
    assert st.p95_ms == p95


def test_p95_keeps_only_the_last_256_latencies() -> None:
    st = BackendStats(prior_quality=0.5, prior_weight=10)
    for _ in range(300):
        st.observe(True, 10_000.0)
    for _ in range(256):
        st.observe(True, 5.0)
    assert st.p95_ms == 5.0


def test_tokens_and_cost_accumulate() -> None:
    st = BackendStats(prior_quality=0.5, prior_weight=10)
    st.observe(True, 1.0, 100, 50, 0.25)
    st.observe(True, 1.0, 10, 5, 0.5)
    assert (st.prompt_tokens, st.completion_tokens, st.cost) == (110, 55, pytest.approx(0.75))


def discounted_mean(prior: float, weight: float, scores: list[float]) -> float:
    total = count = 0.0
    for s in scores:
        total = total * QUALITY_DECAY + s
        count = count * QUALITY_DECAY + 1.0
    return (prior * weight + total) / (weight + count)


@pytest.mark.parametrize(
    ("prior", "weight", "scores", "expected"),
    [
        pytest.param(0.5, 10, [], 0.5, id="prior-only"),
        pytest.param(0.5, 10, [1.0], 6 / 11, id="one-rating-counts-as-one"),
        pytest.param(0.8, 2, [0.2, 0.2], (1.6 + 0.2 * 0.99 + 0.2) / (2 + 1.99), id="two-ratings-first-faded"),
        pytest.param(0.5, 10, [1.0] * 10, discounted_mean(0.5, 10, [1.0] * 10), id="ten-perfect"),
        pytest.param(0.9, 1, [0.0] * 99, discounted_mean(0.9, 1, [0.0] * 99), id="evidence-dominates"),
    ],
)
def test_quality_is_the_posterior_mean_with_prior_pseudo_counts(prior, weight, scores, expected) -> None:
    st = BackendStats(prior_quality=prior, prior_weight=weight)
    for s in scores:
        st.observe_feedback(s)
    assert st.quality == pytest.approx(expected)
    assert st.feedback_n == len(scores)


def test_quality_follows_a_drop_recent_ratings_count_most() -> None:
    assert 0.9 <= QUALITY_DECAY < 1.0
    st = BackendStats(prior_quality=0.5, prior_weight=10)
    for _ in range(10):
        st.observe_feedback(1.0)
    assert 0.5 < st.quality < 0.75  # ten perfect ratings pull it most of the way to halfway
    for _ in range(10):
        st.observe_feedback(0.0)
    # equal numbers of 1s and 0s: the later 0s weigh more, so below the prior
    assert st.quality < 0.5
    for _ in range(2000):
        st.observe_feedback(0.2)
    # long run: the estimate sits near the recent ratings, the prior only a small pull
    assert st.quality == pytest.approx((0.5 * 10 + 0.2 / (1 - QUALITY_DECAY)) / (10 + 1 / (1 - QUALITY_DECAY)))
    assert st.quality < 0.3


def test_reward_posterior_is_discounted() -> None:
    st = BackendStats(prior_quality=0.5, prior_weight=10)
    st.observe_reward(1.0, decay=1.0)
    assert (st.reward_alpha, st.reward_beta) == (2.0, 1.0)
    st.observe_reward(0.25, decay=0.5)
    # alpha: 1 + (2-1)*0.5 + 0.25; beta: 1 + 0*0.5 + 0.75
    assert (st.reward_alpha, st.reward_beta) == pytest.approx((1.75, 1.75))
    for _ in range(2000):
        st.observe_reward(1.0, decay=0.9)
    # Old evidence fades: alpha converges to 1 + 1/(1-0.9), beta back to its prior.
    assert st.reward_alpha == pytest.approx(11.0) and st.reward_beta == pytest.approx(1.0)


# -- request cost and integer weights -------------------------------------------------------------

def test_request_cost_arithmetic() -> None:
    config = make_config()
    a = config.pools["chat"].backends["a"]
    b = config.pools["chat"].backends["b"]
    assert request_cost(a, 1000, 500) == pytest.approx(0.1 + 0.1)
    assert request_cost(b, 250, 1500) == pytest.approx(0.25 + 3.0)
    assert request_cost(a, 0, 0) == 0.0


def test_observe_request_returns_and_records_cost_only_when_ok() -> None:
    engine = engine_for(make_config())
    assert engine.observe_request("chat", "b", True, 100.0, 2000, 1000) == pytest.approx(2.0 + 2.0)
    assert engine.observe_request("chat", "b", False, 100.0, 2000, 1000) == 0.0
    st = engine.stats[("chat", "b")]
    assert st.cost == pytest.approx(4.0) and st.requests == 2 and st.errors == 1
    assert engine.observe_request("chat", "nope", True, 1.0, 10, 10) == 0.0
    assert engine.observe_request("nope", "a", True, 1.0, 10, 10) == 0.0


@pytest.mark.parametrize(
    ("shares", "weights"),
    [
        pytest.param({"a": 0.75, "b": 0.25}, {"a": 750, "b": 250}, id="plain"),
        pytest.param({"a": 0.9996, "b": 0.0004}, {"a": 1000, "b": 1}, id="tiny-share-keeps-one"),
        pytest.param({"a": 1.0, "b": 0.0}, {"a": 1000, "b": 0}, id="zero-is-no-traffic"),
        pytest.param({"a": 1.0, "b": 1e-12}, {"a": 1000, "b": 0}, id="negligible-is-zero"),
    ],
)
def test_to_weights(shares: dict[str, float], weights: dict[str, int]) -> None:
    assert to_weights(shares) == weights
    assert WEIGHT_SCALE == 1000


# -- static strategies ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        pytest.param("weighted", {"a": 3, "b": 1}, id="weighted"),
        pytest.param("least_request", {"a": 3, "b": 1}, id="least_request"),
        pytest.param("round_robin", {"a": 1, "b": 1}, id="round_robin"),
    ],
)
def test_static_strategies_push_exactly_the_configured_weights(strategy: str, expected: dict[str, int]) -> None:
    engine = engine_for(make_config(strategy))
    assert engine.recompute() is True
    assert engine.weights() == {"chat": expected}
    for ok, lat in [(True, 10.0), (False, 5000.0), (True, 90.0)]:
        engine.observe_request("chat", "b", ok, lat, 100, 100)
    assert engine.recompute() is False
    assert engine.weights() == {"chat": expected}


def test_static_strategy_with_deep_health_scales_shares() -> None:
    engine = engine_for(make_config("weighted", extra="deep_health: {path: /health}"))
    engine.recompute()
    assert engine.weights()["chat"] == {"a": 750, "b": 250}
    engine.observe_health("chat", "b", 0.0, "unhealthy", "down")
    assert engine.recompute() is True
    assert engine.weights()["chat"] == {"a": 1000, "b": 0}


# -- telemetry strategies -----------------------------------------------------------------------------

NO_FLOOR = "{exploration_floor: 0, hysteresis: 0, smoothing: 0.5}"


def test_telemetry_strategies_produce_weights_scaled_to_a_thousand() -> None:
    engine = engine_for(make_config("health_aware"))  # default floor 0.02
    assert engine.recompute() is True
    w = engine.weights()["chat"]
    # 3:1 with a 0.02 floor each: 0.02 + 0.96 * 0.75 = 0.74
    assert w == {"a": 740, "b": 260}
    assert all(isinstance(v, int) for v in w.values())
    assert sum(w.values()) == WEIGHT_SCALE


@pytest.mark.parametrize("strategy", ["health_aware", "cost_optimized", "performance_based", "quality_based",
                                      "balanced", "adaptive_learning"])
def test_every_telemetry_strategy_gives_integer_weights_near_a_thousand(strategy: str) -> None:
    engine = engine_for(make_config(strategy))
    rng = random.Random(11)
    for _ in range(50):
        name = rng.choice("ab")
        engine.observe_request("chat", name, rng.random() > 0.1, rng.uniform(50, 500), 400, 100)
    engine.recompute()
    w = engine.weights()["chat"]
    assert set(w) == {"a", "b"}
    assert all(isinstance(v, int) and v >= 1 for v in w.values())
    assert abs(sum(w.values()) - WEIGHT_SCALE) <= 2


def test_smoothing_moves_halfway_to_the_target_each_recompute() -> None:
    engine = engine_for(make_config("health_aware", NO_FLOOR))
    engine.recompute()
    state = engine.pools["chat"]
    assert state.smoothed == pytest.approx({"a": 0.75, "b": 0.25})
    engine.observe_health("chat", "b", 0.5, "degraded")
    # target: b keeps half of 0.25, a takes the rest -> a 0.875, b 0.125
    assert engine.recompute() is True
    assert state.decision is not None and state.decision.shares == pytest.approx({"a": 0.875, "b": 0.125})
    assert state.smoothed == pytest.approx({"a": 0.8125, "b": 0.1875})
    assert engine.weights()["chat"] == to_weights(state.smoothed)
    assert engine.recompute() is True
    assert state.smoothed == pytest.approx({"a": 0.84375, "b": 0.15625})
    assert engine.weights()["chat"] == {"a": 844, "b": 156}


def test_smoothing_one_jumps_straight_to_the_target() -> None:
    engine = engine_for(make_config("health_aware", "{exploration_floor: 0, hysteresis: 0, smoothing: 1}"))
    engine.recompute()
    engine.observe_health("chat", "b", 0.5, "degraded")
    engine.recompute()
    assert engine.weights()["chat"] == {"a": 875, "b": 125}


def test_hysteresis_holds_small_changes_back() -> None:
    engine = engine_for(make_config("health_aware", "{exploration_floor: 0, hysteresis: 0.1, smoothing: 1}",
                                    backends="""
      a: {url: "http://127.0.0.1:9001"}
      b: {url: "http://127.0.0.1:9002"}
    """))
    assert engine.recompute() is True
    assert engine.weights()["chat"] == {"a": 500, "b": 500}
    engine.observe_request("chat", "b", False, 100.0)  # error ewma 0.05 -> b's target ~0.474
    assert engine.recompute() is False
    assert engine.weights()["chat"] == {"a": 500, "b": 500}
    assert engine.pools["chat"].smoothed["b"] == pytest.approx(0.9025 / 1.9025)
    for _ in range(4):
        engine.observe_request("chat", "b", False, 100.0)  # error ewma ~0.226 -> b's target ~0.375
    assert engine.recompute() is True
    assert engine.weights()["chat"]["b"] < 400


def test_hysteresis_compares_with_the_last_push_not_the_last_step() -> None:
    engine = engine_for(make_config("health_aware", "{exploration_floor: 0, hysteresis: 0.02, smoothing: 0.5}"))
    engine.recompute()
    engine.observe_health("chat", "b", 0.5, "degraded")  # target a: 0.75 -> 0.875
    pushed = [engine.recompute() for _ in range(6)]
    # a: .8125 .84375 .859375 (step .0156 < .02) .8671875 (.0234 from the last push) ...
    assert pushed[:4] == [True, True, False, True]
    assert engine.weights()["chat"]["a"] in (867, 868)


def test_unhealthy_backend_drops_to_zero_at_once() -> None:
    engine = engine_for(make_config("health_aware", "{smoothing: 0.1}"))
    engine.recompute()
    engine.observe_health("chat", "b", 0.0, "unhealthy", "llm down")
    assert engine.recompute() is True
    w = engine.weights()["chat"]
    assert w["b"] == 0 and w["a"] > 0
    assert "unhealthy" in engine.explain("chat")["backends"]["b"]["reason"]


def test_every_backend_unhealthy_keeps_all_in_rotation() -> None:
    engine = engine_for(make_config("health_aware", "{exploration_floor: 0, smoothing: 1}"))
    engine.recompute()
    engine.observe_health("chat", "a", 0.0, "unhealthy")
    engine.observe_health("chat", "b", 0.0, "unhealthy")
    engine.recompute()
    assert engine.weights()["chat"] == {"a": 750, "b": 250}
    explain = engine.explain("chat")
    for b in ("a", "b"):
        assert explain["backends"][b]["reason"].startswith("every backend reports unhealthy: kept in rotation")


def test_recovered_backend_returns_smoothly() -> None:
    engine = engine_for(make_config("health_aware", NO_FLOOR))
    engine.recompute()
    engine.observe_health("chat", "b", 0.0, "unhealthy")
    engine.recompute()
    assert engine.weights()["chat"]["b"] == 0
    engine.observe_health("chat", "b", 1.0, "healthy")
    engine.recompute()
    assert engine.pools["chat"].smoothed["b"] == pytest.approx(0.125)  # halfway from 0 to 0.25


def test_adaptive_learning_is_deterministic_across_engines() -> None:
    config = make_config("adaptive_learning", "{seed: 7}")
    engines = [engine_for(config), engine_for(config)]
    history: list[list[dict[str, int]]] = [[], []]
    rng = random.Random(3)
    for step in range(300):
        name = "a" if step % 2 else "b"
        ok = rng.random() > (0.05 if name == "a" else 0.6)
        latency = rng.uniform(80, 120) if name == "a" else rng.uniform(2000, 4000)
        for e in engines:
            e.observe_request("chat", name, ok, latency, 500, 200)
        if step % 25 == 24:
            for i, e in enumerate(engines):
                e.recompute()
                history[i].append(e.weights()["chat"])
    assert history[0] == history[1]
    final = history[0][-1]
    assert final["a"] > 700 > final["b"] > 0


def test_different_seeds_may_differ_but_each_is_reproducible() -> None:
    def run(seed: int) -> dict[str, float]:
        engine = engine_for(make_config("adaptive_learning", f"{{seed: {seed}, smoothing: 1, hysteresis: 0}}",
                                        backends="""
          a: {url: "http://127.0.0.1:9001"}
          b: {url: "http://127.0.0.1:9002"}
        """))
        engine.recompute()
        return dict(engine.pools["chat"].smoothed)

    assert run(1) == run(1)
    assert run(1) != run(2)


# -- config edits ---------------------------------------------------------------------------------

def test_sync_keeps_stats_of_kept_backends_and_drops_removed_ones() -> None:
    engine = engine_for(make_config("health_aware"))
    engine.observe_request("chat", "a", True, 100.0, 10, 10)
    engine.observe_request("chat", "b", True, 100.0, 10, 10)
    engine.observe_feedback("chat", "a", 1.0)
    engine.recompute()
    edited = make_config("health_aware", "{quality_prior_weight: 4}", backends="""
      a: {url: "http://127.0.0.1:9001", weight: 3, quality: 0.5, expected_latency_ms: 900}
      c: {url: "http://127.0.0.1:9003", weight: 1}
    """)
    engine.sync(edited)
    a = engine.stats[("chat", "a")]
    assert a.requests == 1 and a.feedback_n == 1
    assert (a.prior_quality, a.prior_weight, a.expected_latency_ms) == (0.5, 4.0, 900.0)
    assert a.quality == pytest.approx((0.5 * 4 + 1.0) / 5)
    assert ("chat", "b") not in engine.stats
    assert engine.stats[("chat", "c")].requests == 0
    assert engine.observe_feedback("chat", "b", 1.0) is False
    engine.recompute()
    assert set(engine.weights()["chat"]) == {"a", "c"}


def test_sync_adds_and_removes_pools() -> None:
    engine = engine_for(make_config())
    other = parse_config("""
pools:
  embed:
    backends:
      e: {url: "http://127.0.0.1:9100", weight: 2}
""", env={})
    engine.sync(other)
    assert set(engine.pools) == {"embed"}
    assert set(engine.stats) == {("embed", "e")}
    engine.recompute()
    assert engine.weights() == {"embed": {"e": 2}}


# -- observations and rewards ---------------------------------------------------------------------

def test_observe_health_and_feedback() -> None:
    engine = engine_for(make_config())
    engine.observe_health("chat", "a", 0.5, "degraded", "slow llm")
    st = engine.stats[("chat", "a")]
    assert (st.health, st.health_status, st.health_detail) == (0.5, "degraded", "slow llm")
    engine.observe_health("chat", "ghost", 0.0, "unhealthy")  # ignored, no error
    assert engine.observe_feedback("chat", "a", 0.0) is True
    assert st.quality == pytest.approx(0.8 * 10 / 11)


def test_reward_of_a_failure_is_zero_and_of_a_success_follows_the_objective() -> None:
    engine = engine_for(make_config(scoring="{objective: {quality: 1, cost: 0, latency: 0, errors: 0}}"))
    assert engine.reward("chat", "a", False, 10.0, 0.0) == 0.0
    assert engine.reward("chat", "a", True, 10.0, 0.0) == pytest.approx(0.8)
    assert engine.reward("chat", "b", True, 10.0, 0.0) == pytest.approx(0.6)
    cost_only = engine_for(make_config(scoring="{objective: {quality: 0, cost: 1, latency: 0, errors: 0}}"))
    # default mix 500/200 tokens: b's unit cost 0.5 + 0.4 = 0.9 is the reference
    assert cost_only.reward("chat", "b", True, 10.0, 0.9) == pytest.approx(0.0)
    assert cost_only.reward("chat", "a", True, 10.0, 0.09) == pytest.approx(0.9)
    latency_only = engine_for(make_config(scoring="{objective: {quality: 0, cost: 0, latency: 1, errors: 0}}"))
    # no latency seen yet: the reference is 5 s
    assert latency_only.reward("chat", "a", True, 1250.0, 0.0) == pytest.approx(0.75)
    assert latency_only.reward("chat", "a", True, 60_000.0, 0.0) == 0.0


def test_unit_cost_follows_the_observed_token_mix() -> None:
    engine = engine_for(make_config())
    engine.recompute()
    # default mix 500 prompt / 200 completion
    assert engine.explain("chat")["backends"]["b"]["cost"]["per_request_estimate"] == pytest.approx(0.9)
    engine.observe_request("chat", "a", True, 10.0, 1000, 0)
    engine.observe_request("chat", "a", True, 10.0, 3000, 1000)
    # mix 2000 / 500 -> b: 2.0 + 1.0
    assert engine.explain("chat")["backends"]["b"]["cost"]["per_request_estimate"] == pytest.approx(3.0)


def test_failed_requests_do_not_inflate_the_token_mix() -> None:
    engine = engine_for(make_config())
    engine.recompute()
    engine.observe_request("chat", "a", True, 10.0, 1000, 0)
    engine.observe_request("chat", "a", False, 10.0, 1000, 0)  # e.g. a 5xx; its prompt tokens were estimated
    # Every request had 1000 prompt tokens, so b's expected price per request is 1000 * 1.0 / 1000 = 1.0.
    assert engine.explain("chat")["backends"]["b"]["cost"]["per_request_estimate"] == pytest.approx(1.0)


# -- explain ----------------------------------------------------------------------------------------

def test_explain_has_every_input_and_a_reason_and_no_api_key() -> None:
    secret = "sk-secret-value"
    config = make_config("cost_optimized", env={"K": secret}, backends="""
      a: {url: "https://api.example.com", api_key: "${K}", cost: {input_per_1k: 0.1, output_per_1k: 0.2}}
      b: {url: "http://127.0.0.1:9002", api_key_header: x-api-key, api_key: "${K}", quality: 0.9}
    """)
    assert config.pools["chat"].backends["a"].auth_value == f"Bearer {secret}"  # the key did load
    engine = engine_for(config)
    engine.observe_request("chat", "a", True, 120.0, 500, 100)
    engine.observe_feedback("chat", "b", 0.7)
    engine.observe_health("chat", "b", 0.5, "degraded", "llm slow")
    engine.recompute()
    explain = engine.explain("chat", budget={"hour": 1.0})
    text = json.dumps(explain)
    assert secret not in text
    assert explain["pool"] == "chat" and explain["strategy"] == "cost_optimized"
    assert explain["shifted_to_cheapest"] is False and explain["budget"] == {"hour": 1.0}
    assert set(explain["backends"]) == {"a", "b"}
    weights = engine.weights()["chat"]
    for name, info in explain["backends"].items():
        assert info["weight"] == weights[name]
        assert {"score", "status", "detail"} <= set(info["health"])
        assert {"ewma", "p95", "expected"} <= set(info["latency_ms"])
        assert {"per_request_estimate", "spent"} <= set(info["cost"])
        assert {"estimate", "prior", "feedback"} <= set(info["quality"])
        assert isinstance(info["reason"], str) and info["reason"]
    a, b = explain["backends"]["a"], explain["backends"]["b"]
    assert a["latency_ms"]["ewma"] == 120.0 and a["latency_ms"]["p95"] == 120.0 and a["requests"] == 1
    assert a["cost"]["spent"] == pytest.approx(0.07)
    assert b["health"] == {"score": 0.5, "status": "degraded", "detail": "llm slow"}
    assert b["quality"] == {"estimate": pytest.approx((0.9 * 10 + 0.7) / 11, abs=1e-4), "prior": 0.9, "feedback": 1}
    assert a["weight"] > b["weight"]  # b is the dearer one


def test_explain_reports_the_budget_shift() -> None:
    engine = engine_for(make_config("quality_based"))
    assert engine.recompute(shift_to_cheapest=frozenset({"chat"})) is True
    assert engine.weights()["chat"] == {"a": 1000, "b": 0}
    explain = engine.explain("chat")
    assert explain["shifted_to_cheapest"] is True
    assert "budget exhausted" in explain["backends"]["b"]["reason"]
    engine.recompute()
    assert engine.explain("chat")["shifted_to_cheapest"] is False
    assert engine.weights()["chat"]["b"] > 0


def test_operator_weight_edit_smaller_than_hysteresis_still_goes_out() -> None:
    text = """
pools:
  chat:
    strategy: weighted
    scoring: {hysteresis: 0.05}
    backends:
      a: {url: "http://127.0.0.1:1", weight: 50}
      b: {url: "http://127.0.0.1:2", weight: 50}
"""
    engine = Engine()
    engine.sync(parse_config(text, env={}))
    engine.recompute()
    engine.sync(parse_config(text.replace("weight: 50}\n      b", "weight: 51}\n      b"), env={}))
    assert engine.recompute() is True
    assert engine.weights()["chat"] == {"a": 51, "b": 50}
