"""Probes every backend of pools with `deep_health` on their interval (I/O side of health.py)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
import time
from collections.abc import Callable

import aiohttp

from ..config import Backend, Config
from .health import UNHEALTHY, Verdict, judge_json, judge_models

log = logging.getLogger("controlplane.health")

Sink = Callable[[str, str, Verdict], None]


@functools.lru_cache(maxsize=8)
def _tls_context(ca_file: str) -> ssl.SSLContext | bool:
    """Trust what Envoy trusts (envoy.ca_file) when this machine has that file, else the system's CAs."""
    if os.path.isfile(ca_file):
        return ssl.create_default_context(cafile=ca_file)
    return True


async def probe(
    session: aiohttp.ClientSession, backend: Backend, path: str, fmt: str, timeout: float, ca_file: str = ""
) -> Verdict:
    headers = {}
    if backend.auth_value is not None:  # /models needs the key; it is never logged
        headers[backend.api_key_header] = backend.auth_value
    try:
        async with session.get(backend.url.rstrip("/") + path, headers=headers,
                               timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False,
                               ssl=_tls_context(ca_file) if backend.tls and ca_file else True) as resp:
            body = await resp.content.read(256 * 1024)
            if fmt == "openai_models":
                return judge_models(resp.status, body, dict(resp.headers))
            return judge_json(resp.status, body)
    except TimeoutError:
        return Verdict(UNHEALTHY, "unhealthy", f"no answer within {timeout:g}s")
    except (aiohttp.ClientError, OSError) as exc:
        return Verdict(UNHEALTHY, "unhealthy", f"unreachable: {type(exc).__name__}")


class Prober:
    def __init__(self, config_source: Callable[[], Config], sink: Sink) -> None:
        self.config_source = config_source
        self.sink = sink
        self._last: dict[tuple[str, str], float] = {}

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    await self.tick(session)
                except Exception:  # keep probing whatever one round did
                    log.exception("health probe round failed")
                await asyncio.sleep(0.25)

    async def tick(self, session: aiohttp.ClientSession) -> None:
        """Probe whatever is due, concurrently."""
        now = time.monotonic()
        due = []
        config = self.config_source()
        for pname, pool in config.pools.items():
            deep = pool.deep_health
            if deep is None:
                continue
            for bname, backend in pool.backends.items():
                if now - self._last.get((pname, bname), -1e9) >= deep.interval.total_seconds():
                    self._last[(pname, bname)] = now
                    due.append((pname, bname, probe(session, backend, deep.path, deep.format,
                                                    deep.timeout.total_seconds(), config.envoy.ca_file)))
        if not due:
            return
        results = await asyncio.gather(*(c for _, _, c in due))
        for (pname, bname, _), verdict in zip(due, results, strict=True):
            self.sink(pname, bname, verdict)
