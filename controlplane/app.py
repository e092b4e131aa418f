"""Wires the loop together: config file -> scores -> weights -> resources -> snapshot -> ADS -> Envoy,
with Envoy's access log and the health probes flowing back into the scores.

This is the only module with timers: the config watcher, the DNS refresher,
the scoring loop and the health prober.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import resolver, statefile
from .alerts import Alerter
from .bootstrap import bootstrap, write_bootstrap
from .config import Config, ConfigError, load_config
from .envoyproc import EnvoyProcess
from .scoring import ledger as ledgers
from .scoring.budget import AlertBook, WindowState, windows
from .scoring.engine import Engine, Weights
from .telemetry import accesslog
from .telemetry.health import Verdict
from .telemetry.prober import Prober
from .telemetry.requests import RequestIndex
from .xds import resources, typeurls
from .xds.server import AdsServer, SnapshotCache, start_server
from .xds.snapshot import Snapshot

log = logging.getLogger("controlplane")


@dataclass
class ConfigState:
    """The live (last good) config and what became of the latest edit."""

    path: Path
    config: Config
    digest: str
    loaded_at: float = field(default_factory=time.time)
    reloads: int = 0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)
    rejected_digest: str = ""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class App:
    def __init__(
        self,
        config_path: Path,
        config: Config,
        *,
        state_dir: Path,
        run_envoy: bool = True,
        node_id: str = "llm-lb-local",
        watch_interval: float = 0.5,
    ) -> None:
        self.state = ConfigState(
            path=config_path, config=config, digest=_digest(config_path.read_bytes())
        )
        self.state_dir = state_dir
        self.node_id = node_id
        self.watch_interval = watch_interval
        self.cache = SnapshotCache()
        self.ads = AdsServer(self.cache)
        self.addresses: dict[str, str] = {}
        self.weights: Weights = {}
        self.state_path = state_dir / "state.json"
        self.persisted = statefile.load(self.state_path)
        self.engine = Engine()
        self.engine.sync(config)
        self.ledger: ledgers.Ledger = ledgers.SqliteLedger(state_dir / "ledger.sqlite3")
        self.requests = RequestIndex()
        self.access_log = accesslog.AccessLogService(self.observe)
        self.alerter = Alerter()
        self.alerter.configure(config.controlplane.alerts.webhook, config.controlplane.alerts.timeout.total_seconds())
        self.alert_book = AlertBook()
        self.budgets: dict[str, list[WindowState]] = {}
        self.rejected: dict[str, str] = {}  # pool -> why Envoy answers 429 for it
        self.shifted: frozenset[str] = frozenset()
        self.envoy: EnvoyProcess | None = None
        self._run_envoy = run_envoy
        self._grpc: Any = None
        self._api: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self.stopped = asyncio.Event()

    @property
    def config(self) -> Config:
        return self.state.config

    async def start(self) -> None:
        from .api import start_api  # aiohttp only where the API is served

        cfg = self.config
        self.addresses = await resolver.resolve(self._hosts(cfg))
        # Thresholds crossed before a restart were alerted then: note them, do not send them again.
        self.check_budgets(alert=False)
        self.engine.recompute(self.shifted)
        self.publish()
        self._grpc = await start_server(
            self.ads, cfg.controlplane.xds.address, cfg.controlplane.xds.port,
            extra=lambda server: accesslog.add_to_server(self.access_log, server),
        )
        log.info("xDS (ADS) listening on %s", cfg.controlplane.xds)
        self._api = await start_api(self, cfg.controlplane.api.address, cfg.controlplane.api.port)
        log.info("API listening on http://%s (/healthz /metrics /v1/status)", cfg.controlplane.api)
        if self._run_envoy:
            path = write_bootstrap(self.state_dir / "envoy-bootstrap.json", bootstrap(cfg, self.node_id))
            self.envoy = EnvoyProcess(
                path, self.state_dir / "envoy.log", log_level=cfg.envoy.log_level, concurrency=cfg.envoy.concurrency
            )
            await self.envoy.start()
        self._tasks = [
            asyncio.create_task(self._watch_config(), name="config-watcher"),
            asyncio.create_task(self._refresh_dns(), name="dns-refresher"),
            asyncio.create_task(self._score(), name="scoring"),
            asyncio.create_task(Prober(lambda: self.config, self.observe_health).run(), name="health-prober"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.envoy is not None:
            await self.envoy.stop()
        if self._api is not None:
            await self._api.cleanup()
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        await self.alerter.drain()
        self.ledger.close()
        self.stopped.set()

    @staticmethod
    def _hosts(config: Config) -> set[str]:
        return {b.host for pool in config.pools.values() for b in pool.backends.values()}

    def publish(self, config: Config | None = None) -> Snapshot:
        """Build and serve a snapshot; unchanged types keep their version.

        Raises before anything is served if the snapshot cannot be built, so
        the caller can keep the last good config.
        """
        config = config or self.config
        weights = self.engine.weights()
        snapshot = Snapshot.of(
            resources.build(config, weights, self.addresses, frozenset(self.persisted.drained), self.rejected)
        )
        problems = snapshot.problems()
        if problems:  # a bug in the builders, never an operator error
            raise RuntimeError("inconsistent snapshot: " + "; ".join(problems))
        self.weights = weights
        previous = self.cache.snapshot
        changed = [
            typeurls.SHORT[t] for t in typeurls.PUSH_ORDER if previous is None or previous.version(t) != snapshot.version(t)
        ]
        if changed:
            self.cache.set(snapshot)
            log.info("snapshot: %s changed (%s)", ", ".join(changed), _versions(snapshot))
        return self.cache.snapshot or snapshot

    async def reload(self) -> bool:
        """Load the file if it changed; on any error keep the last good config live.

        Returns True only when a new config was applied.
        """
        state = self.state
        try:
            data = state.path.read_bytes()
        except OSError as exc:
            self._reject(f"{state.path}: cannot read: {exc.strerror or exc}", "")
            return False
        digest = _digest(data)
        if digest in (state.digest, state.rejected_digest):
            return False
        try:
            new = load_config(state.path)
        except ConfigError as exc:
            self._reject(str(exc), digest)
            return False
        fixed = self._restart_only(new)
        if fixed:
            log.warning("%s: these changes need a restart and are not applied: %s", state.path, "; ".join(fixed))
        if self._hosts(new) - set(self.addresses):
            self.addresses = await resolver.resolve(self._hosts(new), self.addresses)
        saved = copy.deepcopy(self.engine)  # sync() forgets removed backends: keep them until it works
        try:
            self.engine.sync(new)
            self.engine.recompute(self.shifted)
            self.publish(new)
        except Exception as exc:  # noqa: BLE001 - never let a bug take the live config down
            log.exception("cannot build Envoy resources for the edited config")
            self.engine = saved
            self._reject(f"{state.path}: cannot build Envoy resources: {exc}", digest)
            return False
        self.alerter.configure(new.controlplane.alerts.webhook, new.controlplane.alerts.timeout.total_seconds())
        state.config, state.digest = new, digest
        state.loaded_at, state.errors, state.rejected_digest = time.time(), [], ""
        state.reloads += 1
        log.info("%s: reloaded (%d pools)", state.path, len(new.pools))
        return True

    def set_draining(self, pool: str, backend: str, draining: bool, force: bool = False) -> None:
        """Mark a backend draining (no new requests) or back in rotation, and remember it."""
        if pool not in self.config.pools:
            raise LookupError(f"no pool {pool!r}")
        backends = self.config.pools[pool].backends
        if backend not in backends:
            raise LookupError(f"pool {pool!r} has no backend {backend!r}")
        key = (pool, backend)
        if draining and not force:
            active = [b for b in backends if (pool, b) not in self.persisted.drained and b != backend]
            if not active:
                raise ValueError(
                    f"{backend!r} is the last backend of pool {pool!r} in rotation; draining it fails "
                    "every request to the pool (use force to do it anyway)"
                )
        changed = (key in self.persisted.drained) != draining
        if not changed:
            return
        if draining:
            self.persisted.drained.add(key)
        else:
            self.persisted.drained.discard(key)
        statefile.save(self.state_path, self.persisted)
        log.info("%s %s/%s", "draining" if draining else "undrained", pool, backend)
        self.publish()

    # -- telemetry in -----------------------------------------------------------

    def observe(self, obs: accesslog.Observation) -> None:
        """One request from Envoy's access log: stats, spend, and any feedback waiting for it."""
        if not obs.backend or obs.pool not in self.config.pools:
            return  # answered by Envoy itself (overflow, budget, no host): no backend to score
        cost = self.engine.observe_request(
            obs.pool, obs.backend, obs.ok, obs.latency_ms, obs.prompt_tokens, obs.completion_tokens
        )
        if obs.ok:
            self.ledger.record(time.time(), obs.pool, obs.backend, obs.prompt_tokens, obs.completion_tokens, cost)
        if obs.quality_header is not None:
            self.engine.observe_feedback(obs.pool, obs.backend, obs.quality_header)
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

    def check_budgets(self, now: float | None = None, alert: bool = True) -> None:
        """Spend against each pool's budget: alerts at thresholds, the pool's action when exhausted."""
        if all(pool.budget is None for pool in self.config.pools.values()):
            self.budgets, self.shifted, self.rejected = {}, frozenset(), {}
            return
        now = time.time() if now is None else now
        hour, day = ledgers.period_start(now, "hour"), ledgers.period_start(now, "day")
        spent_hour, spent_day = self.ledger.spend(hour), self.ledger.spend(day)
        rejected, shifted, budgets = {}, set(), {}
        for pname, pool in self.config.pools.items():
            if pool.budget is None:
                continue
            states = windows(
                pool.budget,
                sum(s.cost for (p, _), s in spent_hour.items() if p == pname),
                sum(s.cost for (p, _), s in spent_day.items() if p == pname),
                hour, day,
            )
            budgets[pname] = states
            for state in states:
                for threshold in self.alert_book.due(pname, pool.budget, state):
                    if not alert:
                        continue
                    exhausted = threshold >= 1.0
                    self.alerter.send(
                        "budget_exhausted" if exhausted else "budget_threshold",
                        f"pool {pname!r} has spent {state.spent:.4f} of its {state.window}ly budget "
                        f"{state.limit:g} ({state.fraction:.0%})"
                        + (f"; action: {pool.budget.on_exhausted}" if exhausted else ""),
                        pool=pname, window=state.window, threshold=threshold, spent=state.spent,
                        limit=state.limit, action=pool.budget.on_exhausted if exhausted else None,
                    )
            exhausted = [s for s in states if s.exhausted]
            if exhausted:
                if pool.budget.on_exhausted == "reject":
                    w = exhausted[0]
                    rejected[pname] = (f"the {w.window}ly budget of pool {pname!r} ({w.limit:g}) is exhausted "
                                       f"(spent {w.spent:.4f}); try again in the next {w.window}")
                else:
                    shifted.add(pname)
        self.budgets, self.shifted, self.rejected = budgets, frozenset(shifted), rejected

    def cost_report(self, now: float | None = None) -> dict[str, Any]:
        """Spend per pool and backend for this hour and day, against each budget."""
        now = time.time() if now is None else now
        hour = self.ledger.spend(ledgers.period_start(now, "hour"))
        day = self.ledger.spend(ledgers.period_start(now, "day"))
        total = self.ledger.spend(0)
        pools: dict[str, Any] = {}
        for pname, pool in self.config.pools.items():
            backends = {}
            for bname in pool.backends:
                key = (pname, bname)
                t = total.get(key, ledgers.Spend())
                backends[bname] = {
                    "hour": round(hour.get(key, ledgers.Spend()).cost, 6),
                    "day": round(day.get(key, ledgers.Spend()).cost, 6),
                    "total": round(t.cost, 6),
                    "requests": t.requests, "prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
                }
            pools[pname] = {
                "hour": round(sum(b["hour"] for b in backends.values()), 6),
                "day": round(sum(b["day"] for b in backends.values()), 6),
                "budget": [w.as_dict() for w in self.budgets.get(pname, [])],
                "action": ("rejecting" if pname in self.rejected else
                           "shifted_to_cheapest" if pname in self.shifted else None),
                "backends": backends,
            }
        return {"currency_note": "prices as configured per 1k tokens", "pools": pools}

    async def _score(self, tick: float = 0.1) -> None:
        """Each pool is rescored on its own `scoring.interval`."""
        due: dict[str, float] = {}
        while True:
            await asyncio.sleep(tick)
            try:
                now = time.monotonic()
                pools = frozenset(
                    name for name, pool in self.config.pools.items()
                    if now >= due.setdefault(name, now + pool.scoring.interval.total_seconds())
                )
                if not pools:
                    continue
                for name in pools:
                    due[name] = now + self.config.pools[name].scoring.interval.total_seconds()
                before = dict(self.rejected)
                self.check_budgets()
                self.requests.expire()
                if self.engine.recompute(self.shifted, pools) or before != self.rejected:
                    self.publish()
            except Exception:
                log.exception("scoring failed; weights unchanged")

    def _reject(self, errors: str, digest: str) -> None:
        state = self.state
        if state.errors == errors.splitlines() and state.rejected_digest == digest:
            return  # the same problem as last poll: said once is enough
        state.errors = errors.splitlines()
        state.rejected_digest = digest
        state.rejected += 1
        log.error("config edit REJECTED; the last good config stays live:\n  %s", "\n  ".join(state.errors))

    def _restart_only(self, new: Config) -> list[str]:
        old = self.config
        out = []
        for label, addr in new.listen_addresses().items():
            if label != "envoy.listener" and addr != old.listen_addresses()[label]:
                out.append(f"{label} {old.listen_addresses()[label]} -> {addr}")
        if new.envoy.listener.max_connections != old.envoy.listener.max_connections:
            out.append("envoy.listener.max_connections (in Envoy's bootstrap)")
        return out

    async def _watch_config(self) -> None:
        while True:
            await asyncio.sleep(self.watch_interval)
            try:
                await self.reload()
            except Exception:  # keep watching whatever one bad edit does
                log.exception("config reload failed")

    async def _refresh_dns(self) -> None:
        while True:
            await asyncio.sleep(self.config.controlplane.resolve_interval.total_seconds())
            try:
                resolved = await resolver.resolve(self._hosts(self.config), self.addresses)
                # Merged, not replaced: a reload may have resolved new hosts while this one awaited.
                self.addresses = {**self.addresses, **resolved}
                self.publish()
            except Exception:
                log.exception("DNS refresh failed")

    def status(self) -> dict[str, Any]:
        """Everything an operator asks about, without a single secret."""
        state, snapshot = self.state, self.cache.snapshot
        return {
            "config": {
                "path": str(state.path),
                "version": state.digest,
                "loaded_at": state.loaded_at,
                "reloads": state.reloads,
                "last_edit": "rejected" if state.errors else "applied",
                "errors": state.errors,
            },
            "snapshot": {typeurls.SHORT[t]: snapshot.version(t) for t in typeurls.PUSH_ORDER} if snapshot else {},
            "envoy": {
                "managed": self.envoy is not None,
                "pid": self.envoy.pid if self.envoy else None,
                "restarts": self.envoy.restarts if self.envoy else 0,
                "listener": str(self.config.envoy.listener),
                "admin": str(self.config.envoy.admin),
            },
            "nodes": [node.as_dict() for node in self.ads.nodes.values()],
            "in_sync": self.ads.in_sync(),
            "pools": {
                name: {
                    "strategy": pool.strategy,
                    "prefix": pool.match.prefix,
                    "backends": {
                        bname: {
                            "url": b.url,
                            "address": self.addresses.get(b.host),
                            "weight": self.weights.get(name, {}).get(bname),
                            "priority": b.priority,
                            "draining": (name, bname) in self.persisted.drained,
                            "api_key": "set" if b.api_key is not None else None,
                        }
                        for bname, b in pool.backends.items()
                    },
                }
                for name, pool in self.config.pools.items()
            },
        }


def _versions(snapshot: Snapshot) -> str:
    return " ".join(f"{typeurls.SHORT[t]}={snapshot.version(t)}" for t in typeurls.PUSH_ORDER)
