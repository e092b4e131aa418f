"""The one desired state: everything Envoy's resources are built from, in one immutable value.

Each input (the config reloader, the scoring loop, the budget controller, the
DNS refresher, drains) proposes a new state for its own part; the reconciler
turns the latest state into a snapshot. Nothing mutates a state in place, so
a refused change simply never becomes the state: there is nothing to roll back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .config import Config
from .rollouts.plan import Plans
from .rollouts.plan import weights as rollout_weights

Weights = Mapping[str, Mapping[str, int]]  # pool -> backend -> weight
Addresses = Mapping[str, str]  # backend host name -> IP address
Drained = frozenset[tuple[str, str]]  # (pool, backend) pairs taking no new requests


@dataclass(frozen=True)
class Cooldown:
    """A backend that answered 429 with a Retry-After: out of rotation (EDS DRAINING) until `until`."""

    until: float  # wall clock (time.time()), when the backend returns
    since: float  # when the 429 was seen
    retry_after: str  # the header as the backend sent it


Cooling = Mapping[tuple[str, str], Cooldown]  # (pool, backend) -> its cooldown


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


def _no_cooling() -> Cooling:
    return MappingProxyType({})


@dataclass(frozen=True)
class DesiredState:
    config: Config
    weights: Weights = field(default_factory=_empty)
    addresses: Addresses = field(default_factory=_empty)
    drained: Drained = frozenset()
    cooling: Cooling = field(default_factory=_no_cooling)  # rate limited by the backend itself: as drained, for a while
    rejected: Mapping[str, str] = field(default_factory=_empty)  # pool -> why Envoy answers 429 for it
    # client -> (error code, message, Retry-After seconds): over its budget or tokens per minute, answered 429
    blocked: Mapping[str, tuple[str, str, int]] = field(default_factory=_empty)
    envoys: int = 1  # Envoys connected: each client's request limit is divided among them
    xds_token: str = field(default="", repr=False)  # what Envoy sends to authenticate its access-log streams
    spool_path: str | None = None  # where the managed Envoy also logs each request (telemetry/spool.py)
    rollouts: Plans = field(default_factory=_empty)  # pool -> what its rollout asks of Envoy now (rollouts/)

    def replace(self, **changes: Any) -> DesiredState:
        """A new state with some parts changed; mappings are frozen so no holder can edit them later."""
        for name in ("weights", "addresses", "rejected", "blocked", "cooling", "rollouts"):
            if name in changes:
                changes[name] = _freeze(changes[name])
        return dataclasses.replace(self, **changes)

    def out_of_rotation(self) -> Drained:
        """The (pool, backend) pairs Envoy sends no new requests: drained by an operator, or cooling."""
        return self.drained | frozenset(self.cooling) if self.cooling else self.drained

    def effective_weights(self) -> Weights:
        """What Envoy is sent: the scores' weights, with each rollout's candidate at its planned share
        (0: left out of the endpoints)."""
        if not self.rollouts:
            return self.weights
        out = dict(self.weights)
        away = self.out_of_rotation()
        for name, plan in self.rollouts.items():
            pool = self.config.pools.get(name)
            if pool is not None:
                drained = frozenset(b for p, b in away if p == name)
                out[name] = rollout_weights(pool, self.weights.get(name, {}), plan, drained)
        return out

    def changed(self, other: DesiredState | None) -> frozenset[str]:
        """The names of the parts that differ from `other` (all of them when there is none)."""
        names = [f.name for f in dataclasses.fields(self)]
        if other is None:
            return frozenset(names)
        return frozenset(n for n in names if getattr(self, n) is not getattr(other, n)
                         and getattr(self, n) != getattr(other, n))


def _freeze(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType({k: (_freeze(v) if isinstance(v, Mapping) else v) for k, v in value.items()})
