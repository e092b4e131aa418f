"""Alerts to the operator's webhook: a JSON POST per event, retried, never blocking the loop."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp

log = logging.getLogger("controlplane.alerts")


class Alerter:
    def __init__(self, attempts: int = 3) -> None:
        self.webhook: str | None = None
        self.timeout = 5.0
        self.attempts = attempts
        self.sent = 0
        self.failed = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def configure(self, webhook: str | None, timeout: float) -> None:
        self.webhook, self.timeout = webhook, timeout

    def send(self, kind: str, message: str, **details: Any) -> None:
        body = {"kind": kind, "message": message, "at": time.time(), **details}
        log.warning("alert %s: %s", kind, message)
        if not self.webhook:
            return
        task = asyncio.create_task(self._post(self.webhook, self.timeout, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, url: str, timeout: float, body: dict[str, Any]) -> None:
        """To the webhook in force when the alert was raised, whatever a reload does meanwhile."""
        delay = 0.5
        for attempt in range(1, self.attempts + 1):
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
                    async with session.post(url, json=body) as resp:
                        if resp.status < 300:
                            self.sent += 1
                            return
                        problem = f"HTTP {resp.status}"
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                problem = str(exc) or type(exc).__name__
            log.warning("webhook attempt %d/%d failed: %s", attempt, self.attempts, problem)
            await asyncio.sleep(delay)
            delay *= 2
        self.failed += 1

    async def drain(self) -> None:
        """On stop: give alerts in flight a moment, then cancel what is left."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.timeout)
        for task in list(self._tasks):
            task.cancel()
