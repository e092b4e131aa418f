"""One reconciler: the latest desired state -> a snapshot, published to the xDS cache.

Inputs propose changes to their own part of the state; bursts are coalesced
(changes within a short hold-off give one rebuild), and only the resource
types whose inputs changed are rebuilt: a weight change rebuilds EDS only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from google.protobuf.message import Message

from .history import WeightHistory
from .rollouts.plan import shadow_cluster
from .state import DesiredState
from .xds import resources, typeurls
from .xds.snapshot import Snapshot

log = logging.getLogger("controlplane.reconciler")

Built = Mapping[str, Message]
Builder = Callable[[DesiredState, Built | None, DesiredState | None], dict[str, Message]]


def _endpoints(state: DesiredState, previous: Built | None, built_from: DesiredState | None) -> dict[str, Message]:
    """Per pool: a weight change in one pool of a hundred rebuilds that pool's endpoints only."""
    # A backend cooling after a 429 with Retry-After is published exactly as a drained one (DRAINING).
    out_of_rotation = state.out_of_rotation()
    if previous is None or built_from is None or state.config is not built_from.config:
        return resources.endpoints(state.config, state.weights, state.addresses, out_of_rotation, state.rollouts)
    out: dict[str, Message] = {}
    before = built_from.out_of_rotation()
    for name, pool in state.config.pools.items():
        drained = frozenset(b for p, b in out_of_rotation if p == name)
        unchanged = (
            name in previous
            and state.weights.get(name) == built_from.weights.get(name)
            and drained == frozenset(b for p, b in before if p == name)
            and state.rollouts.get(name) == built_from.rollouts.get(name)
            and all(state.addresses.get(b.host) == built_from.addresses.get(b.host) for b in pool.backends.values())
        )
        if unchanged:
            out.update({key: previous[key] for key in (name, shadow_cluster(name)) if key in previous})
        else:
            out.update(resources.pool_endpoints(name, pool, state.weights.get(name, {}), state.addresses, drained,
                                                state.rollouts.get(name)))
    return out


# Per xDS type: the parts of the state it is built from, and how.
BUILDERS: Mapping[str, tuple[frozenset[str], Builder]] = {
    typeurls.CLUSTER: (frozenset({"config"}), lambda s, _p, _b: resources.clusters(s.config)),
    typeurls.ENDPOINT: (frozenset({"config", "weights", "addresses", "drained", "cooling", "rollouts"}), _endpoints),
    typeurls.LISTENER: (frozenset({"config", "xds_token", "spool_path"}),
                        lambda s, _p, _b: resources.listeners(s.config, s.xds_token, s.spool_path)),
    typeurls.ROUTE: (frozenset({"config", "rejected", "blocked", "envoys", "rollouts"}),
                     lambda s, _p, _b: resources.routes(s.config, s.rejected, s.blocked, s.envoys, s.rollouts)),
}


class Publisher(Protocol):
    """Where snapshots go (the xDS server's cache)."""

    @property
    def snapshot(self) -> Snapshot | None: ...

    def set(self, snapshot: Snapshot) -> None: ...


def build(state: DesiredState, previous: Snapshot | None = None, built_from: DesiredState | None = None) -> Snapshot:
    """The snapshot for `state`, reusing `previous`'s types whose inputs are unchanged since `built_from`.

    Raises before anything is published if the result is inconsistent (a bug
    in the builders, never an operator error).
    """
    changed = state.changed(built_from if previous is not None else None)
    rebuilt = {
        t: build_type(state, previous.resources.get(t) if previous is not None else None, built_from)
        for t, (inputs, build_type) in BUILDERS.items() if inputs & changed
    }
    snapshot = previous.update(rebuilt) if previous is not None else Snapshot.of(rebuilt)
    problems = snapshot.problems()
    if problems:
        raise RuntimeError("inconsistent snapshot: " + "; ".join(problems))
    return snapshot


class Reconciler:
    def __init__(self, cache: Publisher, state: DesiredState, holdoff: float = 0.005, max_holdoff: float = 0.1
                 ) -> None:
        self.cache = cache
        self.holdoff = holdoff  # wait this long after a change for more to come
        self.max_holdoff = max_holdoff  # but never longer than this after the first one
        self.builds = 0
        self.failures = 0
        self._state = state
        self._built: DesiredState | None = None
        self.history = WeightHistory()  # the weight changes Envoy was sent
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> DesiredState:
        """The latest desired state (maybe not yet published)."""
        return self._state

    @property
    def published(self) -> DesiredState | None:
        """The state the served snapshot was built from."""
        return self._built

    def apply(self, state: DesiredState) -> Snapshot:
        """Build and publish `state` now; if that raises, nothing changed (the caller reports the refusal)."""
        snapshot = build(state, self.cache.snapshot, self._built)
        self._state = state
        self._publish(state, snapshot)
        return snapshot

    def propose(self, **changes: Any) -> None:
        """Change parts of the state; the snapshot follows after the hold-off, with whatever else came."""
        state = self._state.replace(**changes)
        if not state.changed(self._state):
            return
        self._state = state
        self._dirty.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reconciler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def flush(self) -> None:
        """Publish whatever is pending now, without waiting for the hold-off."""
        if self._state is not self._built:
            self._rebuild()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._dirty.wait()
            first = loop.time()
            while True:  # coalesce: wait until changes pause, or the maximum hold-off passes
                self._dirty.clear()
                left = self.max_holdoff - (loop.time() - first)
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(self._dirty.wait(), min(self.holdoff, left))
                except TimeoutError:
                    break
            self._dirty.clear()
            self._rebuild()

    def _rebuild(self) -> None:
        state = self._state
        try:
            snapshot = build(state, self.cache.snapshot, self._built)
        except Exception:  # noqa: BLE001 - keep serving the last good snapshot
            self.failures += 1
            log.exception("cannot build Envoy resources; Envoy keeps the last good snapshot")
            return
        self._publish(state, snapshot)

    def _publish(self, state: DesiredState, snapshot: Snapshot) -> None:
        previous = self.cache.snapshot
        self.history.record(self._built, state)
        self._built = state
        self.builds += 1
        changed = [typeurls.SHORT[t] for t in typeurls.PUSH_ORDER
                   if previous is None or previous.version(t) != snapshot.version(t)]
        if changed:
            self.cache.set(snapshot)
            log.info("snapshot: %s changed (%s)", ", ".join(changed),
                     " ".join(f"{typeurls.SHORT[t]}={snapshot.version(t)}" for t in typeurls.PUSH_ORDER))
