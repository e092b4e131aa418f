"""What each backend did lately, and in all: requests by status class, errors, latency percentiles, share.

The scores keep smoothed values (EWMA); operators and alerts ask other
questions ("p95 over the last minute", "how many 5xx", "what share of the
pool's requests went where"), so this keeps the recent requests themselves,
bounded per backend by age (MAX_AGE) and by count (MAX_SAMPLES), and
cumulative counts by status class. One append per request; the questions
are answered at read time (a scrape, an alert check, a page refresh).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

MAX_AGE = 300.0  # seconds of history kept: the longest window anyone may ask about
MAX_SAMPLES = 4096  # per backend: p95 of the last 4096 requests is exact enough, and memory stays bounded
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "none")  # "none": no HTTP status (reset, timeout before headers)


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 200 <= status < 600 else "none"


@dataclass
class _Backend:
    samples: deque[tuple[float, bool, float]] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    by_class: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUS_CLASSES, 0))


@dataclass(frozen=True)
class Window:
    """One backend over the last `seconds`."""

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
        entry.samples.append((at, ok, latency_s))
        entry.by_class[status_class(status)] += 1

    def retain(self, keys: Iterable[tuple[str, str]]) -> None:
        """Forget backends no longer in the config (a reload removed them)."""
        keep = set(keys)
        for key in [k for k in self._backends if k not in keep]:
            del self._backends[key]

    def by_class(self) -> dict[tuple[str, str], dict[str, int]]:
        """All time (since start), per (pool, backend): requests per status class."""
        return {key: dict(entry.by_class) for key, entry in self._backends.items()}

    def window(self, pool: str, backend: str, seconds: float, now: float) -> Window:
        entry = self._backends.get((pool, backend))
        if entry is None:
            return Window(0, 0, None, None, None)
        since = now - min(seconds, MAX_AGE)
        latencies = []
        errors = 0
        for at, ok, latency in reversed(entry.samples):
            if at < since:
                break
            latencies.append(latency)
            errors += not ok
        latencies.sort()
        return Window(len(latencies), errors, _quantile(latencies, 0.5), _quantile(latencies, 0.95),
                      _quantile(latencies, 0.99))

    def shares(self, pool: str, backends: Iterable[str], seconds: float, now: float) -> dict[str, float]:
        """Each backend's share of the pool's requests over the window (0 for all when there were none)."""
        counts = {b: self.window(pool, b, seconds, now).requests for b in backends}
        total = sum(counts.values())
        return {b: (n / total if total else 0.0) for b, n in counts.items()}


def _quantile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank quantile of sorted values."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
