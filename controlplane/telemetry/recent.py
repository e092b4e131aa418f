"""What each backend did lately, and in all: requests by status class, errors, latency percentiles, share.

The scores keep smoothed values (EWMA); operators and alerts ask other
questions ("p95 over the last minute", "how many 5xx", "what share of the
pool's requests went where"), so this keeps the recent requests themselves,
bounded per backend: requests and errors per second for the last MAX_AGE
seconds, the latencies of the last MAX_SAMPLES requests, and cumulative
counts by status class. A few array writes per request, no object kept per
request; the questions are answered at read time (a scrape, an alert check,
a page refresh).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

MAX_AGE = 300.0  # seconds of history kept: the longest window anyone may ask about
SECONDS = int(MAX_AGE)  # per-second request and error counts, per backend: exact counts for any window
MAX_SAMPLES = 512  # latencies kept per backend for percentiles: the window's, or its last 512 if more
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "none")  # "none": no HTTP status (reset, timeout before headers)


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 200 <= status < 600 else "none"


class _Backend:
    """Fixed-size rings (arrays, not objects per request): about 15 KB per backend, whatever the traffic."""

    __slots__ = ("times", "latencies", "next", "filled", "second", "requests", "errors", "by_class")

    def __init__(self) -> None:
        self.times = array("d", bytes(8 * MAX_SAMPLES))
        self.latencies = array("d", bytes(8 * MAX_SAMPLES))
        self.next = 0  # where the next sample goes
        self.filled = 0  # samples held (up to MAX_SAMPLES)
        self.second = array("q", [-1]) * SECONDS  # which second each slot counts (slot = second % SECONDS)
        self.requests = array("i", bytes(4 * SECONDS))
        self.errors = array("i", bytes(4 * SECONDS))
        self.by_class = dict.fromkeys(STATUS_CLASSES, 0)

    def observe(self, at: float, ok: bool, latency_s: float) -> None:
        i = self.next
        self.times[i] = at
        self.latencies[i] = latency_s
        self.next = (i + 1) % MAX_SAMPLES
        if self.filled < MAX_SAMPLES:
            self.filled += 1
        second = int(at)
        slot = second % SECONDS
        if self.second[slot] != second:
            self.second[slot] = second
            self.requests[slot] = self.errors[slot] = 0
        self.requests[slot] += 1
        if not ok:
            self.errors[slot] += 1

    def counts(self, since: float, now: float) -> tuple[int, int]:
        """Requests and errors in the whole seconds from `since` to `now`."""
        first, last = int(since), int(now)
        requests = errors = 0
        for second in range(max(first, last - SECONDS + 1), last + 1):
            slot = second % SECONDS
            if self.second[slot] == second:
                requests += self.requests[slot]
                errors += self.errors[slot]
        return requests, errors

    def latencies_since(self, since: float) -> list[float]:
        out = []
        i = self.next
        times, latencies = self.times, self.latencies
        for _ in range(self.filled):
            i = (i - 1) % MAX_SAMPLES
            if times[i] < since:
                break
            out.append(latencies[i])
        return out


@dataclass(frozen=True)
class Window:
    """One backend over the last `seconds` (counts to the second; percentiles of its last MAX_SAMPLES)."""

    requests: int
    errors: int
    p50_seconds: float | None
    p95_seconds: float | None
    p99_seconds: float | None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


class Recent:
    def __init__(self) -> None:
        self._backends: dict[tuple[str, str], _Backend] = {}

    def observe(self, at: float, pool: str, backend: str, status: int, ok: bool, latency_s: float) -> None:
        entry = self._backends.get((pool, backend))
        if entry is None:
            entry = self._backends[(pool, backend)] = _Backend()
        entry.observe(at, ok, latency_s)
        entry.by_class[status_class(status)] += 1

    def retain(self, keys: Iterable[tuple[str, str]]) -> None:
        """Forget backends no longer in the config (a reload removed them)."""
        keep = set(keys)
        for key in [k for k in self._backends if k not in keep]:
            del self._backends[key]

    def by_class(self) -> dict[tuple[str, str], dict[str, int]]:
        """All time (since start), per (pool, backend): requests per status class."""
        return {key: dict(entry.by_class) for key, entry in self._backends.items()}

    def classes(self, pool: str, backend: str) -> dict[str, int]:
        """All time, one backend: requests per status class (zeros when it has had none)."""
        entry = self._backends.get((pool, backend))
        return dict(entry.by_class) if entry is not None else dict.fromkeys(STATUS_CLASSES, 0)

    def window(self, pool: str, backend: str, seconds: float, now: float) -> Window:
        entry = self._backends.get((pool, backend))
        if entry is None:
            return Window(0, 0, None, None, None)
        since = now - min(seconds, MAX_AGE)
        requests, errors = entry.counts(since, now)
        latencies = sorted(entry.latencies_since(since))
        return Window(requests, errors, _quantile(latencies, 0.5), _quantile(latencies, 0.95),
                      _quantile(latencies, 0.99))

    def shares(self, pool: str, backends: Iterable[str], seconds: float, now: float) -> dict[str, float]:
        """Each backend's share of the pool's requests over the window (0 for all when there were none)."""
        since = now - min(seconds, MAX_AGE)
        counts = {}
        for b in backends:
            entry = self._backends.get((pool, b))
            counts[b] = entry.counts(since, now)[0] if entry is not None else 0
        total = sum(counts.values())
        return {b: (n / total if total else 0.0) for b, n in counts.items()}


def _quantile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank quantile of sorted values."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
