"""The config file: watched, validated, and proposed as the new config, or refused with every error."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import resolver
from ..config import Config, ConfigError, load_config
from ..reconciler import Reconciler, build
from ..scoring.engine import Engine

log = logging.getLogger("controlplane")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass
class ConfigStatus:
    """The live (last good) config's file and what became of the latest edit."""

    path: Path
    digest: str
    loaded_at: float = field(default_factory=time.time)
    reloads: int = 0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)
    rejected_digest: str = ""


class ConfigReloader:
    """Reads the file every 0.1 s and compares its hash: cheap for a config file, and it sees edits that keep
    the size and mtime, which a stat-based check would miss."""

    def __init__(self, path: Path, reconciler: Reconciler, engine: Engine, shifted: Callable[[], frozenset[str]],
                 interval: float = 0.1) -> None:
        self.status = ConfigStatus(path=path, digest=digest(path.read_bytes()))
        self.reconciler = reconciler
        self.engine = engine
        self.shifted = shifted  # pools whose budget shifts them to their cheapest backend
        self.interval = interval

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.reload()
            except Exception:  # keep watching whatever one bad edit does
                log.exception("config reload failed")

    async def reload(self) -> bool:
        """Load the file if it changed; on any error keep the last good config live.

        Returns True only when a new config was applied.
        """
        status = self.status
        try:
            data = status.path.read_bytes()
        except OSError as exc:
            self._reject(f"{status.path}: cannot read: {exc.strerror or exc}", "")
            return False
        new_digest = digest(data)
        if new_digest in (status.digest, status.rejected_digest):
            return False
        try:
            new = load_config(status.path)
        except ConfigError as exc:
            self._reject(str(exc), new_digest)
            return False
        old = self.reconciler.state.config
        fixed = restart_only(old, new)
        if fixed:
            log.warning("%s: these changes need a restart and are not applied: %s", status.path, "; ".join(fixed))
        addresses = self.reconciler.state.addresses
        if resolver.backend_hosts(new) - set(addresses):
            resolved = await resolver.resolve(resolver.backend_hosts(new), addresses)
            addresses = {**self.reconciler.state.addresses, **resolved}
        state = self.reconciler.state.replace(config=new, addresses=addresses)
        try:
            # Prove the edit builds before the engine follows it: a refused edit then changes nothing.
            build(state)
        except Exception as exc:  # noqa: BLE001 - never let a bug take the live config down
            log.exception("cannot build Envoy resources for the edited config")
            self._reject(f"{status.path}: cannot build Envoy resources: {exc}", new_digest)
            return False
        try:
            self.engine.sync(new)
            self.engine.recompute(self.shifted())
            self.reconciler.apply(state.replace(weights=self.engine.weights()))
        except Exception as exc:  # noqa: BLE001 - a bug past the check: follow the live config again
            log.exception("cannot apply the edited config")
            self.engine.sync(old)  # what the edit removed comes back with its stats
            self.engine.recompute(self.shifted())
            self._reject(f"{status.path}: cannot apply: {exc}", new_digest)
            return False
        status.digest, status.loaded_at, status.errors, status.rejected_digest = new_digest, time.time(), [], ""
        status.reloads += 1
        log.info("%s: reloaded (%d pools)", status.path, len(new.pools))
        return True

    def _reject(self, errors: str, rejected_digest: str) -> None:
        status = self.status
        if status.errors == errors.splitlines() and status.rejected_digest == rejected_digest:
            return  # the same problem as last poll: said once is enough
        status.errors = errors.splitlines()
        status.rejected_digest = rejected_digest
        status.rejected += 1
        log.error("config edit REJECTED; the last good config stays live:\n  %s", "\n  ".join(status.errors))


def restart_only(old: Config, new: Config) -> list[str]:
    """Changes a running process cannot apply (ports it listens on, Envoy's bootstrap)."""
    out = []
    for label, addr in new.listen_addresses().items():
        if label != "envoy.listener" and addr != old.listen_addresses()[label]:
            out.append(f"{label} {old.listen_addresses()[label]} -> {addr}")
    if new.envoy.listener.max_connections != old.envoy.listener.max_connections:
        out.append("envoy.listener.max_connections (in Envoy's bootstrap)")
    return out
