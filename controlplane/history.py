"""The last weight changes Envoy was sent, per pool, with their cause: what an operator asks first
("why did traffic move?"). Recorded where snapshots are published, so it shows what Envoy got."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from .state import DesiredState

MAX_CHANGES = 200  # across pools; older ones are dropped

Reasons = Callable[[str], Mapping[str, str]]  # pool -> each backend's reason for its weight (the strategy's)


def _cause(before: DesiredState, after: DesiredState) -> str:
    if after.config is not before.config:
        return "config edit"
    if after.drained != before.drained:
        return "drain"
    if after.rejected != before.rejected:
        return "budget"
    if after.rollouts != before.rollouts:
        return "rollout"
    return "scoring"


class WeightHistory:
    def __init__(self, reasons: Reasons | None = None, maxlen: int = MAX_CHANGES) -> None:
        self.reasons = reasons
        self._changes: deque[dict[str, Any]] = deque(maxlen=maxlen)

    def record(self, before: DesiredState | None, after: DesiredState, at: float | None = None) -> None:
        at = time.time() if at is None else at
        was = before.effective_weights() if before is not None else {}
        now = after.effective_weights()
        for pool in after.config.pools:
            old = dict(was.get(pool, {}))
            new = dict(now.get(pool, {}))
            old_drained = {b for p, b in before.drained if p == pool} if before is not None else set()
            new_drained = {b for p, b in after.drained if p == pool}
            if before is not None and old == new and old_drained == new_drained:
                continue
            backends = {}
            reasons = self._reasons(pool)  # once per pool: the strategy's explanation covers all its backends
            for name in sorted(set(old) | set(new) | old_drained | new_drained):
                if before is not None and old.get(name) == new.get(name) and \
                        (name in old_drained) == (name in new_drained):
                    continue
                backends[name] = {"before": old.get(name), "after": new.get(name), "draining": name in new_drained,
                                  "reason": reasons.get(name, "")}
            self._changes.append({"at": at, "pool": pool,
                                  "cause": "start" if before is None else _cause(before, after),
                                  "backends": backends})

    def _reasons(self, pool: str) -> Mapping[str, str]:
        if self.reasons is None:
            return {}
        try:
            return self.reasons(pool)
        except KeyError:  # a pool the scores no longer (or do not yet) know
            return {}

    def recent(self, pool: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """Newest first."""
        out = [c for c in reversed(self._changes) if pool is None or c["pool"] == pool]
        return out[:limit]
