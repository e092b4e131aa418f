"""What operators ask about (status, cost), built from the read-only views, never a secret."""

from __future__ import annotations

import time
from typing import Any

from .controllers.clients import NO_CLIENT, REASONS, ClientCounts
from .scoring.budget import merge_blocks, period_start
from .scoring.ledger import Spend
from .telemetry.envoy_hosts import HEALTHY, UNKNOWN
from .views import Views
from .xds import typeurls


def status(views: Views) -> dict[str, Any]:
    cfg, state, snapshot, envoy = views.config, views.state(), views.snapshot(), views.envoy()
    config = state.config
    weights = views.pushed_weights()
    return {
        "config": {
            "path": str(cfg.path),
            "version": cfg.digest,
            "loaded_at": cfg.loaded_at,
            "reloads": cfg.reloads,
            "last_edit": "rejected" if cfg.errors else "applied",
            "errors": cfg.errors,
            # edits that take effect only at the next start (Envoy flags, bootstrap, listen ports)
            "restart_pending": list(cfg.restart_pending),
        },
        "snapshot": {typeurls.SHORT[t]: snapshot.version(t) for t in typeurls.PUSH_ORDER} if snapshot else {},
        "envoy": {
            "managed": envoy is not None,
            "pid": envoy.pid if envoy else None,
            "restarts": envoy.restarts if envoy else 0,
            "listener": str(config.envoy.listener),
            "admin": str(config.envoy.admin),
        },
        "nodes": views.xds.node_status(),
        "in_sync": views.xds.in_sync(),
        "api": {"token_required": config.controlplane.api.token is not None},
        "alerts": views.alerts.active(),
        "alert_counts": views.alerts.counters(),
        "envoy_view": {"read_at": views.envoy_hosts.read_at, "error": views.envoy_hosts.error},
        "grpc_auth": {"mtls": config.controlplane.xds.tls is not None,
                      "unauthenticated_refused": dict(views.xds.stats.unauthenticated)},
        "pools": {
            name: {
                "strategy": pool.strategy,
                "prefix": pool.match.prefix,
                "backends": {
                    bname: {
                        "url": b.url,
                        "address": state.addresses.get(b.host),
                        "weight": weights.get(name, {}).get(bname),
                        "priority": b.priority,
                        "draining": (name, bname) in state.drained,
                        "api_key": "set" if b.api_key is not None else None,
                    }
                    for bname, b in pool.backends.items()
                },
            }
            for name, pool in config.pools.items()
        },
        "clients": clients_status(views),
        "rollouts": views.rollouts.status() if views.rollouts is not None else {},
    }


def clients_status(views: Views, now: float | None = None) -> dict[str, Any]:
    """Per configured client (and `(none)`: requests without a valid key): requests and rejections by
    reason since the start, tokens (all time) and spend this hour and day, its block, its limits. Never
    its key. Empty when no clients are configured."""
    config = views.state().config
    if not config.clients or views.clients is None:
        return {}
    now = views.now() if now is None else now
    hour, day = views.spend.by_client(period_start(now, "hour")), views.spend.by_client(period_start(now, "day"))
    total = views.spend.by_client()
    counters, used = views.clients.counters(), views.clients.tokens_this_minute()
    blocked = merge_blocks(*views.clients.blocks())
    out: dict[str, Any] = {}
    for name, client in sorted(config.clients.items()):
        t = total.get(name, Spend())
        budget = client.budget
        out[name] = {
            **_counts(counters.get(name)),
            "tokens": {"prompt": t.prompt_tokens, "completion": t.completion_tokens},
            "tokens_this_minute": used.get(name, 0),
            "spend": {"hour": round(hour.get(name, Spend()).cost, 6), "day": round(day.get(name, Spend()).cost, 6),
                      "total": round(t.cost, 6)},
            "blocked": blocked[name][0] if name in blocked else None,
            "limits": {"requests_per_minute": client.limits.requests_per_minute,
                       "tokens_per_minute": client.limits.tokens_per_minute,
                       "budget": None if budget is None else {"hourly": budget.hourly, "daily": budget.daily}},
        }
    out[NO_CLIENT] = _counts(counters.get(NO_CLIENT))
    return out


def _counts(counts: ClientCounts | None) -> dict[str, Any]:
    return {"requests": counts.requests if counts else 0,
            "rejected": {r: counts.rejected[r] if counts else 0 for r in REASONS}}


NO_MODEL = "(none)"  # the models key for spend whose request and backend named no model


def cost_report(views: Views, now: float | None = None) -> dict[str, Any]:
    """Spend per pool, per backend and per model for this hour and day, against each budget (from memory,
    not the ledger); and how much of it was recovered from the spool."""
    now = views.now() if now is None else now
    hour_start, day_start = period_start(now, "hour"), period_start(now, "day")
    hour = views.spend.since(hour_start)
    day = views.spend.since(day_start)
    total = views.spend.total()
    # per pool, per model label: (hour, day, total); "" and a model the client called "(none)" share one label
    models: dict[str, dict[str, list[Spend]]] = {}
    for at, spent in enumerate((views.spend.by_model(hour_start), views.spend.by_model(day_start),
                                views.spend.by_model())):
        for (pname, model), s in spent.items():
            sums = models.setdefault(pname, {}).setdefault(model or NO_MODEL, [Spend(), Spend(), Spend()])
            sums[at] += s
    verdict = views.budgets()
    pools: dict[str, Any] = {}
    for pname, pool in views.state().config.pools.items():
        backends = {}
        for bname in pool.backends:
            key = (pname, bname)
            backends[bname] = _spend_entry(hour.get(key, Spend()), day.get(key, Spend()), total.get(key, Spend()))
        pools[pname] = {
            "hour": round(sum(b["hour"] for b in backends.values()), 6),
            "day": round(sum(b["day"] for b in backends.values()), 6),
            "budget": [w.as_dict() for w in verdict.windows.get(pname, ())],
            "action": verdict.action(pname),
            "backends": backends,
            "models": {label: _spend_entry(*sums) for label, sums in sorted(models.get(pname, {}).items())},
        }
    recovered = views.spend.recovered
    return {
        "currency_note": "prices as configured per 1k tokens",
        # all time, included in the figures above: spend the ledger lacked after a crash or an Envoy
        # restart, charged from the managed Envoy's spool file (telemetry/spool.py)
        "recovered_requests": recovered.requests,
        "recovered_cost": round(recovered.cost, 6),
        "pools": pools,
        "clients": _clients_cost(views, now),
    }


def _clients_cost(views: Views, now: float) -> dict[str, Any]:
    """Per client: spend this hour, today and all time, its requests and tokens (all time, the requests a
    backend answered), and its budget windows. Clients no longer configured are listed while they have
    spend on record (`configured: false`). Empty when no clients are configured and none ever spent."""
    config = views.state().config
    total = views.spend.by_client()
    if not config.clients and not total:
        return {}
    hour, day = views.spend.by_client(period_start(now, "hour")), views.spend.by_client(period_start(now, "day"))
    verdict = views.clients.budgets() if views.clients is not None else None
    blocked = merge_blocks(*views.clients.blocks()) if views.clients is not None else {}
    out: dict[str, Any] = {}
    for name in sorted(set(config.clients) | set(total)):
        out[name] = {
            **_spend_entry(hour.get(name, Spend()), day.get(name, Spend()), total.get(name, Spend())),
            "configured": name in config.clients,
            "budget": [w.as_dict() for w in verdict.windows.get(name, ())] if verdict is not None else [],
            "blocked": blocked[name][0] if name in blocked else None,
        }
    return out


def _spend_entry(hour: Spend, day: Spend, total: Spend) -> dict[str, Any]:
    return {
        "hour": round(hour.cost, 6),
        "day": round(day.cost, 6),
        "total": round(total.cost, 6),
        "requests": total.requests, "prompt_tokens": total.prompt_tokens, "completion_tokens": total.completion_tokens,
    }


WINDOW_SECONDS = 60.0  # "lately", for traffic share, p95 and error rate on the page and in the table


def pools(views: Views, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    return {"pools": {name: pool(views, name, now) for name in views.state().config.pools}}


def pool(views: Views, name: str, now: float | None = None) -> dict[str, Any]:
    """One pool as operators look at it: per backend Envoy's view, our weights and why, what it did lately
    and what it cost. Raises KeyError for a pool the live config does not have."""
    now = time.time() if now is None else now
    state = views.state()
    cfg = state.config.pools[name]
    weights = views.pushed_weights().get(name, {})
    out = state.out_of_rotation()
    in_rotation = {b: w for b, w in weights.items() if (name, b) not in out}
    total_weight = sum(in_rotation.values())
    try:
        explained = views.explain(name, None)["backends"]
    except KeyError:  # a pool the scores do not know yet (a reload in progress)
        explained = {}
    recent = views.recent
    shares = recent.shares(name, cfg.backends, WINDOW_SECONDS, now)
    hour, day = views.spend.since(period_start(now, "hour")), views.spend.since(period_start(now, "day"))
    total = views.spend.total()
    hosts = views.envoy_hosts
    backends: dict[str, Any] = {}
    for bname, backend in cfg.backends.items():
        stats = views.backends.get((name, bname))
        window = recent.window(name, bname, WINDOW_SECONDS, now)
        key = (name, bname)
        backends[bname] = {
            "url": backend.url,
            "priority": backend.priority,
            "weight": weights.get(bname),
            "weight_share": round(in_rotation.get(bname, 0) / total_weight, 4) if total_weight else 0.0,
            "traffic_share": round(shares.get(bname, 0.0), 4),
            "draining": key in state.drained,
            "envoy_state": hosts.get(name, bname),
            "health": ({"score": stats.health, "status": stats.health_status, "detail": stats.health_detail}
                       if stats else None),
            "quality": round(stats.quality, 4) if stats else None,
            "latency_p95_seconds": window.p95_seconds,
            "latency_ewma_seconds": (round(stats.latency_ewma_ms / 1000, 4)
                                     if stats and stats.latency_ewma_ms is not None else None),
            "error_rate": None if window.error_rate is None else round(window.error_rate, 4),
            "requests": window.requests,
            "requests_by_class": recent.classes(name, bname),
            "spend": {"hour": round(hour.get(key, Spend()).cost, 6), "day": round(day.get(key, Spend()).cost, 6),
                      "total": round(total.get(key, Spend()).cost, 6)},
            "reason": explained.get(bname, {}).get("reason", ""),
            "quota": explained.get(bname, {}).get("quota"),  # a provider quota capping its share
            "cooling": explained.get(bname, {}).get("cooling"),  # out of rotation after a 429 with Retry-After
        }
    known = [b["envoy_state"] for b in backends.values() if b["envoy_state"] != UNKNOWN]
    verdict = views.budgets()
    return {
        "name": name,
        "strategy": cfg.strategy,
        "prefix": cfg.match.prefix,
        "models": cfg.match.models,
        # the share of backends Envoy may send to; None when its view is not known (no admin to read)
        "available": round(sum(s == HEALTHY for s in known) / len(known), 4) if known else None,
        "budget": [w.as_dict() for w in verdict.windows.get(name, ())],
        "budget_action": verdict.action(name),
        "spend": {"hour": round(sum(b["spend"]["hour"] for b in backends.values()), 6),
                  "day": round(sum(b["spend"]["day"] for b in backends.values()), 6)},
        "changes": views.history.recent(name),
        "backends": backends,
    }
