"""The scoring loop's state: per-backend stats in, smoothed integer weights out.

Shared by the live control plane and the simulator, so what the simulator
measures is what production does. No clocks and no I/O: the caller decides
when to observe and when to recompute.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import STATIC_STRATEGIES, Backend, Config, Objective, Pool
from ..state import Cooldown, Cooling, Drained, Weights
from .stats import RATE_WINDOW, BackendStats, Rate, RateWindow, memory_decay
from .strategies import Candidate, Decision, decide, probe
from .weights import cap_shares, pool_weights

WEIGHT_SCALE = 1000
DEFAULT_MIX = (500, 200)  # prompt, completion tokens per request until some are seen
DEFAULT_LATENCY_REF_MS = 5000.0
# Backend quotas: a capped backend's projected rate is held at QUOTA_TARGET of its quota, so the noise of
# a rate measured over seconds stays under it; a published share may drift up to QUOTA_SLACK over a
# tighter cap before the change is worth a push (0.9 x 1.05: at most 94.5% of the quota).
QUOTA_TARGET = 0.9
QUOTA_SLACK = 1.05

def request_cost(backend: Backend, prompt_tokens: float, completion_tokens: float) -> float:
    return (backend.cost.input_per_1k * prompt_tokens + backend.cost.output_per_1k * completion_tokens) / 1000.0


def objective_reward(
    objective: Objective, quality: float, cost: float, latency_ms: float, cost_ref: float, latency_ref: float
) -> float:
    """A successful request's reward in 0..1: quality, cheapness and speed weighted by the objective."""
    total = objective.quality + objective.cost + objective.latency
    if total <= 0:
        return 1.0
    value = (
        objective.quality * quality
        + objective.cost * (1.0 - min(1.0, cost / cost_ref))
        + objective.latency * (1.0 - min(1.0, latency_ms / latency_ref))
    )
    return max(0.0, min(1.0, value / total))


def to_weights(shares: dict[str, float]) -> dict[str, int]:
    """Integer EDS weights; 0 means no traffic (the endpoint is published unhealthy)."""
    return {n: (max(1, round(s * WEIGHT_SCALE)) if s > 1e-9 else 0) for n, s in shares.items()}


@dataclass
class PoolState:
    smoothed: dict[str, float] = field(default_factory=dict)
    published: dict[str, float] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)
    decision: Decision | None = None
    shifted: bool = False
    rng: random.Random = field(default_factory=random.Random)
    # What a reward is measured against (most expensive unit cost, latency scale): refreshed each
    # recompute, not per request, which would cost O(backends) on the access-log path.
    reward_refs: tuple[float, float] | None = None
    window: RateWindow = field(default_factory=RateWindow)  # the pool's recent traffic, for quotas
    caps: dict[str, float] = field(default_factory=dict)  # backend -> the most of its tier's traffic it may take
    binding: frozenset[str] = frozenset()  # backends whose share its quota lowered
    over_quota: frozenset[int] = frozenset()  # tiers whose quotas together cannot hold their traffic
    quota_reasons: dict[str, str] = field(default_factory=dict)
    below_quality: frozenset[str] = frozenset()  # held out by min_quality: they return at min_quality + margin


class Engine:
    def __init__(self) -> None:
        self.stats: dict[tuple[str, str], BackendStats] = {}
        self.pools: dict[str, PoolState] = {}
        self._config: Config | None = None
        # What the last sync() removed: a reload that fails after syncing syncs back and finds it here.
        self._retired_stats: dict[tuple[str, str], BackendStats] = {}
        self._retired_pools: dict[str, PoolState] = {}
        # Requests whose usage block could not be true (estimated instead), per (pool, backend).
        self.usage_suspicious: dict[tuple[str, str], int] = {}
        # Backends Envoy sends no new requests (drained, or cooling after a 429): quotas are shared
        # among the rest, and explain says why.
        self.drained: Drained = frozenset()
        self.cooling: Cooling = {}
        # Envoy's own view: (pool, backend) -> why Envoy sends it nothing (ejected, failing active checks).
        # Such a backend is never probed; its weight is otherwise left to Envoy.
        self.envoy_out: Mapping[tuple[str, str], str] = {}

    def sync(self, config: Config) -> None:
        """Follow the config: new backends get stats, priors follow edits, removed ones go (kept one sync)."""
        self._config = config
        keep = set()
        for pname, pool in config.pools.items():
            if pname not in self.pools:
                retired = self._retired_pools.pop(pname, None)
                self.pools[pname] = retired or PoolState(rng=random.Random(pool.scoring.seed))
            self.pools[pname].reward_refs = None  # prices may have changed
            for bname, backend in pool.backends.items():
                key = (pname, bname)
                keep.add(key)
                st = self.stats.get(key) or self._retired_stats.pop(key, None)
                if st is None:
                    self.stats[key] = BackendStats(
                        prior_quality=backend.quality,
                        prior_weight=pool.scoring.quality_prior_weight,
                        expected_latency_ms=backend.expected_latency_ms,
                        decay=memory_decay(pool.scoring.memory_ratings),
                    )
                else:
                    self.stats[key] = st
                    st.prior_quality = backend.quality
                    st.prior_weight = pool.scoring.quality_prior_weight
                    st.expected_latency_ms = backend.expected_latency_ms
                    st.decay = memory_decay(pool.scoring.memory_ratings)
        self._retired_stats = {key: self.stats.pop(key) for key in set(self.stats) - keep}
        self._retired_pools = {name: self.pools.pop(name) for name in set(self.pools) - set(config.pools)}
        self.usage_suspicious = {key: n for key, n in self.usage_suspicious.items()
                                 if key in self.stats or key in self._retired_stats}

    @property
    def config(self) -> Config:
        assert self._config is not None, "sync() first"
        return self._config

    # -- observations -------------------------------------------------------

    def observe_request(
        self, pool: str, backend: str, ok: bool, latency_ms: float, prompt_tokens: int = 0, completion_tokens: int = 0,
        charged: bool | None = None,
    ) -> float:
        """Record one request; returns what it cost. Runs once per access-log entry: kept lean.

        `charged`: whether it costs, when that differs from `ok` (an answer cut short is a failure, but
        the backend did the work)."""
        st = self.stats.get((pool, backend))
        p = self.config.pools.get(pool)
        cfg = p.backends.get(backend) if p is not None else None
        if cfg is None or st is None or p is None:
            return 0.0
        paid = ok if charged is None else charged
        cost = request_cost(cfg, prompt_tokens, completion_tokens) if paid else 0.0
        st.observe(ok, latency_ms, prompt_tokens, completion_tokens, cost)
        st.window_requests += 1
        if paid:
            st.window_tokens += prompt_tokens + completion_tokens
        if p.strategy == "adaptive_learning":  # the only reader of the reward posterior
            # The same memory as the quality estimate's, per request: one number says how fast both forget.
            st.observe_reward(self.reward(pool, backend, ok, latency_ms, cost), st.decay)
        return cost

    def observe_attempt_failure(self, pool: str, backend: str, latency_ms: float) -> bool:
        """One failed attempt at `backend` (the attempts log; or a request Envoy's own timer ended, which
        no attempt entry records): an error, and its time if longer than the latency estimate. Costs
        nothing: what a cut answer cost is charged from its request's entry (charge())."""
        st = self.stats.get((pool, backend))
        p = self.config.pools.get(pool)
        if st is None or p is None or backend not in p.backends:
            return False
        st.observe_failure(latency_ms)
        st.window_requests += 1  # the backend was sent it: its quota's rate counts it
        if p.strategy == "adaptive_learning":
            st.observe_reward(0.0, st.decay)  # a failure earns nothing (reward())
        return True

    def charge(self, pool: str, backend: str, prompt_tokens: int, completion_tokens: int) -> float:
        """What a failed request the backend still did the work for cost (an answer cut short): spend only,
        its failure being counted by observe_attempt_failure()."""
        st = self.stats.get((pool, backend))
        p = self.config.pools.get(pool)
        cfg = p.backends.get(backend) if p is not None else None
        if cfg is None or st is None:
            return 0.0
        cost = request_cost(cfg, prompt_tokens, completion_tokens)
        st.cost += cost
        st.window_tokens += prompt_tokens + completion_tokens
        return cost

    def observe_suspicious_usage(self, pool: str, backend: str) -> int:
        """Count a request whose usage block could not be true; returns the backend's count (0: unknown)."""
        key = (pool, backend)
        if key not in self.stats:
            return 0
        count = self.usage_suspicious[key] = self.usage_suspicious.get(key, 0) + 1
        return count

    def observe_feedback(self, pool: str, backend: str, score: float) -> bool:
        st = self.stats.get((pool, backend))
        if st is None:
            return False
        st.observe_feedback(score)
        return True

    def observe_health(self, pool: str, backend: str, score: float, status: str, detail: str = "") -> None:
        st = self.stats.get((pool, backend))
        if st is not None:
            st.health, st.health_status, st.health_detail = score, status, detail

    def reward(self, pool: str, backend: str, ok: bool, latency_ms: float, cost: float) -> float:
        """One request's reward in 0..1 by the pool's objective; a failure earns nothing."""
        if not ok:
            return 0.0
        state = self.pools[pool]
        if state.reward_refs is None:
            state.reward_refs = self._reward_refs(pool)
        cost_ref, latency_ref = state.reward_refs
        return objective_reward(
            self.config.pools[pool].scoring.objective, self.stats[(pool, backend)].quality, cost, latency_ms,
            cost_ref, latency_ref,
        )

    def _reward_refs(self, pool: str) -> tuple[float, float]:
        return max(self._unit_costs(pool).values()) or 1.0, self._latency_ref(pool)

    def _pool_stats(self, pool: str) -> list[BackendStats]:
        """The pool's own stats (not a scan of every backend of every pool: 100 pools would make it O(n²))."""
        return [st for name in self.config.pools[pool].backends if (st := self.stats.get((pool, name))) is not None]

    def _mix(self, pool: str) -> tuple[float, float]:
        prompt = completion = n = 0
        for st in self._pool_stats(pool):
            prompt += st.prompt_tokens
            completion += st.completion_tokens
            n += st.requests - st.errors
        return (prompt / n, completion / n) if n and (prompt or completion) else DEFAULT_MIX

    def _unit_costs(self, pool: str) -> dict[str, float]:
        prompt, completion = self._mix(pool)
        return {name: request_cost(b, prompt, completion) for name, b in self.config.pools[pool].backends.items()}

    def _latency_ref(self, pool: str) -> float:
        seen = [st.latency_ms for st in self._pool_stats(pool) if st.latency_ms]
        return 2.0 * max(seen) if seen else DEFAULT_LATENCY_REF_MS

    # -- decisions ------------------------------------------------------------

    def candidates(self, pool: str) -> list[Candidate]:
        costs = self._unit_costs(pool)
        out = []
        for name, backend in self.config.pools[pool].backends.items():
            st = self.stats[(pool, name)]
            out.append(
                Candidate(
                    name=name, weight=backend.weight, health=st.health, quality=st.quality,
                    latency_ms=st.latency_ms, error_rate=st.error_ewma, unit_cost=costs[name],
                    reward_alpha=st.reward_alpha, reward_beta=st.reward_beta,
                )
            )
        return out

    def set_rotation(self, drained: Drained, cooling: Cooling) -> None:
        """Which backends Envoy sends no new requests (as of the desired state)."""
        self.drained, self.cooling = drained, cooling

    def set_envoy_view(self, out: Mapping[tuple[str, str], str]) -> None:
        """Which backends Envoy itself sends nothing ((pool, backend) -> why): never probed."""
        self.envoy_out = out

    def _unprobed(self, pname: str, pool: Pool) -> dict[str, str]:
        """The pool's backends that must not be probed, and why (deep health is the strategies' own check)."""
        out = {}
        for name in pool.backends:
            key = (pname, name)
            if key in self.cooling:
                out[name] = "cooling after a 429"
            elif key in self.drained:
                out[name] = "draining"
            elif key in self.envoy_out:
                out[name] = self.envoy_out[key]
        return out

    def recompute(self, shift_to_cheapest: frozenset[str] = frozenset(), pools: frozenset[str] | None = None,
                  now: float | None = None) -> bool:
        """New weights for every pool (or those named); True if any changed enough to push.

        `now` (any monotonic clock) closes each recomputed pool's rate window; without it the last
        measured rate is used (a config reload between rounds)."""
        changed = False
        for pname, pool in self.config.pools.items():
            if pools is None or pname in pools:
                changed |= self._recompute_pool(pname, pool, pname in shift_to_cheapest, now)
        return changed

    def _recompute_pool(self, pname: str, pool: Pool, shift: bool, now: float | None = None) -> bool:
        state = self.pools[pname]
        state.reward_refs = None
        if now is not None:
            state.window.roll(now, {name: st.take_window() for name in pool.backends
                                    if (st := self.stats.get((pname, name))) is not None})
        cands = self.candidates(pname)
        decision = decide(pool.strategy, cands, pool.scoring, state.rng, shift_to_cheapest=shift,
                          below_quality=state.below_quality)
        if not any(decision.shares.values()):
            # Every backend reports unhealthy: a health endpoint can be wrong, so keep all in
            # rotation by configured weight and let Envoy's own checks and retries decide.
            fallback = decide("weighted", [_healthy(c) for c in cands], pool.scoring, state.rng,
                              below_quality=state.below_quality)
            reasons = {n: "every backend reports unhealthy: kept in rotation; " + r for n, r in fallback.reasons.items()}
            decision = Decision(fallback.shares, reasons, fallback.below_quality)
        elif not shift:  # a budget shift sends everything to the cheapest: nothing to probe with
            decision = probe(decision, cands, pool.scoring.probe_share, pool.strategy not in STATIC_STRATEGIES,
                             self._unprobed(pname, pool))
        state.decision, state.shifted, state.below_quality = decision, shift, decision.below_quality
        static = pool.strategy in STATIC_STRATEGIES or shift
        target = decision.shares
        if static or not state.smoothed or set(state.smoothed) != set(target):
            smoothed = dict(target)
        else:
            a = pool.scoring.smoothing
            smoothed = {n: state.smoothed[n] + a * (target[n] - state.smoothed[n]) for n in target}
            # A backend taken out (unhealthy, below quality) leaves at once, not smoothly; one only probed
            # takes exactly the probe share.
            smoothed = {n: (target[n] if target[n] == 0 or n in decision.probing else s) for n, s in smoothed.items()}
        state.smoothed = smoothed
        # Quotas last, on every strategy: what Envoy is sent never projects a backend past its quota.
        was_binding = state.binding
        capped = self._apply_quotas(pname, pool, smoothed)
        if static and not state.binding and not was_binding:
            pass  # an operator's own edit always goes out
        elif (state.binding == was_binding
              and not self._significant(state.published, capped, pool.scoring.hysteresis)
              and all(state.published.get(n, 0.0) <= capped[n] * QUOTA_SLACK for n in state.binding)):
            return False  # hysteresis spares Envoy telemetry noise, unless a cap tightened
        state.published = dict(capped)
        if pool.strategy in STATIC_STRATEGIES and pool.deep_health is None and not shift and not state.binding:
            weights = pool_weights(pool)  # exactly what the operator wrote
        else:
            weights = to_weights(capped)
        if weights == state.weights:
            return False
        state.weights = weights
        return True

    def _apply_quotas(self, pname: str, pool: Pool, shares: dict[str, float]) -> dict[str, float]:
        """Cap each backend with a quota to QUOTA_TARGET of it at the pool's measured rate; the overflow
        goes to the other backends of its priority tier (Envoy balances by weight within a tier only)
        that are in rotation, in proportion to their shares. A tier is assumed to carry all the pool's
        traffic: true of tier 0, and of a failover tier when it is in use."""
        state = self.pools[pname]
        state.caps, state.binding, state.over_quota, state.quota_reasons = {}, frozenset(), frozenset(), {}
        rate = state.window.rate
        quotas = {n: b for n, b in pool.backends.items()
                  if b.max_requests_per_minute is not None or b.max_tokens_per_minute is not None}
        if not quotas or rate is None or rate.rpm <= 0:
            return shares
        tpm = rate.tpm or rate.rpm * sum(self._mix(pname))  # no tokens seen lately: the usual mix
        for name, backend in quotas.items():
            cap = math.inf
            if backend.max_requests_per_minute is not None:
                cap = QUOTA_TARGET * backend.max_requests_per_minute / rate.rpm
            if backend.max_tokens_per_minute is not None and tpm > 0:
                cap = min(cap, QUOTA_TARGET * backend.max_tokens_per_minute / tpm)
            if cap < 1.0:
                state.caps[name] = cap
        out = dict(shares)
        binding: set[str] = set()
        over: set[int] = set()
        away = self.out_of_rotation
        for tier in sorted({b.priority for b in pool.backends.values()}):
            members = {n: shares.get(n, 0.0) for n, b in pool.backends.items()
                       if b.priority == tier and shares.get(n, 0.0) > 0 and (pname, n) not in away}
            total = sum(members.values())
            if total <= 0 or not set(members) & set(state.caps):
                continue
            result = cap_shares({n: s / total for n, s in members.items()},
                                {n: c for n, c in state.caps.items() if n in members})
            if not result.feasible:
                over.add(tier)
                for n in members:
                    state.quota_reasons[n] = (
                        f"the quotas of tier {tier} cannot hold the pool's {rate.rpm:.0f} requests/min "
                        f"({_tpm(tpm)}): shares kept as the strategy set them")
                continue
            for n in members:
                out[n] = result.shares[n] * total
            binding |= result.binding
            for n in members:
                if n in result.binding:
                    state.quota_reasons[n] = (
                        f"capped at {result.shares[n]:.1%} of its tier's traffic by its quota ({_quota(pool.backends[n])}; "
                        f"pool at {rate.rpm:.0f} requests/min, {_tpm(tpm)})")
                elif result.binding and result.shares[n] > members[n] / total + 1e-9:
                    state.quota_reasons[n] = "takes the traffic of backends at their quota, in proportion to its share"
        state.binding, state.over_quota = frozenset(binding), frozenset(over)
        return out

    @property
    def out_of_rotation(self) -> Drained:
        return self.drained | frozenset(self.cooling) if self.cooling else self.drained

    @staticmethod
    def _significant(published: dict[str, float], new: dict[str, float], hysteresis: float) -> bool:
        if set(published) != set(new):
            return True
        for name, share in new.items():
            if (share == 0) != (published[name] == 0):
                return True
            if abs(share - published[name]) >= hysteresis:
                return True
        return False

    def weights(self) -> Weights:
        return {pname: dict(state.weights) for pname, state in self.pools.items()}

    def explain(self, pool: str, budget: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Each backend's weight with the inputs and the strategy's reasoning, for operators."""
        state = self.pools[pool]
        cfg = self.config.pools[pool]
        costs = self._unit_costs(pool)
        rate = state.window.rate
        out = {}
        for name, backend in cfg.backends.items():
            st = self.stats[(pool, name)]
            reason = state.decision.reasons.get(name, "") if state.decision else ""
            if name in state.quota_reasons:
                reason += "; " + state.quota_reasons[name]
            cooldown = self.cooling.get((pool, name))
            if cooldown is not None:
                reason = _cooling_reason(cooldown) + "; " + reason
            out[name] = {
                "weight": state.weights.get(name),
                "share": round(state.published.get(name, 0.0), 4),
                "target_share": round(state.decision.shares.get(name, 0.0), 4) if state.decision else None,
                "health": {"score": st.health, "status": st.health_status, "detail": st.health_detail},
                "latency_ms": {"ewma": _round(st.latency_ewma_ms), "p95": _round(st.p95_ms),
                               "expected": st.expected_latency_ms},
                "error_rate": round(st.error_ewma, 4),
                "requests": st.requests,  # successes, failed attempts (retried ones too) and timed-out requests
                "errors": st.errors,
                "usage_suspicious": self.usage_suspicious.get((pool, name), 0),
                "cost": {"per_request_estimate": round(costs[name], 6), "spent": round(st.cost, 6)},
                "quality": {"estimate": round(st.quality, 4), "prior": st.prior_quality, "feedback": st.feedback_n},
                "below_min_quality": name in state.below_quality,  # held out: returns at min_quality + margin
                "probing": bool(state.decision and name in state.decision.probing),  # only the probe share
                "quota": self._quota_view(pool, name, backend, rate),
                "cooling": None if cooldown is None else {
                    "until": round(cooldown.until, 3), "since": round(cooldown.since, 3),
                    "retry_after": cooldown.retry_after},
                "reason": reason,
            }
        return {"pool": pool, "strategy": cfg.strategy, "shifted_to_cheapest": state.shifted,
                "budget": budget, "traffic": _traffic_view(rate, state), "backends": out}

    def _quota_view(self, pool: str, name: str, backend: Backend, rate: Rate | None) -> dict[str, Any] | None:
        """A backend's quota, what it is projected to receive at the weights Envoy has, and whether it binds."""
        if backend.max_requests_per_minute is None and backend.max_tokens_per_minute is None:
            return None
        state = self.pools[pool]
        cfg = self.config.pools[pool]
        projected_rpm = projected_tpm = None
        if rate is not None:
            away = self.out_of_rotation
            tier = [n for n, b in cfg.backends.items() if b.priority == backend.priority and (pool, n) not in away]
            total = sum(state.published.get(n, 0.0) for n in tier)
            share = state.published.get(name, 0.0) / total if total > 0 and name in tier else 0.0
            projected_rpm = round(share * rate.rpm, 1)
            projected_tpm = round(share * (rate.tpm or rate.rpm * sum(self._mix(pool))), 1)
        return {
            "max_requests_per_minute": backend.max_requests_per_minute,
            "max_tokens_per_minute": backend.max_tokens_per_minute,
            "max_share": round(state.caps[name], 4) if name in state.caps else None,
            "projected_rpm": projected_rpm,
            "projected_tpm": projected_tpm,
            "observed_rpm": round(rate.per_backend.get(name, 0.0), 1) if rate is not None else None,
            "binding": name in state.binding,
            "tier_over_quota": backend.priority in state.over_quota,
        }


def _healthy(c: Candidate) -> Candidate:
    return Candidate(c.name, c.weight, 1.0, c.quality, c.latency_ms, c.error_rate, c.unit_cost,
                     c.reward_alpha, c.reward_beta)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _quota(backend: Backend) -> str:
    parts = []
    if backend.max_requests_per_minute is not None:
        parts.append(f"{backend.max_requests_per_minute} requests/min")
    if backend.max_tokens_per_minute is not None:
        parts.append(f"{backend.max_tokens_per_minute} tokens/min")
    return ", ".join(parts)


def _tpm(tpm: float) -> str:
    return f"{tpm:.0f} tokens/min"


def _traffic_view(rate: Rate | None, state: PoolState) -> dict[str, Any]:
    """The pool's measured rate, which quotas are projected from (null until known: no cap before)."""
    if rate is None:
        return {"known": False, "rpm": None, "tpm": None, "requests": 0, "seconds": None,
                "window_seconds": RATE_WINDOW, "over_quota_tiers": []}
    return {"known": True, "rpm": round(rate.rpm, 1), "tpm": round(rate.tpm, 1), "requests": rate.requests,
            "seconds": round(rate.seconds, 1), "window_seconds": RATE_WINDOW,
            "over_quota_tiers": sorted(state.over_quota)}


def _cooling_reason(cooldown: Cooldown) -> str:
    def clock(at: float) -> str:
        return time.strftime("%H:%M:%S", time.gmtime(at))

    return (f"cooling: answered 429 with Retry-After {cooldown.retry_after!r} at {clock(cooldown.since)} UTC, "
            f"out of rotation (DRAINING) until {clock(cooldown.until)} UTC")
