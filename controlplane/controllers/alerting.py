"""Which alert conditions hold: a pure function of what the control plane already knows, and the loop that
hands its answer to the Alerter (alerts.py: dedup, resolve, flap guard, rate limit) every
`controlplane.alerts.interval`, read live.

Conditions, each with a stable key (kind:pool[:backend], envoy_nack:node:type, config_rejected):

| kind | holds while | unknown (an active alert is kept as it is) |
|---|---|---|
| backend_unhealthy | Envoy marks the host failing its active health checks | Envoy's view unknown |
| backend_ejected | Envoy's outlier detection ejected the host (an ejected host whose checks then fail stays ejected until Envoy routes to it again) | Envoy's view unknown |
| pool_availability | of the pool's hosts Envoy lists (drained and absent ones left out), the share healthy is under `alerts.min_available` | Envoy's view unknown, a backend not yet read, or no host listed |
| error_rate | the backend's error rate over `alerts.window` is over `alerts.max_error_rate`, with at least `alerts.min_requests` | 1 .. min_requests-1 requests in the window (no requests at all: clear) |
| latency_p95 | its p95 latency over the window is over `alerts.max_p95_latency` | as error_rate |
| envoy_nack | a connected Envoy holds a NACK of that type | - |
| config_rejected | the latest edit of the config file was refused (until an edit applies or the file reverts) | - |

Budgets: the thresholds are one-shot events sent by the budget controller; this only keeps an active
`budget_exhausted` alive while its window is exhausted, so it resolves when the window rolls over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, SecretStr

from ..alerts import Alerter, Condition, condition_key
from ..config import Config, Pool
from ..scoring.budget import BudgetVerdict
from ..telemetry.envoy_hosts import DRAINING, EJECTED, FAILING, HEALTHY, UNKNOWN
from ..telemetry.recent import Recent, Window
from ..xds import typeurls
from ..xds.server import AdsServer
from .reload import ConfigStatus

log = logging.getLogger("controlplane.alerts")

MAX_TEXT = 1000  # characters of a text from elsewhere (Envoy's NACK message, a config error) in an event
MAX_ERRORS = 10  # config errors listed in an event


@dataclass(frozen=True)
class NackView:
    node: str
    type: str  # CDS, EDS, LDS, RDS
    version: str
    message: str


@dataclass(frozen=True)
class Inputs:
    config: Config
    hosts: Mapping[tuple[str, str], str]  # Envoy's view per (pool, backend); empty: unknown
    window: Callable[[str, str, float], Window]  # (pool, backend, seconds) -> what it did lately
    nacks: Sequence[NackView] = ()
    config_errors: Sequence[str] = ()  # of the latest edit, when it was refused
    config_path: str = ""
    rejected_edits: int = 0
    budgets: BudgetVerdict = field(default_factory=BudgetVerdict)
    active: Collection[str] = frozenset()  # keys firing now
    secrets: Collection[str] = ()  # values never to show (scrubbed from texts)


@dataclass(frozen=True)
class Evaluation:
    conditions: tuple[Condition, ...]
    hold: frozenset[str]  # keys whose truth is unknown now: an active alert keeps its state


def evaluate(inputs: Inputs) -> Evaluation:
    out: list[Condition] = []
    hold: set[str] = set()
    for pname, pool in inputs.config.pools.items():
        _backends(inputs, pname, pool, out, hold)
        _availability(inputs, pname, pool, out, hold)
        _traffic(inputs, pname, pool, out, hold)
    for nack in inputs.nacks:
        text = _clip(_scrub(nack.message, inputs.secrets))
        out.append(Condition(
            "envoy_nack", condition_key("envoy_nack", nack.node, nack.type),
            f"Envoy {nack.node!r} rejected {nack.type} version {nack.version} and keeps its previous one: {text}",
            details={"node": nack.node, "type": nack.type, "version": nack.version, "envoy_message": text},
            cleared=f"Envoy {nack.node!r} accepted {nack.type} again"))
    if inputs.config_errors:
        errors = [_clip(_scrub(e, inputs.secrets)) for e in inputs.config_errors]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        out.append(Condition(
            "config_rejected", condition_key("config_rejected"),
            f"config edit rejected; the last good config stays live: {errors[0]}{more}",
            details={"path": inputs.config_path, "errors": errors[:MAX_ERRORS], "error_count": len(errors),
                     "rejected_edits": inputs.rejected_edits},
            cleared=f"{inputs.config_path or 'the config'}: an edit applied or the file reverted; no rejected edit"))
    for pname, states in inputs.budgets.windows.items():
        for state in states:
            if state.exhausted:
                hold.add(condition_key("budget_exhausted", pname, state.window))
    return Evaluation(tuple(out), frozenset(hold))


def _who(pname: str, bname: str, pool: Pool) -> str:
    return f"backend {bname!r} of pool {pname!r} ({pool.backends[bname].url})"


def _backends(inputs: Inputs, pname: str, pool: Pool, out: list[Condition], hold: set[str]) -> None:
    for bname, backend in pool.backends.items():
        state = inputs.hosts.get((pname, bname), UNKNOWN)
        unhealthy = condition_key("backend_unhealthy", pname, bname)
        ejected = condition_key("backend_ejected", pname, bname)
        details = {"url": backend.url, "priority": backend.priority, "envoy_state": state}
        if state == UNKNOWN:
            hold.update((unhealthy, ejected))
            continue
        if state == FAILING:
            out.append(Condition("backend_unhealthy", unhealthy,
                                 f"{_who(pname, bname, pool)} fails Envoy's active health checks",
                                 pname, bname, details, f"{_who(pname, bname, pool)} passes Envoy's health checks"))
        if state == EJECTED or (state == FAILING and ejected in inputs.active):
            out.append(Condition("backend_ejected", ejected,
                                 f"{_who(pname, bname, pool)} is ejected by Envoy's outlier detection",
                                 pname, bname, details,
                                 f"{_who(pname, bname, pool)} is no longer ejected"))


def _availability(inputs: Inputs, pname: str, pool: Pool, out: list[Condition], hold: set[str]) -> None:
    key = condition_key("pool_availability", pname)
    states = {b: inputs.hosts.get((pname, b), UNKNOWN) for b in pool.backends}
    listed = {b: s for b, s in states.items() if s in (HEALTHY, EJECTED, FAILING)}
    if UNKNOWN in states.values() or not listed:
        hold.add(key)  # not read yet, or Envoy does not list the cluster (yet): no verdict
        return
    healthy = sum(1 for s in listed.values() if s == HEALTHY)
    share = healthy / len(listed)
    threshold = pool.alerts.min_available
    if share < threshold:
        out.append(Condition(
            "pool_availability", key,
            f"pool {pname!r}: Envoy can route to {healthy} of {len(listed)} backends ({share:.0%}), "
            f"under min_available {threshold:.0%}",
            pname, None,
            {"available": healthy, "listed": len(listed), "share": round(share, 4), "threshold": threshold,
             "states": dict(sorted(states.items())), "draining": sorted(b for b, s in states.items() if s == DRAINING)},
            f"pool {pname!r}: availability back at or above {threshold:.0%}"))


def _traffic(inputs: Inputs, pname: str, pool: Pool, out: list[Condition], hold: set[str]) -> None:
    rules = pool.alerts
    seconds = rules.window.total_seconds()
    if rules.max_error_rate is None and rules.max_p95_latency is None:
        return
    for bname in pool.backends:
        w = inputs.window(pname, bname, seconds)
        judged = w.requests >= rules.min_requests
        base = {"requests": w.requests, "errors": w.errors, "window_seconds": seconds,
                "min_requests": rules.min_requests}
        if rules.max_error_rate is not None:
            key = condition_key("error_rate", pname, bname)
            rate = w.error_rate
            if judged and rate is not None and rate > rules.max_error_rate:
                out.append(Condition(
                    "error_rate", key,
                    f"{_who(pname, bname, pool)}: {rate:.0%} of {w.requests} requests failed over the last "
                    f"{seconds:g}s, over max_error_rate {rules.max_error_rate:.0%}",
                    pname, bname, {**base, "error_rate": round(rate, 4), "threshold": rules.max_error_rate},
                    f"{_who(pname, bname, pool)}: error rate back under {rules.max_error_rate:.0%}"))
            elif not judged and w.requests:
                hold.add(key)
        if rules.max_p95_latency is not None:
            key = condition_key("latency_p95", pname, bname)
            limit = rules.max_p95_latency.total_seconds()
            p95 = w.p95_seconds
            if judged and p95 is not None and p95 > limit:
                out.append(Condition(
                    "latency_p95", key,
                    f"{_who(pname, bname, pool)}: p95 latency {p95:.3g}s over the last {seconds:g}s "
                    f"({w.requests} requests), over max_p95_latency {limit:g}s",
                    pname, bname, {**base, "p95_seconds": round(p95, 4), "threshold_seconds": limit},
                    f"{_who(pname, bname, pool)}: p95 latency back under {limit:g}s"))
            elif not judged and w.requests:
                hold.add(key)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "..."


def _scrub(text: str, secrets: Collection[str]) -> str:
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, "[redacted]")
    return text


def secret_values(value: Any) -> set[str]:
    """Every SecretStr's value in a config (backend keys, tokens): what no event may show."""
    out: set[str] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, SecretStr):
            if item.get_secret_value():
                out.add(item.get_secret_value())
        elif isinstance(item, BaseModel):
            stack.extend(getattr(item, name) for name in type(item).model_fields)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return out


def nacks_of(ads: AdsServer) -> list[NackView]:
    """The NACKs connected Envoys hold now (a node that left runs nothing of ours)."""
    return [NackView(node.id, typeurls.SHORT.get(t, t), nack.version, nack.message)
            for node in ads.nodes.values() if node.open_streams
            for t, nack in node.nacked.items()]


class AlertLoop:
    """Evaluates the conditions every `controlplane.alerts.interval` and hands them to the Alerter."""

    def __init__(self, alerter: Alerter, config: Callable[[], Config],
                 hosts: Callable[[], Mapping[tuple[str, str], str]], recent: Recent, ads: AdsServer,
                 config_status: Callable[[], ConfigStatus], budgets: Callable[[], BudgetVerdict],
                 extra_secrets: Callable[[], Iterable[str]] = lambda: (),
                 clock: Callable[[], float] = time.time) -> None:
        self.alerter = alerter
        self.config = config
        self.hosts = hosts
        self.recent = recent
        self.ads = ads
        self.config_status = config_status
        self.budgets = budgets
        self.extra_secrets = extra_secrets
        self.clock = clock
        self._secrets: tuple[Config | None, frozenset[str]] = (None, frozenset())

    def inputs(self, now: float) -> Inputs:
        config = self.config()
        if self._secrets[0] is not config:
            self._secrets = (config, frozenset(secret_values(config)))
        status = self.config_status()
        recent = self.recent
        return Inputs(
            config=config, hosts=self.hosts(),
            window=lambda pool, backend, seconds: recent.window(pool, backend, seconds, now),
            nacks=nacks_of(self.ads), config_errors=tuple(status.errors), config_path=str(status.path),
            rejected_edits=status.rejected, budgets=self.budgets(),
            active=self.alerter.active_keys(),
            secrets=self._secrets[1] | {s for s in self.extra_secrets() if s},
        )

    def check(self, now: float | None = None) -> Evaluation:
        now = self.clock() if now is None else now
        evaluation = evaluate(self.inputs(now))
        self.alerter.update(evaluation.conditions, evaluation.hold, now)
        return evaluation

    async def run(self) -> None:
        while True:
            try:
                self.check()
            except Exception:  # keep evaluating whatever one bad round does
                log.exception("alert evaluation failed")
            await asyncio.sleep(self.config().controlplane.alerts.interval.total_seconds())
