"""Narrow, read-only views of the running system, handed to the reports, the API and the metrics at start.

Nothing that reports imports the wiring (`app.py`): it sees only what is here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .controllers.reload import ConfigStatus
from .scoring.budget import BudgetVerdict
from .scoring.ledger import Spend
from .scoring.stats import BackendStats
from .state import DesiredState
from .xds.server import XdsStats
from .xds.snapshot import Snapshot


class XdsView(Protocol):
    @property
    def stats(self) -> XdsStats: ...

    def in_sync(self) -> list[str]: ...

    def connected(self) -> int: ...

    def node_status(self) -> list[dict[str, Any]]: ...


class SpendView(Protocol):
    def total(self) -> dict[tuple[str, str], Spend]: ...

    def since(self, start: float) -> dict[tuple[str, str], Spend]: ...


class EnvoyView(Protocol):
    @property
    def pid(self) -> int | None: ...

    @property
    def restarts(self) -> int: ...


class Counts(Protocol):
    entries: int
    errors: int


@dataclass(frozen=True)
class Views:
    config: ConfigStatus  # the live config's file and what became of the latest edit
    state: Callable[[], DesiredState]  # the latest desired state
    snapshot: Callable[[], Snapshot | None]  # what Envoy is served
    xds: XdsView
    backends: Mapping[tuple[str, str], BackendStats]  # the scores' inputs, per (pool, backend)
    explain: Callable[[str, list[dict[str, Any]] | None], dict[str, Any]]  # one pool's weights, reasoned
    spend: SpendView
    budgets: Callable[[], BudgetVerdict]
    access_log: Counts
    envoy: Callable[[], EnvoyView | None]  # the supervised Envoy, if this process runs one


@dataclass(frozen=True)
class Actions:
    """What the API may change, each through the component that owns it."""

    feedback: Callable[[str, float], dict[str, Any]]
    set_draining: Callable[[str, str, bool, bool], None]
