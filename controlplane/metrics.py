"""Prometheus metrics, read from the live state at scrape time (nothing to keep in sync)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .xds import typeurls

if TYPE_CHECKING:
    from .app import App


class AppCollector(Collector):
    def __init__(self, app: App) -> None:
        self.app = app

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        app = self.app
        state = app.state
        reloads = CounterMetricFamily("llm_lb_config_reloads", "Config file edits, by outcome", labels=["result"])
        reloads.add_metric(["applied"], state.reloads)
        reloads.add_metric(["rejected"], state.rejected)
        yield reloads
        yield GaugeMetricFamily(
            "llm_lb_config_last_edit_ok", "1 if the file on disk is the live config, 0 if its last edit was rejected",
            value=0 if state.errors else 1,
        )
        for name, counter, help_text in (
            ("llm_lb_xds_pushes", app.ads.stats.pushes, "xDS responses sent"),
            ("llm_lb_xds_acks", app.ads.stats.acks, "xDS responses Envoy accepted"),
            ("llm_lb_xds_nacks", app.ads.stats.nacks, "xDS responses Envoy rejected"),
        ):
            family = CounterMetricFamily(name, help_text, labels=["type"])
            for short in typeurls.SHORT.values():
                family.add_metric([short], counter.get(short, 0))
            yield family
        yield GaugeMetricFamily(
            "llm_lb_envoys_connected", "Envoy nodes with an open ADS stream",
            value=sum(1 for n in app.ads.nodes.values() if n.streams > 0),
        )
        yield GaugeMetricFamily(
            "llm_lb_envoys_in_sync", "Envoy nodes that accepted the current snapshot", value=len(app.ads.in_sync())
        )
        weight = GaugeMetricFamily("llm_lb_backend_weight", "Endpoint weight pushed to Envoy", labels=["pool", "backend"])
        for pool, backends in app.weights.items():
            for backend, value in backends.items():
                weight.add_metric([pool, backend], value)
        yield weight
        gauges = {
            "quality": GaugeMetricFamily("llm_lb_backend_quality", "Estimated answer quality (prior + feedback)",
                                         labels=["pool", "backend"]),
            "health": GaugeMetricFamily("llm_lb_backend_health", "Deep health score: 1 healthy, 0.5 degraded, 0 down",
                                        labels=["pool", "backend"]),
            "latency": GaugeMetricFamily("llm_lb_backend_latency_ms", "Latency EWMA from the access log",
                                         labels=["pool", "backend"]),
            "errors": GaugeMetricFamily("llm_lb_backend_error_rate", "Error rate EWMA from the access log",
                                        labels=["pool", "backend"]),
        }
        for (pool, backend), st in app.engine.stats.items():
            gauges["quality"].add_metric([pool, backend], st.quality)
            gauges["health"].add_metric([pool, backend], st.health)
            if st.latency_ewma_ms is not None:
                gauges["latency"].add_metric([pool, backend], st.latency_ewma_ms)
            gauges["errors"].add_metric([pool, backend], st.error_ewma)
        yield from gauges.values()
        spend = CounterMetricFamily("llm_lb_spend", "Money spent, at configured prices", labels=["pool", "backend"])
        tokens = CounterMetricFamily("llm_lb_tokens", "Tokens counted", labels=["pool", "backend", "kind"])
        for (pool, backend), total in app.ledger.spend(0).items():
            spend.add_metric([pool, backend], total.cost)
            tokens.add_metric([pool, backend, "prompt"], total.prompt_tokens)
            tokens.add_metric([pool, backend, "completion"], total.completion_tokens)
        yield spend
        yield tokens
        budget = GaugeMetricFamily("llm_lb_budget_used_ratio", "Share of the budget spent", labels=["pool", "window"])
        for pool, states in app.budgets.items():
            for state in states:
                budget.add_metric([pool, state.window], state.fraction)
        yield budget
        entries = CounterMetricFamily("llm_lb_access_log_entries", "Access log entries received from Envoy")
        entries.add_metric([], app.access_log.entries)
        yield entries
        restarts = CounterMetricFamily("llm_lb_envoy_restarts", "Times the supervised Envoy was restarted")
        restarts.add_metric([], app.envoy.restarts if app.envoy else 0)
        yield restarts


def registry_for(app: App) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AppCollector(app))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
