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


def rollout_text(report: dict[str, Any]) -> str:
    """`controlplane rollout status POOL`: where the rollout is, each gate, and the arms side by side."""
    where = f"stage {report.get('stage')}"
    if report.get("step") is not None:
        steps = report.get("steps") or []
        where += f", step {report['step']} of {len(steps)} ({steps[report['step'] - 1]:g}%)" if steps else ""
    lines = [f"{report.get('pool')}: {report.get('phase')} ({where}), candidate {report.get('candidate')} "
             f"vs {', '.join(report.get('baseline') or [])}",
             f"  {report.get('reason', '')}",
             f"  step time {report.get('step_elapsed_seconds', 0):g}s of {report.get('step_duration_seconds', 0):g}s"]
    for gate in report.get("gates") or []:
        lines.append(f"  gate {gate['name']:<18} {gate['status']:<5} {gate['detail']}")
    cand, base = report.get("candidate_arm") or {}, report.get("baseline_arm") or {}
    for key in ("requests", "error_rate", "ttfb_p95_ms", "token_latency_p95_ms", "cost_per_request", "quality"):
        lines.append(f"  {key:<22} candidate {_cell(cand.get(key)):>12}   baseline {_cell(base.get(key)):>12}")
    shadow = report.get("shadow")
    if shadow:
        lines.append(f"  shadow spend {shadow['spend']:.4f} of {shadow['budget']:g} USD")
    readout = report.get("readout")
    if readout:
        for metric in ("error_rate", "ttfb_ms", "cost_per_request", "quality"):
            m = readout.get(metric) or {}
            flag = "SIGNIFICANT" if m.get("significant") else "no clear difference"
            lines.append(f"  A/B {metric:<18} difference {_cell(m.get('difference'))} "
                         f"interval {m.get('difference_interval')}: {flag}")
        srm = readout.get("srm") or {}
        if srm.get("mismatch"):
            lines.append(f"  SAMPLE RATIO MISMATCH: {srm.get('observed')} (p={srm.get('p_value')})")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
