"""Wires the loop together and owns the timers; no rules of its own live here.

    config file --reload--> DesiredState <--weights-- scoring loop <-- telemetry (access log, probes)
    drains, DNS, budgets --------^    |
                                 reconciler --> snapshot --> ADS --> Envoy --> access log
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc
from aiohttp import web

from . import resolver, statefile
from .alerts import Alerter
from .api import start_api
from .bootstrap import bootstrap, write_bootstrap
from .config import Config
from .controllers.alerting import AlertLoop
from .controllers.budgets import BudgetController
from .controllers.clients import ClientController, Clock
from .controllers.dns import refresh_dns
from .controllers.drains import Drains
from .controllers.quotas import Cooling
from .controllers.reload import ConfigReloader
from .controllers.scoring import ScoringLoop
from .controllers.spend import SpendFlusher
from .envoyproc import EnvoyProcess
from .reconciler import Reconciler
from .rollouts.controller import Rollouts
from .scoring.engine import Engine
from .scoring.ledger import SpendBook, SqliteLedger
from .state import DesiredState
from .telemetry import accesslog
from .telemetry.accesslog import Observation, Stream
from .telemetry.envoy_hosts import EnvoyHosts
from .telemetry.ingest import Telemetry
from .telemetry.prober import Prober
from .telemetry.requests import RequestIndex
from .telemetry.spool import ENVOY_FLAGS, SPOOL_NAME, Spool
from .views import Actions, Views
from .xds import auth
from .xds.server import AdsServer, SnapshotCache, start_server

log = logging.getLogger("controlplane")


class App:
    def __init__(self, config_path: Path, config: Config, *, state_dir: Path, run_envoy: bool = True,
                 node_id: str = "llm-lb-local", watch_interval: float = 0.1,
                 clock_offset_file: Path | None = None) -> None:
        self.state_dir, self.node_id, self._run_envoy = state_dir, node_id, run_envoy
        self.clock = Clock(clock_offset_file)  # budgets' and spend windows' clock (shifted only by tests)
        self.clock.refresh()
        self.cache = SnapshotCache()
        self.ads = AdsServer(self.cache)
        drained = frozenset(statefile.load(state_dir / "state.json").drained)
        secret = config.controlplane.xds.token
        self.xds_token = auth.resolve_token(secret.get_secret_value() if secret else None, state_dir, fresh=run_envoy)
        self.auth = auth.TokenAuth(self.xds_token, self.ads.stats.unauthenticated)
        spool_path = state_dir.resolve() / SPOOL_NAME if run_envoy else None  # only our own Envoy keeps one
        self.reconciler = Reconciler(self.cache, DesiredState(config=config, drained=drained,
                                                              xds_token=self.xds_token,
                                                              spool_path=str(spool_path) if spool_path else None))
        self.engine = Engine()
        self.engine.sync(config)
        self.ledger = SqliteLedger(state_dir / "ledger.sqlite3")
        self.spend = SpendBook.load(self.ledger, time.time())
        self.spend.recovered = self.ledger.spool_state().recovered  # all time, also shown without a spool
        self.flusher = SpendFlusher(self.spend, self.ledger,
                                    lambda: self.config().controlplane.spend_flush_interval.total_seconds())
        self.requests = RequestIndex()
        self.telemetry = Telemetry(self.engine, self.spend, self.requests, self.config, clock=self.clock)
        # Request entries (spend, spool, scores' successes) and failed attempts (errors per backend, cooling).
        self.access_log = accesslog.AccessLogService(self._use_access_log, self.telemetry.observe_attempts)
        self.spool = None if spool_path is None else Spool(
            spool_path, node_id, self.spend, self.ledger, self.flusher, self.access_log, self.config,
            self._envoy_admin_url)
        # Client request limits are per Envoy process: divided by how many are connected (at least one).
        self.ads.on_streams = lambda count: self.reconciler.propose(envoys=max(1, count))
        self.envoy_hosts = EnvoyHosts(self._envoy_admin_source, lambda: self.reconciler.state)
        self.alerter = Alerter(lambda: self.config().controlplane.alerts)
        # Rollouts as persisted, following the config: their plans are in the very first snapshot.
        self.rollouts = Rollouts(state_dir, self.engine, self.alerter)
        self.reconciler.propose(rollouts=self.rollouts.sync(config))
        self.rollouts.reconciler = self.reconciler
        self.telemetry.rollouts = self.rollouts
        self.reconciler.history.reasons = lambda pool: {
            **{name: b["reason"] for name, b in self.engine.explain(pool)["backends"].items()},
            **self.rollouts.reasons(pool)}  # the candidate's weight is the rollout's, not the strategy's
        self.budgets = BudgetController(self.spend, self.alerter, self.reconciler, clock=self.clock)
        self.clients = ClientController(self.spend, self.alerter, self.reconciler, self.clock)
        self.telemetry.clients = self.clients.observe  # per client: counts, tokens per minute, rejections
        self.scoring = ScoringLoop(self.engine, self.budgets, self.requests, self.reconciler,
                                   envoy_states=lambda: self.envoy_hosts.states)  # never probe what Envoy ejected
        self.cooling = Cooling(self.reconciler)  # a backend's 429 with Retry-After: out of rotation that long
        self.telemetry.rate_limited = self.cooling.observe
        self.reloader = ConfigReloader(config_path, self.reconciler, self.engine, lambda: self.budgets.verdict.shifted,
                                       watch_interval)
        self.reloader.rollouts = self.rollouts
        self.drains = Drains(state_dir / "state.json", self.reconciler)
        self.alerting = AlertLoop(self.alerter, self.config, lambda: self.envoy_hosts.states, self.telemetry.recent,
                                  self.ads, lambda: self.reloader.status, lambda: self.budgets.verdict,
                                  lambda: (self.xds_token,))
        self.envoy: EnvoyProcess | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._grpc: grpc.aio.Server | None = None
        self._api: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.stopped = asyncio.Event()

    def config(self) -> Config:
        return self.reconciler.state.config

    def _use_access_log(self, batch: list[Observation], stream: Stream, received: int) -> int:
        """Entries of our own Envoy are counted against its spool in the same step as their spend is added.
        Request-log streams only: the attempts log's go to Telemetry.observe_attempts (and its spool has none)."""
        if self.spool is not None and stream.node == self.node_id and not self.spool.count(stream, received):
            return 0  # from an Envoy whose spool was already charged
        return self.telemetry.observe_batch(batch)

    def _envoy_admin_source(self) -> str | None:
        """Whose /clusters tells Envoy's view of the hosts: the configured admin, else our own Envoy's."""
        configured = self.config().controlplane.envoy_admin
        if configured is not None:
            return configured
        return self._envoy_admin_url() if self._run_envoy else None

    def _envoy_admin_url(self) -> str:
        admin = self.config().envoy.admin
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(admin.address, admin.address)
        return f"http://[{host}]:{admin.port}" if ":" in host else f"http://{host}:{admin.port}"

    def views(self) -> Views:
        return Views(
            config=self.reloader.status, state=lambda: self.reconciler.state,
            published=lambda: self.reconciler.published, build_failures=lambda: self.reconciler.failures,
            snapshot=lambda: self.cache.snapshot, xds=self.ads, backends=self.engine.stats,
            explain=self.engine.explain, spend=self.spend, ledger=self.flusher,
            budgets=lambda: self.budgets.verdict, access_log=self.access_log, envoy=lambda: self.envoy,
            recent=self.telemetry.recent, histograms=self.telemetry.histograms, envoy_hosts=self.envoy_hosts,
            history=self.reconciler.history, alerts=self.alerter, clients=self.clients, now=self.clock,
            rollouts=self.rollouts,
        )

    async def start(self) -> None:
        cfg = self.config()
        addresses = await resolver.resolve(resolver.backend_hosts(cfg))
        self.reconciler.propose(addresses=addresses)
        self.scoring.start()
        self.clients.check(send=False)  # blocks as the spend stands, before serving (no alert repeated)
        self.reconciler.apply(self.reconciler.state)  # raises if it cannot be built: then nothing starts
        self.reconciler.start()
        xds = cfg.controlplane.xds
        self._grpc = await start_server(
            self.ads, xds.address, xds.port,
            extra=lambda server: accesslog.add_to_server(self.access_log, server),
            interceptors=[self.auth],
            credentials=auth.server_credentials(xds.tls) if xds.tls else None,
        )
        log.info("xDS (ADS) listening on %s", cfg.controlplane.xds)
        actions = Actions(feedback=self.telemetry.feedback, set_draining=self.drains.set,
                          rollout=self.rollouts.command)
        self._api = await start_api(self.views(), actions, cfg.controlplane.api.address, cfg.controlplane.api.port)
        log.info("API listening on http://%s (/healthz /metrics /v1/status)", cfg.controlplane.api)
        if self._run_envoy:
            path = write_bootstrap(self.state_dir / "envoy-bootstrap.json",
                                   bootstrap(cfg, self.node_id, token=self.xds_token))
            self.envoy = EnvoyProcess(path, self.state_dir / "envoy.log", log_level=cfg.envoy.log_level,
                                      concurrency=cfg.envoy.concurrency, pid_file=self.state_dir / "envoy.pid",
                                      before_spawn=self.spool.before_spawn if self.spool else None,
                                      extra_args=ENVOY_FLAGS)  # the spool written at once (telemetry/spool.py)
            await self.envoy.start()
        self._flusher = asyncio.create_task(self.flusher.run(), name="spend-flusher")
        self._tasks = [
            asyncio.create_task(self.reloader.run(), name="config-watcher"),
            asyncio.create_task(refresh_dns(self.reconciler), name="dns-refresher"),
            asyncio.create_task(self.scoring.run(), name="scoring"),
            asyncio.create_task(Prober(self.config, self.telemetry.observe_health).run(), name="health-prober"),
            asyncio.create_task(self.envoy_hosts.run(), name="envoy-hosts"),
            asyncio.create_task(self.alerting.run(), name="alerts"),
            asyncio.create_task(self.clients.run(), name="client-limits"),
            asyncio.create_task(self.cooling.run(), name="cooling"),
            asyncio.create_task(self.rollouts.run(), name="rollouts"),
        ]
        if self.spool is not None:
            self._tasks.append(asyncio.create_task(self.spool.run(), name="spool-rotation"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.envoy is not None:
            await self.envoy.stop()  # its last access-log batches arrive while the servers still listen
            if self.spool is not None:  # what it wrote to its spool but did not send is charged now
                await self.spool.settle()
                self.spool.recover("after envoy stopped")
        if self._api is not None:
            await self._api.cleanup()
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        await self.reconciler.stop()
        self.rollouts.save()
        self.flusher.stop()
        if self._flusher is not None:
            await self._flusher  # finishes its write in flight, then flushes what came in since
        await self.alerter.drain()
        self.ledger.close()
        self.stopped.set()
