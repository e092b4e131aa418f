"""The last weight changes Envoy was sent, per pool, with their cause: what an operator asks first
("why did traffic move?"). Recorded where snapshots are published, so it shows what Envoy got."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .state import DesiredState

MAX_CHANGES = 200  # across pools; older ones are dropped

Reason = Callable[[str, str], str]  # (pool, backend) -> the strategy's reason for its weight


def _cause(before: DesiredState, after: DesiredState) -> str:
    if after.config is not before.config:
        return "config edit"
    if after.drained != before.drained:
        return "drain"
    if after.rejected != before.rejected:
        return "budget"
    return "scoring"


class WeightHistory:
    def __init__(self, reason: Reason | None = None, maxlen: int = MAX_CHANGES) -> None:
        self.reason = reason
        self._changes: deque[dict[str, Any]] = deque(maxlen=maxlen)

    def record(self, before: DesiredState | None, after: DesiredState, at: float | None = None) -> None:
        at = time.time() if at is None else at
        for pool in after.config.pools:
            old = dict(before.weights.get(pool, {})) if before is not None else {}
            new = dict(after.weights.get(pool, {}))
            old_drained = {b for p, b in before.drained if p == pool} if before is not None else set()
            new_drained = {b for p, b in after.drained if p == pool}
            if before is not None and old == new and old_drained == new_drained:
                continue
            backends = {}
            for name in sorted(set(old) | set(new) | old_drained | new_drained):
                if before is not None and old.get(name) == new.get(name) and \
                        (name in old_drained) == (name in new_drained):
                    continue
                backends[name] = {"before": old.get(name), "after": new.get(name), "draining": name in new_drained,
                                  "reason": self._reason(pool, name)}
            self._changes.append({"at": at, "pool": pool,
                                  "cause": "start" if before is None else _cause(before, after),
                                  "backends": backends})

    def _reason(self, pool: str, backend: str) -> str:
        if self.reason is None:
            return ""
        try:
            return self.reason(pool, backend)
        except KeyError:  # a backend the scores no longer (or do not yet) know
            return ""

    def recent(self, pool: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """Newest first."""
        out = [c for c in reversed(self._changes) if pool is None or c["pool"] == pool]
        return out[:limit]
