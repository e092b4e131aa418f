"""Routing outcome: the simulator's table for the shipped workload (the live scoring engine, simulated backends)."""

from __future__ import annotations

from controlplane.scoring.simulator import ORACLE, TELEMETRY_STRATEGIES, load_workload, simulate

from .common import ROOT, Context, Row

WORKLOAD = ROOT / "configs" / "workloads" / "heterogeneous.yaml"


def run(ctx: Context) -> list[Row]:
    workload = load_workload(WORKLOAD)
    assert workload.config is not None, f"{WORKLOAD} embeds its config"
    requests = 500 if ctx.smoke else None
    results = {s: simulate(workload.config, workload, s, requests)
               for s in dict.fromkeys([*TELEMETRY_STRATEGIES, "round_robin", ORACLE])}
    rr, oracle = results["round_robin"], results[ORACLE]
    rows = []
    for name, r in results.items():
        vs_rr = f"{100 * (r.total_cost / rr.total_cost - 1):+.0f}% vs round robin" if rr.total_cost else ""
        vs_oracle = f"{100 * r.mean_reward / oracle.mean_reward:.0f}%" if oracle.mean_reward else "-"
        rows.append(Row(
            "outcome", name, r.total_cost, "cost",
            note=(f"{vs_rr}; quality {r.mean_quality:.3f} ({r.mean_quality_ok:.3f} of successes); "
                  f"p95 {r.p95_latency_ms:.0f} ms; errors {100 * r.error_rate:.1f}%; "
                  f"reward {vs_oracle} of the oracle's"),
        ))
    return rows
