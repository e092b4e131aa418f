"""What one backend has been seen to do: latency, errors, tokens, spend, quality, health.

Plain numbers updated per observation; no clocks, no I/O, so the simulator and
the live loop share it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

LATENCY_ALPHA = 0.1  # EWMA weight of one request
ERROR_ALPHA = 0.05
QUALITY_DECAY = 0.99  # per rating: old ratings fade (about the last 100 count), so a drop shows


@dataclass
class BackendStats:
    prior_quality: float
    prior_weight: float  # the prior counts as this many feedback scores
    expected_latency_ms: float | None = None
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

    def observe_feedback(self, score: float) -> None:
        self.feedback_n += 1
        self.feedback_sum = self.feedback_sum * QUALITY_DECAY + score
        self.feedback_weight = self.feedback_weight * QUALITY_DECAY + 1.0

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
