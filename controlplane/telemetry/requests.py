"""Which backend answered which request: feedback arrives later, by `x-request-id`.

Access log entries arrive in batches, so feedback can come before the entry
for its request: such feedback waits (bounded) for it instead of being lost.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Served:
    pool: str
    backend: str


class RequestIndex:
    def __init__(self, capacity: int = 100_000, wait_seconds: float = 30.0) -> None:
        self.capacity = capacity
        self.wait_seconds = wait_seconds
        self._served: OrderedDict[str, Served] = OrderedDict()
        self._pending: OrderedDict[str, tuple[float, float]] = OrderedDict()  # request id -> (score, since)
        self._shared: dict[tuple[str, str], Served] = {}  # one Served per backend, not one per request
        self.expired = 0

    def lookup(self, request_id: str) -> Served | None:
        return self._served.get(request_id)

    def served(self, request_id: str, pool: str, backend: str) -> float | None:
        """Remember who served a request; returns feedback that was waiting for it."""
        if not request_id:
            return None
        served = self._shared.get((pool, backend))
        if served is None:
            if len(self._shared) > 10_000:  # backends come and go with edits; never grow without bound
                self._shared.clear()
            served = self._shared[(pool, backend)] = Served(pool, backend)
        index = self._served
        if request_id in index:
            index.move_to_end(request_id)
        index[request_id] = served
        if len(index) > self.capacity:
            index.popitem(last=False)
        if not self._pending:
            return None
        waiting = self._pending.pop(request_id, None)
        return waiting[0] if waiting else None

    def wait(self, request_id: str, score: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._pending.pop(request_id, None)  # re-inserted at the end: the queue stays in time order
        self._pending[request_id] = (score, now)
        self.expire(now)

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        while self._pending:
            rid, (_, since) = next(iter(self._pending.items()))
            if now - since < self.wait_seconds and len(self._pending) <= self.capacity:
                break
            self._pending.popitem(last=False)
            self.expired += 1
