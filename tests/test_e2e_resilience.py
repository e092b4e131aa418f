"""Failures handled in the data plane: dead and flaky backends, failover, overflow, slow hosts.

Bounded load: 20 keep-alive clients for a few seconds, all on loopback.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from .harness import ControlPlane, Load, MockBackend, http_json, spread, wait_for

pytestmark = pytest.mark.e2e


def chat_pool(backends: dict[str, MockBackend], **pool: object) -> dict:
    spec = {name: {"url": b.url} for name, b in backends.items()}
    for name, extra in pool.pop("per_backend", {}).items():  # type: ignore[union-attr]
        spec[name].update(extra)
    return {"chat": {"match": {"prefix": "/v1/"}, "timeout": "20s", **pool, "backends": spec}}


def test_backend_killed_under_load_fails_no_request_and_is_ejected_fast(tmp_path, mocks):
    backends = {n: mocks(n) for n in ("a", "b", "c")}
    cp = ControlPlane(tmp_path, chat_pool(backends))
    try:
        with Load(cp.listener, clients=20, max_seconds=30) as load:
            load.wait_requests(500)
            victim = backends["c"]
            os.kill(victim.proc.pid, signal.SIGKILL)
            killed_at = time.monotonic()

            def ejected() -> bool:
                health = cp.envoy_hosts("chat")[victim.port]["health"]
                return bool(health.get("failed_outlier_check") or health.get("failed_active_health_check"))

            wait_for(ejected, timeout=10, interval=0.02, what="Envoy to eject the killed backend")
            detected_after = time.monotonic() - killed_at
            load.wait_requests(1000)
        assert load.statuses == {200: load.total}, load.failures
        assert detected_after <= 1.0, f"ejected only after {detected_after:.2f}s"
        assert load.backends["a"] > 0 and load.backends["b"] > 0
    finally:
        cp.stop()


def test_half_failing_backend_is_ejected_and_clients_see_no_5xx(tmp_path, mocks):
    backends = {"good-1": mocks("good-1"), "good-2": mocks("good-2"), "flaky": mocks("flaky", "--error-rate", "0.5")}
    cp = ControlPlane(tmp_path, chat_pool(backends))
    try:
        with Load(cp.listener, clients=20, max_seconds=30) as load:
            wait_for(
                lambda: cp.envoy_stats("cluster.chat.outlier_detection").get(
                    "cluster.chat.outlier_detection.ejections_enforced_total", 0) >= 1,
                timeout=20, what="outlier detection to eject the flaky backend",
            )
            load.wait_requests(500)
        assert load.statuses == {200: load.total}, load.failures
        stats = cp.envoy_stats("cluster.chat.upstream_rq_retry")
        assert stats["cluster.chat.upstream_rq_retry"] > 0, "the flaky backend's 503s were retried elsewhere"
    finally:
        cp.stop()


def test_tier_one_serves_only_while_tier_zero_is_down(tmp_path, mocks):
    backends = {n: mocks(n) for n in ("primary-1", "primary-2", "standby")}
    check = {"path": "/health", "interval": "200ms", "timeout": "1s", "healthy_threshold": 1, "unhealthy_threshold": 1}
    cp = ControlPlane(tmp_path, chat_pool(backends, health_check=check, per_backend={"standby": {"priority": 1}}))
    try:
        counts, statuses = spread(cp.listener, 200, clients=4)
        assert statuses == {200: 200} and counts["standby"] == 0, counts

        for name in ("primary-1", "primary-2"):
            code, _ = http_json("POST", f"{backends[name].url}/admin/config", {"health_status": "unhealthy"})
            assert code == 200

        def only_standby() -> bool:
            counts, statuses = spread(cp.listener, 40, clients=2)
            assert statuses == {200: 40}, statuses
            return set(counts) == {"standby"}

        wait_for(only_standby, timeout=15, what="tier 1 to take all traffic")

        for name in ("primary-1", "primary-2"):
            http_json("POST", f"{backends[name].url}/admin/config", {"health_status": "healthy"})

        def back_on_primary() -> bool:
            counts, statuses = spread(cp.listener, 40, clients=2)
            assert statuses == {200: 40}, statuses
            return counts["standby"] == 0 and counts["primary-1"] > 0 and counts["primary-2"] > 0

        wait_for(back_on_primary, timeout=15, what="traffic to return to tier 0")
    finally:
        cp.stop()


def test_circuit_breaker_overflow_answers_503_at_once_and_is_counted(tmp_path, mocks):
    slow = mocks("slow", "--latency-ms", "3000")
    cb = {"max_requests": 2, "max_pending_requests": 1, "max_connections": 2}
    cp = ControlPlane(tmp_path, chat_pool({"slow": slow}, circuit_breaker=cb))
    try:
        with Load(cp.listener, clients=8, max_seconds=10, timeout=10) as load:
            started = time.monotonic()
            load.wait_requests(50, timeout=10)
            # 50 answers while at most 3 requests fit in the breaker and the backend takes 3 s:
            # overflow is answered at once, nothing waits for the slow backend.
            elapsed = time.monotonic() - started
        assert elapsed < 3.0, f"50 answers took {elapsed:.2f}s"
        overflowed = load.statuses[503]
        assert overflowed >= 47, load.statuses
        assert set(load.statuses) <= {200, 503}, load.failures
        # Envoy counts overflow of max_requests and of max_pending_requests apart.
        stats = cp.envoy_stats("cluster.chat.upstream_rq_")
        counted = stats["cluster.chat.upstream_rq_active_overflow"] + stats["cluster.chat.upstream_rq_pending_overflow"]
        assert counted == overflowed, stats
    finally:
        cp.stop()


def test_backend_slower_than_per_try_timeout_is_retried_elsewhere(tmp_path, mocks):
    backends = {"slow": mocks("slow", "--latency-ms", "3000"), "fast": mocks("fast")}
    retry = {"per_try_timeout": "300ms", "attempts": 2}
    cp = ControlPlane(tmp_path, chat_pool(backends, retry=retry, outlier_detection={"enabled": False}))
    try:
        counts, statuses = spread(cp.listener, 40, clients=4)
        assert statuses == {200: 40}
        assert counts == {"fast": 40}, "every request that met the slow host was answered by the fast one"
        stats = cp.envoy_stats("cluster.chat.upstream_rq_per_try_timeout")
        assert stats["cluster.chat.upstream_rq_per_try_timeout"] > 0
    finally:
        cp.stop()
