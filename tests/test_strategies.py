"""Strategies: shares sum to 1, health and min_quality gate traffic, each strategy prefers what it says."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from controlplane.config import STRATEGIES, Objective, Scoring
from controlplane.scoring.strategies import STRATEGY_FUNCTIONS, Candidate, Decision, decide

TELEMETRY = sorted(STRATEGY_FUNCTIONS)
STATIC = ["round_robin", "weighted", "least_request"]


def cand(name: str, **kw) -> Candidate:
    fields = {"weight": 1, "health": 1.0, "quality": 0.8, "latency_ms": 200.0, "error_rate": 0.0, "unit_cost": 0.1}
    fields.update(kw)
    return Candidate(name=name, **fields)


def run(strategy: str, cands: list[Candidate], scoring: Scoring | None = None, seed: int = 0,
        shift: bool = False) -> Decision:
    return decide(strategy, cands, scoring or Scoring(), random.Random(seed), shift_to_cheapest=shift)


# A pool whose backends differ in every input, so no strategy is trivially uniform.
MIXED = [
    cand("cheap", weight=1, quality=0.6, latency_ms=900.0, error_rate=0.05, unit_cost=0.1,
         reward_alpha=5.0, reward_beta=5.0),
    cand("fast", weight=2, quality=0.75, latency_ms=80.0, error_rate=0.0, unit_cost=0.5,
         reward_alpha=20.0, reward_beta=4.0),
    cand("smart", weight=3, quality=0.95, latency_ms=2500.0, error_rate=0.01, unit_cost=3.0,
         reward_alpha=8.0, reward_beta=3.0),
]

SCENARIOS = {
    "all-healthy": MIXED,
    "one-unhealthy": [MIXED[0], replace(MIXED[1], health=0.0), MIXED[2]],
    "one-degraded": [MIXED[0], MIXED[1], replace(MIXED[2], health=0.5)],
    "unknown-latency": [replace(MIXED[0], latency_ms=None), MIXED[1], MIXED[2]],
    "single-backend": [MIXED[1]],
}


def test_every_configured_strategy_is_handled() -> None:
    assert set(STRATEGIES) == set(TELEMETRY) | set(STATIC)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_shares_sum_to_one_over_eligible_and_every_backend_has_a_reason(strategy: str, scenario: str) -> None:
    cands = SCENARIOS[scenario]
    d = run(strategy, cands)
    assert set(d.shares) == {c.name for c in cands}
    assert set(d.reasons) == {c.name for c in cands}
    eligible = [c.name for c in cands if c.health > 0]
    assert sum(d.shares[n] for n in eligible) == pytest.approx(1.0)
    assert all(0.0 <= s <= 1.0 + 1e-12 for s in d.shares.values())
    for name, reason in d.reasons.items():
        assert isinstance(reason, str) and reason.strip(), name


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_unhealthy_backend_gets_nothing(strategy: str) -> None:
    cands = [MIXED[0], replace(MIXED[1], health=0.0), MIXED[2]]
    d = run(strategy, cands)
    assert d.shares["fast"] == 0.0
    assert "unhealthy" in d.reasons["fast"]
    assert d.shares["cheap"] > 0 and d.shares["smart"] > 0


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_all_unhealthy_gives_all_zero_shares(strategy: str) -> None:
    cands = [replace(c, health=0.0) for c in MIXED]
    d = run(strategy, cands)
    assert d.shares == {"cheap": 0.0, "fast": 0.0, "smart": 0.0}
    assert all("unhealthy" in r for r in d.reasons.values())


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_min_quality_excludes_backends_below_it(strategy: str) -> None:
    d = run(strategy, MIXED, Scoring(min_quality=0.7))
    assert d.shares["cheap"] == 0.0
    assert "below min_quality" in d.reasons["cheap"] and "no traffic" in d.reasons["cheap"]
    assert d.shares["fast"] + d.shares["smart"] == pytest.approx(1.0)
    assert d.shares["fast"] > 0 and d.shares["smart"] > 0


def test_min_quality_boundary_is_inclusive() -> None:
    d = run("round_robin", MIXED, Scoring(min_quality=0.75))
    assert d.shares == pytest.approx({"cheap": 0.0, "fast": 0.5, "smart": 0.5})


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_min_quality_no_backend_meets_it_keeps_all_with_a_reason(strategy: str) -> None:
    d = run(strategy, MIXED, Scoring(min_quality=0.99))
    assert all(s > 0 for s in d.shares.values())
    assert sum(d.shares.values()) == pytest.approx(1.0)
    for reason in d.reasons.values():
        assert "no backend meets it" in reason


def test_min_quality_ignores_unhealthy_backends_that_meet_it() -> None:
    # Only an unhealthy backend is good enough: the eligible ones are all kept, it stays out.
    cands = [cand("lo1", quality=0.3), cand("lo2", quality=0.4), cand("hi", quality=0.99, health=0.0)]
    d = run("round_robin", cands, Scoring(min_quality=0.9))
    assert d.shares == pytest.approx({"lo1": 0.5, "lo2": 0.5, "hi": 0.0})
    assert "no backend meets it" in d.reasons["lo1"]


# -- exploration floor ------------------------------------------------------------------------

# Each pool makes one backend dominate under the named strategy, so the others would be starved.
DOMINATED = {
    "health_aware": [cand("a", weight=1000), cand("b", weight=1), cand("c", weight=1)],
    "cost_optimized": [cand("a", unit_cost=0.1), cand("b", unit_cost=3.0), cand("c", unit_cost=5.0)],
    "performance_based": [cand("a", latency_ms=50.0), cand("b", latency_ms=5000.0), cand("c", latency_ms=9000.0)],
    "quality_based": [cand("a", quality=0.95), cand("b", quality=0.3), cand("c", quality=0.2)],
    "balanced": [cand("a", quality=1.0, unit_cost=0.1), cand("b", quality=0.0, unit_cost=3.0),
                 cand("c", quality=0.0, unit_cost=3.0, error_rate=0.9)],
    "adaptive_learning": [cand("a", reward_alpha=200.0, reward_beta=1.0), cand("b", reward_alpha=1.0, reward_beta=200.0),
                          cand("c", reward_alpha=1.0, reward_beta=300.0)],
}


@pytest.mark.parametrize("strategy", TELEMETRY)
def test_floor_zero_lets_dominated_backends_starve(strategy: str) -> None:
    d = run(strategy, DOMINATED[strategy], Scoring(exploration_floor=0.0))
    assert d.shares["a"] > 0.97
    assert d.shares["b"] < 0.02 and d.shares["c"] < 0.02


@pytest.mark.parametrize("floor", [0.02, 0.1, 0.3], ids=lambda f: f"floor={f}")
@pytest.mark.parametrize("strategy", TELEMETRY)
def test_exploration_floor_gives_every_eligible_backend_at_least_the_floor(strategy: str, floor: float) -> None:
    d = run(strategy, DOMINATED[strategy], Scoring(exploration_floor=floor))
    cap = min(floor, 1 / 3)
    for name in ("a", "b", "c"):
        assert d.shares[name] >= cap - 1e-9, name
    assert d.shares["a"] > d.shares["b"]
    assert sum(d.shares.values()) == pytest.approx(1.0)


def test_exploration_floor_is_capped_at_an_equal_split() -> None:
    d = run("cost_optimized", DOMINATED["cost_optimized"], Scoring(exploration_floor=0.5))
    assert d.shares == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})


def test_exploration_floor_not_given_to_unhealthy_or_excluded_backends() -> None:
    cands = [cand("a", unit_cost=0.1), cand("sick", unit_cost=0.2, health=0.0), cand("dull", quality=0.1)]
    d = run("cost_optimized", cands, Scoring(exploration_floor=0.3, min_quality=0.5))
    assert d.shares["sick"] == 0.0 and d.shares["dull"] == 0.0
    assert d.shares["a"] == pytest.approx(1.0)


@pytest.mark.parametrize("strategy", STATIC)
def test_static_strategies_ignore_the_exploration_floor(strategy: str) -> None:
    d = run(strategy, [cand("a", weight=99), cand("b", weight=1)], Scoring(exploration_floor=0.3))
    expected = {"a": 0.5, "b": 0.5} if strategy == "round_robin" else {"a": 0.99, "b": 0.01}
    assert d.shares == pytest.approx(expected)


# -- health scaling ---------------------------------------------------------------------------

@pytest.mark.parametrize("floor", [0.0, 0.02, 0.2], ids=lambda f: f"floor={f}")
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_degraded_backend_gets_half_and_healthy_ones_take_the_rest(strategy: str, floor: float) -> None:
    scoring = Scoring(exploration_floor=floor)
    healthy = run(strategy, MIXED, scoring, seed=3)
    degraded_cands = [c if c.name != "smart" else replace(c, health=0.5) for c in MIXED]
    degraded = run(strategy, degraded_cands, scoring, seed=3)
    assert healthy.shares["smart"] > 0
    assert degraded.shares["smart"] <= 0.5 * healthy.shares["smart"] + 1e-9
    assert degraded.shares["smart"] == pytest.approx(0.5 * healthy.shares["smart"])
    freed = healthy.shares["smart"] - degraded.shares["smart"]
    gained = sum(degraded.shares[n] - healthy.shares[n] for n in ("cheap", "fast"))
    assert gained == pytest.approx(freed)
    for n in ("cheap", "fast"):
        assert degraded.shares[n] >= healthy.shares[n] - 1e-12


def test_degraded_backend_gives_up_half_of_its_floor_too() -> None:
    cands = [cand("a", unit_cost=0.1), cand("b", unit_cost=10.0, health=0.5)]
    d = run("cost_optimized", cands, Scoring(exploration_floor=0.2))
    # raw b ~ 0 -> floor 0.2 -> health halves it.
    assert d.shares["b"] == pytest.approx(0.1, abs=1e-6)
    assert d.shares["a"] == pytest.approx(0.9, abs=1e-6)


def test_freed_share_goes_to_healthy_backends_in_proportion() -> None:
    cands = [cand("a", weight=1), cand("b", weight=3), cand("c", weight=4, health=0.5)]
    d = run("weighted", cands)
    # c: 0.5 -> 0.25; the freed 0.25 split 1:3 between a and b.
    assert d.shares == pytest.approx({"a": 0.125 + 0.0625, "b": 0.375 + 0.1875, "c": 0.25})


def test_all_degraded_keep_their_relative_shares() -> None:
    cands = [cand("a", weight=1, health=0.5), cand("b", weight=3, health=0.5)]
    d = run("weighted", cands)
    assert d.shares == pytest.approx({"a": 0.25, "b": 0.75})


# -- each strategy prefers what it says ------------------------------------------------------

def test_cost_optimized_gives_the_cheapest_the_largest_share() -> None:
    cands = [cand("mid", unit_cost=0.5), cand("cheap", unit_cost=0.1), cand("dear", unit_cost=3.0)]
    d = run("cost_optimized", cands)
    assert d.shares["cheap"] >= 0.7
    assert d.shares["cheap"] > d.shares["mid"] > d.shares["dear"]


def test_cost_optimized_free_backends_take_everything_but_the_floor() -> None:
    cands = [cand("free", unit_cost=0.0), cand("paid", unit_cost=0.1)]
    d = run("cost_optimized", cands, Scoring(exploration_floor=0.0))
    assert d.shares == pytest.approx({"free": 1.0, "paid": 0.0})


def test_cost_optimized_penalises_errors() -> None:
    cands = [cand("a", unit_cost=0.1, error_rate=0.5), cand("b", unit_cost=0.1)]
    d = run("cost_optimized", cands, Scoring(exploration_floor=0.0))
    assert d.shares["a"] == pytest.approx(1 / 3) and d.shares["b"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("latencies", "order"),
    [
        pytest.param({"a": 100.0, "b": 300.0, "c": 1000.0}, ["a", "b", "c"], id="ascending"),
        pytest.param({"a": 2000.0, "b": 50.0, "c": 400.0}, ["b", "c", "a"], id="shuffled"),
    ],
)
def test_performance_based_prefers_low_latency(latencies: dict[str, float], order: list[str]) -> None:
    d = run("performance_based", [cand(n, latency_ms=v) for n, v in latencies.items()], Scoring(exploration_floor=0.0))
    shares = [d.shares[n] for n in order]
    assert shares == sorted(shares, reverse=True) and shares[0] > shares[1] > shares[2]
    # 1/latency^2: twice as slow gets a quarter.
    assert run("performance_based", [cand("x", latency_ms=100.0), cand("y", latency_ms=200.0)],
               Scoring(exploration_floor=0.0)).shares == pytest.approx({"x": 0.8, "y": 0.2})


def test_performance_based_unknown_latency_uses_the_median_of_known_ones() -> None:
    cands = [cand("a", latency_ms=100.0), cand("b", latency_ms=400.0), cand("u", latency_ms=None)]
    d = run("performance_based", cands, Scoring(exploration_floor=0.0))
    assert d.shares["u"] == pytest.approx(d.shares["b"])  # median of [100, 400] by index is 400


def test_quality_based_prefers_high_quality() -> None:
    cands = [cand("lo", quality=0.5), cand("hi", quality=0.9), cand("mid", quality=0.7)]
    d = run("quality_based", cands)
    assert d.shares["hi"] > d.shares["mid"] > d.shares["lo"]
    assert d.shares["hi"] >= 0.9


def test_quality_based_counts_errors_against_quality() -> None:
    cands = [cand("a", quality=0.9, error_rate=0.3), cand("b", quality=0.8)]
    d = run("quality_based", cands)
    assert d.shares["b"] > d.shares["a"]


BALANCED_CASES = {
    # name: (objective, candidates, who should win, who should lose)
    "cost-only-cheapest-wins": (
        Objective(quality=0, cost=1, latency=0, errors=0),
        [cand("cheap", unit_cost=0.1, quality=0.2), cand("dear", unit_cost=3.0, quality=1.0)], "cheap", "dear"),
    "quality-only-best-wins": (
        Objective(quality=1, cost=0, latency=0, errors=0),
        [cand("cheap", unit_cost=0.1, quality=0.2), cand("dear", unit_cost=3.0, quality=1.0)], "dear", "cheap"),
    "latency-only-fastest-wins": (
        Objective(quality=0, cost=0, latency=1, errors=0),
        [cand("slow", latency_ms=3000.0), cand("fast", latency_ms=100.0)], "fast", "slow"),
    "errors-only-reliable-wins": (
        Objective(quality=0, cost=0, latency=0, errors=1),
        [cand("flaky", error_rate=0.6), cand("solid", error_rate=0.0)], "solid", "flaky"),
}


@pytest.mark.parametrize("case", sorted(BALANCED_CASES))
def test_balanced_follows_the_objective(case: str) -> None:
    objective, cands, winner, loser = BALANCED_CASES[case]
    d = run("balanced", cands, Scoring(objective=objective, exploration_floor=0.0))
    assert d.shares[winner] > 0.9
    assert d.shares[loser] < 0.1


def test_balanced_with_zero_cost_weight_does_not_favour_the_cheapest() -> None:
    cands = [cand("cheap", unit_cost=0.1), cand("mid", unit_cost=0.5), cand("dear", unit_cost=3.0)]
    d = run("balanced", cands, Scoring(objective=Objective(cost=0.0)))
    assert d.shares == pytest.approx({"cheap": 1 / 3, "mid": 1 / 3, "dear": 1 / 3})
    favoured = run("balanced", cands, Scoring(objective=Objective(cost=1.0)))
    assert favoured.shares["cheap"] > favoured.shares["mid"] > favoured.shares["dear"]


def test_adaptive_learning_is_deterministic_for_a_seed() -> None:
    first = run("adaptive_learning", MIXED, seed=42)
    second = run("adaptive_learning", MIXED, seed=42)
    assert first == second
    # and the shares are genuinely sampled (not a constant split)
    assert len({round(s, 6) for s in first.shares.values()}) == 3


def test_adaptive_learning_favours_the_clearly_best_posterior() -> None:
    cands = [cand("good", reward_alpha=90.0, reward_beta=10.0), cand("poor", reward_alpha=10.0, reward_beta=90.0),
             cand("meh", reward_alpha=40.0, reward_beta=60.0)]
    d = run("adaptive_learning", cands, seed=1)
    assert d.shares["good"] >= 0.9
    assert d.shares["poor"] == pytest.approx(0.02, abs=1e-9)  # only the exploration floor


def test_adaptive_learning_splits_close_posteriors() -> None:
    cands = [cand("a", reward_alpha=2.0, reward_beta=2.0), cand("b", reward_alpha=2.0, reward_beta=2.0)]
    d = run("adaptive_learning", cands, Scoring(exploration_floor=0.0), seed=5)
    assert 0.35 < d.shares["a"] < 0.65


def test_health_aware_scales_configured_weight_by_errors() -> None:
    d = run("health_aware", [cand("a", weight=3), cand("b", weight=1)], Scoring(exploration_floor=0.0))
    assert d.shares == pytest.approx({"a": 0.75, "b": 0.25})
    d = run("health_aware", [cand("a", weight=1, error_rate=0.5), cand("b", weight=1)], Scoring(exploration_floor=0.0))
    assert d.shares == pytest.approx({"a": 0.2, "b": 0.8})  # (1-0.5)^2 = 0.25 vs 1


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        pytest.param("round_robin", {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, id="round_robin-equal"),
        pytest.param("weighted", {"a": 1 / 6, "b": 2 / 6, "c": 3 / 6}, id="weighted-configured"),
        pytest.param("least_request", {"a": 1 / 6, "b": 2 / 6, "c": 3 / 6}, id="least_request-configured"),
    ],
)
def test_static_strategies_use_configured_weights(strategy: str, expected: dict[str, float]) -> None:
    cands = [cand("a", weight=1), cand("b", weight=2, unit_cost=9.0), cand("c", weight=3, error_rate=0.5)]
    assert run(strategy, cands).shares == pytest.approx(expected)


# -- budget shift ----------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_shift_to_cheapest_puts_all_traffic_on_the_cheapest(strategy: str) -> None:
    d = run(strategy, MIXED, Scoring(exploration_floor=0.2), shift=True)
    assert d.shares == {"cheap": 1.0, "fast": 0.0, "smart": 0.0}
    assert all("budget exhausted" in r for r in d.reasons.values())


def test_shift_to_cheapest_splits_ties_and_skips_unhealthy() -> None:
    cands = [cand("a", unit_cost=0.1), cand("b", unit_cost=0.1), cand("c", unit_cost=0.05, health=0.0),
             cand("d", unit_cost=1.0)]
    d = run("balanced", cands, shift=True)
    assert d.shares == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.0, "d": 0.0})


def test_reasons_name_the_facts() -> None:
    d = run("cost_optimized", MIXED)
    assert "cost 0.10000/request" in d.reasons["cheap"]
    assert "latency 80 ms" in d.reasons["fast"]
    assert d.reasons["smart"].startswith(f"{d.shares['smart']:.1%} of traffic")
    no_latency = run("cost_optimized", [cand("x", latency_ms=None)])
    assert "latency" not in no_latency.reasons["x"] and "100.0% of traffic" in no_latency.reasons["x"]


def test_budget_shift_stays_on_a_degraded_cheapest_backend() -> None:
    cands = [cand("cheap", unit_cost=0.1, health=0.5), cand("dear", unit_cost=1.0), cand("dearer", unit_cost=3.0)]
    decision = decide("balanced", cands, Scoring(), random.Random(0), shift_to_cheapest=True)
    assert decision.shares == {"cheap": 1.0, "dear": 0.0, "dearer": 0.0}
    assert "budget exhausted" in decision.reasons["cheap"]
