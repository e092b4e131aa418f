"""The config file: watched, validated, and proposed as the new config, or refused with every error."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .. import resolver
from ..config import Config, ConfigError
from ..config.loader import config_from_bytes, read_config_file
from ..reconciler import Reconciler, build
from ..rollouts.controller import Rollouts
from ..scoring.engine import Engine

log = logging.getLogger("controlplane")

PARSE_BUDGET = 5.0  # seconds a file may take to parse and validate (off the event loop) before it is refused


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
    # Applied edits that take effect only when the process restarts: the file differs from the running values.
    restart_pending: list[str] = field(default_factory=list)


class ConfigReloader:
    """Reads the file every 0.1 s and compares its hash: cheap for a config file, and it sees edits that keep
    the size and mtime, which a stat-based check would miss.

    A changed file is parsed only once two polls in a row saw the same size, mtime and hash, so a file
    caught mid-write is never applied; parsing runs in a thread, within PARSE_BUDGET."""

    def __init__(self, path: Path, reconciler: Reconciler, engine: Engine, shifted: Callable[[], frozenset[str]],
                 interval: float = 0.1) -> None:
        self.status = ConfigStatus(path=path, digest=digest(path.read_bytes()))
        self.reconciler = reconciler
        self.engine = engine
        self.shifted = shifted  # pools whose budget shifts them to their cheapest backend
        self.interval = interval
        self.running = reconciler.state.config  # what Envoy and the listeners were started with
        self._seen: tuple[int, int, str] | None = None  # (size, mtime, digest) of a changed file at the last poll
        self._parsing: asyncio.Future[Config] | None = None
        self.rollouts: Rollouts | None = None  # rollouts/controller.py: follows each applied config

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.reload()
            except Exception:  # keep watching whatever one bad edit does
                log.exception("config reload failed")

    async def reload(self) -> bool:
        """Load the file if it changed and is settled; on any error keep the last good config live.

        Returns True only when a new config was applied.
        """
        status = self.status
        try:
            info = os.stat(status.path)
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError([f"{status.path}: not a regular file"])
            data = read_config_file(status.path)
        except OSError as exc:
            self._seen = None
            self._reject(f"{status.path}: cannot read: {exc.strerror or exc}", "")
            return False
        except ConfigError as exc:
            self._seen = None
            self._reject(str(exc), "")
            return False
        new_digest = digest(data)
        if new_digest == status.digest:
            self._seen = None
            if status.errors or status.rejected_digest:  # reverted (or restored) to the live config
                status.errors, status.rejected_digest = [], ""
                log.info("%s: back to the live config; the rejected edit is gone", status.path)
            return False
        if new_digest == status.rejected_digest:
            self._seen = None
            return False
        seen = (info.st_size, info.st_mtime_ns, new_digest)
        if seen != self._seen:
            self._seen = seen  # changed since the last poll: maybe still being written; look again next poll
            return False
        self._seen = None
        if self._parsing is not None and not self._parsing.done():
            return False  # a parse that overran its budget still holds a thread: one at a time
        new = await self._parse(data, new_digest)
        if new is None:
            return False
        old = self.reconciler.state.config
        addresses = self.reconciler.state.addresses
        if resolver.backend_hosts(new) - set(addresses):
            resolved = await resolver.resolve(resolver.backend_hosts(new), addresses)
            addresses = {**self.reconciler.state.addresses, **resolved}
        rollouts = self.rollouts.sync(new, commit=False) if self.rollouts is not None else {}
        state = self.reconciler.state.replace(config=new, addresses=addresses, rollouts=rollouts)
        try:
            # Prove the edit builds before the engine follows it: a refused edit then changes nothing.
            build(state)
        except Exception as exc:  # noqa: BLE001 - never let a bug take the live config down
            log.exception("cannot build Envoy resources for the edited config")
            self._reject(f"{status.path}: cannot build Envoy resources: {exc}", new_digest)
            return False
        saved = self.rollouts.checkpoint() if self.rollouts is not None else None
        try:
            self.engine.sync(new)
            self.engine.recompute(self.shifted())
            if self.rollouts is not None:  # the rollouts follow the edit (a changed block starts again)
                state = state.replace(rollouts=self.rollouts.sync(new))
            self.reconciler.apply(state.replace(weights=self.engine.weights()))
        except Exception as exc:  # noqa: BLE001 - a bug past the check: follow the live config again
            log.exception("cannot apply the edited config")
            self.engine.sync(old)  # what the edit removed comes back with its stats
            self.engine.recompute(self.shifted())
            if self.rollouts is not None and saved is not None:
                self.rollouts.restore(saved)  # the runs as they were, not restarted
            self._reject(f"{status.path}: cannot apply: {exc}", new_digest)
            return False
        status.digest, status.loaded_at, status.errors, status.rejected_digest = new_digest, time.time(), [], ""
        status.reloads += 1
        status.restart_pending = restart_only(self.running, new)
        if status.restart_pending:
            log.warning("%s: these changes take effect only after a restart: %s",
                        status.path, "; ".join(status.restart_pending))
        log.info("%s: reloaded (%d pools)", status.path, len(new.pools), extra={"version": status.digest})
        return True

    async def _parse(self, data: bytes, new_digest: str) -> Config | None:
        """The file's config, parsed in a thread within PARSE_BUDGET; None (and rejected) if it is not one."""
        path = self.status.path
        task = asyncio.ensure_future(asyncio.to_thread(config_from_bytes, data, str(path)))
        task.add_done_callback(_retrieve)
        self._parsing = task
        try:
            return await asyncio.wait_for(asyncio.shield(task), PARSE_BUDGET)
        except TimeoutError:
            self._reject(f"{path}: took longer than {PARSE_BUDGET:g}s to parse; refused", new_digest)
        except ConfigError as exc:
            self._reject(str(exc), new_digest)
        except Exception as exc:  # noqa: BLE001 - a loader bug: refuse the file, without echoing what it holds
            log.exception("cannot load the edited config")
            self._reject(f"{path}: cannot load: {type(exc).__name__}", new_digest)
        return None

    def _reject(self, errors: str, rejected_digest: str) -> None:
        status = self.status
        if status.errors == errors.splitlines() and status.rejected_digest == rejected_digest:
            return  # the same problem as last poll: said once is enough
        status.errors = errors.splitlines()
        status.rejected_digest = rejected_digest
        status.rejected += 1
        log.error("config edit REJECTED; the last good config stays live:\n  %s", "\n  ".join(status.errors))


# Settings read once at start, and where they went: an edit to one is reported, never silently ignored.
START_ONLY = {
    "envoy.admin": "in Envoy's bootstrap",
    "envoy.listener.max_connections": "in Envoy's bootstrap",
    "envoy.log_level": "Envoy command-line flag",
    "envoy.concurrency": "Envoy command-line flag",
    "controlplane.xds": "the gRPC server and Envoy's bootstrap",
    "controlplane.api": "the API server",
}
LIVE_FIELDS = frozenset({"controlplane.api.token"})  # inside a START_ONLY section, yet read per request


def restart_only(old: Config, new: Config) -> list[str]:
    """Changes a running process cannot apply: ports it listens on, Envoy's bootstrap and command line.

    Everything else (the listener, pools, controlplane intervals, alerts, envoy.ca_file) is read live.
    Values are shown for addresses and plain settings; any other part of a section is only named (it may
    hold a secret)."""
    out = []
    for path, why in START_ONLY.items():
        before, after = _setting(old, path), _setting(new, path)
        if before == after:
            continue
        if not isinstance(before, BaseModel) or not isinstance(after, BaseModel):
            out.append(f"{path} {before} -> {after} ({why})")
            continue
        if (getattr(before, "address", None), getattr(before, "port", None)) != \
                (getattr(after, "address", None), getattr(after, "port", None)):
            out.append(f"{path} {before} -> {after} ({why})")
        for name in type(after).model_fields:
            if (name not in ("address", "port") and f"{path}.{name}" not in LIVE_FIELDS
                    and getattr(before, name, None) != getattr(after, name)):
                out.append(f"{path}.{name} changed ({why})")
    return out


def _setting(config: Config, path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a parse's outcome as seen, also when nobody waited for it (it overran its budget)."""
    if not task.cancelled():
        task.exception()
