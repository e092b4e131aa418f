"""Rollouts without a network: the config block, the weights a plan gives, the state machine and its gates,
persistence, and the Envoy resources a shadow or an A/B test needs."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from controlplane.config import Config, ConfigError
from controlplane.config.loader import config_from_bytes
from controlplane.config.model import Rollout
from controlplane.rollouts import machine
from controlplane.rollouts.controller import Rollouts
from controlplane.rollouts.machine import CommandError, Run
from controlplane.rollouts.plan import FULL_WEIGHT, RolloutPlan, shadow_pool, weights
from controlplane.scoring.engine import Engine
from controlplane.telemetry.accesslog import Attempt, Observation
from controlplane.xds import resources
from controlplane.xds.snapshot import Snapshot


def pool_doc(rollout: dict[str, Any] | None = None, **backends: dict[str, Any]) -> dict[str, Any]:
    backends = backends or {"a": {"url": "http://127.0.0.1:9001"}, "b": {"url": "http://127.0.0.1:9002"},
                            "c": {"url": "http://127.0.0.1:9003"}}
    doc: dict[str, Any] = {"backends": backends}
    if rollout is not None:
        doc["rollout"] = rollout
    return doc


def config(rollout: dict[str, Any] | None = None, **backends: dict[str, Any]) -> Config:
    return Config.model_validate({"pools": {"chat": pool_doc(rollout, **backends)}})


def errors_of(rollout: dict[str, Any], **backends: dict[str, Any]) -> str:
    text = json.dumps({"pools": {"chat": pool_doc(rollout, **backends)}}).encode()
    with pytest.raises(ConfigError) as caught:
        config_from_bytes(text, "rollout.yaml")
    return str(caught.value)


# -- the config block ----------------------------------------------------------------------------------------

def test_defaults_follow_the_issue() -> None:
    r = config({"candidate": "c"}).pools["chat"].rollout
    assert r is not None and r.mode == "canary" and r.steps == [1, 5, 25, 50, 100]
    assert r.step_duration == timedelta(minutes=5) and r.max_step_duration == timedelta(minutes=30)
    assert r.gates.errors is not None and (r.gates.errors.baseline_rate, r.gates.errors.bad_rate) == (0.02, 0.10)
    assert config({"candidate": "c"}).pools["chat"].rollout_baseline() == ["a", "b"]


@pytest.mark.parametrize(("rollout", "wanted"), [
    ({"candidate": "zz"}, "rollout.candidate 'zz' is not a backend"),
    ({"candidate": "c", "baseline": ["c"]}, "must not name the candidate"),
    ({"candidate": "c", "baseline": ["nope"]}, "rollout.baseline names 'nope'"),
    ({"candidate": "c", "steps": [5, 1]}, "steps must increase"),
    ({"candidate": "c", "steps": [0, 5]}, "steps"),
    ({"candidate": "c", "mode": "shadow"}, "mode shadow needs a shadow block"),
    ({"candidate": "c", "gates": {"errors": {"baseline_rate": 0.2, "bad_rate": 0.1}}}, "bad_rate (0.1) must be above"),
    ({"candidate": "c", "step_duration": "10m", "max_step_duration": "5m"}, "max_step_duration must be longer"),
    ({"candidate": "c", "gates": {"ttfb": 2}}, "gates.ttfb"),
    ({"candidate": "c", "mode": "blue-green"}, "rollout.mode"),
])
def test_bad_rollout_blocks_are_named(rollout: dict[str, Any], wanted: str) -> None:
    message = errors_of(rollout)
    assert wanted in message and "rollout.yaml" in message and "chat" in message, message


def test_candidate_and_baseline_share_a_tier() -> None:
    message = errors_of({"candidate": "c", "baseline": ["b"]}, a={"url": "http://127.0.0.1:1"},
                        b={"url": "http://127.0.0.1:2", "priority": 1}, c={"url": "http://127.0.0.1:3"})
    assert "priority tier 1, the candidate in tier 0" in message
    alone = errors_of({"candidate": "c"}, a={"url": "http://127.0.0.1:1", "priority": 1},
                      c={"url": "http://127.0.0.1:3"})
    assert "no baseline" in alone


# -- weights -------------------------------------------------------------------------------------------------

def share_of(out: dict[str, int] | Any, name: str, tier: list[str]) -> float:
    return out[name] / sum(out[n] for n in tier)


@pytest.mark.parametrize("step", [0.01, 0.05, 0.25, 0.5, 0.9])
def test_the_candidate_takes_exactly_its_step_of_its_tier(step: float) -> None:
    pool = config({"candidate": "c"}).pools["chat"]
    out = weights(pool, {"a": 1, "b": 1, "c": 7}, RolloutPlan("canary", "c", step), frozenset())
    assert share_of(out, "c", ["a", "b", "c"]) == pytest.approx(step, abs=1e-4)
    assert out["a"] == out["b"], "the others keep the ratio scoring gave them"


def test_full_step_keeps_the_others_for_retries_and_zero_removes_the_candidate() -> None:
    pool = config({"candidate": "c"}).pools["chat"]
    full = weights(pool, {"a": 600, "b": 400, "c": 1}, RolloutPlan("canary", "c", 1.0), frozenset())
    assert full == {"a": 1, "b": 1, "c": FULL_WEIGHT}
    out = weights(pool, {"a": 600, "b": 400, "c": 1}, RolloutPlan("canary", "c", 0.0), frozenset())
    assert out["c"] == 0 and out["a"] == 600
    drained = weights(pool, {"a": 500, "b": 500, "c": 1}, RolloutPlan("canary", "c", 0.5), frozenset({"b"}))
    assert drained["c"] == drained["a"], "a drained backend takes nothing, so it does not count"


def test_load_assignment_leaves_a_rolled_back_candidate_out() -> None:
    cfg = config({"candidate": "c"})
    built = resources.endpoints(cfg, {"chat": {"a": 1, "b": 1, "c": 1}}, {"127.0.0.1": "127.0.0.1"}, frozenset(),
                                {"chat": RolloutPlan("canary", "c", 0.0)})
    ports = {lb.endpoint.address.socket_address.port_value
             for loc in built["chat"].endpoints for lb in loc.lb_endpoints}  # type: ignore[attr-defined]
    assert ports == {9001, 9002}


# -- envoy resources for shadow and A/B ------------------------------------------------------------------------

def test_shadow_has_its_own_cluster_and_a_mirror_only_while_planned() -> None:
    cfg = config({"candidate": "c", "mode": "shadow", "shadow": {"percent": 25, "budget": 1, "max_requests": 8}})
    clusters = resources.clusters(cfg)
    shadow = clusters["chat~shadow"]
    assert shadow_pool("chat~shadow") == "chat" and shadow_pool("chat") is None
    assert not shadow.HasField("outlier_detection") and not shadow.health_checks  # type: ignore[attr-defined]
    limits = shadow.circuit_breakers.thresholds[0]  # type: ignore[attr-defined]
    assert limits.max_requests.value == 8 and limits.max_retries.value == 0
    addresses = {"127.0.0.1": "127.0.0.1"}
    eds = resources.endpoints(cfg, {}, addresses, frozenset(), {"chat": RolloutPlan("shadow", "c", 0.0, 0.25)})
    shadow_ports = [lb.endpoint.address.socket_address.port_value
                    for loc in eds["chat~shadow"].endpoints for lb in loc.lb_endpoints]  # type: ignore[attr-defined]
    assert shadow_ports == [9003]
    routes = resources.route_configuration(cfg, plans={"chat": RolloutPlan("shadow", "c", 0.0, 0.25)})
    mirrors = [m for r in routes.virtual_hosts[0].routes for m in r.route.request_mirror_policies]
    assert mirrors and all(m.cluster == "chat~shadow" for m in mirrors)
    assert mirrors[0].runtime_fraction.default_value.numerator == 250_000
    assert mirrors[0].request_headers_mutations[0].append.header.key == "x-llm-lb-shadow"
    stopped = resources.route_configuration(cfg, plans={"chat": RolloutPlan("shadow", "c", 0.0, 0.0)})
    assert not any(r.route.request_mirror_policies for r in stopped.virtual_hosts[0].routes)
    snapshot = Snapshot.of({t: resources.build(cfg, {}, addresses, plans={"chat": RolloutPlan("shadow", "c", 0, 0.25)})[t]
                            for t in resources.build(cfg, {}, addresses)})
    assert not snapshot.problems()


def test_ab_hashes_users_with_maglev() -> None:
    cfg = config({"candidate": "c", "mode": "ab", "ab": {"percent": 30, "user_header": "x-user"}})
    cluster = resources.clusters(cfg)["chat"]
    assert cluster.lb_policy == cluster.MAGLEV  # type: ignore[attr-defined]
    route = resources.route_configuration(cfg).virtual_hosts[0].routes[-1]
    assert route.route.hash_policy[0].header.header_name == "x-user"
    assert route.request_headers_to_add[0].header.value == "%REQ(x-user)%"


# -- the state machine -----------------------------------------------------------------------------------------

def rollout(**settings: Any) -> Rollout:
    r = config({"candidate": "c", **settings}).pools["chat"].rollout
    assert r is not None
    return r


def feed(run: Run, cand_ok: int, cand_failed: int, base_ok: int, at: float = 1.0, ttfb: float = 100.0,
         cand_ttfb: float | None = None) -> None:
    for _ in range(cand_ok):
        machine.observe_candidate(run, at, True, cand_ttfb or ttfb, 500.0, 10, 50, 0.01, None)
    for _ in range(cand_failed):
        machine.observe_candidate(run, at, False, None, 5.0, 0, 0, 0.0, None)
    for _ in range(base_ok):
        machine.observe_baseline(run, at, True, ttfb, 500.0, 10, 50, 0.01, None)


FAST = {"steps": [10, 50, 100], "step_duration": "10s", "max_step_duration": "60s", "min_requests": 40}


def test_a_good_candidate_walks_the_steps_to_promotion() -> None:
    r = rollout(**FAST)
    run = machine.start("chat", r, 0.0)
    assert machine.plan(run, r) == RolloutPlan("canary", "c", 0.1)
    for _ in range(3):
        feed(run, 50, 0, 400)
        assert machine.tick(run, r, 5.0, 5.0) is None, "not before step_duration"
        t = machine.tick(run, r, 10.0, 5.0)
        assert t is not None and t.by == "gates"
    assert run.phase == machine.PROMOTED and machine.plan(run, r) is None
    assert [(h["from"], h["to"]) for h in run.history] == [
        ("none", "running"), ("running", "running"), ("running", "running"), ("running", "promoted")]


def test_a_failing_candidate_fails_and_leaves_traffic() -> None:
    r = rollout(**FAST)
    run = machine.start("chat", r, 0.0)
    feed(run, 16, 4, 400)
    t = machine.tick(run, r, 1.0, 1.0)
    assert t is not None and t.after == machine.FAILED and "errors" in t.reason
    assert machine.plan(run, r) == RolloutPlan("canary", "c", 0.0)
    with pytest.raises(CommandError):
        machine.command(run, r, "resume", 2.0)
    machine.command(run, r, "retry", 3.0)
    assert run.phase == machine.RUNNING and run.step == 0 and run.cand.requests == 0
    assert [(h["from"], h["to"]) for h in run.history] == [("none", "running"), ("running", "failed"),
                                                          ("failed", "running")]


def test_the_baselines_own_errors_are_not_blamed_on_the_candidate() -> None:
    r = rollout(**FAST)
    run = machine.start("chat", r, 0.0)
    for _ in range(10):  # both at 10%, interleaved as traffic is, the gates evaluated every round
        feed(run, 9, 1, 36)
        for _ in range(4):
            machine.observe_baseline(run, 1.0, False, None, 5.0, 0, 0, 0.0, None)
        gates = {g.name: g for g in machine.evaluate(run, r, 1.0)}
        assert gates["errors"].status != machine.FAIL, gates["errors"]
    assert run.rates is not None and run.rates[0] == pytest.approx(0.1)


def test_the_errors_test_is_decided_once_per_step_and_asked_again_at_the_next() -> None:
    r = rollout(gates={"ttfb_p95_ratio": None}, **FAST)
    run = machine.start("chat", r, 0.0)
    feed(run, 2000, 0, 8000)  # a long good stretch: the step's test passed long ago...
    for _ in range(40):  # ...then every fifth request fails: the step's decision stands (no false alarm by
        feed(run, 4, 1, 20)  # looking again and again)
        assert {g.name: g.status for g in machine.evaluate(run, r, 1.0)}["errors"] == machine.PASS
    run.step_elapsed = 10.0
    assert machine.tick(run, r, 10.0, 0.0) is not None and run.step == 1  # the next step: a new test
    for n in range(1, 200):
        feed(run, 0 if n % 5 == 0 else 1, 1 if n % 5 == 0 else 0, 4)
        if {g.name: g.status for g in machine.evaluate(run, r, 11.0)}["errors"] == machine.FAIL:
            break
    assert n <= 80, f"the new step's test failed it only after {n} requests"


def test_a_good_candidate_watched_every_request_fails_no_more_than_alpha() -> None:
    """The errors gate looked at after every request of a long step, over many seeded runs of a candidate
    exactly at the acceptable rate (2%): Wald's bound holds however often it is looked at."""
    import random

    r = rollout(gates={"ttfb_p95_ratio": None}, **FAST)
    rng = random.Random(5)
    runs, failed = 300, 0
    for _ in range(runs):
        run = machine.start("chat", r, 0.0)
        for _ in range(1500):
            machine.observe_candidate(run, 1.0, rng.random() >= 0.02, 10.0, 10.0, 1, 1, 0.0, None)
            if run.llr >= run.bounds[1]:
                failed += 1
                break
            if run.llr <= run.bounds[0]:
                break
    alpha = 0.01
    assert failed / runs <= alpha + 3 * (alpha * (1 - alpha) / runs) ** 0.5, failed


def test_on_failure_pause_holds_the_step_and_resume_restarts_its_window() -> None:
    r = rollout(on_failure="pause", **FAST)
    run = machine.start("chat", r, 0.0)
    feed(run, 10, 10, 100)
    t = machine.tick(run, r, 1.0, 1.0)
    assert t is not None and t.after == machine.PAUSED
    assert machine.plan(run, r) == RolloutPlan("canary", "c", 0.1)
    machine.command(run, r, "resume", 2.0)
    assert run.phase == machine.RUNNING and run.cand.requests == 0


def test_doubled_ttfb_fails_and_five_percent_passes() -> None:
    r = rollout(gates={"ttfb_p95_ratio": 1.25, "errors": None}, **FAST)
    slow = machine.start("chat", r, 0.0)
    feed(slow, 40, 0, 200, cand_ttfb=200.0)
    assert machine.tick(slow, r, 1.0, 1.0) is None, "judged once the step has run its time"
    assert {g.name: g.status for g in slow.gates}["ttfb_p95"] == machine.WAIT
    assert (t := machine.tick(slow, r, 10.0, 9.0)) is not None and "ttfb_p95" in t.reason
    fine = machine.start("chat", r, 0.0)
    feed(fine, 40, 0, 200, cand_ttfb=105.0)
    assert machine.tick(fine, r, 10.0, 10.0) is not None and fine.phase == machine.RUNNING and fine.step == 1


def test_the_last_step_compares_latency_with_the_baselines_whole_run() -> None:
    r = rollout(gates={"ttfb_p95_ratio": 1.25, "errors": None}, **FAST)
    run = machine.start("chat", r, 0.0)
    feed(run, 40, 0, 200)
    run.step = 2  # 100%: the baseline keeps weight 1 and serves next to nothing in this step
    run.cand, run.base = type(run.cand)(), type(run.base)()
    feed(run, 40, 0, 0)
    run.step_elapsed = 10.0
    gates = {g.name: g for g in machine.evaluate(run, r, 1.0)}
    assert gates["ttfb_p95"].status == machine.PASS, gates["ttfb_p95"]


def test_quality_waits_for_min_feedback_then_judges() -> None:
    r = rollout(gates={"errors": None, "ttfb_p95_ratio": None, "quality": {"min_delta": -0.05, "min_feedback": 20}},
                **FAST)
    run = machine.start("chat", r, 0.0)
    for _ in range(19):
        run.total_cand.observe_feedback(0.4)
        run.total_base.observe_feedback(0.9)
    assert {g.name: g.status for g in machine.evaluate(run, r, 1.0)}["quality"] == machine.WAIT
    run.total_cand.observe_feedback(0.4)
    run.total_base.observe_feedback(0.9)
    assert {g.name: g.status for g in machine.evaluate(run, r, 1.0)}["quality"] == machine.FAIL
    # With too little baseline feedback, the scores' estimate of the baseline stands in.
    other = machine.start("chat", r, 0.0)
    for _ in range(20):
        other.total_cand.observe_feedback(0.8)
    gates = {g.name: g for g in machine.evaluate(other, r, 1.0, baseline_quality=0.82)}
    assert gates["quality"].status == machine.PASS, gates["quality"]


def test_silence_fails_only_when_the_share_should_have_brought_requests() -> None:
    r = rollout(gates={"errors": None, "ttfb_p95_ratio": None, "no_data_after": "30s"}, **FAST)
    run = machine.start("chat", r, 0.0)
    feed(run, 0, 0, 50)  # at 10%, 50 baseline requests: about 5.6 due
    assert {g.name: g.status for g in machine.evaluate(run, r, 40.0)}["no_data"] == machine.PASS
    feed(run, 0, 0, 100)  # 150: about 16.7 due
    assert {g.name: g.status for g in machine.evaluate(run, r, 40.0)}["no_data"] == machine.FAIL
    assert {g.name: g.status for g in machine.evaluate(run, r, 20.0)}["no_data"] == machine.PASS, "not before 30 s"


def test_inconclusive_step_pauses_and_operator_commands() -> None:
    r = rollout(**FAST)
    run = machine.start("chat", r, 0.0)
    t = machine.tick(run, r, 61.0, 61.0) or machine.tick(run, r, 61.0, 61.0)
    assert t is not None and t.after == machine.PAUSED and "inconclusive" in t.reason
    machine.command(run, r, "resume", 62.0)
    machine.command(run, r, "promote", 63.0)
    assert run.step == 1
    machine.command(run, r, "promote", 64.0, full=True)
    assert run.phase == machine.PROMOTED
    with pytest.raises(CommandError):
        machine.command(run, r, "abort", 65.0)
    with pytest.raises(CommandError, match="promoted"):
        machine.command(run, r, "retry", 65.0)
    with pytest.raises(CommandError):
        machine.command(run, r, "explode", 65.0)


def test_shadow_passes_then_continues_as_canary() -> None:
    r = rollout(mode="shadow", shadow={"percent": 50, "budget": 1, "then": "canary"}, **FAST)
    run = machine.start("chat", r, 0.0)
    assert machine.plan(run, r) == RolloutPlan("shadow", "c", 0.0, 0.5)
    feed(run, 50, 0, 100)
    t = machine.tick(run, r, 10.0, 10.0)
    assert t is not None and run.stage == "canary" and run.step == 0 and run.phase == machine.RUNNING
    assert machine.plan(run, r) == RolloutPlan("canary", "c", 0.1)
    assert run.shadow_arms is not None and run.shadow_arms[0].requests == 50 and run.total_cand.requests == 0
    again = Run.from_dict(json.loads(json.dumps(run.to_dict())), 11.0)
    assert again.shadow_arms is not None and again.shadow_arms[0].requests == 50, "the shadow's report survives"


def test_shadow_budget_stops_the_mirror() -> None:
    r = rollout(mode="shadow", shadow={"percent": 50, "budget": 0.1}, **FAST)
    run = machine.start("chat", r, 0.0)
    run.shadow_spend = 0.1
    assert machine.plan(run, r) == RolloutPlan("shadow", "c", 0.0, 0.0)
    t = machine.tick(run, r, 1.0, 1.0)
    assert t is not None and t.after == machine.PAUSED and "budget" in t.reason


# -- the controller: telemetry, persistence, config edits ------------------------------------------------------

def obs(backend: str, status: int = 200, pool: str = "chat", user: str = "") -> Observation:
    return Observation("id", pool, backend, status, 120.0, 80.0, 10, 50, False, "", None, "m", "m", user=user)


def test_controller_counts_attempts_once_and_survives_a_restart(tmp_path: Path) -> None:
    cfg = config({"candidate": "c", **FAST})
    engine = Engine()
    engine.sync(cfg)
    now = [100.0]
    rollouts = Rollouts(tmp_path, engine, clock=lambda: now[0])
    plans = rollouts.sync(cfg)
    assert plans == {"chat": RolloutPlan("canary", "c", 0.1)} and rollouts.watched == {"chat"}
    rollouts.observe(obs("c"), True, 0.01, 100.0)
    rollouts.observe(obs("c", 503), False, 0.0, 100.0)  # its failure comes from the attempts log
    rollouts.observe_attempt(Attempt("id", "chat", "c", 503, 5.0, ""), 100.0)
    rollouts.observe(obs("a"), True, 0.01, 100.0)
    rollouts.observe_feedback("chat", "c", 0.7)
    run = rollouts.runs["chat"]
    assert (run.cand.requests, run.cand.failures, run.base.requests) == (2, 1, 1)
    now[0] = 105.0
    rollouts.step()
    now[0] = 107.0
    rollouts.step()
    rollouts.save()
    again = Rollouts(tmp_path, engine, clock=lambda: 500.0)
    assert again.sync(cfg) == plans, "the same plans after a restart"
    resumed = again.runs["chat"]
    assert resumed.step_elapsed == pytest.approx(2.0) and resumed.cand.requests == 2
    assert resumed.total_cand.quality.n == 1
    edited = config({"candidate": "c", **{**FAST, "steps": [20, 100]}})
    assert again.sync(edited) == {"chat": RolloutPlan("canary", "c", 0.2)}
    assert again.runs["chat"].cand.requests == 0, "an edited block starts again"
    assert again.sync(config()) == {} and not again.runs
    assert again.transitions[("chat", "removed")] == 1, "counted (and sent to the webhook) as a transition"


def test_unreadable_state_is_kept_aside_and_the_candidate_kept_out(tmp_path: Path) -> None:
    (tmp_path / "rollouts.json").write_text("{not json")
    rollouts = Rollouts(tmp_path, Engine())
    cfg = config({"candidate": "c"})
    assert rollouts.sync(cfg) == {"chat": RolloutPlan("canary", "c", 0.0)}, "it may have failed: out of traffic"
    assert rollouts.runs["chat"].phase == machine.ABORTED and "could not be read" in rollouts.runs["chat"].reason
    assert list(tmp_path.glob("rollouts.json.corrupt-*"))
    rollouts.command("chat", "retry")
    assert rollouts.plans() == {"chat": RolloutPlan("canary", "c", 0.01)}


def test_a_failed_reload_puts_the_runs_back(tmp_path: Path) -> None:
    rollouts = Rollouts(tmp_path, Engine(), clock=lambda: 1.0)
    cfg = config({"candidate": "c", **FAST})
    rollouts.sync(cfg)
    run = rollouts.runs["chat"]
    run.phase = machine.FAILED
    saved = rollouts.checkpoint()
    rollouts.sync(config({"candidate": "c", **{**FAST, "min_requests": 41}}))
    assert rollouts.runs["chat"].phase == machine.RUNNING
    rollouts.restore(saved)
    assert rollouts.runs["chat"] is run and rollouts.plans() == {"chat": RolloutPlan("canary", "c", 0.0)}


def test_shadow_attempts_are_priced_and_compared_with_the_primary(tmp_path: Path) -> None:
    cfg = config({"candidate": "c", "mode": "shadow", "shadow": {"percent": 100, "budget": 10}, **FAST},
                 a={"url": "http://127.0.0.1:1"},
                 c={"url": "http://127.0.0.1:3", "cost": {"input_per_1k": 1.0, "output_per_1k": 2.0}})
    rollouts = Rollouts(tmp_path, Engine(), clock=lambda: 1.0)
    rollouts.sync(cfg)
    rollouts.observe_attempt(Attempt("id", "chat~shadow", "c", 200, 300.0, "", "", True, 90.0, 4000, 8000), 1.0)
    rollouts.observe_attempt(Attempt("id2", "chat~shadow", "c", 500, 30.0, "", "", True, None, 4000, 100), 1.0)
    rollouts.observe_attempt(Attempt("id3", "chat~shadow", "c", 0, 0.0, "UO", "", True), 1.0)  # its breaker
    rollouts.observe(obs("a"), True, 0.002, 1.0)
    run = rollouts.runs["chat"]
    assert run.shadow_spend == pytest.approx(1.0 * 1 + 2.0 * 2)  # 1000 prompt and 2000 completion tokens
    assert (run.cand.requests, run.cand.failures, run.base.requests) == (2, 1, 1)
    report = rollouts.report("chat")
    assert report["shadow"]["report"]["shadow"]["tokens_out_per_request"] == 2000
    assert "quality" not in report["shadow"]["report"]["shadow"]
    assert report["shadow"]["overflow"] == 1


def test_an_edit_of_the_candidate_backend_restarts_a_failed_rollout(tmp_path: Path) -> None:
    rollouts = Rollouts(tmp_path, Engine(), clock=lambda: 1.0)
    rollouts.sync(config({"candidate": "c", **FAST}))
    rollouts.runs["chat"].phase = machine.FAILED
    same = config({"candidate": "c", **FAST}, a={"url": "http://127.0.0.1:9001", "weight": 2},
                  b={"url": "http://127.0.0.1:9002"}, c={"url": "http://127.0.0.1:9003"})
    assert rollouts.sync(same) == {"chat": RolloutPlan("canary", "c", 0.0)}, "another backend's edit: still failed"
    fixed = config({"candidate": "c", **FAST}, a={"url": "http://127.0.0.1:9001", "weight": 2},
                   b={"url": "http://127.0.0.1:9002"}, c={"url": "http://127.0.0.1:9013"})
    assert rollouts.sync(fixed) == {"chat": RolloutPlan("canary", "c", 0.1)}
    assert "candidate edited" in rollouts.runs["chat"].reason


def test_the_arms_count_4xx_and_keep_users_hashed(tmp_path: Path) -> None:
    rollouts = Rollouts(tmp_path, Engine(), clock=lambda: 1.0)
    rollouts.sync(config({"candidate": "c", "mode": "ab", "gates": {"ttfb_p95_ratio": None}}))
    rollouts.observe(obs("c", 404, user="alice@example.com"), True, 0.0, 1.0)
    rollouts.observe(obs("a", 200, user="bob"), True, 0.0, 1.0)
    run = rollouts.runs["chat"]
    assert (run.total_cand.requests, run.total_cand.failures) == (1, 1), "a 4xx the client saw is a failure"
    assert run.cand.requests == 0, "an A/B test keeps its whole run only"
    rollouts.save()
    saved = (tmp_path / "rollouts.json").read_text()
    assert "alice" not in saved and "bob" not in saved and run.total_cand.users_seen == 1


@pytest.mark.parametrize(("rollout", "wanted"), [
    ({"candidate": "c", "mode": "ab", "ab": {"user_header": "authorization"}}, "carries credentials"),
    ({"candidate": "c", "mode": "ab", "baseline": ["a"]}, "splits the candidate's tier in two"),
])
def test_ab_settings_that_would_leak_or_mislead_are_refused(rollout: dict[str, Any], wanted: str) -> None:
    assert wanted in errors_of(rollout)
