"""`/metrics` after real traffic through Envoy agrees with what the mock backends counted.

Bounded: 40 requests (a quarter of them streamed), then a few more after one backend is killed.
"""

from __future__ import annotations

import http.client
import json
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .harness import ControlPlane, MockBackend, http_json, wait_for

pytestmark = pytest.mark.e2e

MODEL = "metrics-model-7"
REQUESTS = 40
CLIENTS = 4

FAMILIES = {
    # name as the parser reports it (counters without `_total`) -> type
    "llm_lb_config_reloads": "counter",
    "llm_lb_config_last_edit_ok": "gauge",
    "llm_lb_xds_pushes": "counter",
    "llm_lb_xds_acks": "counter",
    "llm_lb_xds_nacks": "counter",
    "llm_lb_envoys_connected": "gauge",
    "llm_lb_envoys_in_sync": "gauge",
    "llm_lb_backend_weight": "gauge",
    "llm_lb_backend_quality": "gauge",
    "llm_lb_backend_health": "gauge",
    "llm_lb_backend_latency_seconds": "gauge",
    "llm_lb_backend_error_rate": "gauge",
    "llm_lb_backend_requests": "counter",
    "llm_lb_backend_traffic_share": "gauge",
    "llm_lb_backend_latency_p95_seconds": "gauge",
    "llm_lb_backend_window_error_rate": "gauge",
    "llm_lb_backend_envoy_state": "gauge",
    "llm_lb_backend_draining": "gauge",
    "llm_lb_usage_suspicious": "counter",
    "llm_lb_spend": "counter",
    "llm_lb_tokens": "counter",
    "llm_lb_budget_used_ratio": "gauge",
    "llm_lb_access_log_entries": "counter",
    "llm_lb_access_log_messages": "counter",
    "llm_lb_access_log_errors": "counter",
    "llm_lb_access_log_streams": "counter",
    "llm_lb_access_log_ingest_lag_seconds": "gauge",
    "llm_lb_envoy_admin_read_ok": "gauge",
    "llm_lb_envoy_restarts": "counter",
    "gen_ai_server_request_duration_seconds": "histogram",
    "gen_ai_server_time_to_first_token_seconds": "histogram",
    "gen_ai_client_token_usage": "histogram",
}


class Scrape:
    """One parsed `/metrics` answer."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def samples(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """Samples called `name` whose labels include `labels`."""
        family = name
        for suffix in ("_total", "_bucket", "_count", "_sum"):
            if name.endswith(suffix) and name[: -len(suffix)] in self.families:
                family = name[: -len(suffix)]
        if family not in self.families:
            return []
        return [(s.labels, s.value) for s in self.families[family].samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        found = self.samples(name, **labels)
        assert len(found) == 1, (name, labels, found)
        return found[0][1]

    def total(self, name: str, **labels: str) -> float:
        return sum(v for _, v in self.samples(name, **labels))

    def state(self, backend: str) -> str | None:
        on = [lb["state"] for lb, v in self.samples("llm_lb_backend_envoy_state", pool="chat", backend=backend)
              if v == 1]
        return on[0] if len(on) == 1 else None


def scrape(cp: ControlPlane) -> Scrape:
    with urllib.request.urlopen(f"{cp.api}/metrics", timeout=5) as resp:
        return Scrape(resp.read().decode())


def body(stream: bool) -> bytes:
    """A chat request naming MODEL; a stream asks for its usage chunk, so tokens are counted, not estimated."""
    doc: dict[str, Any] = {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": "hello there"}]}
    if stream:
        doc["stream_options"] = {"include_usage": True}
    return json.dumps(doc).encode()


def send(listener: str, count: int, stream_every: int = 0) -> list[tuple[int, str, str]]:
    """`count` requests on one keep-alive connection: (status, x-backend, x-request-id) each."""
    out = []
    conn = http.client.HTTPConnection(listener, timeout=10)
    try:
        for i in range(count):
            stream = bool(stream_every) and i % stream_every == 0
            try:
                conn.request("POST", "/v1/chat/completions", body=body(stream),
                             headers={"content-type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                out.append((resp.status, resp.getheader("x-backend", ""), resp.getheader("x-request-id", "")))
            except (OSError, http.client.HTTPException):
                out.append((0, "", ""))
                conn.close()
                conn = http.client.HTTPConnection(listener, timeout=10)
    finally:
        conn.close()
    return out


def test_metrics_agree_with_the_backends_and_show_envoys_view(tmp_path: Path, mocks: Callable[..., MockBackend]) -> None:
    backends: dict[str, MockBackend] = {"a": mocks("a"), "b": mocks("b", "--completion-tokens", "23")}
    pools = {"chat": {
        "match": {"prefix": "/v1/"},
        "timeout": "10s",
        "health_check": {"interval": "1s", "timeout": "1s", "unhealthy_threshold": 2, "healthy_threshold": 1},
        "outlier_detection": {"consecutive_5xx": 2, "consecutive_gateway_failure": 2, "interval": "1s"},
        "backends": {name: {"url": m.url} for name, m in backends.items()},
    }}
    cp = ControlPlane(tmp_path, pools)
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = [r for part in pool.map(lambda _: send(cp.listener, REQUESTS // CLIENTS, stream_every=4),
                                              range(CLIENTS)) for r in part]
        assert Counter(status for status, _, _ in results) == {200: REQUESTS}, results
        request_ids = {rid for _, _, rid in results}
        assert len(request_ids) == REQUESTS and "" not in request_ids
        served = {name: http_json("GET", f"{m.url}/admin/stats")[1] for name, m in backends.items()}
        assert sum(s["requests"] for s in served.values()) == REQUESTS
        assert all(s["requests"] > 0 for s in served.values()), served  # both in rotation

        def counted() -> Scrape | None:
            m = scrape(cp)
            done = m.total("llm_lb_backend_requests_total", pool="chat") == REQUESTS
            known = all(m.state(b) == "healthy" for b in backends) and m.value("llm_lb_envoy_admin_read_ok") == 1
            return m if done and known else None

        m = wait_for(counted, timeout=15, interval=0.2, what="every request in /metrics and both backends healthy")
        assert m is not None

        missing = {name: kind for name, kind in FAMILIES.items()
                   if name not in m.families or m.families[name].type != kind}
        assert not missing, missing
        for name, mock in served.items():
            labels = {"pool": "chat", "backend": name}
            assert m.value("llm_lb_backend_requests_total", **labels, status_class="2xx") == mock["requests"]
            for cls in ("3xx", "4xx", "5xx", "none"):
                assert m.value("llm_lb_backend_requests_total", **labels, status_class=cls) == 0
            assert m.value("gen_ai_client_token_usage_sum", **labels, gen_ai_token_type="input") \
                == mock["prompt_tokens"]
            assert m.value("gen_ai_client_token_usage_sum", **labels, gen_ai_token_type="output") \
                == mock["completion_tokens"]
            assert m.value("gen_ai_client_token_usage_count", **labels, gen_ai_token_type="output") == mock["requests"]
            assert m.value("gen_ai_server_request_duration_seconds_count", **labels) == mock["requests"]
            assert m.value("gen_ai_server_request_duration_seconds_sum", **labels) > 0
            assert m.value("gen_ai_server_time_to_first_token_seconds_count", **labels) > 0
            assert m.value("llm_lb_tokens_total", **labels, kind="prompt") == mock["prompt_tokens"]
            assert m.value("llm_lb_tokens_total", **labels, kind="completion") == mock["completion_tokens"]
            assert m.value("llm_lb_backend_latency_seconds", **labels) > 0
            assert 0 < m.value("llm_lb_backend_latency_p95_seconds", **labels) < 10
            assert m.value("llm_lb_backend_window_error_rate", **labels) == 0
            assert m.value("llm_lb_backend_draining", **labels) == 0
            assert mock["models"] == {MODEL: mock["requests"]}
            states = {lb["state"]: v for lb, v in m.samples("llm_lb_backend_envoy_state", **labels)}
            assert states == {"healthy": 1, "ejected": 0, "failing_active_checks": 0, "draining": 0, "absent": 0,
                              "unknown": 0}
        for family in ("gen_ai_server_request_duration_seconds", "gen_ai_server_time_to_first_token_seconds",
                       "gen_ai_client_token_usage"):
            samples = m.samples(f"{family}_count")
            assert samples and all(lb["gen_ai_request_model"] == MODEL and lb["gen_ai_response_model"] == MODEL
                                   for lb, _ in samples), samples
            check_histograms(m, family)
        shares = [v for _, v in m.samples("llm_lb_backend_traffic_share", pool="chat")]
        assert len(shares) == 2 and sum(shares) == pytest.approx(1.0)
        assert m.total("llm_lb_xds_pushes_total") > 0 and m.total("llm_lb_xds_acks_total") > 0
        assert m.total("llm_lb_xds_nacks_total") == 0
        assert m.value("llm_lb_envoys_connected") == 1 and m.value("llm_lb_envoys_in_sync") == 1
        assert m.value("llm_lb_access_log_entries_total") >= REQUESTS
        assert m.value("llm_lb_access_log_errors_total") == 0
        assert 0 <= m.value("llm_lb_access_log_ingest_lag_seconds") < 30
        labels_seen = {v for f in m.families.values() for s in f.samples for v in s.labels.values()}
        assert not labels_seen & request_ids, "a request id became a label value"
        assert not any(rid in m.text for rid in request_ids)

        # One backend dies: Envoy's own view of it (read from its /clusters) turns to ejected or failing.
        victim = backends["b"]
        victim.proc.kill()
        victim.proc.wait(10)
        after = send(cp.listener, 10)
        assert all(backend == "a" for status, backend, _ in after if status == 200), after

        def gone() -> Scrape | None:
            m = scrape(cp)
            return m if m.state("b") in ("ejected", "failing_active_checks") else None

        m = wait_for(gone, timeout=20, interval=0.2, what="the killed backend to show as ejected or failing")
        assert m is not None
        assert m.state("a") == "healthy"
        assert m.value("llm_lb_envoy_admin_read_ok") == 1
    finally:
        cp.stop()


def check_histograms(m: Scrape, family: str) -> None:
    """Each series: cumulative buckets that never fall, ending in +Inf equal to its count."""
    series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    for labels, value in m.samples(f"{family}_bucket"):
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        series.setdefault(key, []).append((float(labels["le"]), value))
    assert series, family
    for key, buckets in series.items():
        buckets.sort()
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), (family, key, buckets)
        assert buckets[-1][0] == float("inf")
        assert buckets[-1][1] == m.value(f"{family}_count", **dict(key))
