"""The API in-process (real HTTP on loopback, no Envoy): every route, tokens, bounds, the OpenAPI document."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from controlplane.api import MAX_BODY_BYTES, ROUTES
from controlplane.config import ConfigError, parse_config

from . import test_app as app_test

TOKEN = "api-token-0123456789abcdef"
OTHER = "other-token-0123456789abcdef"
POOLS = {"chat": {"backends": {"a": {"url": "http://127.0.0.1:9001", "weight": 3},
                               "b": {"url": "http://127.0.0.1:9002"}}}}


def write(path: Path, ports: dict[str, int], token: str | None) -> None:
    api: dict[str, object] = {"port": ports["api"]}
    if token is not None:
        api["token"] = token
    doc = {"controlplane": {"xds": {"port": ports["xds"]}, "api": api},
           "envoy": {"listener": {"port": ports["listener"]}, "admin": {"port": ports["admin"]}}, "pools": POOLS}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)


def run_app(tmp_path: Path, scenario, token: str | None = "${TEST_API_TOKEN}") -> None:
    app_test.run_app(tmp_path, scenario, lambda path, ports: write(path, ports, token))


@pytest.fixture(autouse=True)
def tokens(monkeypatch):
    monkeypatch.setenv("TEST_API_TOKEN", TOKEN)
    monkeypatch.setenv("TEST_API_TOKEN_2", OTHER)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_openapi_lists_exactly_the_served_routes(tmp_path):
    async def scenario(app, http, path, ports):
        served = {(r.method, r.resource.canonical) for r in app._api.app.router.routes()
                  if r.method != "HEAD" and r.resource is not None}
        async with http.get("/openapi.json") as resp:
            assert resp.status == 200
            doc = await resp.json()
        documented = {(method.upper(), p) for p, ops in doc["paths"].items() for method in ops}
        assert documented == served
        assert len(served) == len(ROUTES) == 20
        for p, ops in doc["paths"].items():
            for method, op in ops.items():
                assert op["summary"] and op["responses"], (method, p)
                mutates = method == "post"
                assert ("security" in op) == mutates, (method, p)
                assert ("401" in op["responses"]) == mutates, (method, p)

    run_app(tmp_path, scenario)


def test_every_read_route_answers_without_a_token(tmp_path):
    async def scenario(app, http, path, ports):
        for route in ROUTES:
            if route.method != "GET":
                continue
            url = route.path.replace("{pool}", "chat")
            async with http.get(url) as resp:
                if route.path == "/v1/rollouts/{pool}":  # chat has no rollout block
                    assert resp.status == 404 and "has no rollout" in (await resp.json())["error"]["message"]
                    continue
                assert resp.status == 200, url
                assert resp.content_type.split(";")[0] == route.content.split(";")[0], url
                body = await resp.read()
                assert TOKEN.encode() not in body, f"{url} echoes the API token"
        async with http.get("/") as resp:
            assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
        for url in ("/v1/pools/nope", "/v1/pools/nope/weights"):
            async with http.get(url) as resp:
                assert resp.status == 404 and "no pool 'nope'" in (await resp.json())["error"]["message"]
        async with http.get("/v1/pools") as resp:
            pools = (await resp.json())["pools"]
        chat = pools["chat"]
        assert set(chat["backends"]) == {"a", "b"}
        assert chat["backends"]["a"]["weight"] == 3 and chat["backends"]["b"]["weight"] == 1
        assert chat["backends"]["a"]["weight_share"] == 0.75
        assert chat["backends"]["a"]["envoy_state"] == "unknown"  # no Envoy admin to read here
        assert chat["available"] is None
        assert chat["changes"] and chat["changes"][-1]["cause"] == "start"
        async with http.get("/v1/pools/chat") as resp:
            assert (await resp.json())["backends"].keys() == chat["backends"].keys()
        async with http.get("/readyz") as resp:  # no managed Envoy: ready once a snapshot is built
            assert resp.status == 200 and (await resp.json())["ready"] is True
        async with http.get("/v1/status") as resp:
            assert (await resp.json())["api"]["token_required"] is True

    run_app(tmp_path, scenario)


MUTATIONS = (("/v1/pools/chat/backends/a/drain", {}), ("/v1/pools/chat/backends/a/undrain", {}),
             ("/v1/feedback", {"request_id": "r-1", "score": 0.5}))


def test_mutations_need_the_token(tmp_path):
    async def scenario(app, http, path, ports):
        for url, body in MUTATIONS:
            for headers in ({}, bearer("wrong-token-0123456789"), bearer(TOKEN + "x"), {"Authorization": TOKEN},
                            {"Authorization": f"Basic {TOKEN}"}):
                async with http.post(url, json=body, headers=headers) as resp:
                    assert resp.status == 401, (url, headers)
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                    text = await resp.text()
                    assert TOKEN not in text and "Bearer <token>" in json.loads(text)["error"]["message"]
            assert ("chat", "a") not in app.reconciler.state.drained
        async with http.post(MUTATIONS[0][0], json={}, headers=bearer(TOKEN)) as resp:
            assert resp.status == 200 and ("chat", "a") in app.reconciler.state.drained
        async with http.post(MUTATIONS[1][0], headers={"Authorization": f"bearer {TOKEN}"}) as resp:
            assert resp.status == 200 and ("chat", "a") not in app.reconciler.state.drained
        async with http.post("/v1/feedback", json=MUTATIONS[2][1], headers=bearer(TOKEN)) as resp:
            assert resp.status == 202
        async with http.get("/v1/status") as resp:
            assert (await resp.json())["api"]["unauthorized_refused"] == 15

    run_app(tmp_path, scenario)


def test_bad_bodies_with_a_valid_token(tmp_path):
    async def scenario(app, http, path, ports):
        big = b'{"force": true' + b" " * MAX_BODY_BYTES + b"}"
        for url, _ in MUTATIONS:
            async with http.post(url, data=big, headers=bearer(TOKEN)) as resp:
                assert resp.status == 413, url
            async with http.post(url, data=big) as resp:  # no token: refused before the body is read
                assert resp.status == 401, url
            async with http.post(url, data=b"{not json", headers=bearer(TOKEN)) as resp:
                assert resp.status == 400 and "must be JSON" in (await resp.json())["error"]["message"], url
            async with http.post(url, json=[1, 2], headers=bearer(TOKEN)) as resp:
                assert resp.status == 400, url
        async with http.post(MUTATIONS[1][0], json={"force": True}, headers=bearer(TOKEN)) as resp:
            assert resp.status == 400 and "unknown field(s): force" in (await resp.json())["error"]["message"]
        async with http.post("/v1/feedback", json={"request_id": "r", "score": 2}, headers=bearer(TOKEN)) as resp:
            assert resp.status == 400 and "'score'" in (await resp.json())["error"]["message"]
        async with http.post("/v1/feedback", json={"request_id": "r", "score": 1, "x": 1},
                             headers=bearer(TOKEN)) as resp:
            assert resp.status == 400 and "unknown field(s): x" in (await resp.json())["error"]["message"]
        async with http.post("/v1/pools/chat/backends/zzz/drain", headers=bearer(TOKEN)) as resp:
            assert resp.status == 404

    run_app(tmp_path, scenario)


def test_a_reload_rotates_the_token(tmp_path):
    async def scenario(app, http, path, ports):
        async with http.post(MUTATIONS[0][0], headers=bearer(TOKEN)) as resp:
            assert resp.status == 200
        write(path, ports, "${TEST_API_TOKEN_2}")
        deadline = asyncio.get_running_loop().time() + 10
        while app.config().controlplane.api.token.get_secret_value() != OTHER:
            assert asyncio.get_running_loop().time() < deadline, "the edit was not applied"
            await asyncio.sleep(0.05)
        async with http.post(MUTATIONS[1][0], headers=bearer(TOKEN)) as resp:
            assert resp.status == 401
        async with http.post(MUTATIONS[1][0], headers=bearer(OTHER)) as resp:
            assert resp.status == 200
        async with http.get("/v1/status") as resp:
            assert (await resp.json())["config"]["restart_pending"] == []  # the token is read live

    run_app(tmp_path, scenario)


def test_without_a_token_mutations_are_open_on_loopback(tmp_path):
    async def scenario(app, http, path, ports):
        async with http.post(MUTATIONS[0][0]) as resp:
            assert resp.status == 200
        async with http.get("/v1/status") as resp:
            assert (await resp.json())["api"]["token_required"] is False

    run_app(tmp_path, scenario, token=None)


@pytest.mark.parametrize("address", ["0.0.0.0", "192.168.1.10", "::"])
def test_an_api_reachable_from_other_hosts_needs_a_token(address):
    text = yaml.safe_dump({"controlplane": {"api": {"address": address, "port": 8088}}, "pools": POOLS})
    with pytest.raises(ConfigError) as err:
        parse_config(text, "cp.yaml")
    assert any("controlplane.api" in e and "needs a token" in e for e in err.value.errors), err.value.errors
    ok = yaml.safe_dump({"controlplane": {"api": {"address": address, "port": 8088, "token": "${TEST_API_TOKEN}"}},
                         "pools": POOLS})
    assert parse_config(ok, "cp.yaml").controlplane.api.token.get_secret_value() == TOKEN


def test_a_literal_api_token_is_refused():
    text = yaml.safe_dump({"controlplane": {"api": {"port": 8088, "token": TOKEN}}, "pools": POOLS})
    with pytest.raises(ConfigError) as err:
        parse_config(text, "cp.yaml")
    assert any("controlplane.api.token" in e for e in err.value.errors)
    assert not any(TOKEN in e for e in err.value.errors)
