"""The rollout statistics: the SPRT's error rates and sample sizes, intervals against published values,
exact binomial ranges, the SRM test, bounded samples, persistence, and an A/A readout's false alarms."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from controlplane.rollouts import stats
from controlplane.rollouts.stats import (
    ArmStats,
    Moments,
    Reservoir,
    Sprt,
    binomial_range,
    expected_samples,
    mean_diff,
    proportion_diff,
    readout,
    simulate_aa,
    srm_p_value,
    wilson,
    z_value,
)

GATE = {"p0": 0.02, "p1": 0.10, "alpha": 0.01, "beta": 0.05}


def run_sprt(rate: float, seed: int, limit: int = 100_000) -> Sprt:
    rng = random.Random(seed)
    sprt = Sprt(**GATE)
    while sprt.decision is None and sprt.n < limit:
        sprt.observe(rng.random() < rate)
    return sprt


def within(share: float, expected: float, runs: int) -> bool:
    """`share` of `runs` Bernoulli trials is at most `expected` plus three standard errors."""
    return share <= expected + 3 * math.sqrt(expected * (1 - expected) / runs)


# --- SPRT ---

def test_sprt_fails_a_bad_stream_quickly():
    wald = expected_samples(**GATE, p_true=0.20)
    assert 15 < wald < 20  # about 4.55 / 0.254: the upper boundary over the mean step
    runs = [run_sprt(0.20, seed) for seed in range(200)]
    assert all(r.decision == "fail" for r in runs)
    assert statistics.mean(r.n for r in runs) < 2 * wald
    assert max(r.n for r in runs) < 5 * wald


def test_sprt_passes_a_clean_stream_after_exactly_the_bound():
    sprt = Sprt(**GATE)
    needed = math.ceil(sprt.lower / math.log((1 - GATE["p1"]) / (1 - GATE["p0"])))
    assert needed == 36
    for _ in range(needed - 1):
        sprt.observe(False)
    assert sprt.decision is None
    sprt.observe(False)
    assert sprt.decision == "pass" and sprt.n == needed and sprt.failures == 0
    sprt.observe_many(10, 0)  # not latched: the current evidence decides
    assert sprt.decision == "fail"


def test_sprt_error_rates_hold():
    runs = 2000
    false_fail = sum(run_sprt(GATE["p0"], seed).decision == "fail" for seed in range(runs)) / runs
    assert within(false_fail, GATE["alpha"], runs)
    false_pass = sum(run_sprt(GATE["p1"], 10_000 + seed).decision == "pass" for seed in range(runs)) / runs
    assert within(false_pass, GATE["beta"], runs)


def test_expected_samples_closed_forms():
    up = math.log((1 - GATE["beta"]) / GATE["alpha"])
    low = math.log(GATE["beta"] / (1 - GATE["alpha"]))
    l1, l0 = math.log(GATE["p1"] / GATE["p0"]), math.log((1 - GATE["p1"]) / (1 - GATE["p0"]))
    a, b = GATE["alpha"], GATE["beta"]
    # at p0 Wald's operating characteristic is exactly 1 - alpha, at p1 exactly beta
    at_p0 = ((1 - a) * low + a * up) / (GATE["p0"] * l1 + (1 - GATE["p0"]) * l0)
    at_p1 = (b * low + (1 - b) * up) / (GATE["p1"] * l1 + (1 - GATE["p1"]) * l0)
    assert expected_samples(**GATE, p_true=GATE["p0"]) == pytest.approx(at_p0, rel=1e-9)
    assert expected_samples(**GATE, p_true=GATE["p1"]) == pytest.approx(at_p1, rel=1e-9)
    assert expected_samples(**GATE, p_true=0.0) == pytest.approx(low / l0)
    assert expected_samples(**GATE, p_true=1.0) == pytest.approx(up / l1)
    zero_drift = -l0 / (l1 - l0)  # the hardest rate: no drift, the longest test
    assert expected_samples(**GATE, p_true=zero_drift) == pytest.approx(
        expected_samples(**GATE, p_true=zero_drift + 1e-7), rel=1e-3)
    assert expected_samples(**GATE, p_true=zero_drift) > expected_samples(**GATE, p_true=GATE["p0"])


def test_sprt_persists_and_validates():
    sprt = Sprt(**GATE)
    sprt.observe_many(3, 40)
    one_by_one = Sprt(**GATE)
    for failed in [True] * 3 + [False] * 40:
        one_by_one.observe(failed)
    assert one_by_one.llr == pytest.approx(sprt.llr) and one_by_one.n == 43
    again = Sprt.from_dict(json.loads(json.dumps(sprt.to_dict())))
    assert again == sprt
    for bad in ({"p0": 0.1, "p1": 0.1}, {"p0": 0.0}, {"p1": 1.0}, {"alpha": 0.0}, {"beta": 1.0}):
        with pytest.raises(ValueError):
            Sprt(**{**GATE, **bad})
    with pytest.raises(ValueError):
        sprt.observe_many(-1, 0)


# --- intervals ---

def test_wilson_matches_published_values():
    assert z_value(0.95) == pytest.approx(1.959964, abs=1e-6)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(10, 10)[1] == 1.0
    assert wilson(0, 0) == (0.0, 1.0)
    narrow, wide = wilson(5, 100, 0.90), wilson(5, 100, 0.99)
    assert wide[0] < narrow[0] < 0.05 < narrow[1] < wide[1]


def test_proportion_diff_matches_newcombe():
    # Newcombe (1998), example (a): 56/70 - 48/80, method 10: 0.0524 to 0.3339
    assert proportion_diff(56, 70, 48, 80) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert proportion_diff(0, 0, 3, 10) == (-1.0, 1.0)


def test_mean_diff_and_moments():
    xs, ys = [1.0, 2.0, 4.0, 7.0, 11.0], [3.0, 3.5, 5.0]
    a, b = Moments(), Moments()
    for x in xs:
        a.add(x)
    for y in ys:
        b.add(y)
    assert a.mean == pytest.approx(statistics.mean(xs)) and a.variance == pytest.approx(statistics.variance(xs))
    assert a.stdev == pytest.approx(statistics.stdev(xs))
    half = z_value(0.95) * math.sqrt(statistics.variance(xs) / 5 + statistics.variance(ys) / 3)
    d = statistics.mean(xs) - statistics.mean(ys)
    assert mean_diff(a, b) == pytest.approx((d - half, d + half))
    lo, hi = a.interval(0.95)
    assert (lo + hi) / 2 == pytest.approx(a.mean) and hi - lo == pytest.approx(2 * 1.959964 * a.stdev / math.sqrt(5))
    one = Moments()
    one.add(3.0)
    assert one.variance == 0.0 and all(math.isnan(v) for v in one.interval() + mean_diff(one, a))
    assert Moments.from_dict(json.loads(json.dumps(a.to_dict()))) == a


def brute_range(n: int, p: float, confidence: float) -> tuple[int, int]:
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    tail = (1 - confidence) / 2
    lo = max(k for k in range(n + 1) if sum(pmf[:k]) <= tail)
    hi = min(k for k in range(n + 1) if sum(pmf[k + 1:]) <= tail)
    return lo, hi


@pytest.mark.parametrize("n,p,confidence", [
    (1, 0.5, 0.99), (10, 0.5, 0.95), (20, 0.05, 0.99), (50, 0.3, 0.99), (100, 0.01, 0.9), (200, 0.5, 0.999),
    (300, 0.97, 0.99),
])
def test_binomial_range_matches_brute_force(n, p, confidence):
    lo, hi = binomial_range(n, p, confidence)
    assert (lo, hi) == brute_range(n, p, confidence)
    covered = sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(lo, hi + 1))
    assert covered >= confidence


def test_binomial_range_edges():
    assert binomial_range(10, 0.0) == (0, 0)
    assert binomial_range(10, 1.0) == (10, 10)
    assert binomial_range(0, 0.5) == (0, 0)
    lo, hi = binomial_range(1_000_000, 0.3)  # normal approximation: 300000 +- 2.576 * 458
    assert abs(lo - (300_000 - 1180)) <= 3 and abs(hi - (300_000 + 1180)) <= 3
    with pytest.raises(ValueError):
        binomial_range(10, 1.5)


def test_srm_p_value():
    assert srm_p_value([5000, 5000], [0.5, 0.5]) == pytest.approx(1.0)
    assert srm_p_value([5050, 4950], [0.5, 0.5]) > 0.05
    # one degree of freedom: P(chi2 >= x) = erfc(sqrt(x / 2))
    for observed in ([5050, 4950], [130, 70], [9, 1], [820, 180]):
        total = sum(observed)
        x = sum((o - total * s) ** 2 / (total * s) for o, s in zip(observed, [0.8, 0.2], strict=True))
        assert srm_p_value(observed, [0.8, 0.2]) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9)
    assert srm_p_value([5500, 4500], [0.5, 0.5]) < 1e-20
    # two degrees of freedom: P(chi2 >= x) = exp(-x / 2); shares need not sum to 1
    assert srm_p_value([40, 30, 30], [1, 1, 1]) == pytest.approx(math.exp(-2.0 / 2))
    assert stats.chi2_sf(18.307, 10) == pytest.approx(0.05, abs=1e-5)  # the table's 5% point
    assert srm_p_value([0, 0], [0.5, 0.5]) == 1.0
    assert srm_p_value([10, 0], [1.0, 0.0]) == 1.0 and srm_p_value([10, 1], [1.0, 0.0]) == 0.0


# --- reservoir ---

def test_reservoir_is_exact_below_capacity():
    rng = random.Random(7)
    values = [rng.expovariate(1 / 800) for _ in range(300)]
    r = Reservoir(capacity=512)
    assert r.quantile(0.5) is None
    for v in values:
        r.add(v)
    assert len(r) == 300 == r.seen
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    for q in (1, 25, 50, 90, 95, 99):
        assert r.quantile(q / 100) == pytest.approx(cuts[q - 1])
    assert r.quantile(0.0) == min(values) and r.quantile(1.0) == max(values)
    with pytest.raises(ValueError):
        r.quantile(1.5)


def test_reservoir_is_bounded_and_uniform_beyond_capacity():
    r = Reservoir(capacity=512, seed=3)
    for i in range(100_000):
        r.add(float(i))
    assert len(r) == 512 and r.seen == 100_000
    median = r.quantile(0.5)
    # a uniform sample of 512: the median's standard error is about 0.022 of the range
    assert median is not None and abs(median - 50_000) < 4 * 0.022 * 100_000
    assert len({int(v) // 10_000 for v in r.values}) == 10  # every decile represented


def test_reservoir_round_trip_continues_identically():
    live = Reservoir(capacity=64, seed=5)
    for i in range(1000):
        live.add(float(i))
    restored = Reservoir.from_dict(json.loads(json.dumps(live.to_dict())))
    assert restored.values == live.values and restored.seen == live.seen
    for i in range(1000, 3000):
        live.add(float(i))
        restored.add(float(i))
    assert restored.values == live.values
    other = Reservoir(capacity=64, seed=6)
    for i in range(3000):
        other.add(float(i))
    assert other.values != live.values


# --- arms and the readout ---

def test_arm_stats_accumulates_and_round_trips(monkeypatch):
    monkeypatch.setattr(stats, "USERS_CAP", 3)
    arm = ArmStats()
    arm.observe_success(10.0, 120.0, 1120.0, 50, 200, 0.002, user="u1")
    arm.observe_success(12.0, None, 500.0, 0, 100, 0.001, user="u2")
    arm.observe_failure(11.0, user="u1")
    for user in ("u3", "u4", "u5"):
        arm.observe_failure(13.0, user=user)
    arm.observe_feedback(0.8)
    assert arm.requests == 6 and arm.failures == 4 and arm.error_rate == pytest.approx(4 / 6)
    assert arm.ttfb.n == 1 and len(arm.ttfb_ms) == 1
    assert arm.token_latency_ms.values == [1120.0 / 50]  # none for the reply without tokens
    assert arm.cost.n == 2 and arm.spend == pytest.approx(0.003)
    assert (arm.tokens_in, arm.tokens_out, arm.last_seen) == (300, 50, 13.0)
    assert arm.users == {"u1", "u2", "u3"} and arm.users_overflow == 2 and arm.users_seen == 5
    assert arm.ttfb_ms.seed != arm.token_latency_ms.seed
    data = json.loads(json.dumps(arm.to_dict(), allow_nan=False))
    assert data["users"] == ["u1", "u2", "u3"]
    assert ArmStats.from_dict(data).to_dict() == arm.to_dict()
    assert ArmStats().error_rate == 0.0


def arm_with_scores(mean: float, n: int, seed: int) -> ArmStats:
    rng = random.Random(seed)
    arm = ArmStats()
    for i in range(n):
        arm.observe_success(float(i), 800.0 + rng.gauss(0, 100), 2000.0, 100, 300, 0.001)
        arm.observe_feedback(min(1.0, max(0.0, rng.gauss(mean, 0.2))))
    return arm


def test_readout_flags_a_real_quality_difference_only():
    report = readout(arm_with_scores(0.4, 60, 1), arm_with_scores(0.9, 60, 2), 0.5)
    quality = report["quality"]
    assert quality["significant"] and quality["difference"] > 0.3
    assert quality["difference_interval"][0] > 0 and quality["a"]["n"] == quality["b"]["n"] == 60
    same = readout(arm_with_scores(0.7, 60, 3), arm_with_scores(0.7, 60, 4), 0.5)
    assert not same["quality"]["significant"]
    lo, hi = same["quality"]["difference_interval"]
    assert lo < 0 < hi
    assert not same["error_rate"]["significant"] and same["error_rate"]["b"]["estimate"] == 0.0


def test_readout_is_json_safe_when_nothing_is_computable():
    report = readout(ArmStats(), ArmStats(), 0.1)
    json.dumps(report, allow_nan=False)
    for metric in ("error_rate", "ttfb_ms", "cost_per_request", "quality"):
        block = report[metric]
        assert block["difference"] is None and not block["significant"]
        assert block["a"]["estimate"] is None
    assert report["srm"] == {"unit": "requests", "observed": [0, 0], "expected_share_b": 0.1,
                             "p_value": 1.0, "mismatch": False}


def test_readout_split_check():
    a, b = ArmStats(), ArmStats()
    for i in range(900):
        a.observe_failure(0.0, user=f"a{i % 450}")
    for i in range(100):
        b.observe_failure(0.0, user=f"b{i % 50}")
    srm = readout(a, b, 0.1)["srm"]
    assert srm["unit"] == "users" and srm["observed"] == [450, 50] and not srm["mismatch"]
    srm = readout(a, b, 0.5)["srm"]
    assert srm["mismatch"] and srm["p_value"] < 1e-6
    a.users.clear()
    assert readout(a, b, 0.1)["srm"]["unit"] == "requests"
    errors = readout(a, b, 0.1)["error_rate"]
    assert errors["a"]["estimate"] == errors["b"]["estimate"] == 1.0 and errors["difference"] == 0.0


def test_simulate_aa_false_alarms_stay_near_alpha():
    runs, alpha = 400, 0.05
    rates = simulate_aa(runs, 200, alpha, seed=1)
    assert set(rates) == {"error_rate", "ttfb_ms", "cost_per_request", "quality", "srm"}
    for metric, rate in rates.items():
        assert within(rate, alpha if metric != "srm" else stats.SRM_THRESHOLD, runs), (metric, rate)
    assert simulate_aa(5, 50, alpha) == simulate_aa(5, 50, alpha)


def test_srm_counts_requests_once_an_arm_has_more_users_than_it_keeps() -> None:
    a, b = ArmStats(), ArmStats()
    for i in range(30):
        a.observe_success(1.0, 10.0, 10.0, 1, 1, 0.0, f"a{i}")
        b.observe_success(1.0, 10.0, 10.0, 1, 1, 0.0, f"b{i}")
    assert readout(a, b, 0.5)["srm"]["unit"] == "users"  # type: ignore[index]
    a.users_overflow = 5  # past the cap the overflow counts requests, not users: units would mix
    srm = readout(a, b, 0.5)["srm"]
    assert srm["unit"] == "requests" and srm["observed"] == [30, 30]  # type: ignore[index]
