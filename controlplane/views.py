"""Narrow, read-only views of the running system, handed to the reports, the API and the metrics at start.

Nothing that reports imports the wiring (`app.py`): it sees only what is here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .controllers.clients import ClientCounts
from .history import WeightHistory
from .scoring.budget import Block, BudgetVerdict, ClientBudgetVerdict
from .scoring.ledger import Spend
from .scoring.stats import BackendStats
from .state import DesiredState, Weights
from .telemetry.envoy_hosts import EnvoyHosts
from .telemetry.histograms import GenAiHistograms
from .telemetry.recent import Recent
from .xds.server import XdsStats
from .xds.snapshot import Snapshot


class ConfigView(Protocol):
    """The live config's file and what became of the latest edit."""

    @property
    def path(self) -> Path: ...

    @property
    def digest(self) -> str: ...

    @property
    def loaded_at(self) -> float: ...

    @property
    def reloads(self) -> int: ...

    @property
    def rejected(self) -> int: ...

    @property
    def errors(self) -> list[str]: ...

    @property
    def restart_pending(self) -> list[str]: ...


class XdsView(Protocol):
    @property
    def stats(self) -> XdsStats: ...

    def in_sync(self) -> list[str]: ...

    def connected(self) -> int: ...

    def node_status(self) -> list[dict[str, Any]]: ...


class SpendView(Protocol):
    def total(self) -> dict[tuple[str, str], Spend]: ...

    def since(self, start: float) -> dict[tuple[str, str], Spend]: ...

    def by_model(self, start: float | None = None) -> dict[tuple[str, str], Spend]:
        """Per (pool, model): all time when `start` is None, else from the hour holding `start` on."""
        ...

    def by_client(self, start: float | None = None) -> dict[str, Spend]:
        """Per client: all time when `start` is None, else from the hour holding `start` on."""
        ...

    @property
    def pending(self) -> int:
        """(hour, pool, backend, model) rows not yet written to the ledger."""
        ...

    @property
    def recovered(self) -> Spend:
        """All time: spend charged from the managed Envoy's spool, not from the gRPC access log."""
        ...


class EnvoyView(Protocol):
    @property
    def pid(self) -> int | None: ...

    @property
    def restarts(self) -> int: ...


class Counts(Protocol):
    @property
    def messages(self) -> int: ...

    @property
    def entries(self) -> int: ...

    @property
    def errors(self) -> int: ...

    @property
    def streams(self) -> Mapping[str, int]:
        """Per Envoy node id: access-log streams opened (each after the first ones is a reconnect)."""
        ...

    @property
    def lag_seconds(self) -> float:
        """The latest batch: from its last request's end to its arrival here."""
        ...


class LedgerView(Protocol):
    """Whether spend reaches the disk: the crash bound holds only while flushes succeed."""

    @property
    def flushes(self) -> int: ...

    @property
    def failures(self) -> int: ...

    @property
    def last_flush(self) -> float: ...


class AlertsView(Protocol):
    def active(self) -> list[dict[str, Any]]:
        """The alerts firing now, oldest first."""
        ...

    def counters(self) -> dict[str, Any]:
        """fired, resolved, sent, failed, dropped: per kind; queued, active: counts."""
        ...


class ClientsView(Protocol):
    """Per client: what it did since the start, its blocks, its tokens this minute, its budgets."""

    def counters(self) -> Mapping[str, ClientCounts]: ...

    def blocks(self) -> tuple[Mapping[str, Block], Mapping[str, Block]]:
        """(budget blocks, token blocks) in force."""
        ...

    def tokens_this_minute(self) -> Mapping[str, int]: ...

    def budgets(self) -> ClientBudgetVerdict: ...


class RolloutsView(Protocol):
    """Each pool's rollout: stage, phase, step, gates, arms (rollouts/controller.py)."""

    @property
    def runs(self) -> Mapping[str, Any]: ...

    @property
    def transitions(self) -> Mapping[tuple[str, str], int]:
        """(pool, phase entered) -> how many times."""
        ...

    def report(self, pool: str) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Views:
    config: ConfigView
    state: Callable[[], DesiredState]  # the latest desired state (maybe not yet published)
    published: Callable[[], DesiredState | None]  # the state the served snapshot was built from
    build_failures: Callable[[], int]  # snapshots that could not be built (the last good one stayed)
    snapshot: Callable[[], Snapshot | None]  # what Envoy is served
    xds: XdsView
    backends: Mapping[tuple[str, str], BackendStats]  # the scores' inputs, per (pool, backend)
    explain: Callable[[str, list[dict[str, Any]] | None], dict[str, Any]]  # one pool's weights, reasoned
    spend: SpendView
    ledger: LedgerView
    budgets: Callable[[], BudgetVerdict]
    access_log: Counts
    envoy: Callable[[], EnvoyView | None]  # the supervised Envoy, if this process runs one
    recent: Recent  # per backend, lately: status classes, error rate, latency percentiles, share
    histograms: GenAiHistograms  # the OTel GenAI histograms
    envoy_hosts: EnvoyHosts  # Envoy's own view of each backend (ejected, failing checks)
    history: WeightHistory  # the last weight changes Envoy was sent
    alerts: AlertsView  # what fires now, and what was sent
    clients: ClientsView | None = None  # per client (controllers/clients.py)
    rollouts: RolloutsView | None = None  # canary, A/B, shadow (rollouts/)
    now: Callable[[], float] = time.time  # the clock of budgets and spend windows (a test may shift it)

    def pushed_weights(self) -> Weights:
        """What Envoy was sent, not what is about to be."""
        return (self.published() or self.state()).effective_weights()


@dataclass(frozen=True)
class Actions:
    """What the API may change, each through the component that owns it."""

    feedback: Callable[[str, float], dict[str, Any]]
    set_draining: Callable[[str, str, bool, bool], None]
    # (pool, action, full) -> the rollout's report; LookupError: no rollout; ValueError: not now
    rollout: Callable[[str, str, bool], dict[str, Any]] | None = None
