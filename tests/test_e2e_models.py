"""Requests routed by the JSON body's `model`, end to end through a real Envoy.

Two models through one base URL reach their own pools, an alias reaches its
pool and the backend sees its own model name, Envoy answers `/v1/models`,
unknown models and model-less bodies itself, and when every tier-0 backend
is gone the fallback model serves with no client-visible failure.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest

from .harness import ControlPlane, Load, MockBackend, chat_body, http_json, wait_for

pytestmark = pytest.mark.e2e

FAST_UPSTREAM = "gpt-4o-mini-2024-07-18"


def post(listener: str, body: bytes, path: str = "/v1/chat/completions",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(listener, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def backend_stats(backend: MockBackend) -> dict[str, Any]:
    code, body = http_json("GET", f"{backend.url}/admin/stats")
    assert code == 200, body
    return body


@pytest.fixture(scope="module")
def models_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlPlane, dict[str, MockBackend]]]:
    tmp = tmp_path_factory.mktemp("models")
    backends = {name: MockBackend(name, args=["--completion-tokens", "5", "--prompt-tokens", "9"])
                for name in ("fast", "smart", "emb")}
    pools = {
        "chat-fast": {"match": {"prefix": "/v1/", "models": ["gpt-4o-mini", "fast"]},
                      "backends": {"fast": {"url": backends["fast"].url, "model": FAST_UPSTREAM}}},
        "chat-smart": {"match": {"prefix": "/v1/", "models": ["gpt-4o", "smart"]},
                       "backends": {"smart": {"url": backends["smart"].url}}},
        "embeddings": {"match": {"prefix": "/v1/embeddings"}, "backends": {"emb": {"url": backends["emb"].url}}},
    }
    cp = None
    try:
        cp = ControlPlane(tmp, pools)
        yield cp, backends
    finally:
        if cp is not None:
            cp.stop()
        for b in backends.values():
            b.stop()


def test_two_models_one_base_url_with_the_openai_sdk(models_setup):
    openai = pytest.importorskip("openai")
    cp, backends = models_setup
    client = openai.OpenAI(base_url=f"http://{cp.listener}/v1", api_key="unused-by-the-balancer", max_retries=0)
    smart = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert "smart" in smart.choices[0].message.content
    fast = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert "fast" in fast.choices[0].message.content
    assert fast.model == FAST_UPSTREAM  # the backend answered under its own name
    text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="smart", stream=True, messages=[{"role": "user", "content": "hi"}]) if chunk.choices)
    assert "smart" in text
    text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="fast", stream=True, messages=[{"role": "user", "content": "hi"}]) if chunk.choices)
    assert "fast" in text
    assert sorted(m.id for m in client.models.list()) == ["fast", "gpt-4o", "gpt-4o-mini", "smart"]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert "gpt-5" in str(unknown.value)


def test_alias_reaches_its_pool_and_the_backend_sees_its_own_model_name(models_setup):
    cp, backends = models_setup
    before = backend_stats(backends["fast"])["models"].get(FAST_UPSTREAM, 0)
    for model in ("fast", "gpt-4o-mini"):
        code, _, body = post(cp.listener, chat_body(model=model))
        assert code == 200, body
        assert json.loads(body)["model"] == FAST_UPSTREAM
    seen = backend_stats(backends["fast"])["models"]
    assert seen.get(FAST_UPSTREAM, 0) == before + 2
    assert set(seen) == {FAST_UPSTREAM}, seen  # never the alias or the app's name
    # A pool without its own names forwards the body as sent.
    code, _, body = post(cp.listener, chat_body(model="smart"))
    assert code == 200 and json.loads(body)["model"] == "smart"


def test_a_spoofed_model_header_changes_nothing(models_setup):
    cp, backends = models_setup
    code, _, body = post(cp.listener, chat_body(model="gpt-4o"), headers={"x-llm-model": "gpt-4o-mini"})
    assert code == 200 and "smart" in json.loads(body)["choices"][0]["message"]["content"]
    # Without a model in the body, the header alone does not route anywhere.
    before = {n: backend_stats(b)["requests"] for n, b in backends.items()}
    code, _, body = post(cp.listener, b'{"messages": []}', headers={"x-llm-model": "gpt-4o"})
    assert code == 400, body
    code, _, body = post(cp.listener, b"", headers={"x-llm-model": "gpt-4o", "x-llm-lb-model": "x"})
    assert code == 400, body
    assert {n: backend_stats(b)["requests"] for n, b in backends.items()} == before


def test_envoy_answers_models_unknown_and_missing_models_itself(models_setup):
    cp, backends = models_setup
    before = {n: backend_stats(b)["requests"] for n, b in backends.items()}
    code, listing = http_json("GET", f"http://{cp.listener}/v1/models")
    assert code == 200 and listing["object"] == "list"
    assert {m["id"]: m["owned_by"] for m in listing["data"]} == {
        "fast": "chat-fast", "gpt-4o-mini": "chat-fast", "gpt-4o": "chat-smart", "smart": "chat-smart"}
    code, one = http_json("GET", f"http://{cp.listener}/v1/models/gpt-4o")
    assert code == 200 and one["id"] == "gpt-4o"

    code, headers, body = post(cp.listener, chat_body(model='no-such"model'))
    error = json.loads(body)["error"]
    assert code == 404 and headers["content-type"].startswith("application/json")
    assert error["code"] == "model_not_found" and 'no-such"model' in error["message"]
    assert "gpt-4o-mini" in error["message"]  # the available ones are listed

    for raw, ctype in ((b"this is not json", "application/json"), (b'{"messages": []}', "application/json"),
                       (b'{"model": "gpt-4o"}', "text/plain")):
        code, headers, body = post(cp.listener, raw, headers={"content-type": ctype})
        assert code == 400, (raw, body)
        assert json.loads(body)["error"]["code"] == "missing_model"
    assert {n: backend_stats(b)["requests"] for n, b in backends.items()} == before
    # A prefix-only pool with a longer prefix still takes its paths, model or not.
    code, _, body = post(cp.listener, b'{"model": "anything", "messages": [{"role": "user", "content": "x"}]}',
                         path="/v1/embeddings")
    assert code == 200 or backend_stats(backends["emb"])["requests"] > before["emb"], body


def _cost_once_settled(cp: ControlPlane, pool: str, backend: str, requests: int) -> dict[str, Any]:
    def settled() -> dict[str, Any] | None:
        entry = http_json("GET", f"{cp.api}/v1/cost")[1]["pools"][pool]
        return entry if entry["backends"][backend]["requests"] == requests else None

    return wait_for(settled, what=f"{requests} requests of {pool}/{backend} in the spend")


def test_no_lua_runs_for_non_streamed_requests_and_usage_matches_the_backends(models_setup):
    cp, backends = models_setup
    lua = "http.ingress.lua.executions"
    smart_before = backend_stats(backends["smart"])
    cost_before = _cost_once_settled(cp, "chat-smart", "smart", smart_before["completions"])["backends"]["smart"]
    start = cp.envoy_stats(lua).get(lua, 0)
    for _ in range(5):
        assert post(cp.listener, chat_body(model="gpt-4o"))[0] == 200
    assert cp.envoy_stats(lua).get(lua, 0) == start  # five requests, no Lua
    body = json.dumps({"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    code, _, raw = post(cp.listener, body)
    assert code == 200 and b"data: [DONE]" in raw
    assert cp.envoy_stats(lua).get(lua, 0) == start + 1  # the streamed one, only
    smart_after = backend_stats(backends["smart"])
    assert smart_after["completions"] - smart_before["completions"] == 6
    cost_after = _cost_once_settled(cp, "chat-smart", "smart", smart_after["completions"])["backends"]["smart"]
    # What the backend reported, read from JSON natively and from the stream by Lua: not estimated.
    for key in ("prompt_tokens", "completion_tokens"):
        assert cost_after[key] - cost_before[key] == smart_after[key] - smart_before[key], key
    # Spend per model: the served model of each pool.
    fast_pool = http_json("GET", f"{cp.api}/v1/cost")[1]["pools"]["chat-fast"]
    assert FAST_UPSTREAM in fast_pool["models"], fast_pool["models"]


def test_large_requests_pass_up_to_the_documented_limit_and_get_a_json_413_beyond(models_setup):
    cp, backends = models_setup
    image = "A" * (10 * 1024 * 1024)  # a 10 MB base64 image in a chat message
    body = json.dumps({"model": "fast", "messages": [{"role": "user", "content": image}]}).encode()
    code, _, raw = post(cp.listener, body)
    assert code == 200, raw[:300]
    assert json.loads(raw)["model"] == FAST_UPSTREAM  # rewritten, whole body buffered upstream too
    before = {n: backend_stats(b)["requests"] for n, b in backends.items()}
    too_big = json.dumps({"model": "fast", "messages": [{"role": "user", "content": "A" * (17 * 1024 * 1024)}]})
    code, _, raw = post(cp.listener, too_big.encode())
    assert code == 413
    error = json.loads(raw)["error"]
    assert "16384 KiB" in error["message"] and "per_connection_buffer_limit_kb" in error["message"]
    assert {n: backend_stats(b)["requests"] for n, b in backends.items()} == before


def test_fallback_model_serves_when_every_tier0_backend_dies(tmp_path):
    primary = [MockBackend(f"primary-{i}") for i in range(2)]
    fallback = MockBackend("fallback")
    cp = None
    try:
        cp = ControlPlane(tmp_path, {"chat": {
            "match": {"prefix": "/v1/", "models": ["gpt-4o"]},
            "health_check": {"interval": "500ms", "timeout": "300ms"},
            "backends": {
                "primary-0": {"url": primary[0].url},
                "primary-1": {"url": primary[1].url},
                "fallback": {"url": fallback.url, "priority": 1, "model": "gpt-4o-mini"},
            },
        }})
        with Load(cp.listener, clients=20, model="gpt-4o") as load:
            load.wait_requests(200)
            for b in primary:
                b.stop()
            wait_for(lambda: backend_stats(fallback)["completions"] >= 300, timeout=30,
                     what="the fallback to serve 300 requests")
        assert load.failures == [] and set(load.statuses) == {200}, (load.statuses, load.failures[:5])
        assert set(backend_stats(fallback)["models"]) == {"gpt-4o-mini"}

        def served() -> dict[str, Any] | None:
            models = http_json("GET", f"{cp.api}/v1/cost")[1]["pools"]["chat"]["models"]
            return models if models.get("gpt-4o-mini", {}).get("requests", 0) >= 300 else None

        models = wait_for(served, what="the fallback model in the spend")
        assert models["gpt-4o"]["requests"] >= 1  # the primaries' requests, under the requested name
    finally:
        if cp is not None:
            cp.stop()
        for b in (*primary, fallback):
            b.stop()


def test_rate_limited_tier_falls_back_and_each_attempt_is_rewritten_for_its_backend(tmp_path):
    limited = MockBackend("limited", args=["--error-rate", "1", "--error-status", "429"])
    fallback = MockBackend("fallback")
    cp = None
    try:
        cp = ControlPlane(tmp_path, {"chat": {
            "match": {"prefix": "/v1/", "models": ["big"]},
            "backends": {
                "limited": {"url": limited.url, "model": "big-2024"},
                "fallback": {"url": fallback.url, "priority": 1, "model": "small-2024"},
            },
        }})
        for _ in range(10):
            code, _, body = post(cp.listener, chat_body(model="big"))
            assert code == 200 and json.loads(body)["model"] == "small-2024", body
        assert set(backend_stats(limited)["models"]) == {"big-2024"}
        assert backend_stats(limited)["requests"] >= 10
        assert backend_stats(fallback)["models"] == {"small-2024": 10}
    finally:
        if cp is not None:
            cp.stop()
        limited.stop()
        fallback.stop()
