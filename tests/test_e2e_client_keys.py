"""Client keys and request limits in a real Envoy, called with the official OpenAI SDK."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import yaml

from .harness import ControlPlane, MockBackend, chat_body, http_json, wait_for

pytestmark = pytest.mark.e2e

WEB_KEY = "web-app-key-0123456789abcdef"
BATCH_KEY = "batch-key-0123456789abcdef"
ENV = {"WEB_APP_KEY": WEB_KEY, "BATCH_KEY": BATCH_KEY}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def backend_stats(b: MockBackend) -> dict:
    code, body = http_json("GET", f"{b.url}/admin/stats")
    assert code == 200
    return body


def start(tmp_path, backends: dict[str, MockBackend], clients: dict) -> ControlPlane:
    cp = ControlPlane(tmp_path, None, env=ENV, start=False)
    doc = cp.document({"chat": {"match": {"prefix": "/v1/"}, "backends": {
        name: {"url": b.url} for name, b in backends.items()}}})
    doc["clients"] = clients
    cp.write_config(text=yaml.safe_dump(doc, sort_keys=False))
    cp.start()
    return cp


def sdk(cp: ControlPlane, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{cp.listener}/v1", api_key=key, max_retries=0, timeout=10)


def ask(client: openai.OpenAI) -> str:
    reply = client.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "hi"}])
    return reply.choices[0].message.content or ""


def test_keys_decide_who_may_call_and_never_reach_a_backend(tmp_path):
    a = MockBackend("a")
    cp = start(tmp_path, {"a": a}, {"web-app": {"key": "${WEB_APP_KEY}"}, "batch": {"key": "${BATCH_KEY}"}})
    try:
        assert ask(sdk(cp, WEB_KEY))
        assert ask(sdk(cp, BATCH_KEY))
        served = backend_stats(a)["requests"]
        assert served == 2
        for key in ("", "wrong-key-0123456789abcdef", WEB_KEY + "x"):
            with pytest.raises(openai.AuthenticationError) as err:
                ask(sdk(cp, key) if key else openai.OpenAI(base_url=f"http://{cp.listener}/v1", api_key="-",
                                                          max_retries=0, default_headers={"Authorization": ""}))
            assert err.value.status_code == 401
            assert err.value.body["code"] == "invalid_api_key", err.value.body  # OpenAI-style JSON
        # a request without any credential header, and one that names a client itself
        code, body = http_json("POST", f"http://{cp.listener}/v1/chat/completions", json.loads(chat_body()))
        assert code == 401 and body["error"]["code"] == "invalid_api_key"
        stats = backend_stats(a)
        assert stats["requests"] == served, "a refused request reached the backend"
        assert digest(WEB_KEY) not in stats["credentials"] and digest(BATCH_KEY) not in stats["credentials"]
        # x-api-key works too (Anthropic-style clients), and is stripped as well
        import http.client
        conn = http.client.HTTPConnection(cp.listener, timeout=10)
        conn.request("POST", "/v1/chat/completions", chat_body(), {"content-type": "application/json",
                                                                   "x-api-key": BATCH_KEY,
                                                                   "x-llm-client": "web-app"})
        assert conn.getresponse().status == 200
        conn.close()
        assert digest(BATCH_KEY) not in backend_stats(a)["credentials"]
        assert WEB_KEY not in cp.log_text() and BATCH_KEY not in cp.log_text()
        assert WEB_KEY not in json.dumps(cp.status())

        # A key removed from the config stops working at once (an RDS update: open connections too).
        keep = sdk(cp, BATCH_KEY)
        assert ask(keep)
        doc = yaml.safe_load(cp.config_path.read_text())
        del doc["clients"]["batch"]
        started = time.monotonic()
        cp.write_config(text=yaml.safe_dump(doc, sort_keys=False))
        cp.wait_applied()
        with pytest.raises(openai.AuthenticationError):
            ask(keep)  # the same SDK client, its pooled connection reused
        assert time.monotonic() - started < 5
        assert ask(sdk(cp, WEB_KEY))
    finally:
        cp.stop()
        a.stop()


def test_requests_per_minute_hold_under_concurrency(tmp_path):
    a, b = MockBackend("a"), MockBackend("b")
    limit = 60
    cp = start(tmp_path, {"a": a, "b": b}, {
        "web-app": {"key": "${WEB_APP_KEY}", "limits": {"requests_per_minute": limit}},
        "batch": {"key": "${BATCH_KEY}"}})
    try:
        client = sdk(cp, WEB_KEY)

        def one(_: int) -> int | tuple[int, str | None, dict]:
            try:
                ask(client)
                return 200
            except openai.RateLimitError as exc:
                return (429, exc.response.headers.get("retry-after"), exc.body)

        started = time.monotonic()
        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(one, range(150)))
        assert time.monotonic() - started < 55, "the burst must fit in one bucket window"
        admitted = results.count(200)
        refused = [r for r in results if r != 200]
        assert abs(admitted - limit) <= limit * 0.1, admitted
        assert len(refused) == 150 - admitted
        code, retry_after, body = refused[0]
        assert code == 429 and int(retry_after) > 0 and body["code"] == "rate_limit_exceeded", refused[0]
        served = backend_stats(a)["requests"] + backend_stats(b)["requests"]
        assert served == admitted, "a refused request reached a backend"
        assert ask(sdk(cp, BATCH_KEY)), "another client is not limited by web-app's limit"
    finally:
        cp.stop()
        a.stop()
        b.stop()


def test_without_clients_the_listener_stays_open(tmp_path):
    a = MockBackend("a")
    cp = ControlPlane(tmp_path, {"chat": {"match": {"prefix": "/v1/"}, "backends": {"a": {"url": a.url}}}})
    try:
        assert ask(sdk(cp, "anything"))
        wait_for(lambda: backend_stats(a)["requests"] == 1, what="the request at the backend")
    finally:
        cp.stop()
        a.stop()


async def _second_envoy(target: str, token: str, opened: asyncio.Event, close: asyncio.Event) -> None:
    """An ADS stream as a second Envoy would open it (authenticated), held until `close` is set."""
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    from controlplane.xds import typeurls

    async with grpc.aio.insecure_channel(target) as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
            metadata=(("authorization", f"Bearer {token}"),))
        await call.write(discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id="second-envoy"),
                                                        type_url=typeurls.CLUSTER))
        await call.read()
        opened.set()
        await close.wait()
        call.cancel()


def test_request_limits_are_divided_across_connected_envoys(tmp_path):
    a = MockBackend("a")
    limit = 20
    cp = start(tmp_path, {"a": a}, {"web-app": {"key": "${WEB_APP_KEY}", "limits": {"requests_per_minute": limit}}})
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        def admitted(count: int) -> int:
            client, ok = sdk(cp, WEB_KEY), 0
            for _ in range(count):
                try:
                    ask(client)
                    ok += 1
                except openai.RateLimitError:
                    pass
            return ok

        def routes_version() -> str:
            return cp.status()["snapshot"]["RDS"]

        def envoy_has(version: str) -> bool:
            node = next(n for n in cp.status()["nodes"] if n["id"] == "llm-lb-local")
            return node["acked"].get("RDS") == version

        before = routes_version()
        token = (tmp_path / "state" / "xds-token").read_text().strip()
        opened, close = asyncio.Event(), asyncio.Event()
        held = asyncio.run_coroutine_threadsafe(
            _second_envoy(f"127.0.0.1:{cp.ports['xds']}", token, opened, close), loop)
        halved = wait_for(lambda: (v := routes_version()) != before and v, what="limits re-divided for 2 Envoys")
        wait_for(lambda: envoy_has(halved), what="the managed Envoy to take the halved limit")
        assert admitted(limit) == limit // 2

        loop.call_soon_threadsafe(close.set)
        held.result(timeout=10)
        whole = wait_for(lambda: (v := routes_version()) != halved and v, what="limits re-divided for 1 Envoy")
        wait_for(lambda: envoy_has(whole), what="the managed Envoy to take the whole limit")
        assert admitted(limit + 5) == limit
    finally:
        loop.call_soon_threadsafe(loop.stop)
        cp.stop()
        a.stop()
