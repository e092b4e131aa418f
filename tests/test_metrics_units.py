"""The metrics' parts without processes: recent windows, GenAI histograms, Envoy's host states, and the
whole `/metrics` rendering from fake views (parsed back, also by the strict OpenMetrics parser)."""

from __future__ import annotations

import asyncio
import math
import time
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from controlplane import metrics
from controlplane.alerts import Alerter, Condition
from controlplane.config import Alerts, Config
from controlplane.history import WeightHistory
from controlplane.scoring.budget import BudgetVerdict
from controlplane.scoring.ledger import Spend
from controlplane.scoring.stats import BackendStats
from controlplane.state import DesiredState
from controlplane.telemetry import envoy_hosts, histograms
from controlplane.telemetry.envoy_hosts import EnvoyHosts, host_state, states_from_clusters
from controlplane.telemetry.histograms import GenAiHistograms
from controlplane.telemetry.recent import MAX_AGE, MAX_SAMPLES, Recent, status_class
from controlplane.views import Views
from controlplane.xds.server import XdsStats

from .harness import free_port

NOW = 1_000_000.0


# --- recent.py ---

def test_status_classes() -> None:
    assert [status_class(s) for s in (200, 204, 302, 404, 429, 503, 599)] == \
        ["2xx", "2xx", "3xx", "4xx", "4xx", "5xx", "5xx"]
    assert [status_class(s) for s in (0, 100, 199, 600, -1)] == ["none"] * 5


def test_window_counts_only_the_window_and_its_error_rate() -> None:
    recent = Recent()
    recent.observe(NOW - 120, "p", "a", 503, False, 9.0)  # outside a 60 s window
    for i in range(8):
        recent.observe(NOW - 30 + i, "p", "a", 200, True, 0.1)
    recent.observe(NOW - 1, "p", "a", 500, False, 0.2)
    recent.observe(NOW - 1, "p", "a", 0, False, 0.3)
    win = recent.window("p", "a", 60, NOW)
    assert (win.requests, win.errors) == (10, 2)
    assert win.error_rate == pytest.approx(0.2)
    assert win.p99_seconds == 0.3, "the old 9 s request is out of the window"
    everything = recent.window("p", "a", 10 * MAX_AGE, NOW)  # clamped to MAX_AGE: still all of them here
    assert everything.requests == 11 and everything.p99_seconds == 9.0
    empty = recent.window("p", "nobody", 60, NOW)
    assert (empty.requests, empty.error_rate, empty.p95_seconds) == (0, None, None)
    assert recent.by_class()[("p", "a")] == {"2xx": 8, "3xx": 0, "4xx": 0, "5xx": 2, "none": 1}


def test_window_ignores_samples_older_than_max_age() -> None:
    recent = Recent()
    recent.observe(NOW - MAX_AGE - 1, "p", "a", 200, True, 1.0)
    recent.observe(NOW - 10, "p", "a", 200, True, 2.0)
    assert recent.window("p", "a", 2 * MAX_AGE, NOW).requests == 1


def test_percentiles_are_nearest_rank() -> None:
    recent = Recent()
    for i in range(100, 0, -1):  # 1..100 ms, out of order
        recent.observe(NOW, "p", "a", 200, True, i / 1000)
    win = recent.window("p", "a", 60, NOW)
    assert (win.p50_seconds, win.p95_seconds, win.p99_seconds) == (0.050, 0.095, 0.099)
    for i in range(1, 21):  # 20 values: rank ceil(0.95 * 20) = 19
        recent.observe(NOW, "p", "b", 200, True, float(i))
    assert recent.window("p", "b", 60, NOW).p95_seconds == 19.0
    recent.observe(NOW, "p", "c", 200, True, 4.5)
    one = recent.window("p", "c", 60, NOW)
    assert one.p50_seconds == one.p95_seconds == one.p99_seconds == 4.5


def test_latency_samples_are_bounded_by_count_while_counts_stay_exact() -> None:
    recent = Recent()
    for i in range(MAX_SAMPLES + 100):
        recent.observe(NOW, "p", "a", 200 if i % 4 else 503, i % 4 != 0, float(i))
    window = recent.window("p", "a", 60, NOW)
    assert window.requests == MAX_SAMPLES + 100, "requests and errors are counted per second, not sampled"
    assert window.errors == (MAX_SAMPLES + 100 + 3) // 4
    # percentiles of the last MAX_SAMPLES latencies only (100 .. MAX_SAMPLES + 99), nearest rank
    assert window.p95_seconds == 100 + math.ceil(0.95 * MAX_SAMPLES) - 1
    assert recent.by_class()[("p", "a")]["2xx"] == MAX_SAMPLES + 100 - window.errors, "the counts by class are all time"


def test_counts_per_second_forget_what_is_older_than_the_window() -> None:
    recent = Recent()
    for second in range(0, 400):  # one request a second for 400 s: the ring holds MAX_AGE of them
        recent.observe(NOW - 400 + second + 0.5, "p", "a", 200, True, 0.1)
    assert recent.window("p", "a", 60, NOW).requests == 60
    # capped at the ring's age: the last MAX_AGE seconds, the current one (empty here) included
    assert recent.window("p", "a", 10_000, NOW).requests == MAX_AGE - 1
    assert recent.shares("p", ["a", "b"], 60, NOW) == {"a": 1.0, "b": 0.0}


def test_shares_over_the_window() -> None:
    recent = Recent()  # appended in time order, as the access log does
    recent.observe(NOW - 500, "p", "b", 200, True, 0.1)  # too old
    for _ in range(3):
        recent.observe(NOW - 5, "p", "a", 200, True, 0.1)
    recent.observe(NOW - 5, "p", "b", 503, False, 0.1)
    recent.observe(NOW - 5, "other", "a", 200, True, 0.1)  # another pool
    assert recent.shares("p", ["a", "b", "c"], 60, NOW) == {"a": 0.75, "b": 0.25, "c": 0.0}
    assert recent.shares("p", ["a", "b"], 1, NOW) == {"a": 0.0, "b": 0.0}, "no requests: 0 for all"


def test_retain_forgets_removed_backends() -> None:
    recent = Recent()
    recent.observe(NOW, "p", "a", 200, True, 0.1)
    recent.observe(NOW, "p", "b", 200, True, 0.1)
    recent.retain([("p", "a")])
    assert set(recent.by_class()) == {("p", "a")}
    assert recent.window("p", "b", 60, NOW).requests == 0


# --- histograms.py ---

def parsed(families: Any) -> dict[str, Any]:
    return {f.name: f for f in families}


def buckets_of(family: Any, **labels: str) -> dict[str, float]:
    return {s.labels["le"]: s.value for s in family.samples
            if s.name.endswith("_bucket") and all(s.labels.get(k) == v for k, v in labels.items())}


def test_buckets_are_cumulative_and_a_value_on_a_bound_falls_in_it() -> None:
    h = GenAiHistograms()
    h.observe("p", "a", "m", "m", 0.01, 0.001, 4, 16)  # each exactly on a bound
    h.observe("p", "a", "m", "m", 0.0100001, None, 5, 0)  # just above: the next bucket; no TTFT
    h.observe("p", "a", "m", "m", 1000.0, 100.0, 10**9, 10**9)  # above every bound: only +Inf
    fams = parsed(h.families())
    duration = buckets_of(fams["gen_ai_server_request_duration_seconds"])
    assert duration["0.01"] == 1 and duration["0.02"] == 2 and duration["81.92"] == 2 and duration["+Inf"] == 3
    assert list(duration) == [*map(lambda b: str(float(b)), histograms.DURATION_BUCKETS), "+Inf"]
    ttft = fams["gen_ai_server_time_to_first_token_seconds"]
    assert buckets_of(ttft)["0.001"] == 1 and buckets_of(ttft)["+Inf"] == 2
    count = {s.name: s.value for s in ttft.samples if not s.name.endswith("_bucket")}
    assert count == {"gen_ai_server_time_to_first_token_seconds_count": 2,
                     "gen_ai_server_time_to_first_token_seconds_sum": pytest.approx(100.001)}
    tokens = fams["gen_ai_client_token_usage"]
    inputs = buckets_of(tokens, gen_ai_token_type="input")
    assert (inputs["1.0"], inputs["4.0"], inputs["16.0"], inputs["+Inf"]) == (0, 1, 2, 3)
    outputs = buckets_of(tokens, gen_ai_token_type="output")
    assert (outputs["1.0"], outputs["16.0"], outputs["+Inf"]) == (1, 2, 3), "0 tokens fall in le=1"
    sums = {s.labels["gen_ai_token_type"]: s.value for s in tokens.samples if s.name.endswith("_sum")}
    assert sums == {"input": 4 + 5 + 10**9, "output": 16 + 10**9}


def test_ttft_series_absent_until_a_first_byte_is_known() -> None:
    h = GenAiHistograms()
    h.observe("p", "a", "m", "m", 0.5, None, 1, 1)
    fams = parsed(h.families())
    assert fams["gen_ai_server_time_to_first_token_seconds"].samples == []
    assert fams["gen_ai_server_request_duration_seconds"].samples


def test_model_labels_are_bounded_per_backend() -> None:
    h = GenAiHistograms()
    for i in range(histograms.MAX_MODELS + 5):
        h.observe("p", "a", f"req-{i}", f"served-{i}", 0.1, 0.01, 1, 1)
    h.observe("p", "a", "req-0", "served-0", 0.1, 0.01, 1, 1)  # a pair already kept keeps its own series
    h.observe("p", "b", "req-x", "served-x", 0.1, 0.01, 1, 1)  # another backend has its own allowance
    counts = {(s.labels["backend"], s.labels["gen_ai_request_model"], s.labels["gen_ai_response_model"]): s.value
              for s in parsed(h.families())["gen_ai_server_request_duration_seconds"].samples
              if s.name.endswith("_count")}
    kept = {k for k in counts if k[0] == "a" and k[1] != histograms.OTHER_MODEL}
    assert len(kept) == histograms.MAX_MODELS
    assert counts[("a", histograms.OTHER_MODEL, histograms.OTHER_MODEL)] == 5
    assert counts[("a", "req-0", "served-0")] == 2
    assert counts[("b", "req-x", "served-x")] == 1
    assert len(counts) == histograms.MAX_MODELS + 2


def test_histogram_retain_drops_removed_backends_and_their_model_allowance() -> None:
    h = GenAiHistograms()
    for i in range(histograms.MAX_MODELS):
        h.observe("p", "gone", f"m{i}", f"m{i}", 0.1, None, 1, 1)
    h.observe("p", "kept", "m", "m", 0.1, None, 1, 1)
    h.retain({("p", "kept")})
    labels = {s.labels["backend"] for s in parsed(h.families())["gen_ai_server_request_duration_seconds"].samples}
    assert labels == {"kept"}
    h.observe("p", "gone", "new", "new", 0.1, None, 1, 1)  # back with a fresh allowance
    models = {s.labels["gen_ai_request_model"] for s in parsed(h.families())["gen_ai_client_token_usage"].samples
              if s.labels["backend"] == "gone"}
    assert models == {"new"}


# --- envoy_hosts.py ---

def config(**pools: dict[str, str]) -> Config:
    return Config.model_validate({"pools": {
        name: {"match": {"prefix": f"/{name}/"}, "backends": {b: {"url": url} for b, url in backends.items()}}
        for name, backends in pools.items()}})


def host(address: str, port: int, **health: Any) -> dict[str, Any]:
    return {"address": {"socket_address": {"address": address, "port_value": port}}, "health_status": health}


CLUSTERS = {"cluster_statuses": [
    {"name": "chat", "host_statuses": [
        host("127.0.0.1", 9001, eds_health_status="HEALTHY"),
        host("127.0.0.1", 9002, eds_health_status="HEALTHY", failed_outlier_check=True),
        host("127.0.0.1", 9003, eds_health_status="HEALTHY", failed_active_health_check=True,
             failed_outlier_check=True),
        host("127.0.0.1", 9004, eds_health_status="DRAINING"),
        host("10.0.0.7", 443, eds_health_status="HEALTHY", pending_dynamic_removal=True),
        host("127.0.0.1", 9999, eds_health_status="HEALTHY"),  # not in the config: ignored
    ]},
    {"name": "embed", "host_statuses": [host("127.0.0.1", 9001, failed_active_health_check=True)]},
    {"name": "not-a-pool", "host_statuses": [host("127.0.0.1", 9006)]},
]}


def desired() -> DesiredState:
    cfg = config(
        chat={"ok": "http://127.0.0.1:9001", "ejected": "http://127.0.0.1:9002", "failing": "http://127.0.0.1:9003",
              "drained": "http://127.0.0.1:9004", "named": "https://llm.example", "gone": "http://127.0.0.1:9005"},
        embed={"same-address": "http://127.0.0.1:9001"})
    return DesiredState(cfg, addresses={"llm.example": "10.0.0.7"})


def test_host_state_the_worst_reason_wins() -> None:
    assert host_state({}) == envoy_hosts.HEALTHY
    assert host_state({"eds_health_status": "HEALTHY"}) == envoy_hosts.HEALTHY
    assert host_state({"failed_outlier_check": True}) == envoy_hosts.EJECTED
    assert host_state({"failed_outlier_check": True, "failed_active_health_check": True}) == envoy_hosts.FAILING
    assert host_state({"eds_health_status": "DRAINING", "failed_outlier_check": True}) == envoy_hosts.EJECTED
    assert host_state({"eds_health_status": "DRAINING"}) == envoy_hosts.DRAINING
    assert host_state({"pending_dynamic_removal": True}) == envoy_hosts.DRAINING


def test_states_from_clusters_by_pool_and_address() -> None:
    assert states_from_clusters(CLUSTERS, desired()) == {
        ("chat", "ok"): "healthy",
        ("chat", "ejected"): "ejected",
        ("chat", "failing"): "failing_active_checks",
        ("chat", "drained"): "draining",
        ("chat", "named"): "draining",  # found by its resolved address
        ("chat", "gone"): "absent",
        ("embed", "same-address"): "failing_active_checks",  # same address, other cluster: its own state
    }
    assert set(states_from_clusters({}, desired()).values()) == {"absent"}
    assert set(states_from_clusters({"cluster_statuses": None}, desired()).values()) == {"absent"}


def test_envoy_hosts_poll_reads_admin_and_forgets_on_failure() -> None:
    async def scenario() -> None:
        answer: dict[str, Any] = {"status": 200, "body": CLUSTERS}

        async def clusters(request: web.Request) -> web.Response:
            assert request.query.get("format") == "json"
            return web.json_response(answer["body"], status=answer["status"])

        app = web.Application()
        app.router.add_get("/clusters", clusters)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url: dict[str, str | None] = {"admin": f"http://127.0.0.1:{port}"}
        hosts = EnvoyHosts(lambda: url["admin"], desired)
        assert hosts.get("chat", "ok") == envoy_hosts.UNKNOWN and hosts.read_at == 0
        try:
            async with aiohttp.ClientSession() as session:
                await hosts.poll(session)
                assert hosts.error is None and hosts.read_at > 0
                assert hosts.get("chat", "ejected") == "ejected"
                answer["status"] = 500
                await hosts.poll(session)
                assert hosts.error is not None and "500" in hosts.error
                assert hosts.states == {} and hosts.get("chat", "ejected") == envoy_hosts.UNKNOWN
                answer.update(status=200, body=[1, 2])
                await hosts.poll(session)
                assert hosts.error is not None and "not a JSON object" in hosts.error
                url["admin"] = None
                await hosts.poll(session)
                assert hosts.error is not None and hosts.states == {}
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


# --- metrics.py, from fake views ---

def fake_views(hosts_error: str | None = None) -> Views:
    cfg = config(chat={"a": "http://127.0.0.1:9001", "b": "http://127.0.0.1:9002", "idle": "http://127.0.0.1:9003"})
    state = DesiredState(cfg, weights={"chat": {"a": 3, "b": 1, "idle": 1}}, drained=frozenset({("chat", "idle")}))
    recent = Recent()
    now = time.time()
    for i in range(20):
        recent.observe(now - 1, "chat", "a", 200, True, (i + 1) / 100)
    for status in (200, 200, 503, 404, 0):
        recent.observe(now - 1, "chat", "b", status, 0 < status < 500, 0.5)
    recent.observe(now - 3600, "chat", "gone", 200, True, 0.1)  # a removed backend: not in the config
    gen_ai = GenAiHistograms()
    gen_ai.observe("chat", "a", "gpt-x", "gpt-x-2024", 0.25, 0.05, 12, 34)
    stats = {("chat", "a"): BackendStats(0.5, 10, latency_ewma_ms=250.0, error_ewma=0.1),
             ("chat", "b"): BackendStats(0.7, 10)}
    hosts = EnvoyHosts(lambda: None, lambda: state)
    hosts.states = {("chat", "a"): "healthy", ("chat", "b"): "ejected", ("chat", "idle"): "draining"}
    hosts.read_at, hosts.error = (0.0, hosts_error) if hosts_error else (now, None)
    xds = XdsStats(pushes={"CDS": 2, "EDS": 5}, acks={"CDS": 2, "EDS": 4}, nacks={"EDS": 1})
    fake: Any = SimpleNamespace
    alerter = Alerter(lambda: Alerts())  # no webhook: tracked and counted, nothing sent
    alerter.update([Condition("backend_ejected", "backend_ejected:chat:b", "b is ejected", "chat", "b"),
                    Condition("error_rate", "error_rate:chat:b", "b fails", "chat", "b")], now=now - 60)
    alerter.update([Condition("backend_ejected", "backend_ejected:chat:b", "b is ejected", "chat", "b")], now=now)
    return Views(
        config=fake(reloads=2, rejected=1, errors=[], path=None, digest="d", loaded_at=0.0, restart_pending=[]),
        state=lambda: state, published=lambda: state, build_failures=lambda: 0, snapshot=lambda: None,
        xds=fake(stats=xds, in_sync=lambda: ["n1"], connected=lambda: 1, node_status=lambda: []),
        backends=stats,
        explain=lambda pool, _: {"backends": {"a": {"usage_suspicious": 1}, "b": {}, "idle": {}}},
        spend=fake(total=lambda: {("chat", "a"): Spend(20, 240, 680, 1.25)}, pending=3, recovered=Spend(2)),
        ledger=fake(flushes=4, failures=0, last_flush=123.0),
        budgets=lambda: BudgetVerdict(),
        access_log=fake(messages=3, entries=25, errors=0, streams={"node": 2}, lag_seconds=0.125),
        envoy=lambda: None,
        recent=recent, histograms=gen_ai, envoy_hosts=hosts, history=WeightHistory(), alerts=alerter,
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def one(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def test_rendering_every_family_from_the_views() -> None:
    text = metrics.render(metrics.registry_for(fake_views())).decode()
    found = samples(text)
    a, b, idle = ({"pool": "chat", "backend": n} for n in ("a", "b", "idle"))
    # requests by class: every configured backend, every class, zeros included; nothing for removed ones
    assert one(found, "llm_lb_backend_requests_total", **a, status_class="2xx") == 20
    assert [one(found, "llm_lb_backend_requests_total", **b, status_class=c)
            for c in ("2xx", "3xx", "4xx", "5xx", "none")] == [2, 0, 1, 1, 1]
    assert all(one(found, "llm_lb_backend_requests_total", **idle, status_class=c) == 0
               for c in ("2xx", "3xx", "4xx", "5xx", "none"))
    assert not any(dict(labels).get("backend") == "gone" for _, labels in found)
    # alerts: both fired, one resolved, one firing now; nothing sent without a webhook
    assert one(found, "llm_lb_alerts_total", kind="backend_ejected", event="firing") == 1
    assert one(found, "llm_lb_alerts_total", kind="error_rate", event="resolved") == 1
    assert one(found, "llm_lb_alerts_active", kind="backend_ejected") == 1
    assert ("llm_lb_alerts_active", (("kind", "error_rate"),)) not in found
    assert one(found, "llm_lb_alert_deliveries_total", outcome="sent") == 0
    # the 60 s window
    assert one(found, "llm_lb_backend_traffic_share", **a) == 0.8
    assert one(found, "llm_lb_backend_traffic_share", **b) == 0.2
    assert one(found, "llm_lb_backend_traffic_share", **idle) == 0
    assert one(found, "llm_lb_backend_latency_p95_seconds", **a) == 0.19
    assert one(found, "llm_lb_backend_window_error_rate", **a) == 0
    assert one(found, "llm_lb_backend_window_error_rate", **b) == 0.4
    assert ("llm_lb_backend_latency_p95_seconds", tuple(sorted(idle.items()))) not in found, "no requests: absent"
    assert ("llm_lb_backend_window_error_rate", tuple(sorted(idle.items()))) not in found
    # EWMA latency in seconds (the old _ms gauge is gone)
    assert one(found, "llm_lb_backend_latency_seconds", **a) == 0.25
    assert ("llm_lb_backend_latency_seconds", tuple(sorted(b.items()))) not in found, "no latency yet"
    assert "llm_lb_backend_latency_ms" not in text
    # Envoy's view: one 1 per backend, every state listed
    for labels, expected in ((a, "healthy"), (b, "ejected"), (idle, "draining")):
        states = {s: one(found, "llm_lb_backend_envoy_state", **labels, state=s) for s in envoy_hosts.STATES}
        assert states == {s: (1 if s == expected else 0) for s in envoy_hosts.STATES}
    assert [one(found, "llm_lb_backend_draining", **x) for x in (a, b, idle)] == [0, 0, 1]
    assert one(found, "llm_lb_envoy_admin_read_ok") == 1
    assert one(found, "llm_lb_access_log_ingest_lag_seconds") == 0.125
    assert one(found, "llm_lb_access_log_entries_total") == 25
    # kept as they were
    assert one(found, "llm_lb_backend_weight", **a) == 3
    assert one(found, "llm_lb_spend_total", **a) == 1.25
    assert one(found, "llm_lb_tokens_total", **a, kind="completion") == 680
    assert one(found, "llm_lb_xds_nacks_total", type="EDS") == 1
    assert one(found, "llm_lb_usage_suspicious_total", **a) == 1
    assert one(found, "llm_lb_config_reloads_total", result="rejected") == 1
    # the GenAI histograms
    model = {"gen_ai_request_model": "gpt-x", "gen_ai_response_model": "gpt-x-2024"}
    assert one(found, "gen_ai_server_request_duration_seconds_count", **a, **model) == 1
    assert one(found, "gen_ai_server_time_to_first_token_seconds_bucket", **a, **model, le="0.06") == 1
    assert one(found, "gen_ai_client_token_usage_sum", **a, **model, gen_ai_token_type="output") == 34


def test_unknown_envoy_view_and_the_strict_openmetrics_parser() -> None:
    views = fake_views(hosts_error="ClientConnectorError: refused")
    views.envoy_hosts.states = {}
    registry = metrics.registry_for(views)
    found = samples(metrics.render(registry).decode())
    assert one(found, "llm_lb_envoy_admin_read_ok") == 0
    assert one(found, "llm_lb_backend_envoy_state", pool="chat", backend="a", state="unknown") == 1
    # OpenMetrics' parser checks what the Prometheus text parser lets pass: histogram buckets sorted,
    # cumulative, ending in +Inf equal to _count; counters named without _total; units in the names.
    exposed = openmetrics_latest(registry).decode()  # type: ignore[no-untyped-call]
    families = {f.name: f for f in openmetrics_families(exposed)}  # type: ignore[no-untyped-call]
    assert families["gen_ai_server_request_duration_seconds"].unit == "seconds"
    assert families["llm_lb_backend_latency_p95_seconds"].unit == "seconds"
    assert families["llm_lb_backend_requests"].type == "counter"
    assert families["gen_ai_client_token_usage"].type == "histogram"
    assert all(math.isfinite(s.value) for f in families.values() for s in f.samples)
