"""Wires the loop together: config file -> weights -> resources -> snapshot -> ADS -> Envoy.

This is the only module with timers: the config watcher and the DNS refresher.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import resolver, statefile
from .bootstrap import bootstrap, write_bootstrap
from .config import Config, ConfigError, load_config
from .envoyproc import EnvoyProcess
from .scoring.weights import Weights, config_weights
from .xds import resources, types
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
        self.publish()
        self._grpc = await start_server(self.ads, cfg.controlplane.xds.address, cfg.controlplane.xds.port)
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
        weights = config_weights(config)
        snapshot = Snapshot.of(resources.build(config, weights, self.addresses, frozenset(self.persisted.drained)))
        problems = snapshot.problems()
        if problems:  # a bug in the builders, never an operator error
            raise RuntimeError("inconsistent snapshot: " + "; ".join(problems))
        self.weights = weights
        previous = self.cache.snapshot
        changed = [
            types.SHORT[t] for t in types.PUSH_ORDER if previous is None or previous.version(t) != snapshot.version(t)
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
        try:
            self.publish(new)
        except Exception as exc:  # noqa: BLE001 - never let a bug take the live config down
            log.exception("cannot build Envoy resources for the edited config")
            self._reject(f"{state.path}: cannot build Envoy resources: {exc}", digest)
            return False
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
                self.addresses = await resolver.resolve(self._hosts(self.config), self.addresses)
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
            "snapshot": {types.SHORT[t]: snapshot.version(t) for t in types.PUSH_ORDER} if snapshot else {},
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
    return " ".join(f"{types.SHORT[t]}={snapshot.version(t)}" for t in types.PUSH_ORDER)
