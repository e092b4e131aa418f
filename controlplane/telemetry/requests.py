"""Which backend answered which request: feedback arrives later, by `x-request-id`.

Access log entries arrive in batches, so feedback can come before the entry
for its request: such feedback waits (bounded) for it instead of being lost.

A request is rated once: the index remembers which of its requests were
rated, and feedback still waiting counts as a rating.

Memory is bounded in bytes, not only in entries. Request ids longer than
MAX_REQUEST_ID_CHARS (128) characters, or not ASCII, are neither indexed nor
waited for (Envoy's own are 36-character UUIDs), so an id costs at most 177
bytes of string (49 + 128). Measured per entry with the ordered dict's own
cost: about 90 more bytes in the index, 150 more in the waiting feedback
(its score and time). So the index holds at most `capacity` entries of at
most ~270 bytes (~27 MB at the default 100,000; ~18 MB with UUIDs) and the
waiting feedback at most `capacity` entries of ~330 bytes (~33 MB). Which
backend served a request is shared per backend, not kept per request; being
rated is part of that shared value, so the "already rated" set costs nothing
more. It ages out with the index, and a request that has aged out of the
index can no longer be matched to a backend anyway.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

MAX_REQUEST_ID_CHARS = 128


@dataclass(frozen=True)
class Served:
    pool: str
    backend: str
    rated: bool = False  # feedback was applied (or handed over) for the request


class AlreadyRatedError(Exception):
    """Feedback for a request that has had its one rating (applied, or still waiting for its entry)."""


def indexable(request_id: str) -> bool:
    """Whether a request id is kept at all: non-empty, at most MAX_REQUEST_ID_CHARS, ASCII."""
    return 0 < len(request_id) <= MAX_REQUEST_ID_CHARS and request_id.isascii()


class RequestIndex:
    def __init__(self, capacity: int = 100_000, wait_seconds: float = 30.0) -> None:
        self.capacity = capacity
        self.wait_seconds = wait_seconds
        self._served: OrderedDict[str, Served] = OrderedDict()
        self._pending: OrderedDict[str, tuple[float, float]] = OrderedDict()  # request id -> (score, since)
        # One Served per backend and rating state, not one per request.
        self._shared: dict[tuple[str, str, bool], Served] = {}
        self.expired = 0

    def lookup(self, request_id: str) -> Served | None:
        return self._served.get(request_id)

    def _shared_served(self, pool: str, backend: str, rated: bool) -> Served:
        served = self._shared.get((pool, backend, rated))
        if served is None:
            if len(self._shared) > 10_000:  # backends come and go with edits; never grow without bound
                self._shared.clear()
            served = self._shared[(pool, backend, rated)] = Served(pool, backend, rated)
        return served

    def served(self, request_id: str, pool: str, backend: str) -> float | None:
        """Remember who served a request; returns feedback that was waiting for it (the request is then rated)."""
        if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id or not request_id.isascii():
            return None
        served = self._shared.get((pool, backend, False)) or self._shared_served(pool, backend, False)
        index = self._served
        earlier = index.get(request_id)
        if earlier is not None:  # logged again (a retry logged later wins), still rated if it was
            index.move_to_end(request_id)
            if earlier.rated:
                served = self._shared_served(pool, backend, True)
        index[request_id] = served
        if len(index) > self.capacity:
            index.popitem(last=False)
        if not self._pending:
            return None
        waiting = self._pending.pop(request_id, None)
        if waiting is None:
            return None
        index[request_id] = self._shared_served(pool, backend, True)
        return waiting[0]

    def rate(self, request_id: str) -> Served | None:
        """Take the one rating of a request: who served it (the caller applies the score), or None if its
        entry has not arrived yet (the caller then waits). Raises AlreadyRatedError for a second rating."""
        if request_id in self._pending:
            raise AlreadyRatedError(request_id)
        served = self._served.get(request_id)
        if served is None:
            return None
        if served.rated:
            raise AlreadyRatedError(request_id)
        self._served[request_id] = self._shared_served(served.pool, served.backend, True)  # its age unchanged
        return served

    def wait(self, request_id: str, score: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if not indexable(request_id):
            return  # could never be matched: its entry is not indexed either
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
