"""Deep health: the control plane reads what each backend says about itself.

Envoy's own checks guard the fast path (is it up?); this says how well: a RAG
service's JSON (`{"status": "healthy|degraded|unhealthy", "llm_status": ...}`)
or an OpenAI-style `GET /models` with its rate-limit headers. The result is a
score in 0..1 that scales the backend's weight.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

HEALTHY, DEGRADED, UNHEALTHY = 1.0, 0.5, 0.0
_STATUS = {"healthy": HEALTHY, "ok": HEALTHY, "up": HEALTHY, "pass": HEALTHY,
           "degraded": DEGRADED, "warn": DEGRADED,
           "unhealthy": UNHEALTHY, "down": UNHEALTHY, "fail": UNHEALTHY, "error": UNHEALTHY}
_BAD_PARTS = {"down", "unhealthy", "error", "failed", "fail", "degraded", "warn"}


@dataclass(frozen=True)
class Verdict:
    score: float
    status: str  # healthy | degraded | unhealthy
    detail: str


def _status(score: float) -> str:
    return "healthy" if score >= HEALTHY else "unhealthy" if score <= UNHEALTHY else "degraded"


def judge_json(http_status: int, body: bytes) -> Verdict:
    """A health JSON; the HTTP status and the components' own statuses outrank a cheerful summary."""
    if http_status >= 500:
        return Verdict(UNHEALTHY, "unhealthy", f"health endpoint answered {http_status}")
    try:
        data = json.loads(body)
    except ValueError:
        return Verdict(DEGRADED, "degraded", f"health endpoint answered {http_status} without valid JSON")
    if not isinstance(data, dict):
        return Verdict(DEGRADED, "degraded", "health JSON is not an object")
    raw = data.get("status")
    score = _STATUS.get(raw.lower()) if isinstance(raw, str) else None
    if score is None:
        return Verdict(DEGRADED, "degraded", f"health JSON has no known status (got {raw!r})")
    broken = sorted(k for k, v in data.items()
                    if k != "status" and k.endswith("status") and isinstance(v, str) and v.lower() in _BAD_PARTS)
    if broken and score > DEGRADED:
        return Verdict(DEGRADED, "degraded", f"says {raw!r} but {', '.join(broken)} report trouble")
    if http_status >= 400 and score > DEGRADED:
        return Verdict(DEGRADED, "degraded", f"says {raw!r} with HTTP {http_status}")
    return Verdict(score, _status(score), f"says {raw!r}")


def judge_models(http_status: int, body: bytes, headers: dict[str, str]) -> Verdict:
    """OpenAI-style `GET /models`: reachable and authorised, and how close to its rate limit."""
    if http_status in (401, 403):
        return Verdict(UNHEALTHY, "unhealthy", f"key rejected ({http_status})")
    if http_status == 429:
        return Verdict(DEGRADED, "degraded", "rate limited (429)")
    if http_status >= 400:
        return Verdict(UNHEALTHY, "unhealthy", f"/models answered {http_status}")
    try:
        data = json.loads(body)
        listed = isinstance(data, dict) and isinstance(data.get("data"), list)
    except ValueError:
        listed = False
    if not listed:
        return Verdict(DEGRADED, "degraded", "/models did not list models")
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        remaining = float(lower["x-ratelimit-remaining-requests"])
        limit = float(lower["x-ratelimit-limit-requests"])
    except (KeyError, ValueError):
        return Verdict(HEALTHY, "healthy", "lists models")
    if limit > 0 and remaining / limit < 0.1:
        return Verdict(DEGRADED, "degraded", f"{remaining:.0f} of {limit:.0f} requests left in the rate window")
    return Verdict(HEALTHY, "healthy", f"lists models; {remaining:.0f}/{limit:.0f} requests left")
