"""A backend's own rate limit: a 429 with Retry-After takes it out of rotation for that long.

The backend is published DRAINING in EDS (as a drain is: no new requests, those in flight finish)
until the time it named; a timer puts it back. Never the last backend of a pool in rotation: a pool
with nowhere else to send keeps it, and Envoy's retries and back-off deal with the 429s.

What is seen is each failed attempt (the router's attempts log, telemetry/accesslog.py): a 429 that
Envoy retried on another backend, and answered from there, cools the backend that sent it as well
as one the client got. The attempts log is at most once like every gRPC access log: a 429 whose entry
is lost cools nothing, and the backend's next 429 does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable
from datetime import UTC
from email.utils import parsedate_to_datetime

from ..reconciler import Reconciler
from ..state import Cooldown, DesiredState

log = logging.getLogger("controlplane.quotas")

MAX_COOLING = 300.0  # seconds: a longer Retry-After is cut to this (a typo must not take a backend out for a day)
_SECONDS = re.compile(r"\d{1,10}(?:\.\d{1,6})?")


def retry_after_seconds(raw: str, now: float, limit: float = MAX_COOLING) -> float | None:
    """How long a Retry-After asks to wait from `now` (wall clock): delay-seconds or an HTTP date, at most
    `limit`; None when it asks for no wait (0, a past date) or is not a Retry-After at all."""
    text = raw.strip()
    if _SECONDS.fullmatch(text):
        seconds = float(text)
    else:
        try:
            date = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if date.tzinfo is None:
            date = date.replace(tzinfo=UTC)  # HTTP dates are GMT; "-0000" parses without a zone
        try:
            seconds = date.timestamp() - now
        except (OverflowError, OSError, ValueError):
            return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return min(seconds, limit)


def in_rotation(state: DesiredState, pool: str) -> list[str]:
    """The pool's backends Envoy may send new requests: not drained, not cooling, not scored out."""
    cfg = state.config.pools.get(pool)
    if cfg is None:
        return []
    weights = state.weights.get(pool, {})
    return [b for b in cfg.backends if (pool, b) not in state.drained and (pool, b) not in state.cooling
            and weights.get(b) != 0]


class Cooling:
    """Proposes `DesiredState.cooling`: which backends are out of rotation after a 429, and until when."""

    def __init__(self, reconciler: Reconciler, clock: Callable[[], float] = time.time, tick: float = 0.1,
                 limit: float = MAX_COOLING) -> None:
        self.reconciler = reconciler
        self.clock = clock
        self.tick = tick
        self.limit = limit
        self.cooled = 0  # times a backend was taken out
        self.kept = 0  # 429s with a Retry-After that would have taken a pool's last backend out
        self.ignored = 0  # Retry-After values that ask for no wait or are not one
        self._kept_logged: dict[tuple[str, str], float] = {}

    def observe(self, pool: str, backend: str, retry_after: str) -> bool:
        """A 429 with this Retry-After from `backend`; True if it was taken out (or its cooling extended)."""
        now = self.clock()
        seconds = retry_after_seconds(retry_after, now, self.limit)
        if seconds is None:
            self.ignored += 1
            return False
        state = self.reconciler.state
        cfg = state.config.pools.get(pool)
        if cfg is None or backend not in cfg.backends:
            return False
        key = (pool, backend)
        until = now + seconds
        current = state.cooling.get(key)
        if current is not None:
            if current.until >= until:
                return False
            cooldown = Cooldown(until, current.since, retry_after)
        else:
            if not [b for b in in_rotation(state, pool) if b != backend]:
                self.kept += 1
                if now - self._kept_logged.get(key, -math.inf) >= seconds:  # once per period asked for
                    self._kept_logged[key] = now
                    log.warning("%s/%s answered 429 (Retry-After %r) but is the pool's last backend in rotation: "
                                "kept", pool, backend, retry_after, extra={"pool": pool, "backend": backend})
                return False
            cooldown = Cooldown(until, now, retry_after)
            self.cooled += 1
            log.info("%s/%s answered 429 with Retry-After %r: out of rotation for %.1f s", pool, backend,
                     retry_after, seconds, extra={"pool": pool, "backend": backend})
        self.reconciler.propose(cooling={**state.cooling, key: cooldown})
        return True

    def expire(self, now: float | None = None) -> bool:
        """Put back the backends whose time is up (or that a reload removed), and every cooling backend of a
        pool left with none in rotation (an operator drained the rest); True if anything changed."""
        now = self.clock() if now is None else now
        state = self.reconciler.state
        if not state.cooling:
            return False
        pools = state.config.pools
        cooling = {key: c for key, c in state.cooling.items()
                   if c.until > now and key[0] in pools and key[1] in pools[key[0]].backends}
        for key, c in state.cooling.items():
            if key not in cooling and key[0] in pools and key[1] in pools[key[0]].backends:
                log.info("%s/%s back in rotation (Retry-After %r over)", *key, c.retry_after,
                         extra={"pool": key[0], "backend": key[1]})
        probe = state.replace(cooling=cooling)
        for pool in {p for p, _ in cooling}:
            if not in_rotation(probe, pool):
                lifted = [key for key in cooling if key[0] == pool]
                for key in lifted:
                    del cooling[key]
                log.warning("pool %s has no other backend in rotation: %s back early", pool,
                            ", ".join(b for _, b in lifted), extra={"pool": pool})
        if len(cooling) == len(state.cooling):
            return False
        self.reconciler.propose(cooling=cooling)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                self.expire()
            except Exception:  # keep the timer alive whatever one round does
                log.exception("cannot end cooldowns")
