"""Re-discovery end to end: true qualities change mid-run, feedback follows them, the traffic follows both ways.

A real Envoy in front of three mock backends (cheap, medium, expensive); every response is rated on
the control plane's API with a score drawn (seeded) around the TRUE quality of the backend that
served it. Phase 1: cheap is poor, medium good, so min_quality holds cheap out (probed only) and
medium takes the traffic. Phase 2: cheap becomes the best and medium regresses: medium leaves, and
cheap, which only probe requests still reach, earns its way back.
"""

from __future__ import annotations

import http.client
import json
import random
import time
from collections import Counter

import pytest

from .harness import ControlPlane, MockBackend, chat_body, http_json, wait_for

pytestmark = pytest.mark.e2e

PRICES = {"cheap": 0.1, "medium": 0.3, "expensive": 1.0}
PHASE1 = {"cheap": 0.4, "medium": 0.85, "expensive": 0.9}
PHASE2 = {"cheap": 0.95, "medium": 0.5, "expensive": 0.9}
MIN_QUALITY = 0.7
# Not the defaults (probe 1%, memory 100 ratings: some 5,000 requests to follow, tests/test_rediscovery.py)
# but the same rule, scaled so the run stays well under a minute.
SCORING = {"interval": "500ms", "min_quality": MIN_QUALITY, "probe_share": 0.02, "memory_ratings": 20}
RATE = 100.0  # requests per second, paced: 50 a scoring round, so a count of requests means the same run to run
WINDOW = 200  # requests a share is measured over
SETTLE = 600  # phase 1
BOUND = 1500  # phase 2: cheap must hold most of a window that starts within this many requests of the change


class Client:
    """Sequential completions over one keep-alive connection, each rated on the API over another."""

    def __init__(self, cp: ControlPlane, seed: int) -> None:
        self.cp = cp
        self.rng = random.Random(seed)
        self.proxy = http.client.HTTPConnection(cp.listener, timeout=10)
        self.api = http.client.HTTPConnection(cp.api.split("//", 1)[1], timeout=10)
        self.served: list[str] = []
        self.failures: list[str] = []
        self.feedback: Counter[int] = Counter()
        self.next = time.monotonic()

    def one(self, truth: dict[str, float]) -> None:
        self.next += 1.0 / RATE
        time.sleep(max(0.0, self.next - time.monotonic()))
        self.proxy.request("POST", "/v1/chat/completions", body=chat_body(), headers={"content-type": "application/json"})
        resp = self.proxy.getresponse()
        body = resp.read()
        backend = resp.getheader("x-backend", "?")
        if resp.status != 200 or backend not in truth:
            self.failures.append(f"{resp.status} from {backend}: {body[:200]!r}")
            return
        self.served.append(backend)
        score = min(1.0, max(0.0, self.rng.gauss(truth[backend], 0.05)))
        self.api.request("POST", "/v1/feedback",
                         body=json.dumps({"request_id": resp.getheader("x-request-id"), "score": round(score, 4)}),
                         headers={"content-type": "application/json"})
        answer = self.api.getresponse()
        answer.read()
        self.feedback[answer.status] += 1  # 202: its access-log entry had not arrived yet; applied when it does

    def share(self, backend: str) -> float:
        return Counter(self.served[-WINDOW:])[backend] / WINDOW

    def close(self) -> None:
        self.proxy.close()
        self.api.close()


def weights(cp: ControlPlane) -> dict:
    code, body = http_json("GET", f"{cp.api}/v1/pools/chat/weights")
    assert code == 200, body
    return body["backends"]


def test_traffic_follows_true_quality_both_ways(tmp_path, mocks) -> None:
    backends: dict[str, MockBackend] = {name: mocks(name) for name in PRICES}
    pools = {"chat": {"match": {"prefix": "/v1/"}, "strategy": "balanced", "scoring": SCORING, "backends": {
        name: {"url": b.url, "quality": 0.8, "cost": {"input_per_1k": PRICES[name], "output_per_1k": PRICES[name]}}
        for name, b in backends.items()}}}
    cp = ControlPlane(tmp_path, pools)
    client = Client(cp, seed=7)
    started = time.monotonic()
    try:
        # Phase 1: cheap (0.4) below min_quality, medium (0.85) good enough and cheaper than expensive.
        for _ in range(SETTLE):
            client.one(PHASE1)
        assert client.share("medium") > 0.5, Counter(client.served[-WINDOW:])
        explained = wait_for(lambda: (w := weights(cp))["cheap"]["probing"] and w, timeout=10,
                             what="cheap to be held out by min_quality and only probed")
        assert explained["cheap"]["below_min_quality"] is True
        assert explained["cheap"]["reason"].startswith("probing only: 2.0% of traffic")
        assert 0 < explained["cheap"]["weight"] < explained["medium"]["weight"]
        probes = Counter(client.served[-WINDOW:])["cheap"]
        assert 0 < probes <= 0.1 * WINDOW, probes  # reached, at about the probe share

        # Phase 2: cheap becomes the best (0.95), medium regresses (0.5).
        changed = len(client.served)
        medium_out = cheap_in = None
        while len(client.served) - changed < BOUND + WINDOW and cheap_in is None:
            client.one(PHASE2)
            after = len(client.served) - changed
            if after >= WINDOW and medium_out is None and client.share("medium") <= 0.1:
                medium_out = after - WINDOW
            if after >= WINDOW and client.share("cheap") > 0.5:
                cheap_in = after - WINDOW
            assert time.monotonic() - started < 50, f"too slow: {len(client.served)} requests"
        elapsed = time.monotonic() - started
        print(f"\nphase 2: medium under 10% from request {medium_out}, cheap over 50% from request {cheap_in} "
              f"(windows of {WINDOW}); {len(client.served)} requests in {elapsed:.1f}s; feedback {dict(client.feedback)}")
        assert cheap_in is not None and cheap_in <= BOUND, Counter(client.served[changed:])
        assert medium_out is not None and medium_out <= cheap_in
        final = weights(cp)
        assert final["cheap"]["probing"] is False and final["cheap"]["below_min_quality"] is False
        assert final["cheap"]["quality"]["estimate"] >= MIN_QUALITY + 0.02
        assert final["medium"]["quality"]["estimate"] < MIN_QUALITY
        assert final["cheap"]["weight"] > final["expensive"]["weight"]
        # No client-visible failure, and every rating accepted (now or once its log entry arrived).
        assert client.failures == []
        assert set(client.feedback) <= {200, 202}, client.feedback
    finally:
        client.close()
        cp.stop()
