"""What Envoy and the backends report, into the scores and the spend: the per-request path.

Access-log entries arrive in batches; each costs a few dict operations here
(stats, in-memory spend, who served it). Nothing on this path touches the
disk: the ledger is written once per flush interval (controllers/spend.py).

Every request a backend answered is charged, whatever its usage block said
(accesslog.parse() has replaced counts that could not be true by estimates,
and marked them suspicious): also an answer cut short by a timeout or a
reset, which counts as a failure for the scores while the backend did the
work. The engine's spend and the book's are added from the same cost, so
they always agree.

Every attempt counts (accesslog.py: the two logs). A failed attempt, retried
elsewhere or not, comes in its own entry from the attempts log and is an
error for the backend that failed it (observe_attempts). The request's entry
then counts in the scores only as a success, with its final attempt's time
(not the earlier attempts' and back-off), or as a failure no attempt entry
records (Envoy's timeout on the whole request): so each failure is counted
once. Cost, spend, feedback, clients, histograms, the recent window and the
spool follow the request's entry alone; an attempt entry is never charged.
A 429 with Retry-After cools the backend from its attempt entry, so one that
Envoy retried elsewhere is seen too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..config import Config
from ..rollouts.controller import Rollouts
from ..scoring.engine import Engine
from ..scoring.ledger import SpendBook
from .accesslog import Attempt, Observation
from .health import Verdict
from .histograms import GenAiHistograms
from .recent import Recent
from .requests import AlreadyRatedError, RequestIndex

log = logging.getLogger("controlplane.telemetry")


class Telemetry:
    def __init__(self, engine: Engine, spend: SpendBook, requests: RequestIndex, config: Callable[[], Config],
                 clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.spend = spend
        self.requests = requests
        self.config = config
        self.clock = clock  # when spend is charged (hour buckets, client minutes): the wall clock; tests shift it
        # Per-client accounting (controllers/clients.py): each entry with a client or without a backend.
        self.clients: Callable[[Observation, float], None] | None = None
        # A backend's 429 with Retry-After (pool, backend, header as sent): cooled (controllers/quotas.py).
        self.rate_limited: Callable[[str, str, str], object] | None = None
        # Rollouts (rollouts/controller.py): entries of the pools in its `watched`, shadows' attempts, feedback.
        self.rollouts: Rollouts | None = None
        self.attempt_failures = 0  # failed attempts counted against their backend (attempts log)
        self.recent = Recent()  # per backend, lately: status classes, error rate, percentiles, share
        self.histograms = GenAiHistograms()  # the OTel GenAI histograms
        self._synced: Config | None = None

    def _sync(self, config: Config) -> None:
        """A reload removed backends: forget their recent requests and histograms (bounded memory)."""
        keys = {(p, b) for p, pool in config.pools.items() for b in pool.backends}
        self.recent.retain(keys)
        self.histograms.retain(keys)
        self._synced = config

    def observe_batch(self, batch: Iterable[Observation]) -> int:
        """Returns how many entries could not be used (each is logged)."""
        at = time.time()  # one clock read per batch: hour buckets need no finer time
        charged_at = self.clock()
        config = self.config()
        if config is not self._synced:
            self._sync(config)
        pools = config.pools
        failed = 0
        engine, spend, requests, clients = self.engine, self.spend, self.requests, self.clients
        recent, histograms = self.recent.observe, self.histograms.observe
        rollouts = self.rollouts
        watched = rollouts.watched if rollouts is not None else frozenset()
        for obs in batch:
            pool, backend = obs.pool, obs.backend
            if clients is not None and (obs.client or not backend):
                try:
                    clients(obs, charged_at)
                except Exception:
                    failed += 1
                    log.exception("cannot count the access log entry of request %r for its client",
                                  obs.request_id[:64])
            if not backend or pool not in pools:
                continue  # answered by Envoy itself (overflow, budget, no host): no backend to score
            if not obs.status and obs.abandoned:
                continue  # the client left before any answer: not the backend's doing
            try:
                ok = obs.ok
                charged = ok or obs.charged  # a failure may still have cost: an answer cut short
                if ok:  # the final attempt's own time: earlier attempts were counted in their entries
                    cost = engine.observe_request(pool, backend, True, obs.latency_ms - obs.retried_ms,
                                                  obs.prompt_tokens, obs.completion_tokens)
                else:  # its failure is its final attempt's entry's, unless no attempt entry records it
                    if obs.unattempted:
                        engine.observe_attempt_failure(pool, backend, obs.latency_ms)
                    cost = engine.charge(pool, backend, obs.prompt_tokens, obs.completion_tokens) if charged else 0.0
                if charged:
                    spend.add(charged_at, pool, backend, obs.model, obs.prompt_tokens, obs.completion_tokens, cost,
                              obs.client)
                seconds = obs.latency_ms / 1000
                recent(at, pool, backend, obs.status, ok, seconds)
                if pool in watched:
                    assert rollouts is not None
                    rollouts.observe(obs, ok, cost, at)
                ttfb = obs.ttfb_ms
                histograms(pool, backend, obs.requested_model, obs.model, seconds,
                           None if ttfb is None else ttfb / 1000, obs.prompt_tokens, obs.completion_tokens)
                if obs.usage_suspicious:
                    self._suspicious(obs)
                if obs.quality_header is not None:
                    self._rated(pool, backend, obs.quality_header)
                if obs.request_id:
                    waiting = requests.served(obs.request_id, pool, backend)
                    if waiting is not None:
                        self._rated(pool, backend, waiting)
            except Exception:  # one entry that cannot be used must not cost the rest of its batch
                failed += 1
                log.exception("cannot use the access log entry of request %r", obs.request_id[:64])
        return failed

    def observe_attempts(self, batch: Iterable[Attempt]) -> int:
        """Failed attempts (the attempts log): each an error for its backend; a 429 with Retry-After cools
        it. Returns how many could not be used (each is logged)."""
        pools = self.config().pools
        engine, rate_limited = self.engine, self.rate_limited
        rollouts = self.rollouts
        at = time.time()
        failed = 0
        for attempt in batch:
            pool, backend = attempt.pool, attempt.backend
            if rollouts is not None and (attempt.shadow or pool in rollouts.watched):
                try:
                    rollouts.observe_attempt(attempt, at)
                except Exception:
                    failed += 1
                    log.exception("cannot use the attempts log entry of request %r for its rollout",
                                  attempt.request_id[:64])
                if attempt.shadow:
                    continue  # the shadow's answer reached no client: nothing for the scores
            if not backend or pool not in pools or not attempt.failed:
                continue  # no backend was picked, or not a failure (the filter is Envoy's; the rule is here)
            try:
                if engine.observe_attempt_failure(pool, backend, attempt.latency_ms):
                    self.attempt_failures += 1
                if attempt.status == 429 and attempt.retry_after and rate_limited is not None:
                    rate_limited(pool, backend, attempt.retry_after)
            except Exception:
                failed += 1
                log.exception("cannot use the attempts log entry of request %r", attempt.request_id[:64])
        return failed

    def _suspicious(self, obs: Observation) -> None:
        count = self.engine.observe_suspicious_usage(obs.pool, obs.backend)
        if count and count & (count - 1) == 0:  # the 1st, 2nd, 4th, 8th...: a lying backend cannot flood the log
            log.warning("%s/%s reported usage that cannot be true (%d requests so far); request %r estimated "
                        "instead at %d prompt and %d completion tokens", obs.pool, obs.backend, count,
                        obs.request_id[:64], obs.prompt_tokens, obs.completion_tokens)

    def feedback(self, request_id: str, score: float) -> dict[str, Any]:
        """Apply a rating, or keep it until the request's entry arrives; each request is rated once
        (status "duplicate" for a second rating)."""
        try:
            served = self.requests.rate(request_id)
        except AlreadyRatedError:
            return {"request_id": request_id, "status": "duplicate",
                    "detail": "this request was already rated; each request can be rated once"}
        if served is None:
            self.requests.wait(request_id, score)
            return {"request_id": request_id, "status": "pending",
                    "detail": "request not seen yet; applied when its access log entry arrives"}
        self._rated(served.pool, served.backend, score)
        stats = self.engine.stats.get((served.pool, served.backend))  # None: the backend was since removed
        return {"request_id": request_id, "status": "applied", "pool": served.pool, "backend": served.backend,
                "quality": round(stats.quality, 4) if stats is not None else None}

    def _rated(self, pool: str, backend: str, score: float) -> None:
        self.engine.observe_feedback(pool, backend, score)
        if self.rollouts is not None:
            self.rollouts.observe_feedback(pool, backend, score)

    def observe_health(self, pool: str, backend: str, verdict: Verdict) -> None:
        stats = self.engine.stats.get((pool, backend))
        if stats is not None and stats.health_status != verdict.status:
            log.info("deep health %s/%s: %s (%s)", pool, backend, verdict.status, verdict.detail,
                     extra={"pool": pool, "backend": backend})
        self.engine.observe_health(pool, backend, verdict.score, verdict.status, verdict.detail)
