"""Envoy's own view of each backend: in rotation, ejected by outlier detection, failing active checks.

The control plane decides weights, but Envoy decides per request which hosts it may use; operators
(metrics, alerts, the live page) need Envoy's view, not only ours. It is read from an Envoy admin
interface's `/clusters?format=json` (the managed Envoy's, or `controlplane.envoy_admin`), a few
times a minute, and mapped back to (pool, backend) by cluster name and endpoint address.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from ..state import DesiredState

log = logging.getLogger("controlplane.envoy_hosts")

HEALTHY, EJECTED, FAILING, DRAINING, ABSENT, UNKNOWN = (
    "healthy", "ejected", "failing_active_checks", "draining", "absent", "unknown")
STATES = (HEALTHY, EJECTED, FAILING, DRAINING, ABSENT, UNKNOWN)
MAX_BODY = 16 * 1024 * 1024  # /clusters of a big config; more than this is not an Envoy we can use


def host_state(health: Mapping[str, Any]) -> str:
    """One host's health_status block -> the state shown to operators (the worst reason wins)."""
    if health.get("failed_active_health_check"):
        return FAILING
    if health.get("failed_outlier_check"):
        return EJECTED
    if health.get("eds_health_status") == "DRAINING":
        return DRAINING
    if health.get("pending_dynamic_removal"):
        return DRAINING
    return HEALTHY


def states_from_clusters(clusters: Mapping[str, Any], state: DesiredState) -> dict[tuple[str, str], str]:
    """Pure: Envoy's `/clusters?format=json` and the desired state -> each configured backend's state.

    A backend Envoy does not list (drained away, or a snapshot not yet applied) is `absent`."""
    by_address: dict[tuple[str, str, int], str] = {}
    for pname, pool in state.config.pools.items():
        for bname, backend in pool.backends.items():
            ip = state.addresses.get(backend.host, backend.host)
            by_address[(pname, ip, backend.port)] = bname
    out = {(p, b): ABSENT for p, pool in state.config.pools.items() for b in pool.backends}
    for cluster in clusters.get("cluster_statuses", ()) or ():
        pname = str(cluster.get("name", ""))
        if pname not in state.config.pools:
            continue
        for host in cluster.get("host_statuses", ()) or ():
            socket = (host.get("address") or {}).get("socket_address") or {}
            found = by_address.get((pname, socket.get("address", ""), int(socket.get("port_value", 0) or 0)))
            if found is not None:
                out[(pname, found)] = host_state(host.get("health_status") or {})
    return out


class EnvoyHosts:
    """The latest view (empty, i.e. `unknown`, until a read succeeds or when no admin is known)."""

    def __init__(self, admin_url: Callable[[], str | None], state: Callable[[], DesiredState],
                 interval: float = 2.0) -> None:
        self.admin_url = admin_url  # read per poll: a reload may change controlplane.envoy_admin
        self.state = state
        self.interval = interval
        self.states: dict[tuple[str, str], str] = {}
        self.read_at = 0.0  # when the view was last read (0: never)
        self.error: str | None = None  # why the last read failed

    def get(self, pool: str, backend: str) -> str:
        return self.states.get((pool, backend), UNKNOWN)

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max(1.0, self.interval))) as session:
            while True:
                await self.poll(session)
                await asyncio.sleep(self.interval)

    async def poll(self, session: aiohttp.ClientSession) -> None:
        url = self.admin_url()
        if url is None:
            self.states, self.error = {}, "no Envoy admin to read (set controlplane.envoy_admin)"
            return
        try:
            async with session.get(url.rstrip("/") + "/clusters?format=json") as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                body = await resp.content.read(MAX_BODY + 1)
                if len(body) > MAX_BODY:
                    raise ValueError(f"answer over {MAX_BODY} bytes")
            clusters = json.loads(body)
            if not isinstance(clusters, dict):
                raise ValueError("not a JSON object")
            self.states = states_from_clusters(clusters, self.state())
            self.read_at, self.error = time.time(), None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            if self.error is None:
                log.warning("cannot read Envoy's host states from %s: %s", url, exc or type(exc).__name__)
            self.states, self.error = {}, f"{type(exc).__name__}: {exc}"
