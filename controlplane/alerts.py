"""Alerts to the operator's webhook: each condition fires once while it holds and resolves once when it
clears; events are rate-limited, queued (bounded) and POSTed in order, never blocking the loop.

Two ways in:
- `update(conditions, hold)`: what holds now, as the alert loop (controllers/alerting.py) evaluates it
  every `controlplane.alerts.interval`. A key seen for the first time fires at once; a firing key that
  is no longer seen (and not in `hold`, whose truth is unknown right now) resolves. Flap guard: a key
  that resolved less than `COOLDOWN_INTERVALS` x interval ago does not fire again at once; if it still
  holds when that time is up it fires then (`since`: when it came back), if it clears before, nothing
  is sent. So a flapping condition costs at most one firing/resolved pair per cooldown.
- `send(kind, message, **details)`: a one-shot event (budget thresholds, once per window). A
  `budget_exhausted` is also tracked as active, so it resolves when the alert loop no longer sees the
  window exhausted (next window, or a raised limit).

Delivery: a token bucket allows at most `max_per_minute` POSTs in any 60 s (a burst of a sixth of it,
the rest spread evenly; a retry takes a token too); waiting events are kept in order, at most
QUEUE_LIMIT. On overflow the oldest *firing* event goes (with its resolve, queued or to come: a
receiver never hears of half an episode), and only a queue holding nothing but resolves loses its
oldest resolve. Each event is tried ATTEMPTS times with back-off.

Events hold names, URLs (which the config refuses to hold credentials) and numbers; the alert loop
scrubs any secret of the config out of the texts it passes (an Envoy NACK message, say).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .config import Alerts

log = logging.getLogger("controlplane.alerts")

QUEUE_LIMIT = 1000  # events waiting for a token or for the webhook
COOLDOWN_INTERVALS = 5  # a resolved key fires again only after holding this many intervals past its resolve
ATTEMPTS = 3
BACKOFF = 0.5  # seconds before the second attempt, doubled for each further one

SEVERITY = {
    "backend_unhealthy": "warning",
    "backend_ejected": "warning",
    "pool_availability": "critical",
    "error_rate": "warning",
    "latency_p95": "warning",
    "envoy_nack": "critical",
    "config_rejected": "warning",
    "budget_threshold": "warning",
    "budget_exhausted": "critical",
    "client_budget_threshold": "warning",
    "client_budget_exhausted": "critical",
}
TRACKED_ONE_SHOTS = frozenset({"budget_exhausted"})  # sent by `send`, resolved through `update`
CORE_FIELDS = frozenset({"event", "kind", "key", "severity", "message", "pool", "backend", "at", "since",
                         "details", "duration_seconds"})

Post = Callable[[str, float, bytes], Awaitable[None]]


def condition_key(kind: str, *parts: str) -> str:
    """Stable: kind, then pool, backend, node, type as they apply (names hold no ':' but node ids may)."""
    return ":".join((kind, *parts))


@dataclass(frozen=True)
class Condition:
    """Something that holds now and is worth telling the operator."""

    kind: str
    key: str
    message: str
    pool: str | None = None
    backend: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    cleared: str = ""  # the resolved event's message
    flat: bool = False  # details also at the event's top level (the budget events always had them there)

    @property
    def severity(self) -> str:
        return SEVERITY.get(self.kind, "warning")


@dataclass
class ActiveAlert:
    condition: Condition  # as last seen (details refreshed every evaluation; no new event)
    since: float  # first seen holding
    fired_at: float
    episode: int  # shared by the firing event and its resolve
    delivery: str  # queued | sent | failed | dropped | no_webhook: what became of the firing event

    def as_dict(self) -> dict[str, Any]:
        c = self.condition
        return {"key": c.key, "kind": c.kind, "severity": c.severity, "pool": c.pool, "backend": c.backend,
                "message": c.message, "since": self.since, "fired_at": self.fired_at, "delivery": self.delivery,
                "details": dict(c.details)}


@dataclass
class _Event:
    body: bytes
    kind: str
    key: str
    firing: bool  # a firing (or one-shot) event; else a resolve
    episode: int
    url: str
    timeout: float


class WebhookError(Exception):
    """The webhook answered, but not with a 2xx."""


class TokenBucket:
    """At most `per_minute` takes in any 60 s: a burst of B = per_minute // 6 (at least 1), then one every
    60 / (per_minute - B + 1) s. (A full bucket at t gives B at once and per_minute - B more before
    t + 60.) Reads `per_minute` at each take, so a reload applies at once."""

    def __init__(self) -> None:
        self.tokens: float | None = None  # None: full at the first take
        self.updated = 0.0

    @staticmethod
    def shape(per_minute: int) -> tuple[float, float]:
        burst = max(1, per_minute // 6)
        return float(burst), (per_minute - burst + 1) / 60.0

    def take(self, now: float, per_minute: int) -> float:
        """0.0 when a token was taken; else how many seconds until one is there (nothing taken)."""
        burst, rate = self.shape(per_minute)
        if self.tokens is None:
            self.tokens = burst
        else:
            self.tokens = min(burst, self.tokens + max(0.0, now - self.updated) * rate)
        self.updated = now
        if self.tokens >= 1.0 - 1e-3:  # epoch seconds are exact to ~1e-7 s: never wait for a rounding error
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return max(1e-3, (1.0 - self.tokens) / rate)


async def post_json(url: str, timeout: float, body: bytes) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
            if resp.status >= 300:
                raise WebhookError(f"HTTP {resp.status}")


def _context(condition: Condition) -> dict[str, Any]:
    """For a JSON log line (logs.py): which pool, backend, Envoy node and kind the alert is about."""
    return {"kind": condition.kind, "pool": condition.pool, "backend": condition.backend,
            "node": condition.details.get("node")}


def _count(counter: dict[str, int], kind: str, by: int = 1) -> None:
    counter[kind] = counter.get(kind, 0) + by


class Alerter:
    """Which alerts are active, what was sent, and the sender.

    Public for the metrics, the API and the page: `active()`; `counters()`; and the per-kind counters
    `fired`, `resolved`, `sent`, `failed` (given up after ATTEMPTS), `dropped` (queue overflow, or still
    queued at stop); `queued` (events waiting now).
    """

    def __init__(self, settings: Callable[[], Alerts], attempts: int = ATTEMPTS, *,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 post: Post = post_json, queue_limit: int = QUEUE_LIMIT) -> None:
        self.settings = settings  # read per event, so a reload takes effect for the next one
        self.attempts = attempts
        self.queue_limit = queue_limit
        self._clock, self._sleep, self._post = clock, sleep, post
        self.fired: dict[str, int] = {}
        self.resolved: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self._active: dict[str, ActiveAlert] = {}
        self._resolved_at: dict[str, float] = {}  # key -> when it last resolved (kept for the cooldown)
        self._pending: dict[str, float] = {}  # key -> first seen again within its cooldown
        self._episodes = itertools.count(1)
        self._queue: deque[_Event] = deque()
        self._bucket = TokenBucket()
        self._worker: asyncio.Task[None] | None = None
        self._inflight: _Event | None = None

    # -- what others read -------------------------------------------------------------------------

    def active(self) -> list[dict[str, Any]]:
        """The alerts firing now, oldest first."""
        return [a.as_dict() for a in sorted(self._active.values(), key=lambda a: (a.since, a.condition.key))]

    def active_keys(self) -> frozenset[str]:
        return frozenset(self._active)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def counters(self) -> dict[str, Any]:
        return {"fired": dict(self.fired), "resolved": dict(self.resolved), "sent": dict(self.sent),
                "failed": dict(self.failed), "dropped": dict(self.dropped), "queued": self.queued,
                "active": len(self._active)}

    # -- conditions -------------------------------------------------------------------------------

    def update(self, conditions: Iterable[Condition], hold: Collection[str] = (), now: float | None = None) -> None:
        """What holds now: fire what is new, resolve what cleared (unless its key is in `hold`)."""
        now = self._clock() if now is None else now
        cooldown = COOLDOWN_INTERVALS * self.settings().interval.total_seconds()
        seen = {c.key: c for c in conditions}
        for key, condition in seen.items():
            alert = self._active.get(key)
            if alert is not None:
                alert.condition = condition
                continue
            resolved_at = self._resolved_at.get(key)
            if resolved_at is not None and now - resolved_at < cooldown:
                self._pending.setdefault(key, now)  # flapping: wait until the cooldown is over
                continue
            self._fire(condition, self._pending.pop(key, now), now)
        for key in [k for k in self._active if k not in seen and k not in hold]:
            self._resolve(key, now)
        for key in [k for k in self._pending if k not in seen and k not in hold]:
            del self._pending[key]  # came back and went again within the cooldown: nothing to tell
        for key in [k for k, at in self._resolved_at.items() if now - at >= cooldown]:
            del self._resolved_at[key]

    def send(self, kind: str, message: str, **details: Any) -> None:
        """A one-shot event (the budget thresholds): sent as it comes, never deduplicated here."""
        now = self._clock()
        pool, backend = details.get("pool"), details.get("backend")
        parts = [str(details[k]) for k in ("pool", "client", "backend", "window") if details.get(k) is not None]
        threshold = details.get("threshold")
        if kind not in TRACKED_ONE_SHOTS and threshold is not None:
            parts.append(f"{threshold:g}" if isinstance(threshold, float | int) else str(threshold))
        key = condition_key(kind, *parts)
        window = details.get("window")
        cleared = (f"pool {pool!r} is within its {window}ly budget again (a new {window} began, or the limit "
                   f"was raised)" if kind == "budget_exhausted" else "")
        condition = Condition(kind, key, message, pool if isinstance(pool, str) else None,
                              backend if isinstance(backend, str) else None, details, cleared, flat=True)
        if kind in TRACKED_ONE_SHOTS:
            if key in self._active:  # a new window's exhaustion while the last one's is still active
                self._resolve(key, now)
            self._fire(condition, now, now)
            return
        _count(self.fired, kind)
        log.warning("alert %s: %s", key, message, extra=_context(condition))
        self._enqueue("firing", condition, now, now, next(self._episodes))

    def _fire(self, condition: Condition, since: float, now: float) -> None:
        episode = next(self._episodes)
        alert = self._active[condition.key] = ActiveAlert(condition, since, now, episode, "queued")
        _count(self.fired, condition.kind)
        log.warning("alert FIRING %s: %s", condition.key, condition.message, extra=_context(condition))
        alert.delivery = self._enqueue("firing", condition, since, now, episode)

    def _resolve(self, key: str, now: float) -> None:
        alert = self._active.pop(key)
        self._resolved_at[key] = now
        condition = alert.condition
        _count(self.resolved, condition.kind)
        log.info("alert resolved %s after %.1fs: %s", key, now - alert.since, condition.cleared or condition.message,
                 extra=_context(condition))
        if alert.delivery in ("dropped", "no_webhook"):
            return  # nobody was told it fired: nobody is told it ended
        self._enqueue("resolved", condition, alert.since, now, alert.episode)

    # -- delivery ---------------------------------------------------------------------------------

    def _enqueue(self, event: str, condition: Condition, since: float, now: float, episode: int) -> str:
        settings = self.settings()
        if not settings.webhook:
            return "no_webhook"
        message = condition.message if event == "firing" else (condition.cleared or f"resolved: {condition.message}")
        body: dict[str, Any] = {}
        if condition.flat:
            body.update((k, v) for k, v in condition.details.items() if k not in CORE_FIELDS)
        body.update(event=event, kind=condition.kind, key=condition.key, severity=condition.severity,
                    message=message, pool=condition.pool, backend=condition.backend, at=now, since=since,
                    details=dict(condition.details))
        if event == "resolved":
            body["duration_seconds"] = round(now - since, 3)
        if len(self._queue) >= self.queue_limit:
            self._overflow()
        self._queue.append(_Event(json.dumps(body, default=str).encode(), condition.kind, condition.key,
                                  event == "firing", episode, settings.webhook, settings.timeout.total_seconds()))
        self._start_worker()
        return "queued"

    def _overflow(self) -> None:
        """Make room: the oldest firing goes with its resolve; only resolves queued: the oldest resolve."""
        victim = next((e for e in self._queue if e.firing), self._queue[0])
        gone = [victim] + ([e for e in self._queue if e.episode == victim.episode and e is not victim]
                           if victim.firing else [])
        for event in gone:
            self._queue.remove(event)
            _count(self.dropped, event.kind)
        if victim.firing:
            alert = self._active.get(victim.key)
            if alert is not None and alert.episode == victim.episode:
                alert.delivery = "dropped"  # its resolve will not be sent either
        log.warning("alert queue full (%d): dropped %s %s", self.queue_limit,
                    "firing of" if victim.firing else "resolve of", victim.key)

    def _start_worker(self) -> None:
        if self._worker is not None and not self._worker.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a unit test): events wait in the queue
        self._worker = loop.create_task(self._work(), name="alert-sender")

    async def _token(self) -> None:
        while (wait := self._bucket.take(self._clock(), self.settings().max_per_minute)) > 0:
            await self._sleep(wait)

    async def _work(self) -> None:
        """One event at a time, in order; ends when the queue is empty (the next event starts it again)."""
        while self._queue:
            await self._token()
            if not self._queue:
                return  # an overflow emptied it meanwhile (queue_limit 0 or 1 only)
            event = self._inflight = self._queue.popleft()
            try:
                await self._deliver(event)
            except Exception:  # a bug must not stop the sender
                log.exception("cannot deliver alert %s", event.key)
                _count(self.failed, event.kind)
            finally:
                self._inflight = None

    async def _deliver(self, event: _Event) -> None:
        """To the webhook in force when the event was raised, whatever a reload does meanwhile."""
        delay = BACKOFF
        for attempt in range(1, self.attempts + 1):
            if attempt > 1:
                await self._sleep(delay)
                delay *= 2
                await self._token()
            try:
                await self._post(event.url, event.timeout, event.body)
            except (TimeoutError, aiohttp.ClientError, OSError, WebhookError) as exc:
                log.warning("webhook attempt %d/%d for %s failed: %s", attempt, self.attempts, event.key,
                            str(exc) or type(exc).__name__)
                continue
            _count(self.sent, event.kind)
            self._mark(event, "sent")
            return
        _count(self.failed, event.kind)
        self._mark(event, "failed")

    def _mark(self, event: _Event, delivery: str) -> None:
        alert = self._active.get(event.key)
        if event.firing and alert is not None and alert.episode == event.episode:
            alert.delivery = delivery

    async def drain(self) -> None:
        """On stop: give queued and in-flight events up to the webhook timeout, then cancel what is left."""
        worker = self._worker
        if worker is None or worker.done():
            return
        await asyncio.wait({worker}, timeout=self.settings().timeout.total_seconds())
        if worker.done():
            return
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        left = list(self._queue) + ([self._inflight] if self._inflight is not None else [])
        for event in left:
            _count(self.dropped, event.kind)
        self._queue.clear()
        log.warning("stopping: %d alert event(s) not sent", len(left))
