"""Failures handled in the data plane: dead and flaky backends, failover, overflow, slow hosts.

Bounded load: 20 keep-alive clients for a few seconds, all on loopback.

No assertion here bounds how long something took: conditions are awaited with
generous deadlines, and speed targets (ejection delay, overflow latency) are
measured by benchmarks, not by these tests.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import threading
import time
from collections import Counter

import pytest

from .harness import ControlPlane, Load, MockBackend, chat_body, http_json, spread, wait_for

pytestmark = pytest.mark.e2e


def chat_pool(backends: dict[str, MockBackend], **pool: object) -> dict:
    spec = {name: {"url": b.url} for name, b in backends.items()}
    for name, extra in pool.pop("per_backend", {}).items():  # type: ignore[union-attr]
        spec[name].update(extra)
    return {"chat": {"match": {"prefix": "/v1/"}, "timeout": "20s", **pool, "backends": spec}}


def test_backend_killed_under_load_fails_no_request_and_is_ejected(tmp_path, mocks):
    backends = {n: mocks(n) for n in ("a", "b", "c")}
    cp = ControlPlane(tmp_path, chat_pool(backends))
    try:
        # max_seconds only caps a run gone wrong: the load stops when the block ends.
        with Load(cp.listener, clients=20, max_seconds=90) as load:
            load.wait_requests(500)
            victim = backends["c"]
            os.kill(victim.proc.pid, signal.SIGKILL)
            killed_at = time.monotonic()

            def ejected() -> bool:
                health = cp.envoy_hosts("chat")[victim.port]["health"]
                return bool(health.get("failed_outlier_check") or health.get("failed_active_health_check"))

            wait_for(ejected, timeout=20, interval=0.02, what="Envoy to eject the killed backend")
            # Reported, not asserted: how fast is a benchmark's question.
            print(f"killed backend ejected after {time.monotonic() - killed_at:.2f}s")
            load.wait_requests(1000)
        assert load.statuses == {200: load.total}, load.failures
        assert load.backends["a"] > 0 and load.backends["b"] > 0
    finally:
        cp.stop()


def test_half_failing_backend_is_ejected_and_clients_see_no_5xx(tmp_path, mocks):
    backends = {"good-1": mocks("good-1"), "good-2": mocks("good-2"), "flaky": mocks("flaky", "--error-rate", "0.5")}
    cp = ControlPlane(tmp_path, chat_pool(backends))
    try:
        with Load(cp.listener, clients=20, max_seconds=90) as load:
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
    # A generous check timeout: one slow answer on a busy machine must not count as a failed check.
    # The test flips health through the answer's status, which a check sees at once.
    check = {"path": "/health", "interval": "200ms", "timeout": "10s", "healthy_threshold": 1, "unhealthy_threshold": 1}
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

        wait_for(only_standby, timeout=30, what="tier 1 to take all traffic")

        for name in ("primary-1", "primary-2"):
            http_json("POST", f"{backends[name].url}/admin/config", {"health_status": "healthy"})

        def back_on_primary() -> bool:
            counts, statuses = spread(cp.listener, 40, clients=2)
            assert statuses == {200: 40}, statuses
            return counts["standby"] == 0 and counts["primary-1"] > 0 and counts["primary-2"] > 0

        wait_for(back_on_primary, timeout=30, what="traffic to return to tier 0")
    finally:
        cp.stop()


class Clients:
    """Keep-alive clients sending completions until stopped; a request still open at the end is abandoned.

    Unlike `Load`, no client has to wait for its request to finish: `abort()` (at the end of the
    `with` block) shuts the sockets of the requests a slow backend still holds, so a test need not
    outwait that backend.
    """

    def __init__(self, listener: str, count: int, timeout: float = 60.0) -> None:
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._aborted = threading.Event()
        self._conns = [http.client.HTTPConnection(listener, timeout=timeout) for _ in range(count)]
        for conn in self._conns:
            conn.connect()
        self._threads = [threading.Thread(target=self._client, args=(c,), daemon=True) for c in self._conns]
        for t in self._threads:
            t.start()

    @property
    def answered(self) -> int:
        with self._lock:
            return sum(self.statuses.values())

    @property
    def running(self) -> int:
        return sum(t.is_alive() for t in self._threads)

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def stop(self) -> None:
        """No new requests; the ones sent stay open."""
        self._stop.set()

    def abort(self) -> None:
        self._stop.set()
        self._aborted.set()
        for conn in self._conns:
            if conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in self._threads:
            t.join(10)

    def _client(self, conn: http.client.HTTPConnection) -> None:
        try:
            while not self._stop.is_set():
                conn.request("POST", "/v1/chat/completions", body=chat_body(), headers={"content-type": "application/json"})
                resp = conn.getresponse()
                body = resp.read()
                with self._lock:
                    self.statuses[resp.status] += 1
                    if resp.status != 503 and len(self.failures) < 20:
                        self.failures.append(f"{resp.status}: {body[:200]!r}")
        except (OSError, http.client.HTTPException) as exc:
            if not self._aborted.is_set():
                with self._lock:
                    self.statuses[0] += 1
                    self.failures.append(f"connection: {exc!r}")
        finally:
            conn.close()


def test_circuit_breaker_overflow_answers_503_at_once_and_is_counted(tmp_path, mocks):
    # The backend takes 30 s, far longer than the test needs, and the breaker lets only 3 requests
    # in (2 sent, 1 pending): every other answer can only be the breaker's.
    slow = mocks("slow", "--latency-ms", "30000")
    cb = {"max_requests": 2, "max_pending_requests": 1, "max_connections": 2}
    cp = ControlPlane(tmp_path, chat_pool({"slow": slow}, circuit_breaker=cb, timeout="60s"))
    try:
        with Clients(cp.listener, count=8) as clients:
            wait_for(lambda: clients.answered >= 50, timeout=25, what="50 answers")
            clients.stop()

            def only_held_clients_left() -> bool:
                # Each client still running waits on a request Envoy holds, sent or pending.
                stats = cp.envoy_stats("cluster.chat.upstream_rq_")
                held = stats["cluster.chat.upstream_rq_active"] + stats["cluster.chat.upstream_rq_pending_active"]
                return clients.running == held

            wait_for(only_held_clients_left, timeout=20, what="the clients the breaker turned away to stop")
            # Ordering, not speed: every answer came while the slow backend held the 2 requests it was
            # given and had finished none, so the overflow was answered without waiting for it.
            code, served = http_json("GET", f"{slow.url}/admin/stats")
            assert code == 200 and served["completions"] == 0 and served["in_flight"] == 2, served
            assert set(clients.statuses) == {503} and clients.statuses[503] >= 50, (clients.statuses, clients.failures)
            # Envoy counts overflow of max_requests and of max_pending_requests apart.
            stats = cp.envoy_stats("cluster.chat.upstream_rq_")
            counted = stats["cluster.chat.upstream_rq_active_overflow"] + stats["cluster.chat.upstream_rq_pending_overflow"]
            assert counted == clients.statuses[503], stats
    finally:
        cp.stop()


def test_backend_slower_than_per_try_timeout_is_retried_elsewhere(tmp_path, mocks):
    # The slow host never answers within a try; the fast one has a generous try to answer in,
    # so a busy machine cannot turn its answer into a timeout.
    backends = {"slow": mocks("slow", "--latency-ms", "30000"), "fast": mocks("fast")}
    retry = {"per_try_timeout": "2s", "attempts": 2}
    cp = ControlPlane(tmp_path, chat_pool(backends, retry=retry, outlier_detection={"enabled": False}))
    try:
        # Few requests: with round robin, nearly every one meets the slow host first and waits out a try.
        counts, statuses = spread(cp.listener, 12, clients=4)
        assert statuses == {200: 12}
        assert counts == {"fast": 12}, "every request that met the slow host was answered by the fast one"
        stats = cp.envoy_stats("cluster.chat.upstream_rq_per_try_timeout")
        assert stats["cluster.chat.upstream_rq_per_try_timeout"] > 0
    finally:
        cp.stop()
