"""What operators ask about (status, cost), built from the read-only views, never a secret."""

from __future__ import annotations

import time
from typing import Any

from .scoring.budget import period_start
from .scoring.ledger import Spend
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
    }


def cost_report(views: Views, now: float | None = None) -> dict[str, Any]:
    """Spend per pool and backend for this hour and day, against each budget (from memory, not the ledger)."""
    now = time.time() if now is None else now
    hour = views.spend.since(period_start(now, "hour"))
    day = views.spend.since(period_start(now, "day"))
    total = views.spend.total()
    verdict = views.budgets()
    pools: dict[str, Any] = {}
    for pname, pool in views.state().config.pools.items():
        backends = {}
        for bname in pool.backends:
            key = (pname, bname)
            t = total.get(key, Spend())
            backends[bname] = {
                "hour": round(hour.get(key, Spend()).cost, 6),
                "day": round(day.get(key, Spend()).cost, 6),
                "total": round(t.cost, 6),
                "requests": t.requests, "prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
            }
        pools[pname] = {
            "hour": round(sum(b["hour"] for b in backends.values()), 6),
            "day": round(sum(b["day"] for b in backends.values()), 6),
            "budget": [w.as_dict() for w in verdict.windows.get(pname, ())],
            "action": verdict.action(pname),
            "backends": backends,
        }
    return {"currency_note": "prices as configured per 1k tokens", "pools": pools}
