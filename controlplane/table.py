"""`controlplane status` as a table: what an operator reads first, from the API's JSON (pure: JSON in, text out)."""

from __future__ import annotations

from typing import Any

COLUMNS = ("POOL", "BACKEND", "STATE", "WEIGHT", "SHARE", "P95", "ERRORS", "QUALITY", "SPEND/DAY")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def state_of(backend: dict[str, Any]) -> str:
    """Envoy's view first; ours (draining, deep health) where it says more."""
    state = str(backend.get("envoy_state") or "unknown")
    if backend.get("draining"):
        return "draining"
    health = backend.get("health") or {}
    if state in ("healthy", "unknown") and health.get("status") in ("unhealthy", "degraded"):
        return f"{state}/{health['status']}"
    return state


def rows(pools: dict[str, Any]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for pname, pool in pools.get("pools", {}).items():
        for bname, b in pool.get("backends", {}).items():
            weight = "-" if b.get("weight") is None else str(b["weight"])
            quality = b.get("quality")
            out.append((
                pname, bname, state_of(b), weight, _percent(b.get("traffic_share")),
                _seconds(b.get("latency_p95_seconds")), _percent(b.get("error_rate")),
                "-" if quality is None else f"{quality:.2f}", f"{(b.get('spend') or {}).get('day', 0.0):.4f}",
            ))
    return out


def status_table(status: dict[str, Any], pools: dict[str, Any]) -> str:
    config = status.get("config", {})
    head = (f"config {str(config.get('version', '?'))[:12]} ({config.get('last_edit', '?')}), "
            f"{len(status.get('in_sync', []))}/{len(status.get('nodes', []))} Envoys in sync")
    lines = [head]
    for error in config.get("errors", []):
        lines.append(f"  rejected edit: {error}")
    for alert in status.get("alerts", []) or []:
        lines.append(f"  ALERT {alert.get('kind')}: {alert.get('message')}")
    table = [COLUMNS, *rows(pools)]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines.append("")
    for row in table:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    lines.append("(SHARE: of the pool's requests in the last minute; P95, ERRORS: the last minute)")
    return "\n".join(lines)
