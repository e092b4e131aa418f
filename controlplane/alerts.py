"""Alerts to the operator's webhook: a JSON POST per event, retried, never blocking the loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from .config import Alerts

log = logging.getLogger("controlplane.alerts")


class Alerter:
    def __init__(self, settings: Callable[[], Alerts], attempts: int = 3) -> None:
        self.settings = settings  # read per alert, so a reload takes effect for the next one
        self.attempts = attempts
        self.sent = 0
        self.failed = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, kind: str, message: str, **details: Any) -> None:
        body = {"kind": kind, "message": message, "at": time.time(), **details}
        log.warning("alert %s: %s", kind, message)
        settings = self.settings()
        if not settings.webhook:
            return
        task = asyncio.create_task(self._post(settings.webhook, settings.timeout.total_seconds(), body))
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
            await asyncio.wait(self._tasks, timeout=self.settings().timeout.total_seconds())
        for task in list(self._tasks):
            task.cancel()
