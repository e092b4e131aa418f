"""Re-discovery: a backend out of rotation for quality or score keeps a probe share, returns with hysteresis."""

from __future__ import annotations

import random
import textwrap
from collections import Counter
from dataclasses import replace

import pytest

from controlplane.config import Config, Scoring, parse_config
from controlplane.controllers.scoring import ScoringLoop, envoy_out
from controlplane.reconciler import Reconciler
from controlplane.scoring.engine import Engine
from controlplane.scoring.stats import QUALITY_DECAY, BackendStats, memory_decay
from controlplane.scoring.strategies import MAX_PROBE_TOTAL, Candidate, Decision, decide, probe
from controlplane.state import Cooldown, DesiredState
from controlplane.telemetry.envoy_hosts import ABSENT, DRAINING, EJECTED, FAILING, HEALTHY, UNKNOWN
from controlplane.xds.server import SnapshotCache

from .loop_fakes import Budgets, Requests

THREE = """
  cheap: {url: "http://127.0.0.1:9001", quality: 0.8, cost: {input_per_1k: 0.1, output_per_1k: 0.1}}
  medium: {url: "http://127.0.0.1:9002", quality: 0.8, cost: {input_per_1k: 0.3, output_per_1k: 0.3}}
  dear: {url: "http://127.0.0.1:9003", quality: 0.8, cost: {input_per_1k: 1.0, output_per_1k: 1.0}}
"""
SMOOTH = "smoothing: 1, hysteresis: 0"


def make_config(strategy: str = "balanced", scoring: str = "", backends: str = THREE) -> Config:
    return parse_config(f"""
pools:
  chat:
    strategy: {strategy}
    scoring: {{{scoring}}}
    backends:
{textwrap.indent(textwrap.dedent(backends).strip(), "      ")}
""", env={})


def engine_for(config: Config) -> Engine:
    engine = Engine()
    engine.sync(config)
    return engine


def rate(engine: Engine, backend: str, score: float, times: int) -> None:
    for _ in range(times):
        engine.observe_feedback("chat", backend, score)


def cand(name: str, **kw: object) -> Candidate:
    fields: dict[str, object] = {"weight": 1, "health": 1.0, "quality": 0.8, "latency_ms": 200.0, "error_rate": 0.0,
                                 "unit_cost": 0.1}
    fields.update(kw)
    return Candidate(name=name, **fields)  # type: ignore[arg-type]


# -- probe(): who gets the probe share -------------------------------------------------------------

def quality_held(scoring: Scoring) -> tuple[list[Candidate], Decision]:
    cands = [cand("good", quality=0.9), cand("poor", quality=0.3, unit_cost=0.01), cand("other", quality=0.85)]
    return cands, decide("cost_optimized", cands, scoring, random.Random(0))


def test_a_backend_held_out_by_min_quality_gets_the_probe_share_from_the_others() -> None:
    scoring = Scoring(min_quality=0.7, probe_share=0.05)
    cands, before = quality_held(scoring)
    assert before.shares["poor"] == 0 and before.below_quality == {"poor"}
    after = probe(before, cands, scoring.probe_share, True, {})
    assert after.probing == {"poor"} and after.below_quality == {"poor"}
    assert after.shares["poor"] == pytest.approx(0.05)
    assert sum(after.shares.values()) == pytest.approx(1.0)
    for n in ("good", "other"):  # given up in proportion
        assert after.shares[n] == pytest.approx(before.shares[n] * 0.95)
    assert after.reasons["poor"].startswith("probing only: 5.0% of traffic (scoring.probe_share)")
    assert "below min_quality 0.70" in after.reasons["poor"] and "no traffic" not in after.reasons["poor"]
    assert "after probes" in after.reasons["good"]


@pytest.mark.parametrize(("why", "change"), [
    ("unhealthy", {"health": 0.0}),
    ("ejected by Envoy's outlier detection", {}),
    ("failing Envoy's active health checks", {}),
    ("draining", {}),
    ("cooling after a 429", {}),
])
def test_never_probed_when_unhealthy_ejected_failing_draining_or_cooling(why: str, change: dict[str, float]) -> None:
    scoring = Scoring(min_quality=0.7, probe_share=0.05)
    cands, _ = quality_held(scoring)
    cands = [replace(c, **change) if c.name == "poor" else c for c in cands]  # type: ignore[arg-type]
    before = decide("cost_optimized", cands, scoring, random.Random(0))
    after = probe(before, cands, scoring.probe_share, True, {} if change else {"poor": why})
    assert after.shares["poor"] == 0.0 and not after.probing
    assert after.shares == before.shares
    assert why in after.reasons["poor"]


def test_only_eligible_backends_are_probed_among_several() -> None:
    cands = [cand("good", quality=0.9), cand("q1", quality=0.3), cand("q2", quality=0.2), cand("sick", quality=0.3, health=0.0),
             cand("ejected", quality=0.2)]
    scoring = Scoring(min_quality=0.7, probe_share=0.02)
    d = probe(decide("quality_based", cands, scoring, random.Random(0)), cands, 0.02, True,
              {"ejected": "ejected by Envoy's outlier detection"})
    assert d.probing == {"q1", "q2"}
    assert d.shares == pytest.approx({"good": 0.96, "q1": 0.02, "q2": 0.02, "sick": 0.0, "ejected": 0.0})


def test_a_strategy_share_under_the_probe_share_is_raised_to_it_for_telemetry_strategies_only() -> None:
    # cost_optimized without a floor: 10x the price is (1/10)^4 = 1e-4 of the cheapest's score.
    cands = [cand("cheap", unit_cost=0.1), cand("dear", unit_cost=1.0)]
    scoring = Scoring(exploration_floor=0.0, probe_share=0.01)
    d = decide("cost_optimized", cands, scoring, random.Random(0))
    assert d.shares["dear"] < 0.001
    probed = probe(d, cands, 0.01, True, {})
    assert probed.probing == {"dear"} and probed.shares["dear"] == pytest.approx(0.01)
    assert "probing only" in probed.reasons["dear"] and "the strategy alone" in probed.reasons["dear"]
    # a share at or above the probe share is the strategy's own
    assert probe(d, cands, d.shares["dear"], True, {}).probing == frozenset()
    # static strategies score nothing: the operator's small weight stays as written
    static = decide("weighted", [cand("a", weight=999), cand("b", weight=1)], scoring, random.Random(0))
    assert probe(static, [cand("a", weight=999), cand("b", weight=1)], 0.01, False, {}) .shares == static.shares


def test_probe_share_zero_turns_it_off() -> None:
    scoring = Scoring(min_quality=0.7, probe_share=0.0)
    cands, before = quality_held(scoring)
    assert probe(before, cands, 0.0, True, {}) is before
    engine = engine_for(make_config("cost_optimized", f"min_quality: 0.7, probe_share: 0, {SMOOTH}"))
    rate(engine, "cheap", 0.2, 30)
    engine.recompute()
    assert engine.weights()["chat"]["cheap"] == 0
    assert engine.explain("chat")["backends"]["cheap"]["probing"] is False


def test_probes_together_take_at_most_half() -> None:
    cands = [cand("good", quality=0.9)] + [cand(f"q{i}", quality=0.1) for i in range(10)]
    d = probe(decide("quality_based", cands, Scoring(min_quality=0.7), random.Random(0)), cands, 0.1, True, {})
    assert len(d.probing) == 10
    assert sum(d.shares[n] for n in d.probing) == pytest.approx(MAX_PROBE_TOTAL)
    assert d.shares["good"] == pytest.approx(1 - MAX_PROBE_TOTAL)


def test_nothing_probed_when_no_backend_has_traffic() -> None:
    cands = [cand("a", health=0.0), cand("b", health=0.0)]
    d = decide("balanced", cands, Scoring(), random.Random(0))
    assert probe(d, cands, 0.05, True, {}).shares == {"a": 0.0, "b": 0.0}


# -- re-entry with hysteresis ----------------------------------------------------------------------

def test_held_out_below_min_quality_and_back_only_above_the_margin() -> None:
    scoring = Scoring(min_quality=0.7, reentry_margin=0.05, probe_share=0.0)
    rng = random.Random(0)

    def run(q: float, held: frozenset[str]) -> Decision:
        return decide("quality_based", [cand("a", quality=0.9), cand("b", quality=q)], scoring, rng, below_quality=held)

    # In rotation: leaves only below min_quality (the boundary is inclusive).
    assert run(0.70, frozenset()).below_quality == frozenset() and run(0.70, frozenset()).shares["b"] > 0
    out = run(0.69, frozenset())
    assert out.below_quality == {"b"} and out.shares["b"] == 0
    # Held out: stays out until min_quality + margin, with a reason saying so.
    for q in (0.70, 0.72, 0.749):
        held = run(q, out.below_quality)
        assert held.below_quality == {"b"} and held.shares["b"] == 0, q
    assert "reentry_margin 0.05" in run(0.72, out.below_quality).reasons["b"]
    assert "returns at 0.75" in out.reasons["b"]
    back = run(0.75, out.below_quality)
    assert back.below_quality == frozenset() and back.shares["b"] > 0


def test_engine_does_not_flap_an_estimate_hovering_at_the_threshold() -> None:
    engine = engine_for(make_config("quality_based", f"min_quality: 0.7, reentry_margin: 0.05, probe_share: 0, "
                                                     f"quality_prior_weight: 1, memory_ratings: 5, {SMOOTH}"))
    st = engine.stats[("chat", "cheap")]
    history = []
    for score in [0.5] * 8 + [0.71, 0.69, 0.72, 0.7, 0.73, 0.71] * 3 + [0.9] * 6:
        st.observe_feedback(score)
        engine.recompute()
        history.append((round(st.quality, 3), engine.weights()["chat"]["cheap"] > 0))
    entered = [i for i in range(1, len(history)) if history[i][1] and not history[i - 1][1]]
    left = [i for i in range(1, len(history)) if history[i - 1][1] and not history[i][1]]
    assert left == [] and len(entered) == 1, history  # out once (first round), back once, at >= 0.75
    assert history[entered[0]][0] >= 0.75 and all(not on for q, on in history if q < 0.75 and q >= 0.7)


def test_a_backend_in_rotation_leaves_at_min_quality_not_at_the_margin() -> None:
    engine = engine_for(make_config("quality_based", f"min_quality: 0.7, reentry_margin: 0.1, probe_share: 0, "
                                                     f"quality_prior_weight: 1, {SMOOTH}"))
    engine.recompute()
    rate(engine, "cheap", 0.72, 20)
    engine.recompute()
    assert engine.weights()["chat"]["cheap"] > 0  # between min_quality and min_quality + margin: stays


# -- the engine: probing, Envoy's view, rotation, explain -----------------------------------------

def test_engine_probes_a_held_out_backend_and_explain_says_so() -> None:
    engine = engine_for(make_config("cost_optimized", f"min_quality: 0.7, probe_share: 0.02, {SMOOTH}"))
    rate(engine, "cheap", 0.2, 30)
    assert engine.recompute() is True
    w = engine.weights()["chat"]
    assert w["cheap"] == 20 and w["medium"] > w["dear"] > 0
    explained = engine.explain("chat")["backends"]
    assert explained["cheap"]["probing"] is True and explained["cheap"]["below_min_quality"] is True
    assert explained["cheap"]["reason"].startswith("probing only: 2.0% of traffic")
    assert explained["medium"]["probing"] is False and explained["medium"]["below_min_quality"] is False


def test_a_probed_backend_takes_exactly_the_probe_share_at_once() -> None:
    engine = engine_for(make_config("cost_optimized", "min_quality: 0.7, probe_share: 0.02, smoothing: 0.1, hysteresis: 0"))
    engine.recompute()
    assert engine.pools["chat"].smoothed["cheap"] > 0.9
    rate(engine, "cheap", 0.2, 30)
    engine.recompute()
    assert engine.pools["chat"].smoothed["cheap"] == pytest.approx(0.02)


@pytest.mark.parametrize("how", ["drained", "cooling", EJECTED, FAILING, DRAINING])
def test_engine_never_probes_out_of_rotation_or_what_envoy_ejected(how: str) -> None:
    engine = engine_for(make_config("cost_optimized", f"min_quality: 0.7, probe_share: 0.02, {SMOOTH}"))
    rate(engine, "cheap", 0.2, 30)
    key = ("chat", "cheap")
    if how == "drained":
        engine.set_rotation(frozenset({key}), {})
    elif how == "cooling":
        engine.set_rotation(frozenset(), {key: Cooldown(2e9, 1e9, "30")})
    else:
        engine.set_envoy_view(envoy_out({key: how, ("chat", "medium"): HEALTHY}))
    engine.recompute()
    assert engine.weights()["chat"]["cheap"] == 0
    explained = engine.explain("chat")["backends"]["cheap"]
    assert explained["probing"] is False and "not probed" in explained["reason"]
    # once back in Envoy's rotation, it is probed again
    engine.set_rotation(frozenset(), {})
    engine.set_envoy_view({})
    engine.recompute()
    assert engine.weights()["chat"]["cheap"] == 20


def test_envoy_view_maps_only_ejected_failing_and_draining() -> None:
    states = {("p", "a"): EJECTED, ("p", "b"): FAILING, ("p", "c"): DRAINING, ("p", "d"): HEALTHY,
              ("p", "e"): ABSENT, ("p", "f"): UNKNOWN}
    # ABSENT is what a backend scored to 0 looks like (left out of EDS): it must stay probe-able.
    assert set(envoy_out(states)) == {("p", "a"), ("p", "b"), ("p", "c")}


def test_scoring_loop_hands_envoys_view_to_the_engine() -> None:
    config = make_config("cost_optimized", f"min_quality: 0.7, probe_share: 0.02, {SMOOTH}")
    engine = engine_for(config)
    reconciler = Reconciler(SnapshotCache(), DesiredState(config=config))
    states = {("chat", "cheap"): EJECTED}

    loop = ScoringLoop(engine, Budgets(), Requests(), reconciler, clock=lambda: 0.0,  # type: ignore[arg-type]
                       envoy_states=lambda: states)
    rate(engine, "cheap", 0.2, 30)
    loop.start()
    assert reconciler.state.weights["chat"]["cheap"] == 0
    states = {("chat", "cheap"): HEALTHY}
    loop.step(10.0)  # schedules the pool
    loop.step(20.0)  # due
    assert reconciler.state.weights["chat"]["cheap"] == 20


def test_no_probing_while_a_budget_shifts_everything_to_the_cheapest() -> None:
    engine = engine_for(make_config("cost_optimized", f"min_quality: 0.7, probe_share: 0.05, {SMOOTH}"))
    rate(engine, "cheap", 0.2, 30)
    engine.recompute(shift_to_cheapest=frozenset({"chat"}))
    assert engine.weights()["chat"] == {"cheap": 0, "medium": 1000, "dear": 0}


def test_unhealthy_backend_is_not_probed_by_the_engine() -> None:
    engine = engine_for(make_config("cost_optimized", f"min_quality: 0.7, probe_share: 0.05, {SMOOTH}"))
    rate(engine, "cheap", 0.2, 30)
    engine.observe_health("chat", "cheap", 0.0, "unhealthy")
    engine.recompute()
    assert engine.weights()["chat"]["cheap"] == 0


# -- the estimator's memory -------------------------------------------------------------------------

def test_memory_in_ratings_is_the_discount() -> None:
    assert QUALITY_DECAY == pytest.approx(memory_decay(100)) == pytest.approx(0.99)
    st = BackendStats(prior_quality=0.5, prior_weight=10, decay=memory_decay(20))
    for _ in range(1000):
        st.observe_feedback(1.0)
    assert st.feedback_weight == pytest.approx(20.0)  # at most `memory` ratings' worth of evidence
    for _ in range(14):  # ln 2 x 20 ~ 14 ratings: half of the old evidence gone
        st.observe_feedback(0.0)
    assert st.feedback_sum == pytest.approx(20 * memory_decay(20) ** 14) and 0.45 < memory_decay(20) ** 14 < 0.5


def test_memory_ratings_reaches_every_backend_and_follows_edits() -> None:
    engine = engine_for(make_config("adaptive_learning", "memory_ratings: 20"))
    assert [st.decay for st in engine.stats.values()] == pytest.approx([0.95] * 3)
    engine.sync(make_config("adaptive_learning", "memory_ratings: 50"))
    assert [st.decay for st in engine.stats.values()] == pytest.approx([0.98] * 3)


def test_adaptive_learnings_reward_posterior_forgets_at_the_same_rate() -> None:
    engine = engine_for(make_config("adaptive_learning", "memory_ratings: 10"))
    for _ in range(500):
        engine.observe_request("chat", "cheap", False, 100.0)
    st = engine.stats[("chat", "cheap")]
    # failures only: beta converges to 1 + memory, alpha to its prior
    assert st.reward_beta == pytest.approx(11.0) and st.reward_alpha == pytest.approx(1.0)


@pytest.mark.parametrize("strategy", ["quality_based", "balanced", "adaptive_learning"])
def test_the_quality_strategies_read_the_same_estimate(strategy: str) -> None:
    """quality_based and balanced score the estimate; adaptive_learning's rewards are computed from it."""
    engine = engine_for(make_config(strategy, "memory_ratings: 10, quality_prior_weight: 1"))
    rate(engine, "cheap", 0.1, 50)
    st = engine.stats[("chat", "cheap")]
    cands = {c.name: c for c in engine.candidates("chat")}
    assert cands["cheap"].quality == st.quality == pytest.approx((0.8 + 0.1 * 10 * (1 - 0.9 ** 50)) / (1 + 10 * (1 - 0.9 ** 50)))
    if strategy == "adaptive_learning":
        # objective quality 1, cost 1, latency 0.5: the reward moves with the estimate, weighted 1/2.5
        assert engine.reward("chat", "cheap", True, 0.0, 0.0) == pytest.approx(
            engine.reward("chat", "medium", True, 0.0, 0.0) - (0.8 - st.quality) / 2.5)


# -- following a change, in requests (the rule, without Envoy) ---------------------------------------

def drift(scoring: str, strategy: str = "balanced", phase: int = 1500, limit: int = 20000,
          window: int = 200, seed: int = 1) -> dict[str, int]:
    """cheap poor (0.4) and medium good (0.85), then at `phase` cheap 0.95 and medium 0.5; requests are
    sent by the weights, each rated from its backend's true quality (sd 0.05), recomputed every 50.

    Returns, in requests after the change, where the first `window` starts in which: medium has most
    of the traffic (`medium_in`, phase 1); medium has at most 10% (`medium_out`) and cheap most
    (`cheap_in`), phase 2."""
    engine = engine_for(make_config(strategy, scoring))
    truth = {"cheap": 0.4, "medium": 0.85, "dear": 0.9}
    rng = random.Random(seed)
    served: list[str] = []
    found: dict[str, int] = {}
    engine.recompute()
    for i in range(limit):
        if i == phase:
            truth = {"cheap": 0.95, "medium": 0.5, "dear": 0.9}
        w = engine.weights()["chat"]
        name = rng.choices(list(w), weights=list(w.values()))[0]
        served.append(name)
        engine.observe_request("chat", name, True, 50.0, 100, 100)
        engine.observe_feedback("chat", name, min(1.0, max(0.0, rng.gauss(truth[name], 0.05))))
        if i % 50 == 49:
            engine.recompute()
        if len(served) < window:
            continue
        last, start = Counter(served[-window:]), i + 1 - window
        if i < phase and last["medium"] > window / 2:
            found.setdefault("medium_in", start)
        if start >= phase and last["medium"] <= window / 10:
            found.setdefault("medium_out", start - phase)
        if start >= phase and last["cheap"] > window / 2:
            found.setdefault("cheap_in", start - phase)
        if "cheap_in" in found and "medium_out" in found:
            break
    return found


def test_the_pool_follows_a_change_in_both_directions() -> None:
    # The defaults (probe 1%, memory 100 ratings): bounds, not speed targets (measured, seeds 0-2:
    # medium out in ~80 requests, cheap back in 4,000-5,000).
    followed = drift("min_quality: 0.7")
    assert followed["medium_in"] < 300 and followed["medium_out"] < 500 and followed["cheap_in"] < 8000, followed
    # A larger probe share and a shorter memory follow faster (measured: cheap back in 60-220).
    faster = drift("min_quality: 0.7, probe_share: 0.05, memory_ratings: 20")
    assert faster["medium_out"] < 300 and faster["cheap_in"] < min(1000, followed["cheap_in"]), (faster, followed)


def test_without_probing_a_held_out_backend_never_returns() -> None:
    followed = drift("min_quality: 0.7, probe_share: 0", limit=8000)
    assert "medium_out" in followed and "cheap_in" not in followed, followed


def test_when_none_is_back_over_the_margin_those_meeting_min_quality_return() -> None:
    scoring = Scoring(min_quality=0.7, reentry_margin=0.05)
    cands = [cand("a", quality=0.72), cand("b", quality=0.6)]
    d = decide("quality_based", cands, scoring, random.Random(0), below_quality=frozenset({"a", "b"}))
    assert d.shares["a"] == pytest.approx(1.0) and d.below_quality == {"b"}
    # none meets even min_quality: all kept, as before
    low = [cand("a", quality=0.65), cand("b", quality=0.6)]
    kept = decide("quality_based", low, scoring, random.Random(0), below_quality=frozenset({"a", "b"}))
    assert all(s > 0 for s in kept.shares.values()) and "kept: no backend meets it" in kept.reasons["a"]


def test_a_probe_never_lowers_a_strategys_share() -> None:
    # 150 backends at 0.4% each and one at 40%: probes would be 0.5/150 = 0.33% each, less than they have.
    cands = [cand("big")] + [cand(f"s{i}") for i in range(150)]
    shares = {"big": 0.4, **{f"s{i}": 0.6 / 150 for i in range(150)}}
    d = probe(Decision(shares, {}), cands, 0.01, True, {})
    assert d.shares == shares and not d.probing
