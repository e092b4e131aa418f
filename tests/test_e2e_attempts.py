"""Every attempt counts, end to end: a real Envoy's attempts log (the router's `upstream_log`) feeds the scores.

A request whose first attempt failed on one backend and was retried on another reaches its client as a
success; the request's own access-log entry names only the backend that answered. The failed attempt
still counts against the backend that failed it, once, from its own entry.

Bounded: a few hundred requests on loopback. Conditions are awaited with deadlines; nothing here times
Envoy or the control plane.
"""

from __future__ import annotations

import http.client
from collections import Counter
from typing import Any

import pytest

from .harness import ControlPlane, MockBackend, chat_body, http_json, spread, wait_for

pytestmark = pytest.mark.e2e

REQUESTS = 200
# The control plane's error rate is an EWMA (alpha 0.05): for a backend failing half its attempts its
# standard deviation is about 0.08, so 0.5 +- 0.25 holds with room to spare. The plain share of failed
# attempts (errors / requests) is within 0.2 of the mock's 0.5 at 40+ attempts (3 standard deviations; the
# mock's draws are seeded, and with its default seed the share of its first 40 to 300 is 0.36 to 0.49).
EWMA_TOLERANCE = 0.25
SHARE_TOLERANCE = 0.2


def served(backend: MockBackend) -> dict[str, Any]:
    code, body = http_json("GET", f"{backend.url}/admin/stats")
    assert code == 200, body
    return dict(body)


def explain(cp: ControlPlane) -> dict[str, Any]:
    code, body = http_json("GET", f"{cp.api}/v1/pools/chat/weights")
    assert code == 200, body
    return dict(body["backends"])


def test_a_backend_failing_half_its_first_attempts_shows_its_errors_and_loses_weight(tmp_path, mocks):
    good, flaky = mocks("good"), mocks("flaky", "--error-rate", "0.5")
    # health_aware: weight x (1 - error rate)^2. No outlier detection, so the flaky backend keeps getting
    # attempts (Envoy would eject it otherwise) and its error rate is measured over many of them.
    pools = {"chat": {"match": {"prefix": "/v1/"}, "strategy": "health_aware", "timeout": "10s",
                      "outlier_detection": {"enabled": False}, "scoring": {"interval": "500ms"},
                      "backends": {"good": {"url": good.url}, "flaky": {"url": flaky.url}}}}
    cp = ControlPlane(tmp_path, pools)
    try:
        backends, statuses = spread(cp.listener, REQUESTS, clients=4)
        assert statuses == {200: REQUESTS}, statuses  # every failed attempt was retried on the good backend
        injected = served(flaky)
        assert injected["errors"] >= 10, injected  # the flaky backend did fail attempts (about half of its own)
        assert backends["flaky"] == injected["completions"], (backends, injected)

        def counted() -> dict[str, Any]:
            """Once every entry is in: each attempt counted once, against the backend that made it."""
            shown = explain(cp)
            f, g = shown["flaky"], shown["good"]
            done = (f["errors"] == injected["errors"]
                    and f["requests"] == injected["errors"] + injected["completions"]
                    and g["requests"] == served(good)["completions"])
            return shown if done else {}

        shown = wait_for(counted, timeout=10, what="the control plane to count every attempt")
        flaky_view, good_view = shown["flaky"], shown["good"]
        assert good_view["errors"] == 0 and good_view["error_rate"] == 0.0, good_view
        share = flaky_view["errors"] / flaky_view["requests"]
        print(f"flaky: {flaky_view['requests']} attempts, {flaky_view['errors']} failed ({share:.2f}), "
              f"error_rate {flaky_view['error_rate']}; good: {good_view['requests']} requests")
        assert abs(share - 0.5) <= SHARE_TOLERANCE, flaky_view
        assert abs(flaky_view["error_rate"] - 0.5) <= EWMA_TOLERANCE, flaky_view

        # health_aware weighs each backend by (1 - error rate)^2: the good one by 1, the flaky one by about a
        # quarter. Once the shares settle (smoothing, a few rounds), the weights stand in that ratio.
        def settled() -> dict[str, Any]:
            shown = explain(cp)
            expected = (1 - shown["flaky"]["error_rate"]) ** 2
            ratio = shown["flaky"]["weight"] / shown["good"]["weight"]
            return shown if shown["flaky"]["weight"] < shown["good"]["weight"] and abs(ratio - expected) < 0.05 else {}

        shown = wait_for(settled, timeout=15, what="the flaky backend's weight to drop by (1 - its error rate)^2")
        print(f"weights: flaky {shown['flaky']['weight']}, good {shown['good']['weight']}; "
              f"flaky's reason: {shown['flaky']['reason']}")
    finally:
        cp.stop()


def test_a_429_retried_on_another_backend_still_cools_the_backend_that_sent_it(tmp_path, mocks):
    """The client never sees the 429 (Envoy retries it elsewhere, as it does by default); the attempts log
    shows it, with its Retry-After, and the backend goes out of rotation for that long."""
    limited = mocks("limited", "--error-rate", "1", "--error-status", "429", "--retry-after", "5")
    other = mocks("other")
    pools = {"chat": {"match": {"prefix": "/v1/"}, "strategy": "weighted", "timeout": "10s",
                      "backends": {"limited": {"url": limited.url}, "other": {"url": other.url}}}}
    cp = ControlPlane(tmp_path, pools)
    try:
        statuses: Counter[int] = Counter()
        conn = http.client.HTTPConnection(cp.listener, timeout=10)
        try:
            for _ in range(20):  # round robin over two: the limited backend gets some of the first attempts
                conn.request("POST", "/v1/chat/completions", body=chat_body(),
                             headers={"content-type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                statuses[resp.status] += 1
                if served(limited)["errors"]:
                    break
        finally:
            conn.close()
        assert set(statuses) == {200}, statuses
        assert served(limited)["errors"] >= 1
        cooled = wait_for(lambda: explain(cp)["limited"]["cooling"], timeout=5,
                          what="the retried 429 to cool the backend")
        assert cooled["retry_after"] == "5", cooled

        def draining() -> bool:
            return bool(cp.envoy_hosts("chat")[limited.port]["health"].get("eds_health_status") == "DRAINING")

        wait_for(draining, timeout=5, what="Envoy to get the backend DRAINING")
        limited_view = explain(cp)["limited"]
        assert limited_view["errors"] == served(limited)["errors"], limited_view  # each 429 an error, once
    finally:
        cp.stop()
