"""Backend quotas end to end: a real Envoy, mock backends, the control plane's caps and cooldowns."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from .harness import ControlPlane, MockBackend, chat_body, http_json, wait_for

pytestmark = pytest.mark.e2e

RATE = 5.0  # requests per second: 300 per minute
MINUTE = 60.0


def requests_of(backend: MockBackend) -> int:
    code, body = http_json("GET", f"{backend.url}/admin/stats")
    assert code == 200, body
    return int(body["requests"])


class Paced:
    """Requests started at a steady RATE whatever each takes (a few keep-alive connections); every answer counted."""

    def __init__(self, listener: str, connections: int = 6) -> None:
        self.listener = listener
        self.statuses: Counter[int] = Counter()
        self.backends: Counter[str] = Counter()
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(connections)

    def _send(self) -> None:
        conn = getattr(self._local, "conn", None) or http.client.HTTPConnection(self.listener, timeout=10)
        self._local.conn = conn
        try:
            conn.request("POST", "/v1/chat/completions", body=chat_body(), headers={"content-type": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
            status, backend = resp.status, resp.getheader("x-backend", "?")
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            self._local.conn = None
            status, backend, body = 0, "?", repr(exc).encode()
        with self._lock:
            self.statuses[status] += 1
            self.backends[backend] += 1
            if status != 200 and len(self.failures) < 20:
                self.failures.append(f"{status}: {body[:200]!r}")

    def run(self, seconds: float, every: float = 0.0, sample: object = None) -> list[tuple[float, object]]:
        """Send for `seconds` at RATE; every `every` seconds call `sample()` and keep (elapsed, value)."""
        samples = []
        start = time.monotonic()
        for k in range(int(seconds * RATE)):
            due = start + k / RATE
            time.sleep(max(0.0, due - time.monotonic()))
            if every and callable(sample) and k % int(every * RATE) == 0:
                samples.append((round(time.monotonic() - start, 1), sample()))
            self._pool.submit(self._send)
        self._pool.shutdown(wait=True)
        return samples


def test_a_60_rpm_backend_under_300_rpm_gets_at_most_66_in_the_minute(tmp_path, mocks):
    limited, b, c = mocks("limited"), mocks("b"), mocks("c")
    pools = {"chat": {"match": {"prefix": "/v1/"}, "strategy": "weighted", "timeout": "10s", "backends": {
        "limited": {"url": limited.url, "max_requests_per_minute": 60},
        "b": {"url": b.url},
        "c": {"url": c.url},
    }}}
    cp = ControlPlane(tmp_path, pools)
    try:
        before = {m.name: requests_of(m) for m in (limited, b, c)}
        load = Paced(cp.listener)
        samples = load.run(MINUTE, every=10.0, sample=lambda: requests_of(limited) - before["limited"])
        after = {m.name: requests_of(m) - before[m.name] for m in (limited, b, c)}
        total = sum(load.statuses.values())
        explained = http_json("GET", f"{cp.api}/v1/pools/chat/weights")[1]
        print(f"\nin the minute: {after} of {total} requests; the limited backend's count at "
              f"{', '.join(f'{t:.0f}s={n}' for t, n in samples)}; traffic {explained['traffic']}; "
              f"quota {explained['backends']['limited']['quota']}")
        assert load.statuses == Counter({200: total}), load.failures
        assert total == int(MINUTE * RATE)
        assert after["limited"] <= 66, after
        assert after["limited"] >= 30, f"capped, not starved: {after}"
        assert after["b"] + after["c"] + after["limited"] == total, after
        assert min(after["b"], after["c"]) >= 100, after
        quota = explained["backends"]["limited"]["quota"]
        assert quota["binding"] is True and quota["projected_rpm"] <= 60, quota
        assert "capped at" in explained["backends"]["limited"]["reason"]
        weights = explained["backends"]
        assert weights["limited"]["weight"] < weights["b"]["weight"] / 2
    finally:
        cp.stop()


def test_a_429_with_retry_after_takes_the_backend_out_for_that_long(tmp_path, mocks):
    """This pool does not retry 429s, so the one 429 that shows the backend is rate limited reaches its client;
    after it, no client sees a failure. (With retries on, the attempt log shows the 429 instead:
    tests/test_e2e_attempts.py.)"""
    limited = mocks("limited", "--error-rate", "1", "--error-status", "429", "--retry-after", "3")
    other = mocks("other")
    pools = {"chat": {"match": {"prefix": "/v1/"}, "strategy": "weighted", "timeout": "10s",
                      "retry": {"retriable_status_codes": []},
                      "backends": {"limited": {"url": limited.url}, "other": {"url": other.url}}}}
    cp = ControlPlane(tmp_path, pools)
    try:
        def eds_health() -> str:
            return str(cp.envoy_hosts("chat")[limited.port]["health"].get("eds_health_status", ""))

        assert eds_health() != "DRAINING"
        conn = http.client.HTTPConnection(cp.listener, timeout=10)
        statuses: Counter[int] = Counter()
        for _ in range(20):  # round robin over two backends: the limited one answers within a few requests
            conn.request("POST", "/v1/chat/completions", body=chat_body(), headers={"content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            statuses[resp.status] += 1
            if resp.status == 429:
                limited_at = time.monotonic()
                assert resp.getheader("retry-after") == "3" and resp.getheader("x-backend") == "limited"
                break
        assert statuses[429] == 1, statuses
        conn.close()

        wait_for(lambda: eds_health() == "DRAINING", timeout=3, interval=0.02, what="the backend to be DRAINING")
        drained_after = time.monotonic() - limited_at
        http_json("POST", f"{limited.url}/admin/config", {"error_rate": 0})  # it will answer when it is back
        arrived = requests_of(limited)
        explained = wait_for(  # the scores learn who is out of rotation at their next tick (0.1 s)
            lambda: (b := http_json("GET", f"{cp.api}/v1/pools/chat/weights")[1]["backends"]["limited"])["cooling"]
            and b, timeout=1, what="explain to show the cooldown")
        assert explained["cooling"]["retry_after"] == "3", explained
        assert explained["reason"].startswith("cooling: answered 429 with Retry-After '3'"), explained

        # A request counts as sent while cooling when Envoy showed the backend DRAINING before it was sent and
        # still after its answer came (Envoy's state does not flap): the one sent as the cooldown ends may
        # rightly reach it, and on a busy machine the gap between the check and the request is wide.
        during: Counter[str] = Counter()
        edge: Counter[str] = Counter()
        conn = http.client.HTTPConnection(cp.listener, timeout=10)
        while eds_health() == "DRAINING":
            assert time.monotonic() - limited_at < 10, "still cooling after 10 s"
            conn.request("POST", "/v1/chat/completions", body=chat_body(), headers={"content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            statuses[resp.status] += 1
            (during if eds_health() == "DRAINING" else edge)[resp.getheader("x-backend", "?")] += 1
            time.sleep(0.02)
        back_after = time.monotonic() - limited_at
        assert requests_of(limited) - arrived <= edge["limited"], "no request reached it while it was cooling"
        assert set(during) == {"other"} and sum(during.values()) >= 20, during

        wait_for(lambda: http_json("GET", f"{cp.api}/v1/pools/chat/weights")[1]["backends"]["limited"]["cooling"]
                 is None, timeout=2, what="explain to show it back")
        after: Counter[str] = Counter()
        for _ in range(40):
            conn.request("POST", "/v1/chat/completions", body=chat_body(), headers={"content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            statuses[resp.status] += 1
            after[resp.getheader("x-backend", "?")] += 1
        conn.close()
        print(f"\n429 at 0 s; DRAINING in Envoy at {drained_after:.2f} s; back at {back_after:.2f} s; "
              f"{sum(during.values())} requests while cooling, all to {sorted(during)}; then {dict(after)}")
        assert 2.9 <= back_after <= 5.0, back_after
        assert after["limited"] >= 10 and after["other"] >= 10, after
        assert statuses == Counter({429: 1, 200: sum(statuses.values()) - 1}), statuses
    finally:
        cp.stop()
