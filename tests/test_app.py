"""The control plane in-process without Envoy: API answers, drains, reloads (real HTTP on loopback)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import yaml
from envoy.config.core.v3 import health_check_pb2

from controlplane.app import App
from controlplane.config import load_config

from .harness import free_port


def write(path: Path, pools: dict, ports: dict[str, int]) -> None:
    doc = {
        "controlplane": {"xds": {"port": ports["xds"]}, "api": {"port": ports["api"]}},
        "envoy": {"listener": {"port": ports["listener"]}, "admin": {"port": ports["admin"]}},
        "pools": pools,
    }
    path.write_text(yaml.safe_dump(doc))


POOLS = {"chat": {"backends": {"a": {"url": "http://127.0.0.1:9001", "weight": 3},
                               "b": {"url": "http://127.0.0.1:9002"}}}}


def run_app(tmp_path: Path, scenario, write_config=None) -> None:
    """The App in-process on free ports, its API reached by `scenario(app, http, path, ports)`;
    `write_config(path, ports)` writes the first config (default: POOLS)."""
    ports = {k: free_port() for k in ("xds", "api", "listener", "admin")}
    path = tmp_path / "config.yaml"
    if write_config is None:
        write(path, POOLS, ports)
    else:
        write_config(path, ports)

    async def main() -> None:
        app = App(path, load_config(path), state_dir=tmp_path / "state", run_envoy=False, watch_interval=0.05)
        await app.start()
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{ports['api']}") as http:
                await scenario(app, http, path, ports)
        finally:
            await app.stop()

    asyncio.run(main())


async def until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def test_drain_api_validates_and_persists(tmp_path):
    async def scenario(app, http, path, ports):
        async with http.post("/v1/pools/nope/backends/a/drain") as resp:
            assert resp.status == 404 and "no pool 'nope'" in (await resp.json())["error"]["message"]
        async with http.post("/v1/pools/chat/backends/a/drain", data="{bad") as resp:
            assert resp.status == 400
        async with http.post("/v1/pools/chat/backends/a/drain", json={"force": "yes"}) as resp:
            assert resp.status == 400
        async with http.post("/v1/pools/chat/backends/a/drain") as resp:
            assert resp.status == 200 and (await resp.json())["draining"] is True
        async with http.post("/v1/pools/chat/backends/b/drain") as resp:
            assert resp.status == 409 and "last backend" in (await resp.json())["error"]["message"]
        async with http.post("/v1/pools/chat/backends/b/drain", json={"force": True}) as resp:
            assert resp.status == 200
        state = json.loads((tmp_path / "state" / "state.json").read_text())
        assert state["drained"] == [{"pool": "chat", "backend": "a"}, {"pool": "chat", "backend": "b"}]
        async with http.get("/v1/status") as resp:
            backends = (await resp.json())["pools"]["chat"]["backends"]
            assert backends["a"]["draining"] and backends["b"]["draining"]
        async with http.post("/v1/pools/chat/backends/a/undrain") as resp:
            assert resp.status == 200 and (await resp.json())["draining"] is False

    run_app(tmp_path, scenario)


def test_reload_applies_valid_edits_and_keeps_last_good_on_errors(tmp_path):
    async def scenario(app, http, path, ports):
        eds_before = app.cache.snapshot.version("type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment")
        path.write_text(path.read_text() + "bogus: 1\n")
        await until(lambda: app.reloader.status.errors)
        async with http.get("/v1/status") as resp:
            status = await resp.json()
        assert status["config"]["last_edit"] == "rejected"
        assert any("unknown key 'bogus'" in e for e in status["config"]["errors"])
        assert status["pools"]["chat"]["backends"]["a"]["weight"] == 3

        pools = json.loads(json.dumps(POOLS))
        pools["chat"]["backends"]["a"]["weight"] = 1
        write(path, pools, ports)
        await until(lambda: not app.reloader.status.errors and app.reconciler.published.weights["chat"]["a"] == 1)
        eds_after = app.cache.snapshot.version("type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment")
        assert eds_after != eds_before
        async with http.get("/metrics") as resp:
            text = await resp.text()
        assert 'llm_lb_backend_weight{backend="a",pool="chat"} 1.0' in text
        assert 'llm_lb_config_reloads_total{result="rejected"} 1.0' in text
        assert 'llm_lb_config_reloads_total{result="applied"} 1.0' in text
        assert "llm_lb_snapshot_build_failures_total 0.0" in text
        assert "llm_lb_ledger_pending_rows 0.0" in text and "llm_lb_ledger_flush_failures_total 0.0" in text
        async with http.get("/healthz") as resp:
            assert resp.status == 200

    run_app(tmp_path, scenario)


def test_drains_survive_a_restart(tmp_path):
    async def first(app, http, path, ports):
        async with http.post("/v1/pools/chat/backends/b/drain") as resp:
            assert resp.status == 200

    async def second(app, http, path, ports):
        assert ("chat", "b") in app.reconciler.state.drained
        cla = app.cache.snapshot.resources["type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"]["chat"]
        draining = [e.metadata.filter_metadata["llm_lb"]["backend"] for loc in cla.endpoints for e in loc.lb_endpoints
                    if e.health_status == health_check_pb2.DRAINING]
        assert draining == ["b"]

    run_app(tmp_path, first)
    run_app(tmp_path, second)


def test_api_bodies_are_bounded_and_bad_json_is_a_400(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000  # 200 KB: refused for its size before it is parsed
    nested = "[" * 20_000 + "]" * 20_000  # 40 KB: within the size, too deep for the parser
    paths = ("/v1/feedback", "/v1/pools/chat/backends/a/drain")

    async def scenario(app, http, path, ports):
        for url in paths:
            async with http.post(url, data=deep, headers={"content-type": "application/json"}) as resp:
                assert resp.status == 413, url
                assert "too large" in (await resp.json())["error"]["message"]
            async with http.post(url, data=nested, headers={"content-type": "application/json"}) as resp:
                assert resp.status == 400, url
                assert "nested too deeply" in (await resp.json())["error"]["message"]
            async with http.post(url, data=b"\xff\xfe{", headers={"content-type": "application/json"}) as resp:
                assert resp.status == 400 and "must be JSON" in (await resp.json())["error"]["message"]
        padded = '{"force": false' + " " * 60_000 + "}"  # under 64 KiB: read, then judged
        async with http.post(paths[1], data=padded) as resp:
            assert resp.status == 200
        async with http.post(paths[1], json={"force": False, "pad": 1}) as resp:  # an unknown field is named
            assert resp.status == 400 and "'force'" in (await resp.json())["error"]["message"]
        async with http.get("/healthz") as resp:
            assert resp.status == 200
        assert ("chat", "a") in app.reconciler.state.drained

    run_app(tmp_path, scenario)


def test_feedback_once_per_request_and_suspicious_usage_in_metrics(tmp_path):
    from controlplane.telemetry.accesslog import parse

    from .test_accesslog import entry

    async def scenario(app, http, path, ports):
        app.telemetry.observe_batch([
            parse(entry(backend="a", request_id="r1", usage={"prompt_tokens": 1e18, "completion_tokens": 12.5})),
            parse(entry(backend="b", request_id="r2", usage={"prompt_tokens": 5, "completion_tokens": 7})),
        ])
        async with http.post("/v1/feedback", json={"request_id": "r1", "score": 0.1}) as resp:
            assert resp.status == 200 and (await resp.json())["backend"] == "a"
        for _ in range(2):
            async with http.post("/v1/feedback", json={"request_id": "r1", "score": 0.1}) as resp:
                assert resp.status == 409
                assert "already rated" in (await resp.json())["error"]["message"]
        async with http.post("/v1/feedback", json={"request_id": "later", "score": 0.9}) as resp:
            assert resp.status == 202
        async with http.post("/v1/feedback", json={"request_id": "later", "score": 0.9}) as resp:
            assert resp.status == 409, "a rating still waiting for its request counts"
        async with http.post("/v1/feedback", json={"request_id": "x" * 129, "score": 0.9}) as resp:
            assert resp.status == 400 and "128" in (await resp.json())["error"]["message"]
        assert app.engine.stats[("chat", "a")].feedback_n == 1
        async with http.get("/metrics") as resp:
            text = await resp.text()
        assert 'llm_lb_usage_suspicious_total{backend="a",pool="chat"} 1.0' in text
        assert 'llm_lb_usage_suspicious_total{backend="b",pool="chat"} 0.0' in text
        async with http.get("/v1/pools/chat/weights") as resp:
            assert (await resp.json())["backends"]["a"]["usage_suspicious"] == 1

    run_app(tmp_path, scenario)
