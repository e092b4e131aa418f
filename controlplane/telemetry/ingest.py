"""What Envoy and the backends report, into the scores and the spend: the per-request path.

Access-log entries arrive in batches; each costs a few dict operations here
(stats, in-memory spend, who served it). Nothing on this path touches the
disk: the ledger is written once per flush interval (controllers/spend.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..config import Config
from ..scoring.engine import Engine
from ..scoring.ledger import SpendBook
from .accesslog import Observation
from .health import Verdict
from .requests import RequestIndex

log = logging.getLogger("controlplane.telemetry")


class Telemetry:
    def __init__(self, engine: Engine, spend: SpendBook, requests: RequestIndex, config: Callable[[], Config]) -> None:
        self.engine = engine
        self.spend = spend
        self.requests = requests
        self.config = config

    def observe_batch(self, batch: Iterable[Observation]) -> None:
        at = time.time()
        for obs in batch:
            self.observe(obs, at)

    def observe(self, obs: Observation, at: float | None = None) -> None:
        """One request from Envoy's access log: stats, spend, and any feedback waiting for it."""
        if not obs.backend or obs.pool not in self.config().pools:
            return  # answered by Envoy itself (overflow, budget, no host): no backend to score
        ok = obs.ok
        cost = self.engine.observe_request(
            obs.pool, obs.backend, ok, obs.latency_ms, obs.prompt_tokens, obs.completion_tokens
        )
        if ok:
            self.spend.add(time.time() if at is None else at, obs.pool, obs.backend, obs.prompt_tokens,
                           obs.completion_tokens, cost)
        if obs.quality_header is not None:
            self.engine.observe_feedback(obs.pool, obs.backend, obs.quality_header)
        if obs.request_id:
            waiting = self.requests.served(obs.request_id, obs.pool, obs.backend)
            if waiting is not None:
                self.engine.observe_feedback(obs.pool, obs.backend, waiting)

    def feedback(self, request_id: str, score: float) -> dict[str, Any]:
        served = self.requests.lookup(request_id)
        if served is None:
            self.requests.wait(request_id, score)
            return {"request_id": request_id, "status": "pending",
                    "detail": "request not seen yet; applied when its access log entry arrives"}
        self.engine.observe_feedback(served.pool, served.backend, score)
        quality = self.engine.stats[(served.pool, served.backend)].quality
        return {"request_id": request_id, "status": "applied", "pool": served.pool, "backend": served.backend,
                "quality": round(quality, 4)}

    def observe_health(self, pool: str, backend: str, verdict: Verdict) -> None:
        stats = self.engine.stats.get((pool, backend))
        if stats is not None and stats.health_status != verdict.status:
            log.info("deep health %s/%s: %s (%s)", pool, backend, verdict.status, verdict.detail)
        self.engine.observe_health(pool, backend, verdict.score, verdict.status, verdict.detail)
