"""What one backend has been seen to do: latency, errors, tokens, spend, quality, health.

Plain numbers updated per observation; no clocks, no I/O, so the simulator and
the live loop share it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

LATENCY_ALPHA = 0.1  # EWMA weight of one request
ERROR_ALPHA = 0.05
# The quality estimate's memory (`scoring.memory_ratings`), in ratings: each rating multiplies the weight
# of the earlier ones by 1 - 1/memory, so the discounted count of ratings never exceeds `memory` and a
# change shows within about that many ratings (half of the old evidence is gone after ~0.69 x memory).
DEFAULT_MEMORY_RATINGS = 100.0
QUALITY_DECAY = 1.0 - 1.0 / DEFAULT_MEMORY_RATINGS  # 0.99

# A pool's traffic rate, for backend quotas: measured over the last RATE_WINDOW seconds and over the
# latest RATE_SHORT seconds, and the larger one counts, so a surge is seen within a round while a lull
# relaxes the caps only as it lasts. Unknown (no cap) until RATE_MIN_REQUESTS requests over at least
# RATE_MIN_SECONDS, or a full window.
RATE_WINDOW = 15.0
RATE_SHORT = 4.0
RATE_MIN_REQUESTS = 5
RATE_MIN_SECONDS = 1.0


def memory_decay(memory: float) -> float:
    """The per-observation discount of a memory of `memory` observations."""
    return 1.0 - 1.0 / memory


@dataclass
class BackendStats:
    prior_quality: float
    prior_weight: float  # the prior counts as this many feedback scores
    expected_latency_ms: float | None = None
    decay: float = QUALITY_DECAY  # per rating (and per reward): memory_decay(scoring.memory_ratings)
    requests: int = 0
    errors: int = 0
    latency_ewma_ms: float | None = None
    error_ewma: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    feedback_n: int = 0
    feedback_sum: float = 0.0  # discounted
    feedback_weight: float = 0.0  # discounted count
    health: float = 1.0  # deep health: 1 healthy, 0.5 degraded, 0 unhealthy
    health_status: str = "unknown"
    health_detail: str = ""
    # adaptive learning: a discounted Beta posterior of the per-request reward
    reward_alpha: float = 1.0
    reward_beta: float = 1.0
    # Since the pool's rate window last rolled: requests, and the tokens of those the backend was paid for.
    window_requests: int = 0
    window_tokens: int = 0
    _latencies: deque[float] = field(default_factory=lambda: deque(maxlen=256), repr=False)

    def observe(self, ok: bool, latency_ms: float, prompt_tokens: int = 0, completion_tokens: int = 0,
                cost: float = 0.0) -> None:
        self.requests += 1
        self.errors += 0 if ok else 1
        self.error_ewma += ERROR_ALPHA * ((0.0 if ok else 1.0) - self.error_ewma)
        if ok:
            self._latencies.append(latency_ms)
            self.latency_ewma_ms = (
                latency_ms if self.latency_ewma_ms is None
                else self.latency_ewma_ms + LATENCY_ALPHA * (latency_ms - self.latency_ewma_ms)
            )
        if ok:  # a failed request's token counts are estimates of nothing served
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
        self.cost += cost

    def observe_failure(self, latency_ms: float) -> None:
        """A failed attempt (or request): an error. Its time counts only when longer than the latency
        estimate: a timed-out attempt shows the backend slow, a quick refusal never makes it look fast
        (and no failure starts the estimate)."""
        self.observe(False, latency_ms)
        ewma = self.latency_ewma_ms
        if ewma is not None and latency_ms > ewma:
            self._latencies.append(latency_ms)
            self.latency_ewma_ms = ewma + LATENCY_ALPHA * (latency_ms - ewma)

    def take_window(self) -> tuple[int, int]:
        """(requests, tokens) since the last call, and start counting again."""
        counts = self.window_requests, self.window_tokens
        self.window_requests = self.window_tokens = 0
        return counts

    def observe_feedback(self, score: float) -> None:
        self.feedback_n += 1
        self.feedback_sum = self.feedback_sum * self.decay + score
        self.feedback_weight = self.feedback_weight * self.decay + 1.0

    def observe_reward(self, reward: float, decay: float) -> None:
        """Discounting old evidence lets the posterior follow a backend that changes."""
        self.reward_alpha = 1.0 + (self.reward_alpha - 1.0) * decay + reward
        self.reward_beta = 1.0 + (self.reward_beta - 1.0) * decay + (1.0 - reward)

    @property
    def quality(self) -> float:
        """Posterior mean with the configured prior as `prior_weight` pseudo-scores; recent ratings count most."""
        return (self.prior_quality * self.prior_weight + self.feedback_sum) / (self.prior_weight + self.feedback_weight)

    @property
    def latency_ms(self) -> float | None:
        return self.latency_ewma_ms if self.latency_ewma_ms is not None else self.expected_latency_ms

    @property
    def p95_ms(self) -> float | None:
        if not self._latencies:
            return None
        ordered = sorted(self._latencies)
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Rate:
    """A pool's recent traffic, per minute, as the backends received it (one access-log entry a request)."""

    rpm: float
    tpm: float  # prompt + completion tokens of the requests the backends were paid for
    requests: int  # the requests the figures are measured from
    seconds: float  # over this long
    per_backend: Mapping[str, float]  # each backend's own requests per minute, over the same span


@dataclass(frozen=True)
class _Bucket:
    start: float
    end: float
    requests: int
    tokens: int
    per_backend: Mapping[str, int]


class RateWindow:
    """Requests and tokens in buckets closed at each scoring round (the caller's clock), so counting a
    request costs two additions and no clock read; the rate is computed once a round, in roll()."""

    def __init__(self, window: float = RATE_WINDOW, short: float = RATE_SHORT,
                 min_requests: int = RATE_MIN_REQUESTS) -> None:
        self.window, self.short, self.min_requests = window, short, min_requests
        self._buckets: deque[_Bucket] = deque()
        self._last: float | None = None
        self.rate: Rate | None = None  # None: not known yet (no cap)

    def roll(self, now: float, counts: Mapping[str, tuple[int, int]]) -> None:
        """Close the bucket since the last roll with `counts` (per backend: requests, tokens) and measure.

        The first roll only starts the clock: what was counted before it covers an unknown span."""
        if self._last is None or now <= self._last:
            if self._last is None:
                self._last = now
            return
        self._buckets.append(_Bucket(self._last, now, sum(r for r, _ in counts.values()),
                                     sum(t for _, t in counts.values()),
                                     {b: r for b, (r, _) in counts.items() if r}))
        self._last = now
        while self._buckets and self._buckets[0].end <= now - self.window:
            self._buckets.popleft()
        self.rate = self._measure()

    def _measure(self) -> Rate | None:
        buckets = list(self._buckets)
        if not buckets:
            return None
        full = buckets[-1].end - buckets[0].start >= self.window
        first = next((i for i, b in enumerate(buckets) if b.requests), None)
        if first is None:
            return Rate(0.0, 0.0, 0, buckets[-1].end - buckets[0].start, {}) if full else None
        # Traffic began somewhere inside its first bucket: counting that bucket's whole span would
        # understate a surge that just started, so it is left out once the later ones span as long.
        used = buckets[first:]
        if len(used) > 1 and used[-1].end - used[1].start >= used[0].end - used[0].start:
            used = used[1:]
        requests = sum(b.requests for b in used)
        seconds = used[-1].end - used[0].start
        if (requests < self.min_requests or seconds < RATE_MIN_SECONDS) and not full:
            return None
        rpm = 60.0 * requests / seconds
        tpm = 60.0 * sum(b.tokens for b in used) / seconds
        latest: list[_Bucket] = []
        for bucket in reversed(used):
            latest.append(bucket)
            if latest[0].end - bucket.start >= self.short:
                break
        if len(latest) < len(used):
            span = latest[0].end - latest[-1].start
            rpm = max(rpm, 60.0 * sum(b.requests for b in latest) / span)
            tpm = max(tpm, 60.0 * sum(b.tokens for b in latest) / span)
        per_backend: dict[str, int] = {}
        for bucket in used:
            for name, n in bucket.per_backend.items():
                per_backend[name] = per_backend.get(name, 0) + n
        return Rate(rpm, tpm, requests, seconds, {b: 60.0 * n / seconds for b, n in per_backend.items()})
