"""Drain and undrain: an operator's action, persisted so it survives a restart."""

from __future__ import annotations

import logging
from pathlib import Path

from .. import statefile
from ..reconciler import Reconciler

log = logging.getLogger("controlplane")


class Drains:
    def __init__(self, path: Path, reconciler: Reconciler) -> None:
        self.path = path
        self.reconciler = reconciler

    def set(self, pool: str, backend: str, draining: bool, force: bool = False) -> None:
        """Mark a backend draining (no new requests) or back in rotation, and remember it."""
        state = self.reconciler.state
        if pool not in state.config.pools:
            raise LookupError(f"no pool {pool!r}")
        backends = state.config.pools[pool].backends
        if backend not in backends:
            raise LookupError(f"pool {pool!r} has no backend {backend!r}")
        if draining and not force:
            active = [b for b in backends if (pool, b) not in state.drained and b != backend]
            if not active:
                raise ValueError(
                    f"{backend!r} is the last backend of pool {pool!r} in rotation; draining it fails "
                    "every request to the pool (use force to do it anyway)"
                )
        key = (pool, backend)
        if (key in state.drained) == draining:
            return
        drained = state.drained | {key} if draining else state.drained - {key}
        statefile.save(self.path, statefile.PersistedState(drained=set(drained)))
        log.info("%s %s/%s", "draining" if draining else "undrained", pool, backend,
                 extra={"pool": pool, "backend": backend})
        self.reconciler.propose(drained=drained)
