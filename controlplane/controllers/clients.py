"""Per-client accounting, and the client limits the control plane decides: tokens per minute and budgets.

Envoy checks a client's key and its requests per minute on its own (xds/resources.py). Tokens cannot be
charged there: they are known at a response's end, and Envoy 1.40's local rate limit has no hook at a
stream's end. Budgets need the spend. So both are decided here, from the access log, and enforced by
Envoy: a blocked client gets a route answering 429 (xds/resources._blocked), pushed as a route change
and lifted the same way; the control plane is never asked per request.

Per access-log entry (the ingest path, only entries with a client or without a backend): a request
count; for a served entry, its tokens added to the client's count for the current calendar minute and
compared with the limit (a dict add and a compare); for an entry Envoy answered itself, the reason of
the rejection (auth, rate, budget, tokens). The moment a count reaches the limit the client is blocked
until the minute ends. Its tokens are those of every Envoy together: each sends its log here.

On a timer (TICK, and at each minute's end): the minute rolled over (token blocks lifted); the client
budgets evaluated (thresholds alerted, exhausted clients blocked, lifted when their window rolls over).

How exact: a client is blocked once its count reaches the limit, and what it gets through meanwhile is
the overshoot: its requests that end during the access log's flush interval (200 ms) plus the time the
route change takes to reach Envoy (a few ms), and those already in flight (they are not stopped).

The clock: `time.time()`, plus an offset that only tests set (`run --clock-offset-file`, see `Clock`),
so a test can cross a budget window without waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..config import Config
from ..reconciler import Reconciler
from ..scoring.budget import (
    BUDGET_EXHAUSTED,
    MINUTE,
    TOKENS_EXCEEDED,
    Block,
    ClientBudgetVerdict,
    evaluate_clients,
    merge_blocks,
    seconds_left,
)
from ..scoring.ledger import SpendBook
from ..telemetry.accesslog import Observation
from ..xds.resources import RATE_LIMITED_STATUS

log = logging.getLogger("controlplane.clients")

NO_CLIENT = "(none)"  # requests without a valid key (rejected with 401)
REASONS = ("auth", "rate", "budget", "tokens")  # why Envoy answered a client itself
BLOCK_ROUTE = "client/"  # the name of a blocked client's route starts so (xds/resources._blocked)
RATE_LIMITED_FLAGS = frozenset({"rate_limited", "RL"})  # the gRPC log's long name, the file log's short code
TICK = 0.25  # seconds between evaluations (budgets; the minute's end is met exactly)
MAX_CLIENTS = 1024  # names counted; they come from the config (Envoy sets them from the keys)


class Sender(Protocol):
    def send(self, kind: str, message: str, **details: Any) -> None: ...


class Clock:
    """Wall-clock time for budgets and token windows: `time.time()` plus an offset.

    FOR TESTS ONLY: with `offset_file` (the hidden `run --clock-offset-file FILE`), the file holds a
    number of seconds (a float) added to the time; it is read at each evaluation (`refresh`, every
    TICK), so a test can move the control plane past the end of a budget's hour without waiting. A
    missing or empty file is 0; an unreadable one keeps the last offset. Without the option the offset
    is always 0 and nothing is read.
    """

    def __init__(self, offset_file: Path | None = None) -> None:
        self.offset_file = offset_file
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def refresh(self) -> None:
        if self.offset_file is None:
            return
        try:
            text = self.offset_file.read_text(encoding="utf-8").strip()
            value = float(text) if text else 0.0
        except FileNotFoundError:
            value = 0.0
        except (OSError, ValueError) as exc:
            log.warning("test clock: cannot read %s (%s); the offset stays %+.3f s", self.offset_file, exc,
                        self.offset)
            return
        if not math.isfinite(value):
            return
        if value != self.offset:
            log.warning("test clock: budgets and token windows now run %+.3f s off the wall clock", value)
            self.offset = value


@dataclass
class ClientCounts:
    """One client since the control plane started: every request Envoy logged for it, and those Envoy
    answered itself, by reason."""

    requests: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))


def rejection(obs: Observation, last_code: str | None) -> str | None:
    """Why Envoy answered this request itself (an entry without a backend), if a client limit did:
    `auth` (no valid key), `rate` (requests per minute: the local rate limit, flagged RateLimited; it
    answers RATE_LIMITED_STATUS, which the listener turns into 429), `budget` or `tokens` (the client's
    blocked route, by the code of the client's latest block: `last_code`)."""
    status = obs.status
    if status == 401:
        return "auth"
    if status != 429 and status != RATE_LIMITED_STATUS:
        return None
    if obs.route.startswith(BLOCK_ROUTE):
        return "tokens" if last_code == TOKENS_EXCEEDED else "budget"
    if status == RATE_LIMITED_STATUS or not RATE_LIMITED_FLAGS.isdisjoint(obs.response_flags.split(",")):
        return "rate"
    return None


class ClientController:
    """Counts per client, blocks clients over their tokens per minute or budget, lifts the blocks.

    Proposes one combined `blocked` mapping (the budget's block wins over the tokens' one).
    """

    def __init__(self, spend: SpendBook, alerter: Sender, reconciler: Reconciler, clock: Clock | None = None
                 ) -> None:
        self.spend = spend
        self.alerter = alerter
        self.reconciler = reconciler
        self.clock = clock or Clock()
        self.counts: dict[str, ClientCounts] = {}
        self.minute = -1  # the calendar minute being counted (minutes since the epoch)
        self.used: dict[str, int] = {}  # tokens this minute, per client with a limit
        self.verdict = ClientBudgetVerdict()
        self.tokens_blocked: dict[str, Block] = {}
        self.budget_blocked: dict[str, Block] = {}
        self.last_code: dict[str, str] = {}  # the code of each client's latest block (also once lifted)
        self._active = False  # any client configured
        self._limits: dict[str, int] = {}  # tokens per minute, per client that has one
        self._config: Config | None = None

    # -- the per-entry path ----------------------------------------------------------------------------

    def observe(self, obs: Observation, at: float) -> None:
        """One access-log entry with a client or without a backend; `at` is when the batch arrived."""
        if not self._active:
            return
        client = obs.client or NO_CLIENT
        counts = self.counts.get(client)
        if counts is None:
            if len(self.counts) >= MAX_CLIENTS:
                return
            counts = self.counts[client] = ClientCounts()
        counts.requests += 1
        if not obs.backend:
            reason = rejection(obs, self.last_code.get(client))
            if reason is not None:
                counts.rejected[reason] += 1
            return
        limit = self._limits.get(client)
        if limit is None or not obs.charged:
            return
        minute = int(at // MINUTE)
        if minute != self.minute:
            self._roll(minute)
        used = self.used[client] = self.used.get(client, 0) + obs.prompt_tokens + obs.completion_tokens
        if used >= limit and client not in self.tokens_blocked:
            self._block_tokens(client, used, limit, at)

    def _block_tokens(self, client: str, used: int, limit: int, at: float) -> None:
        wait = seconds_left(at, "minute")
        self.tokens_blocked[client] = (
            TOKENS_EXCEEDED,
            f"tokens per minute reached: client {client!r} has used {used} tokens this minute, its "
            f"tokens_per_minute limit is {limit}; retry after the time in the Retry-After header",
            wait)
        self.last_code[client] = TOKENS_EXCEEDED
        log.info("client %s over its tokens_per_minute (%d of %d): answered 429 for %d s", client, used, limit,
                 wait)
        self._publish()

    def _roll(self, minute: int) -> None:
        """A new calendar minute: counts start again and token blocks are lifted."""
        self.minute = minute
        self.used.clear()
        if self.tokens_blocked:
            log.info("a new minute: token blocks lifted for %s", ", ".join(sorted(self.tokens_blocked)))
            self.tokens_blocked.clear()
            self._publish()

    # -- the timer -------------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            now = self.clock()
            await asyncio.sleep(min(TICK, MINUTE - now % MINUTE + 0.001))
            try:
                self.check()
            except Exception:
                log.exception("client limits could not be evaluated; blocks unchanged")

    def check(self, send: bool = True) -> None:
        """Roll the minute over if it ended, evaluate the client budgets, propose the blocks.

        The first check after a start passes send=False: thresholds crossed before a restart were alerted
        then, so they are only noted (as for pool budgets)."""
        self.clock.refresh()
        now = self.clock()
        config = self.reconciler.state.config
        if config is not self._config:
            self._sync(config)
        minute = int(now // MINUTE)
        if minute != self.minute:
            self._roll(minute)
        budgets = {name: c.budget for name, c in config.clients.items() if c.budget is not None}
        if budgets or self.verdict.windows or self.budget_blocked:
            verdict = evaluate_clients(budgets, self.spend.cost_by_client_hour(), now, self.verdict.alerted)
            if send:
                for alert in verdict.due:
                    self.alerter.send(alert.kind, alert.message, **alert.details())
            self.verdict = verdict
            blocked: dict[str, Block] = {}
            for client, block in verdict.blocked.items():
                old = self.budget_blocked.get(client)
                # the same window's block stays as it was pushed (its Retry-After counted from then)
                blocked[client] = old if old is not None and old[:2] == block[:2] else block
                self.last_code[client] = BUDGET_EXHAUSTED
                if old is None or old[:2] != block[:2]:
                    log.info("client %s: %s", client, block[1])
            for client in self.budget_blocked.keys() - blocked.keys():
                log.info("client %s: budget block lifted (a new window, or a raised limit)", client)
            self.budget_blocked = blocked
        self._publish()

    def _sync(self, config: Config) -> None:
        """A new config: limits as configured now; a token block whose limit went away or was raised past
        this minute's count is lifted (at the next publish)."""
        self._config = config
        self._active = bool(config.clients)
        self._limits = {name: c.limits.tokens_per_minute for name, c in config.clients.items()
                        if c.limits.tokens_per_minute is not None}
        self.tokens_blocked = {c: b for c, b in self.tokens_blocked.items()
                               if c in self._limits and self.used.get(c, 0) >= self._limits[c]}

    def _publish(self) -> None:
        blocked = merge_blocks(self.budget_blocked, self.tokens_blocked)
        if blocked != dict(self.reconciler.state.blocked):
            self.reconciler.propose(blocked=blocked)

    # -- what the reports read -------------------------------------------------------------------------

    def counters(self) -> Mapping[str, ClientCounts]:
        return self.counts

    def blocks(self) -> tuple[Mapping[str, Block], Mapping[str, Block]]:
        """(budget blocks, token blocks) in force; Envoy is sent merge_blocks() of the two."""
        return self.budget_blocked, self.tokens_blocked

    def tokens_this_minute(self) -> Mapping[str, int]:
        return self.used

    def budgets(self) -> ClientBudgetVerdict:
        return self.verdict
