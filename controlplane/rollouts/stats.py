"""The statistics behind rollout gates and A/B readouts: pure, standard library only, JSON-persistable.

A canary gate must stop a bad candidate after as few requests as the evidence allows and rarely stop a
good one: Wald's SPRT does both with error rates fixed up front. An A/B readout compares two arms with
intervals rather than bare means, and checks the split itself (sample ratio mismatch), since a skewed
split voids every other comparison. Everything here is plain numbers updated per observation, so the
controller can persist it across restarts and the tests can simulate it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Literal

USERS_CAP = 10_000  # distinct users kept per arm; beyond that only a count
RESERVOIR_CAPACITY = 512
SRM_THRESHOLD = 0.001  # a split this unlikely under the configured shares is a mismatch
_MASK64 = (1 << 64) - 1


# --- SPRT ------------------------------------------------------------------------------------------------

def _check_sprt(p0: float, p1: float, alpha: float, beta: float) -> None:
    if not 0.0 < p0 < p1 < 1.0:
        raise ValueError(f"need 0 < p0 < p1 < 1, got p0={p0}, p1={p1}")
    if not (0.0 < alpha < 1.0 and 0.0 < beta < 1.0):
        raise ValueError(f"need 0 < alpha, beta < 1, got alpha={alpha}, beta={beta}")


@dataclass
class Sprt:
    """Wald's sequential test of an error rate: H0 "rate is p0 (good)" against H1 "rate is p1 (bad)".

    Wrongly failing a p0 candidate happens with probability about alpha, wrongly passing a p1 one about
    beta, and it decides after fewer requests on average than any fixed-size test with those errors."""

    p0: float
    p1: float
    alpha: float
    beta: float
    llr: float = 0.0  # log likelihood ratio of H1 over H0 so far
    n: int = 0
    failures: int = 0

    def __post_init__(self) -> None:
        _check_sprt(self.p0, self.p1, self.alpha, self.beta)

    def observe(self, failed: bool) -> None:
        if failed:
            self.observe_many(1, 0)
        else:
            self.observe_many(0, 1)

    def observe_many(self, failures: int, successes: int) -> None:
        if failures < 0 or successes < 0:
            raise ValueError("counts must be non-negative")
        self.llr += failures * math.log(self.p1 / self.p0) + successes * math.log((1 - self.p1) / (1 - self.p0))
        self.n += failures + successes
        self.failures += failures

    @property
    def upper(self) -> float:
        return math.log((1 - self.beta) / self.alpha)

    @property
    def lower(self) -> float:
        return math.log(self.beta / (1 - self.alpha))

    @property
    def decision(self) -> Literal["fail", "pass"] | None:
        """"fail": the bad rate is accepted; "pass": the good one; None: keep sampling."""
        if self.llr >= self.upper:
            return "fail"
        if self.llr <= self.lower:
            return "pass"
        return None

    def to_dict(self) -> dict[str, float | int]:
        return {"p0": self.p0, "p1": self.p1, "alpha": self.alpha, "beta": self.beta,
                "llr": self.llr, "n": self.n, "failures": self.failures}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sprt:
        return cls(float(d["p0"]), float(d["p1"]), float(d["alpha"]), float(d["beta"]),
                   float(d.get("llr", 0.0)), int(d.get("n", 0)), int(d.get("failures", 0)))


def expected_samples(p0: float, p1: float, alpha: float, beta: float, p_true: float) -> float:
    """Wald's approximation of the average number of requests the SPRT takes when the true rate is p_true
    (ignoring overshoot of the boundaries): E[N] = (L lower + (1 - L) upper) / E[step], with L the
    probability of passing, from the root h != 0 of p (p1/p0)^h + (1-p) ((1-p1)/(1-p0))^h = 1."""
    _check_sprt(p0, p1, alpha, beta)
    if not 0.0 <= p_true <= 1.0:
        raise ValueError(f"p_true must be in [0, 1], got {p_true}")
    up, low = math.log((1 - beta) / alpha), math.log(beta / (1 - alpha))
    l1, l0 = math.log(p1 / p0), math.log((1 - p1) / (1 - p0))
    drift = p_true * l1 + (1 - p_true) * l0
    if abs(drift) < 1e-12:  # h -> 0: the walk has no drift
        return -up * low / (p_true * l1 * l1 + (1 - p_true) * l0 * l0)
    if p_true in (0.0, 1.0):
        passes = 1.0 if p_true == 0.0 else 0.0
    else:
        h = _oc_root(p_true, l1, l0, -1.0 if drift > 0 else 1.0)
        if h > 0:
            passes = math.expm1(-h * up) / math.expm1(-h * (up - low))
        else:
            passes = math.exp(-h * low) * math.expm1(h * up) / math.expm1(h * (up - low))
    return (passes * low + (1 - passes) * up) / drift


def _oc_root(p: float, l1: float, l0: float, sign: float) -> float:
    """The non-zero root of p e^(h l1) + (1-p) e^(h l0) = 1, on the side of 0 given by `sign` (bisection:
    the left side is convex, zero at 0 and negative just past it on that side)."""
    def f(t: float) -> float:
        return p * math.exp(sign * t * l1) + (1 - p) * math.exp(sign * t * l0) - 1.0

    lo, hi = 0.0, 1.0
    while f(hi) <= 0:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if f(mid) <= 0:
            lo = mid
        else:
            hi = mid
    return sign * (lo + hi) / 2


# --- running moments and samples -------------------------------------------------------------------------

@dataclass
class Moments:
    """Welford's running mean and variance: numerically stable, three numbers whatever the count."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean

    def add(self, x: float) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    @property
    def variance(self) -> float:
        return self.m2 / (self.n - 1) if self.n >= 2 else 0.0

    @property
    def stdev(self) -> float:
        return math.sqrt(self.variance)

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Normal approximation of the mean's interval: fine from a few dozen observations."""
        if self.n < 2:
            return math.nan, math.nan
        half = z_value(confidence) * self.stdev / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    def to_dict(self) -> dict[str, float | int]:
        return {"n": self.n, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Moments:
        return cls(int(d["n"]), float(d["mean"]), float(d["m2"]))


def _splitmix(seed: int, i: int) -> int:
    """A 64-bit hash of (seed, i): the reservoir's random draws are a function of its seed and the count,
    so a reservoir restored from disk carries on exactly as the one that was saved would have."""
    z = (seed * 0x9E3779B97F4A7C15 + (i + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class Reservoir:
    """A uniform sample of at most `capacity` of the values offered (Vitter's algorithm R), for quantiles
    of a stream of any length in bounded memory; deterministic given the seed."""

    def __init__(self, capacity: int = RESERVOIR_CAPACITY, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity, self.seed = capacity, seed
        self.seen = 0
        self.values: list[float] = []

    def add(self, x: float) -> None:
        if len(self.values) < self.capacity:
            self.values.append(x)
        else:
            j = _splitmix(self.seed, self.seen) % (self.seen + 1)
            if j < self.capacity:
                self.values[j] = x
        self.seen += 1

    def __len__(self) -> int:
        return len(self.values)

    def quantile(self, q: float) -> float | None:
        """Linear interpolation between the order statistics of the sample (numpy's default)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q}")
        if not self.values:
            return None
        ordered = sorted(self.values)
        pos = q * (len(ordered) - 1)
        i = math.floor(pos)
        if i + 1 >= len(ordered):
            return ordered[-1]
        return ordered[i] + (pos - i) * (ordered[i + 1] - ordered[i])

    def to_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "seed": self.seed, "seen": self.seen, "values": list(self.values)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Reservoir:
        r = cls(int(d["capacity"]), int(d["seed"]))
        r.seen = int(d["seen"])
        r.values = [float(v) for v in d["values"]][: r.capacity]
        return r


# --- intervals and tests ---------------------------------------------------------------------------------

def z_value(confidence: float) -> float:
    """The two-sided standard normal quantile: 1.96 for 0.95."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(failures: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion: keeps its coverage near 0 (a canary's usual error rate),
    where the textbook p +- z sqrt(p(1-p)/n) collapses to a point."""
    if n == 0:
        return 0.0, 1.0
    if not 0 <= failures <= n:
        raise ValueError(f"need 0 <= failures <= n, got {failures}/{n}")
    z = z_value(confidence)
    p, z2 = failures / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    lo = 0.0 if failures == 0 else max(0.0, centre - half)
    hi = 1.0 if failures == n else min(1.0, centre + half)
    return lo, hi


def proportion_diff(x1: int, n1: int, x2: int, n2: int, confidence: float = 0.95) -> tuple[float, float]:
    """Interval of p1 - p2 (Newcombe's hybrid score method, from the two Wilson intervals); (-1, 1) when
    either side has no observations."""
    if n1 == 0 or n2 == 0:
        return -1.0, 1.0
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson(x1, n1, confidence)
    l2, u2 = wilson(x2, n2, confidence)
    d = p1 - p2
    return d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)


def mean_diff(a: Moments, b: Moments, confidence: float = 0.95) -> tuple[float, float]:
    """Interval of mean(a) - mean(b), unequal variances (Welch's standard error, normal quantile)."""
    if a.n < 2 or b.n < 2:
        return math.nan, math.nan
    d = a.mean - b.mean
    half = z_value(confidence) * math.sqrt(a.variance / a.n + b.variance / b.n)
    return d - half, d + half


def binomial_range(n: int, p: float, confidence: float = 0.99) -> tuple[int, int]:
    """The equal-tailed range of K ~ Binomial(n, p): lo the largest k with P(K < k) <= (1-c)/2, hi the
    smallest with P(K > k) <= (1-c)/2, so P(lo <= K <= hi) >= confidence. Exact pmf; counts more than
    12 standard deviations out (mass far below 1e-20) are left out of the sums."""
    if n < 0 or not 0.0 <= p <= 1.0 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need n >= 0, 0 <= p <= 1, 0 < confidence < 1; got {n}, {p}, {confidence}")
    if p == 0.0 or n == 0:
        return 0, 0
    if p == 1.0:
        return n, n
    tail = (1 - confidence) / 2
    sd = math.sqrt(n * p * (1 - p))
    first = max(0, math.floor(n * p - 12 * sd - 10))
    last = min(n, math.ceil(n * p + 12 * sd + 10))
    base = math.lgamma(n + 1)
    lp, lq = math.log(p), math.log1p(-p)
    pmf = [math.exp(base - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * lp + (n - k) * lq)
           for k in range(first, last + 1)]
    lo, below = first, 0.0
    for i, mass in enumerate(pmf):  # below = P(K < first + i)
        if below + mass > tail:
            lo = first + i
            break
        below += mass
    hi, above = last, 0.0
    for i in range(len(pmf) - 1, -1, -1):  # above = P(K > first + i)
        if above + pmf[i] > tail:
            hi = first + i
            break
        above += pmf[i]
    return lo, hi


def _upper_gamma(a: float, x: float) -> float:
    """The regularized upper incomplete gamma function Q(a, x) (Numerical Recipes: series below a + 1,
    Lentz's continued fraction above)."""
    if x <= 0:
        return 1.0
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        for k in range(1, 1000):
            term *= x / (a + k)
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        step = d * c
        h *= step
        if abs(step - 1.0) < 1e-16:
            break
    return math.exp(log_front) * h


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square with df degrees of freedom."""
    return _upper_gamma(df / 2, x / 2)


def srm_p_value(observed: list[int], expected_shares: list[float]) -> float:
    """Chi-square goodness-of-fit p-value of a traffic split (k - 1 degrees of freedom): a tiny value means
    the arms did not get the shares they were configured for (sample ratio mismatch). A category expected
    to get nothing is dropped, unless it got something (then the split is impossible: 0)."""
    if len(observed) != len(expected_shares):
        raise ValueError("observed and expected_shares differ in length")
    if any(s < 0 for s in expected_shares) or sum(expected_shares) <= 0:
        raise ValueError("expected shares must be non-negative with a positive sum")
    total = sum(observed)
    if total == 0:
        return 1.0
    if any(o > 0 and s == 0 for o, s in zip(observed, expected_shares, strict=True)):
        return 0.0
    cells = [(o, s) for o, s in zip(observed, expected_shares, strict=True) if s > 0]
    if len(cells) < 2:
        return 1.0
    share_sum = sum(s for _, s in cells)
    stat = sum((o - total * s / share_sum) ** 2 / (total * s / share_sum) for o, s in cells)
    return chi2_sf(stat, len(cells) - 1)


# --- one arm, and the A/B readout ------------------------------------------------------------------------

@dataclass
class ArmStats:
    """One arm's accumulators over a window (a rollout step, or an A/B test)."""

    requests: int = 0  # attempts that reached the arm's backends: successes + failures
    failures: int = 0
    ttfb_ms: Reservoir = field(default_factory=lambda: Reservoir(RESERVOIR_CAPACITY, seed=1))
    token_latency_ms: Reservoir = field(default_factory=lambda: Reservoir(RESERVOIR_CAPACITY, seed=2))
    ttfb: Moments = field(default_factory=Moments)
    cost: Moments = field(default_factory=Moments)  # USD per successful request
    quality: Moments = field(default_factory=Moments)  # feedback scores, 0..1
    users: set[str] = field(default_factory=set)
    users_overflow: int = 0  # observations of users not kept once USERS_CAP were (an overcount)
    last_seen: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    spend: float = 0.0

    def _seen(self, at: float, user: str | None) -> None:
        self.requests += 1
        self.last_seen = max(self.last_seen, at)
        if user is not None and user not in self.users:
            if len(self.users) < USERS_CAP:
                self.users.add(user)
            else:
                self.users_overflow += 1

    def observe_success(self, at: float, ttfb_ms: float | None, latency_ms: float, completion_tokens: int,
                        prompt_tokens: int, cost: float, user: str | None = None) -> None:
        self._seen(at, user)
        if ttfb_ms is not None:
            self.ttfb_ms.add(ttfb_ms)
            self.ttfb.add(ttfb_ms)
        if completion_tokens > 0:
            self.token_latency_ms.add(latency_ms / completion_tokens)
        self.cost.add(cost)
        self.tokens_in += prompt_tokens
        self.tokens_out += completion_tokens
        self.spend += cost

    def observe_failure(self, at: float, user: str | None = None) -> None:
        self._seen(at, user)
        self.failures += 1

    def observe_feedback(self, score: float) -> None:
        self.quality.add(score)

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    @property
    def users_seen(self) -> int:
        return len(self.users) + self.users_overflow

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "failures": self.failures,
                "ttfb_ms": self.ttfb_ms.to_dict(), "token_latency_ms": self.token_latency_ms.to_dict(),
                "ttfb": self.ttfb.to_dict(), "cost": self.cost.to_dict(), "quality": self.quality.to_dict(),
                "users": sorted(self.users), "users_overflow": self.users_overflow, "last_seen": self.last_seen,
                "tokens_in": self.tokens_in, "tokens_out": self.tokens_out, "spend": self.spend}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ArmStats:
        return cls(int(d["requests"]), int(d["failures"]), Reservoir.from_dict(d["ttfb_ms"]),
                   Reservoir.from_dict(d["token_latency_ms"]), Moments.from_dict(d["ttfb"]),
                   Moments.from_dict(d["cost"]), Moments.from_dict(d["quality"]), set(d["users"]),
                   int(d["users_overflow"]), float(d["last_seen"]), int(d["tokens_in"]), int(d["tokens_out"]),
                   float(d["spend"]))


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _comparison(a: tuple[int, float | None, tuple[float, float]], b: tuple[int, float | None, tuple[float, float]],
                diff: tuple[float, float]) -> dict[str, object]:
    """One metric's block of the readout; a non-finite value becomes None (not computable)."""
    def arm(n: int, estimate: float | None, interval: tuple[float, float]) -> dict[str, object]:
        return {"n": n, "estimate": estimate, "interval": [_finite(interval[0]), _finite(interval[1])]}

    lo, hi = _finite(diff[0]), _finite(diff[1])
    computable = a[1] is not None and b[1] is not None
    return {"a": arm(*a), "b": arm(*b),
            "difference": b[1] - a[1] if a[1] is not None and b[1] is not None else None,
            "difference_interval": [lo, hi] if computable else [None, None],
            "significant": computable and lo is not None and hi is not None and (lo > 0 or hi < 0)}


def readout(a: ArmStats, b: ArmStats, expected_b_share: float, alpha: float = 0.05) -> dict[str, object]:
    """Arm b (candidate) against arm a (baseline): per metric each arm's estimate and (1 - alpha) interval,
    the difference b - a and its interval, significant when that excludes 0; and the split's SRM check.
    JSON-safe: None wherever a value cannot be computed."""
    confidence = 1 - alpha

    def proportion(s: ArmStats) -> tuple[int, float | None, tuple[float, float]]:
        return s.requests, s.error_rate if s.requests else None, wilson(s.failures, s.requests, confidence)

    def mean(m: Moments) -> tuple[int, float | None, tuple[float, float]]:
        return m.n, m.mean if m.n else None, m.interval(confidence)

    out: dict[str, object] = {
        "error_rate": _comparison(proportion(a), proportion(b),
                                  proportion_diff(b.failures, b.requests, a.failures, a.requests, confidence)),
    }
    for name, pick in (("ttfb_ms", "ttfb"), ("cost_per_request", "cost"), ("quality", "quality")):
        ma, mb = getattr(a, pick), getattr(b, pick)
        out[name] = _comparison(mean(ma), mean(mb), mean_diff(mb, ma, confidence))
    # Users while both arms still hold every one of theirs; past USERS_CAP the overflow counts requests.
    by_users = a.users_seen > 0 and b.users_seen > 0 and not a.users_overflow and not b.users_overflow
    observed = [a.users_seen, b.users_seen] if by_users else [a.requests, b.requests]
    p = srm_p_value(observed, [1 - expected_b_share, expected_b_share])
    out["srm"] = {"unit": "users" if by_users else "requests", "observed": observed,
                  "expected_share_b": expected_b_share, "p_value": p, "mismatch": p < SRM_THRESHOLD}
    return out


def simulate_aa(runs: int, n_per_arm: int, alpha: float, seed: int = 0, error_rate: float = 0.05,
                latency_mean: float = 800.0, quality_mean: float = 0.7) -> dict[str, float]:
    """A/A experiments (both arms from the same distributions) through `readout`: the share of runs each
    metric, and the SRM check, called significant. A sound readout keeps these near alpha (and 0.001)."""
    rng = random.Random(seed)
    sigma = 0.5  # lognormal TTFB with mean latency_mean
    mu = math.log(latency_mean) - sigma * sigma / 2
    metrics = ("error_rate", "ttfb_ms", "cost_per_request", "quality")
    alarms = dict.fromkeys((*metrics, "srm"), 0)
    for _ in range(runs):
        n_b = rng.getrandbits(2 * n_per_arm).bit_count() if n_per_arm else 0  # Binomial(2n, 1/2) split
        arms = ArmStats(), ArmStats()
        for arm, n in zip(arms, (2 * n_per_arm - n_b, n_b), strict=True):
            for i in range(n):
                if rng.random() < error_rate:
                    arm.observe_failure(float(i))
                    continue
                ttfb = rng.lognormvariate(mu, sigma)
                prompt, completion = rng.randint(100, 1000), rng.randint(20, 400)
                arm.observe_success(float(i), ttfb, ttfb + 20.0 * completion, completion, prompt,
                                    prompt * 1e-6 + completion * 4e-6)
                arm.observe_feedback(min(1.0, max(0.0, rng.gauss(quality_mean, 0.2))))
        result = readout(arms[0], arms[1], 0.5, alpha)
        for name in metrics:
            block = result[name]
            alarms[name] += isinstance(block, dict) and bool(block["significant"])
        srm = result["srm"]
        alarms["srm"] += isinstance(srm, dict) and bool(srm["mismatch"])
    return {name: count / runs if runs else 0.0 for name, count in alarms.items()}
