"""Strategies: what each backend has been seen to do -> its share of the pool's traffic.

Pure functions of their inputs (randomness comes from the caller's seeded
generator), each returning shares that sum to 1 and a reason per backend in
words. A new strategy is one function here and one name in the config model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from ..config import Scoring

SAMPLES = 512  # Thompson draws per recompute
TEMPERATURE_QUALITY = 0.05
TEMPERATURE_UTILITY = 0.1
COST_SHARPNESS = 4.0  # a backend twice the price gets 1/16 of the cheapest's score
MAX_PROBE_TOTAL = 0.5  # probes together never take more than this share from the backends in rotation


@dataclass(frozen=True)
class Candidate:
    """The inputs one backend brings to a decision."""

    name: str
    weight: int  # configured
    health: float  # 0 unhealthy .. 1 healthy
    quality: float
    latency_ms: float | None
    error_rate: float
    unit_cost: float  # expected price of one request at the pool's token mix
    reward_alpha: float = 1.0
    reward_beta: float = 1.0


@dataclass(frozen=True)
class Decision:
    shares: dict[str, float]
    reasons: dict[str, str]
    # Backends min_quality holds out (with re-entry hysteresis): the next decision's `below_quality`.
    below_quality: frozenset[str] = frozenset()
    probing: frozenset[str] = frozenset()  # given only the probe share (see probe())


def _normalize(scores: Mapping[str, float]) -> dict[str, float]:
    total = sum(scores.values())
    if total <= 0:
        return {name: 1.0 / len(scores) for name in scores} if scores else {}
    return {name: value / total for name, value in scores.items()}


def _softmax(values: Mapping[str, float], temperature: float) -> dict[str, float]:
    top = max(values.values())
    return _normalize({n: math.exp((v - top) / temperature) for n, v in values.items()})


def health_aware(cands: list[Candidate], scoring: Scoring, rng: random.Random) -> dict[str, float]:
    # Health itself is applied to every strategy afterwards; here errors count.
    return _normalize({c.name: c.weight * (1.0 - c.error_rate) ** 2 for c in cands})


def cost_optimized(cands: list[Candidate], scoring: Scoring, rng: random.Random) -> dict[str, float]:
    cheapest = min(c.unit_cost for c in cands)
    if cheapest <= 0:
        return _normalize({c.name: 1.0 if c.unit_cost <= 0 else 0.0 for c in cands})
    return _normalize({c.name: (cheapest / c.unit_cost) ** COST_SHARPNESS * (1 - c.error_rate) for c in cands})


def _latencies(cands: list[Candidate]) -> dict[str, float]:
    known = sorted(c.latency_ms for c in cands if c.latency_ms)
    fallback = known[len(known) // 2] if known else 1000.0
    return {c.name: max(1.0, c.latency_ms or fallback) for c in cands}


def performance_based(cands: list[Candidate], scoring: Scoring, rng: random.Random) -> dict[str, float]:
    latency = _latencies(cands)
    return _normalize({c.name: (1.0 / latency[c.name]) ** 2 * (1.0 - c.error_rate) ** 2 for c in cands})


def quality_based(cands: list[Candidate], scoring: Scoring, rng: random.Random) -> dict[str, float]:
    return _softmax({c.name: c.quality - c.error_rate for c in cands}, TEMPERATURE_QUALITY)


def balanced(cands: list[Candidate], scoring: Scoring, rng: random.Random) -> dict[str, float]:
    obj = scoring.objective
    latency = _latencies(cands)
    max_cost = max(c.unit_cost for c in cands) or 1.0
    max_latency = max(latency.values())
    utility = {
        c.name: obj.quality * c.quality - obj.cost * c.unit_cost / max_cost
        - obj.latency * latency[c.name] / max_latency - obj.errors * c.error_rate
        for c in cands
    }
    return _softmax(utility, TEMPERATURE_UTILITY)


def adaptive_learning(cands: list[Candidate], scoring: Scoring, rng: random.Random) -> dict[str, float]:
    """Thompson sampling: each backend's share is how often its reward posterior draws highest."""
    wins = dict.fromkeys((c.name for c in cands), 0)
    for _ in range(SAMPLES):
        best = max(cands, key=lambda c: rng.betavariate(c.reward_alpha, c.reward_beta))
        wins[best.name] += 1
    return _normalize({n: float(w) for n, w in wins.items()})


STRATEGY_FUNCTIONS: dict[str, Callable[[list[Candidate], Scoring, random.Random], dict[str, float]]] = {
    "health_aware": health_aware,
    "cost_optimized": cost_optimized,
    "performance_based": performance_based,
    "quality_based": quality_based,
    "balanced": balanced,
    "adaptive_learning": adaptive_learning,
}


def configured(cands: list[Candidate], strategy: str) -> dict[str, float]:
    """round_robin, weighted and least_request: the operator's weights (equal for round robin)."""
    return _normalize({c.name: 1.0 if strategy == "round_robin" else float(c.weight) for c in cands})


def below_min_quality(c: Candidate, scoring: Scoring, was_below: bool) -> bool:
    """min_quality with hysteresis: a backend leaves below min_quality and returns only at
    min_quality + reentry_margin, so an estimate hovering at the threshold does not flap."""
    if scoring.min_quality is None:
        return False
    return c.quality < scoring.min_quality + (scoring.reentry_margin if was_below else 0.0)


def _quality_reason(c: Candidate, scoring: Scoring, was_below: bool) -> str:
    assert scoring.min_quality is not None
    back = scoring.min_quality + scoring.reentry_margin
    if was_below and c.quality >= scoring.min_quality:
        return (f"quality {c.quality:.2f} below min_quality {scoring.min_quality:.2f} + reentry_margin "
                f"{scoring.reentry_margin:.2f}, which it must reach to return: no traffic")
    return f"quality {c.quality:.2f} below min_quality {scoring.min_quality:.2f} (returns at {back:.2f}): no traffic"


def decide(
    strategy: str,
    cands: list[Candidate],
    scoring: Scoring,
    rng: random.Random,
    shift_to_cheapest: bool = False,
    below_quality: Collection[str] = frozenset(),
) -> Decision:
    """Shares for every candidate: eligibility, the strategy, the exploration floor, then health.

    `below_quality`: the backends min_quality held out last time (the last decision's), which need
    min_quality + reentry_margin to return."""
    reasons: dict[str, str] = {}
    shares = dict.fromkeys((c.name for c in cands), 0.0)
    eligible = [c for c in cands if c.health > 0]
    for c in cands:
        if c.health <= 0:
            reasons[c.name] = "unhealthy: no traffic"
    below = frozenset(c.name for c in cands if below_min_quality(c, scoring, c.name in below_quality))
    if below and eligible:
        good = [c for c in eligible if c.name not in below]
        if not good and scoring.min_quality is not None:
            # None is back over the margin: those that meet min_quality itself beat keeping every one.
            good = [c for c in eligible if c.quality >= scoring.min_quality]
            below = below - {c.name for c in good}
        if good:
            for c in eligible:
                if c not in good:
                    reasons[c.name] = _quality_reason(c, scoring, c.name in below_quality)
            eligible = good
        else:
            for c in eligible:
                reasons[c.name] = f"quality {c.quality:.2f} below min_quality, kept: no backend meets it"
    if not eligible:
        return Decision(shares, reasons, below)

    if shift_to_cheapest:
        cheapest = min(c.unit_cost for c in eligible)
        raw = _normalize({c.name: 1.0 if c.unit_cost == cheapest else 0.0 for c in eligible})
        floor = 0.0
    elif strategy in STRATEGY_FUNCTIONS:
        raw = STRATEGY_FUNCTIONS[strategy](eligible, scoring, rng)
        floor = scoring.exploration_floor
    else:
        raw = configured(eligible, strategy)
        floor = 0.0
    if floor > 0 and len(eligible) > 1:
        floor = min(floor, 1.0 / len(eligible))
        spare = 1.0 - floor * len(eligible)
        raw = {name: floor + spare * share for name, share in raw.items()}
    # Health last, so a degraded backend gives up half of everything, its floor included;
    # but a budget shift stays on the cheapest, degraded or not (unhealthy ones are not eligible).
    shares.update(raw if shift_to_cheapest else _apply_health(raw, {c.name: c.health for c in eligible}))
    for c in eligible:
        reasons.setdefault(c.name, _reason(strategy, c, shares[c.name], shift_to_cheapest))
    return Decision(shares, reasons, below)


def probe(decision: Decision, cands: list[Candidate], share: float, by_score: bool,
          unavailable: Mapping[str, str]) -> Decision:
    """Re-discovery: a backend out of rotation for quality (held out by min_quality) or, when `by_score`
    (the telemetry strategies), given less than `share` by its strategy, gets `share` of the traffic, so
    the ratings and measurements it earns keep its estimates current and it can return. The others give
    it up in proportion to their shares.

    Never probed: an unhealthy backend (deep health 0) or one in `unavailable` (name -> why: ejected or
    failing checks in Envoy's view, draining, cooling). Nothing is probed when no backend has a share
    (every one unhealthy), or with `share` 0."""
    if share <= 0 or sum(decision.shares.values()) <= 0:
        return decision
    reasons = dict(decision.reasons)
    wanted = []
    for c in cands:
        held = c.name in decision.below_quality and decision.shares[c.name] == 0
        if c.health <= 0 or not (held or (by_score and decision.shares[c.name] < share)):
            continue
        if c.name in unavailable:
            reasons[c.name] = f"{reasons.get(c.name, '')}; not probed: {unavailable[c.name]}"
        else:
            wanted.append(c.name)
    each = share
    while wanted:  # many probes split MAX_PROBE_TOTAL; a probe never lowers the share a strategy gave
        each = min(share, MAX_PROBE_TOTAL / len(wanted))
        if all(decision.shares[n] < each for n in wanted):
            break
        wanted = [n for n in wanted if decision.shares[n] < each]
    rest = sum(s for n, s in decision.shares.items() if n not in wanted)
    if not wanted or rest <= 0:
        return Decision(decision.shares, reasons, decision.below_quality)
    scale = (1.0 - each * len(wanted)) / rest
    shares = {n: each if n in wanted else s * scale for n, s in decision.shares.items()}
    for n in wanted:
        before = reasons.get(n, "").removesuffix(": no traffic")
        reasons[n] = (f"probing only: {each:.1%} of traffic (scoring.probe_share) so its estimates stay current; "
                      + (before if n in decision.below_quality else "the strategy alone: " + before))
    for n, old in decision.shares.items():
        prefix = f"{old:.1%} of traffic"
        if n not in wanted and old > 0 and reasons.get(n, "").startswith(prefix):
            reasons[n] = f"{shares[n]:.1%} of traffic after probes" + reasons[n].removeprefix(prefix)
    return Decision(shares, reasons, decision.below_quality, frozenset(wanted))


def _apply_health(shares: dict[str, float], health: dict[str, float]) -> dict[str, float]:
    """A degraded backend keeps `health` of its share; what it gives up goes to fully healthy ones."""
    kept = {n: s * health[n] for n, s in shares.items()}
    freed = sum(shares.values()) - sum(kept.values())
    if freed <= 1e-12:
        return _normalize(kept)
    full = [n for n in shares if health[n] >= 1.0]
    if not full:
        return _normalize(kept)
    base = sum(shares[n] for n in full)
    for n in full:
        kept[n] += freed * (shares[n] / base if base > 0 else 1.0 / len(full))
    return _normalize(kept)


def _reason(strategy: str, c: Candidate, share: float, shifted: bool) -> str:
    facts = (
        f"health {c.health:.2f}, quality {c.quality:.2f}, "
        f"latency {c.latency_ms:.0f} ms, " if c.latency_ms else f"health {c.health:.2f}, quality {c.quality:.2f}, "
    ) + f"errors {c.error_rate:.1%}, cost {c.unit_cost:.5f}/request"
    why = {
        "health_aware": "configured weight scaled by health and error rate",
        "cost_optimized": "cheaper backends get more, sharply (price ratio to the 4th power)",
        "performance_based": "faster, more reliable backends get more (1/latency squared)",
        "quality_based": "higher estimated quality gets more (softmax, temperature 0.05)",
        "balanced": "utility of quality, cost, latency and errors by the pool's objective (softmax)",
        "adaptive_learning": "share of Thompson samples in which its reward posterior was highest",
        "round_robin": "equal shares",
        "weighted": "configured weight",
        "least_request": "configured weight; Envoy prefers the least busy host",
    }.get(strategy, strategy)
    if shifted:
        why = "budget exhausted: traffic shifted to the cheapest backend"
    return f"{share:.1%} of traffic: {why} ({facts})"
