"""Backend host names -> IP addresses, for EDS (Envoy does not resolve EDS endpoints)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable, Mapping

from .config import Config

log = logging.getLogger("controlplane.resolver")


def backend_hosts(config: Config) -> set[str]:
    return {b.host for pool in config.pools.values() for b in pool.backends.values()}


async def resolve(hosts: Iterable[str], previous: Mapping[str, str] | None = None) -> dict[str, str]:
    """One address per host; a host that fails to resolve keeps its previous address."""
    previous = previous or {}
    loop = asyncio.get_running_loop()
    out: dict[str, str] = {}
    for host in sorted(set(hosts)):
        try:
            out[host] = str(ipaddress.ip_address(host))
            continue
        except ValueError:
            pass
        try:
            infos = await loop.getaddrinfo(host, None, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM)
        except OSError as exc:
            if host in previous:
                log.warning("cannot resolve %s (%s); keeping %s", host, exc, previous[host])
                out[host] = previous[host]
            else:
                log.warning("cannot resolve %s (%s); its backends get no traffic until it resolves", host, exc)
            continue
        addresses = sorted({str(info[4][0]) for info in infos}, key=lambda a: (":" in a, a))  # IPv4 first
        keep = previous.get(host)
        out[host] = keep if keep in addresses else addresses[0]
    return out
