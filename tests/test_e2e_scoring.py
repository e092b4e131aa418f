"""The telemetry loop end to end: real Envoy, mock backends of different prices, speeds and qualities."""

from __future__ import annotations

import http.client
import http.server
import json
import time
from collections import Counter

import pytest

from .harness import ControlPlane, MockBackend, chat_body, http_json, spread, wait_for
from .harness import WebhookReceiver as Receiver

pytestmark = pytest.mark.e2e

FAST = {"interval": "300ms", "smoothing": 1.0, "hysteresis": 0.01}


def weights_of(cp: ControlPlane, pool: str = "chat") -> dict:
    code, body = http_json("GET", f"{cp.api}/v1/pools/{pool}/weights")
    assert code == 200, body
    return body["backends"]


def priced(prices: dict[str, MockBackend], cost: dict[str, float], **pool) -> dict:
    return {"chat": {"match": {"prefix": "/v1/"}, **pool, "backends": {
        n: {"url": b.url, "cost": {"input_per_1k": cost[n], "output_per_1k": cost[n]}} for n, b in prices.items()}}}


def test_cost_optimized_moves_traffic_to_the_cheapest(tmp_path, mocks):
    backends = {n: mocks(n) for n in ("cheap", "mid", "premium")}
    cost = {"cheap": 0.1, "mid": 0.5, "premium": 3.0}
    cp = ControlPlane(tmp_path, priced(backends, cost, strategy="round_robin", scoring=FAST))
    try:
        counts, _ = spread(cp.listener, 90, clients=3)
        assert counts["cheap"] < 45, "round robin to start with"
        cp.write_config(priced(backends, cost, strategy="cost_optimized", scoring=FAST))
        switched = time.monotonic()

        def mostly_cheap() -> bool:
            counts, statuses = spread(cp.listener, 100, clients=4)
            assert statuses == {200: 100}
            return counts["cheap"] >= 70

        # A generous deadline, not a speed target: "within ~10 s" is a benchmark's claim.
        wait_for(mostly_cheap, timeout=30, what="70% of traffic on the cheapest backend")
        print(f"70% of traffic on the cheapest backend {time.monotonic() - switched:.1f}s after the switch")
        explained = weights_of(cp)
        assert explained["cheap"]["weight"] > explained["mid"]["weight"] > 0
        assert "cheaper backends get more" in explained["cheap"]["reason"]
    finally:
        cp.stop()


def test_degraded_health_json_halves_the_weight(tmp_path, mocks):
    a, b = mocks("a"), mocks("b")
    pools = {"chat": {"match": {"prefix": "/v1/"}, "strategy": "health_aware", "scoring": FAST,
                      "deep_health": {"path": "/health", "interval": "200ms"},
                      "backends": {"a": {"url": a.url}, "b": {"url": b.url}}}}
    cp = ControlPlane(tmp_path, pools)
    try:
        wait_for(lambda: weights_of(cp)["b"]["health"]["status"] == "healthy", what="first probe")
        before = cp.envoy_hosts("chat")[b.port]["weight"]
        http_json("POST", f"{b.url}/admin/config", {"health_status": "degraded"})
        wait_for(lambda: weights_of(cp)["b"]["health"]["status"] == "degraded", what="the probe to see degraded")
        wait_for(lambda: cp.envoy_hosts("chat")[b.port]["weight"] * 2 <= before,
                 what="Envoy's weight for b to halve")
        share = spread(cp.listener, 200, clients=4)[0]["b"] / 200
        assert share < 0.35, share
        assert "degraded" in weights_of(cp)["b"]["health"]["status"]

        http_json("POST", f"{b.url}/admin/config", {"health_status": "unhealthy"})
        wait_for(lambda: spread(cp.listener, 40, clients=2)[0]["b"] == 0, what="unhealthy b to get no traffic")
    finally:
        cp.stop()


def test_low_feedback_lowers_a_backends_weight(tmp_path, mocks):
    good, poor = mocks("good"), mocks("poor")
    pools = {"chat": {"match": {"prefix": "/v1/"}, "strategy": "quality_based",
                      "scoring": {**FAST, "quality_prior_weight": 2},
                      "backends": {"good": {"url": good.url, "quality": 0.8}, "poor": {"url": poor.url, "quality": 0.8}}}}
    cp = ControlPlane(tmp_path, pools)
    try:
        start = weights_of(cp)["poor"]["weight"]
        conn = http.client.HTTPConnection(cp.listener, timeout=10)
        pending = 0
        for _ in range(40):
            conn.request("POST", "/v1/chat/completions", body=chat_body(), headers={"content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            score = 0.1 if resp.getheader("x-backend") == "poor" else 0.9
            code, body = http_json("POST", f"{cp.api}/v1/feedback",
                                   {"request_id": resp.getheader("x-request-id"), "score": score})
            assert code in (200, 202), body
            pending += code == 202
        conn.close()
        wait_for(lambda: weights_of(cp)["poor"]["quality"]["feedback"] > 5, what="feedback to be applied")
        wait_for(lambda: weights_of(cp)["poor"]["weight"] < start / 2, what="poor's weight to fall")
        explained = weights_of(cp)
        assert explained["poor"]["quality"]["estimate"] < 0.5 < explained["good"]["quality"]["estimate"]
        # malformed feedback is refused with a reason
        assert http_json("POST", f"{cp.api}/v1/feedback", {"request_id": "x", "score": 7})[0] == 400
        assert http_json("POST", f"{cp.api}/v1/feedback", {"score": 0.5})[0] == 400
    finally:
        cp.stop()


@pytest.mark.parametrize("action", ["reject", "shift_to_cheapest"])
def test_budget_exhaustion_alerts_and_acts(tmp_path, mocks, action):
    tokens = ["--prompt-tokens", "100", "--completion-tokens", "100"]
    cheap, dear = mocks("cheap", *tokens), mocks("dear", *tokens)
    receiver = Receiver()
    pools = {"chat": {"match": {"prefix": "/v1/"}, "strategy": "round_robin", "scoring": FAST,
                      "budget": {"hourly": 1.0, "alert_thresholds": [0.5], "on_exhausted": action},
                      "backends": {"cheap": {"url": cheap.url, "cost": {"input_per_1k": 0.5, "output_per_1k": 0.5}},
                                   "dear": {"url": dear.url, "cost": {"input_per_1k": 5.0, "output_per_1k": 5.0}}}}}
    cp = ControlPlane(tmp_path, pools, start=False)
    doc = cp.document(pools)
    doc["controlplane"]["alerts"] = {"webhook": receiver.url}
    import yaml

    cp.write_config(text=yaml.safe_dump(doc))
    cp.start()
    try:
        # each request costs 0.1 (cheap) or 1.0 (dear): a few exhaust the hourly budget of 1.0
        def acted() -> bool:
            counts, statuses = spread(cp.listener, 10, clients=2)
            if action == "reject":
                return statuses.get(429, 0) == 10
            return counts.get("cheap", 0) == 10

        wait_for(acted, timeout=20, what=f"the budget action {action}")
        wait_for(lambda: any(p["kind"] == "budget_exhausted" for p in receiver.posts), what="the webhook POST")
        exhausted = next(p for p in receiver.posts if p["kind"] == "budget_exhausted")
        assert exhausted["pool"] == "chat" and exhausted["window"] == "hour" and exhausted["action"] == action
        assert any(p["kind"] == "budget_threshold" and p["threshold"] == 0.5 for p in receiver.posts)
        report = http_json("GET", f"{cp.api}/v1/cost")[1]["pools"]["chat"]
        assert report["budget"][0]["exhausted"] is True and report["hour"] >= 1.0
        if action == "reject":
            conn = http.client.HTTPConnection(cp.listener, timeout=5)
            conn.request("POST", "/v1/chat/completions", body=chat_body(), headers={"content-type": "application/json"})
            resp = conn.getresponse()
            body = json.loads(resp.read())
            assert resp.status == 429 and resp.getheader("content-type") == "application/json"
            assert body["error"]["type"] == "budget_exhausted" and "hourly budget of pool 'chat'" in body["error"]["message"]
            conn.close()
        else:
            assert weights_of(cp)["dear"]["weight"] == 0
    finally:
        cp.stop()
        receiver.stop()


def test_ledger_matches_backend_tokens_and_survives_restart(tmp_path, mocks):
    a, b = mocks("a", "--completion-tokens", "37"), mocks("b", "--completion-tokens", "11")
    pools = {"chat": {"match": {"prefix": "/v1/"}, "backends": {
        "a": {"url": a.url, "cost": {"input_per_1k": 1.0, "output_per_1k": 2.0}},
        "b": {"url": b.url, "cost": {"input_per_1k": 0.5, "output_per_1k": 0.5}}}}}
    cp = ControlPlane(tmp_path, pools)
    try:
        _, statuses = spread(cp.listener, 60, clients=3)
        assert statuses == {200: 60}
        stream = json.dumps({"model": "m", "stream": True, "stream_options": {"include_usage": True},
                             "messages": [{"role": "user", "content": "count my tokens please"}]})
        for _ in range(4):  # streamed: usage from the final chunk
            conn = http.client.HTTPConnection(cp.listener, timeout=10)
            conn.request("POST", "/v1/chat/completions", body=stream, headers={"content-type": "application/json"})
            assert conn.getresponse().read().rstrip().endswith(b"[DONE]")
            conn.close()

        served = {n: http_json("GET", f"{m.url}/admin/stats")[1] for n, m in (("a", a), ("b", b))}

        def ledger() -> dict:
            return http_json("GET", f"{cp.api}/v1/cost")[1]["pools"]["chat"]["backends"]

        wait_for(lambda: sum(v["requests"] for v in ledger().values()) == 64, what="every request in the ledger")
        before = ledger()
        for name in ("a", "b"):
            assert before[name]["prompt_tokens"] == served[name]["prompt_tokens"], (name, before, served)
            assert before[name]["completion_tokens"] == served[name]["completion_tokens"], (name, before, served)
        expected = (served["a"]["prompt_tokens"] * 1.0 + served["a"]["completion_tokens"] * 2.0) / 1000
        assert before["a"]["total"] == pytest.approx(expected, abs=1e-6)

        cp.stop()
        cp.start()
        assert ledger() == before
        metrics = http.client.HTTPConnection(cp.api.split("//")[1], timeout=5)
        metrics.request("GET", "/metrics")
        text = metrics.getresponse().read().decode()
        assert f'llm_lb_tokens_total{{backend="a",kind="completion",pool="chat"}} {float(served["a"]["completion_tokens"])}' in text
    finally:
        cp.stop()


def test_request_id_comes_back_and_unknown_feedback_waits(tmp_path, mocks):
    a = mocks("a")
    cp = ControlPlane(tmp_path, {"chat": {"match": {"prefix": "/v1/"}, "backends": {"a": {"url": a.url}}}})
    try:
        code, body = http_json("POST", f"{cp.api}/v1/feedback", {"request_id": "not-yet-seen", "score": 0.5})
        assert code == 202 and body["status"] == "pending"
        conn = http.client.HTTPConnection(cp.listener, timeout=10)
        conn.request("POST", "/v1/chat/completions", body=chat_body(), headers={"content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        request_id = resp.getheader("x-request-id")
        assert request_id
        conn.close()

        wait_for(lambda: weights_of(cp)["a"]["requests"] >= 1, what="the access log entry for the request")
        code, body = http_json("POST", f"{cp.api}/v1/feedback", {"request_id": request_id, "score": 1.0})
        assert code == 200 and body["backend"] == "a", body
        code, body = http_json("POST", f"{cp.api}/v1/feedback", {"request_id": request_id, "score": 0.0})
        assert code == 409, body  # one rating per request
        assert Counter(weights_of(cp)["a"]["quality"]) and weights_of(cp)["a"]["quality"]["feedback"] == 1
    finally:
        cp.stop()
