"""Prometheus metrics, read through the views at scrape time (nothing to keep in sync; no database read).

Names follow Prometheus' conventions: counters end in `_total` (prometheus_client adds it to a
CounterMetricFamily's name), durations are in seconds, and every label set is bounded (pools,
backends, status classes, states, xDS types; model names are capped in telemetry/histograms.py; client
names are the configured ones, plus `(none)` for requests without a valid key; no request ids). A scrape costs O(backends) plus, per backend, one pass over its recent requests.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .controllers.clients import NO_CLIENT
from .telemetry.envoy_hosts import STATES
from .telemetry.recent import STATUS_CLASSES
from .views import Views
from .xds import typeurls

WINDOW_SECONDS = 60.0  # the window of the traffic share, p95 latency and window error rate


class SystemCollector(Collector):
    def __init__(self, views: Views) -> None:
        self.views = views

    def collect(self) -> Iterator[Metric]:
        yield from self._config_and_xds()
        yield from self._backends()
        yield self._suspicious()
        yield from self._spend()
        yield from self._clients()
        yield from self.views.histograms.families()
        yield from self._access_log()
        yield from self._ledger_and_envoy()
        yield from self._alerts()
        yield from self._rollouts()

    def _rollouts(self) -> Iterator[Metric]:
        """Per pool with a rollout: its phase (one series at 1), step, the candidate's share, each gate's
        verdict, the shadow's spend, and the transitions so far (phases and gates are fixed sets)."""
        rollouts = self.views.rollouts
        if rollouts is None:
            return
        phase = GaugeMetricFamily("llm_lb_rollout_phase", "1 for the rollout's phase and stage",
                                  labels=["pool", "stage", "phase"])
        step = GaugeMetricFamily("llm_lb_rollout_step", "The canary's step, from 1 (0 outside canary)", labels=["pool"])
        share = GaugeMetricFamily("llm_lb_rollout_candidate_share",
                                  "The candidate's planned share of its tier's traffic (shadow: mirrored share)",
                                  labels=["pool"])
        gates = GaugeMetricFamily("llm_lb_rollout_gate", "1 for each gate's latest verdict (pass, fail, wait)",
                                  labels=["pool", "gate", "status"])
        spend = GaugeMetricFamily("llm_lb_rollout_shadow_spend_usd", "What the shadow's answers cost so far (USD)",
                                  labels=["pool"])
        for name, report in rollouts.status().items():
            phase.add_metric([name, report["stage"], report["phase"]], 1)
            step.add_metric([name], report["step"] or 0)
            share.add_metric([name], (report["mirror"] or report["share"] or 0.0))
            for gate in report["gates"]:
                gates.add_metric([name, gate["name"], gate["status"]], 1)
            if "shadow" in report:
                spend.add_metric([name], report["shadow"]["spend"])
        yield from (phase, step, share, gates, spend)
        transitions = CounterMetricFamily("llm_lb_rollout_transitions", "Rollout transitions, by the phase entered",
                                          labels=["pool", "phase"])
        for (pool, entered), count in sorted(rollouts.transitions.items()):
            transitions.add_metric([pool, entered], count)
        yield transitions

    def _config_and_xds(self) -> Iterator[Metric]:
        views = self.views
        status = views.config
        reloads = CounterMetricFamily("llm_lb_config_reloads", "Config file edits, by outcome", labels=["result"])
        reloads.add_metric(["applied"], status.reloads)
        reloads.add_metric(["rejected"], status.rejected)
        yield reloads
        yield GaugeMetricFamily(
            "llm_lb_config_last_edit_ok", "1 if the file on disk is the live config, 0 if its last edit was rejected",
            value=0 if status.errors else 1,
        )
        for name, counter, help_text in (
            ("llm_lb_xds_pushes", views.xds.stats.pushes, "xDS responses sent"),
            ("llm_lb_xds_acks", views.xds.stats.acks, "xDS responses Envoy accepted"),
            ("llm_lb_xds_nacks", views.xds.stats.nacks, "xDS responses Envoy rejected"),
        ):
            family = CounterMetricFamily(name, help_text, labels=["type"])
            for short in typeurls.SHORT.values():
                family.add_metric([short], counter.get(short, 0))
            yield family
        refused = CounterMetricFamily("llm_lb_grpc_unauthenticated", "gRPC streams refused for want of a valid token",
                                      labels=["service"])
        for service, count in sorted(views.xds.stats.unauthenticated.items()):
            refused.add_metric([service], count)
        yield refused
        yield GaugeMetricFamily(
            "llm_lb_envoys_connected", "Envoy nodes with an open ADS stream",
            value=views.xds.connected(),
        )
        yield GaugeMetricFamily(
            "llm_lb_envoys_in_sync", "Envoy nodes that accepted the current snapshot", value=len(views.xds.in_sync())
        )

    def _backends(self) -> Iterator[Metric]:
        """Per backend: what the scores use, what the recent requests show, and what Envoy thinks of it."""
        views = self.views
        state = views.state()
        weight = GaugeMetricFamily("llm_lb_backend_weight", "Endpoint weight pushed to Envoy", labels=["pool", "backend"])
        for pool, backends in views.pushed_weights().items():
            for backend, value in backends.items():
                weight.add_metric([pool, backend], value)
        yield weight
        quality = GaugeMetricFamily("llm_lb_backend_quality", "Estimated answer quality (prior + feedback)",
                                    labels=["pool", "backend"])
        health = GaugeMetricFamily("llm_lb_backend_health", "Deep health score: 1 healthy, 0.5 degraded, 0 down",
                                   labels=["pool", "backend"])
        latency = GaugeMetricFamily("llm_lb_backend_latency_seconds", "Request latency EWMA from the access log",
                                    labels=["pool", "backend"], unit="seconds")
        errors = GaugeMetricFamily("llm_lb_backend_error_rate", "Error rate EWMA from the access log",
                                   labels=["pool", "backend"])
        for (pool, backend), st in views.backends.items():
            quality.add_metric([pool, backend], st.quality)
            health.add_metric([pool, backend], st.health)
            if st.latency_ewma_ms is not None:
                latency.add_metric([pool, backend], st.latency_ewma_ms / 1000)
            errors.add_metric([pool, backend], st.error_ewma)
        yield from (quality, health, latency, errors)

        window = f"{WINDOW_SECONDS:g}s"
        requests = CounterMetricFamily("llm_lb_backend_requests", "Requests a backend answered (access log), by "
                                       "HTTP status class ('none': no status, e.g. a reset), since start",
                                       labels=["pool", "backend", "status_class"])
        share = GaugeMetricFamily("llm_lb_backend_traffic_share",
                                  f"Share of the pool's requests this backend answered over the last {window} "
                                  "(0 for all when the pool had none)", labels=["pool", "backend"])
        p95 = GaugeMetricFamily("llm_lb_backend_latency_p95_seconds",
                                f"95th percentile request latency over the last {window} (absent without requests)",
                                labels=["pool", "backend"], unit="seconds")
        window_errors = GaugeMetricFamily("llm_lb_backend_window_error_rate",
                                          f"Share of failed requests over the last {window} (absent without requests)",
                                          labels=["pool", "backend"])
        envoy_state = GaugeMetricFamily("llm_lb_backend_envoy_state",
                                        "1 for the backend's state in Envoy's own view (admin /clusters), 0 for the "
                                        "others; 'unknown' while that view cannot be read",
                                        labels=["pool", "backend", "state"])
        draining = GaugeMetricFamily("llm_lb_backend_draining", "1 if the backend is drained (no new requests)",
                                     labels=["pool", "backend"])
        recent, hosts = views.recent, views.envoy_hosts
        by_class = recent.by_class()
        now = time.time()
        for pool, spec in state.config.pools.items():
            windows = {b: recent.window(pool, b, WINDOW_SECONDS, now) for b in spec.backends}
            total = sum(w.requests for w in windows.values())
            for backend, win in windows.items():
                labels = [pool, backend]
                counts = by_class.get((pool, backend), {})
                for cls in STATUS_CLASSES:
                    requests.add_metric([*labels, cls], counts.get(cls, 0))
                # as Recent.shares(), from the windows already read
                share.add_metric(labels, win.requests / total if total else 0.0)
                if win.p95_seconds is not None:
                    p95.add_metric(labels, win.p95_seconds)
                if win.error_rate is not None:
                    window_errors.add_metric(labels, win.error_rate)
                current = hosts.get(pool, backend)
                for name in STATES:
                    envoy_state.add_metric([*labels, name], 1 if name == current else 0)
                draining.add_metric(labels, 1 if (pool, backend) in state.drained else 0)
        yield from (requests, share, p95, window_errors, envoy_state, draining)

    def _alerts(self) -> Iterator[Metric]:
        counts = self.views.alerts.counters()
        events = CounterMetricFamily("llm_lb_alerts", "Alert events raised, by kind and event (firing, resolved)",
                                     labels=["kind", "event"])
        for event in ("fired", "resolved"):
            for kind, count in sorted(counts[event].items()):
                events.add_metric([kind, "firing" if event == "fired" else "resolved"], count)
        yield events
        active = GaugeMetricFamily("llm_lb_alerts_active", "Alerts firing now, by kind", labels=["kind"])
        for kind, count in sorted(Counter(a["kind"] for a in self.views.alerts.active()).items()):
            active.add_metric([kind], count)
        yield active
        delivery = CounterMetricFamily("llm_lb_alert_deliveries",
                                       "Webhook POSTs by outcome (failed: after every retry; dropped: queue full)",
                                       labels=["outcome"])
        for outcome in ("sent", "failed", "dropped"):
            delivery.add_metric([outcome], sum(counts[outcome].values()))
        yield delivery
        yield GaugeMetricFamily("llm_lb_alert_queue", "Alert events waiting for the rate limit", value=counts["queued"])

    def _suspicious(self) -> CounterMetricFamily:
        """Requests whose usage block could not be true (estimated instead), from each pool's explanation
        (where the engine shows them): a scrape-time read, nothing on the per-request path."""
        views = self.views
        family = CounterMetricFamily(
            "llm_lb_usage_suspicious",
            "Requests whose reported token usage could not be true (negative, not a whole number, over the "
            "cap, or more than the bodies allow): estimated from the body sizes instead", labels=["pool", "backend"])
        for pool in views.state().config.pools:
            try:
                backends = views.explain(pool, None)["backends"]
            except KeyError:  # a pool the scores do not know yet (a reload in progress)
                continue
            for backend, explained in backends.items():
                family.add_metric([pool, backend], explained.get("usage_suspicious", 0))
        return family

    def _spend(self) -> Iterator[Metric]:
        views = self.views
        spend = CounterMetricFamily("llm_lb_spend", "Money spent, at configured prices", labels=["pool", "backend"])
        tokens = CounterMetricFamily("llm_lb_tokens", "Tokens counted", labels=["pool", "backend", "kind"])
        for (pool, backend), total in views.spend.total().items():
            spend.add_metric([pool, backend], total.cost)
            tokens.add_metric([pool, backend, "prompt"], total.prompt_tokens)
            tokens.add_metric([pool, backend, "completion"], total.completion_tokens)
        yield spend
        yield tokens
        budget = GaugeMetricFamily("llm_lb_budget_used_ratio", "Share of the budget spent", labels=["pool", "window"])
        for pool, states in views.budgets().windows.items():
            for window in states:
                budget.add_metric([pool, window.window], window.fraction)
        yield budget

    def _clients(self) -> Iterator[Metric]:
        """Per configured client (and `(none)`): requests and rejections since the start, tokens and spend
        (all time, as llm_lb_spend), and whether Envoy answers it 429 now, by reason."""
        views = self.views
        config = views.state().config
        if not config.clients or views.clients is None:
            return
        names = sorted(config.clients)
        counters = views.clients.counters()
        requests = CounterMetricFamily("llm_lb_client_requests", "Requests Envoy logged per client (rejected ones "
                                       "included) since the control plane started; '(none)': no valid key",
                                       labels=["client"])
        rejections = CounterMetricFamily(
            "llm_lb_client_rejections", "Requests Envoy answered itself per client, by reason: auth (no valid key, "
            "client '(none)'), rate (requests_per_minute), budget (budget exhausted), tokens (tokens_per_minute)",
            labels=["client", "reason"])
        for name in [*names, NO_CLIENT]:
            counts = counters.get(name)
            requests.add_metric([name], counts.requests if counts else 0)
            for reason in (("auth",) if name == NO_CLIENT else ("rate", "budget", "tokens")):
                rejections.add_metric([name, reason], counts.rejected[reason] if counts else 0)
        yield requests
        yield rejections
        spend = CounterMetricFamily("llm_lb_client_spend", "Money spent per client, at configured prices",
                                    labels=["client"])
        tokens = CounterMetricFamily("llm_lb_client_tokens", "Tokens counted per client", labels=["client", "kind"])
        totals = views.spend.by_client()
        for name in names:
            total = totals.get(name)
            spend.add_metric([name], total.cost if total else 0.0)
            tokens.add_metric([name, "prompt"], total.prompt_tokens if total else 0)
            tokens.add_metric([name, "completion"], total.completion_tokens if total else 0)
        yield spend
        yield tokens
        budget_blocks, token_blocks = views.clients.blocks()
        blocked = GaugeMetricFamily("llm_lb_client_blocked", "1 while Envoy answers the client 429 for this reason "
                                    "(budget: its budget is exhausted; tokens: its tokens_per_minute is used up)",
                                    labels=["client", "reason"])
        for name in names:
            blocked.add_metric([name, "budget"], 1 if name in budget_blocks else 0)
            blocked.add_metric([name, "tokens"], 1 if name in token_blocks else 0)
        yield blocked
        used = GaugeMetricFamily("llm_lb_client_budget_used_ratio", "Share of the client's budget spent",
                                 labels=["client", "window"])
        for name, states in views.clients.budgets().windows.items():
            for window in states:
                used.add_metric([name, window.window], window.fraction)
        yield used

    def _access_log(self) -> Iterator[Metric]:
        access_log = self.views.access_log
        entries = CounterMetricFamily("llm_lb_access_log_entries", "Access log entries received from Envoy")
        entries.add_metric([], access_log.entries)
        yield entries
        yield CounterMetricFamily("llm_lb_access_log_messages", "Access log messages (batches) received from Envoy",
                                  value=access_log.messages)
        unusable = CounterMetricFamily("llm_lb_access_log_errors", "Access log entries that could not be used")
        unusable.add_metric([], access_log.errors)
        yield unusable
        streams = CounterMetricFamily(
            "llm_lb_access_log_streams",
            "Access-log streams opened, per Envoy node; each one past a node's worker count is a reconnect, "
            "and entries that Envoy held while it had no stream may be lost (recovered only for the managed Envoy)",
            labels=["node"])
        for node, count in sorted(access_log.streams.items()):
            streams.add_metric([node], count)
        yield streams
        yield GaugeMetricFamily("llm_lb_access_log_ingest_lag_seconds",
                                "For the latest access-log batch: from its last request's end to its arrival here",
                                value=access_log.lag_seconds, unit="seconds")

    def _ledger_and_envoy(self) -> Iterator[Metric]:
        views = self.views
        yield CounterMetricFamily("llm_lb_spend_recovered_requests",
                                  "Requests charged from the managed Envoy's spool file because the ledger lacked "
                                  "them (a crash or an Envoy restart), all time", value=views.spend.recovered.requests)
        yield CounterMetricFamily("llm_lb_ledger_flushes", "Spend batches written to the ledger",
                                  value=views.ledger.flushes)
        yield CounterMetricFamily("llm_lb_ledger_flush_failures",
                                  "Spend batches that could not be written (kept in memory, retried)",
                                  value=views.ledger.failures)
        yield GaugeMetricFamily("llm_lb_ledger_last_flush_timestamp_seconds",
                                "When spend last reached the ledger (0: not yet)", value=views.ledger.last_flush)
        yield GaugeMetricFamily("llm_lb_ledger_pending_rows",
                                "Spend rows in memory, not yet in the ledger: lost if the process dies",
                                value=views.spend.pending)
        yield CounterMetricFamily("llm_lb_snapshot_build_failures",
                                  "Snapshots that could not be built; Envoy kept the last good one",
                                  value=views.build_failures())
        restarts = CounterMetricFamily("llm_lb_envoy_restarts", "Times the supervised Envoy was restarted")
        envoy = views.envoy()
        restarts.add_metric([], envoy.restarts if envoy else 0)
        yield restarts
        hosts = views.envoy_hosts
        yield GaugeMetricFamily("llm_lb_envoy_admin_read_ok",
                                "1 if Envoy's host states (admin /clusters) were read by the latest attempt, else 0 "
                                "(llm_lb_backend_envoy_state then shows 'unknown')",
                                value=1 if hosts.error is None and hosts.read_at > 0 else 0)


def registry_for(views: Views) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SystemCollector(views))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
