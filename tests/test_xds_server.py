"""The ADS protocol against a real gRPC client on loopback: ACK, NACK, stale nonces, reconnects."""

from __future__ import annotations

import asyncio

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from controlplane.config import parse_config
from controlplane.scoring.weights import pool_weights
from controlplane.xds import resources, typeurls
from controlplane.xds.server import AdsServer, SnapshotCache, start_server
from controlplane.xds.snapshot import Snapshot

from .harness import free_port

CONFIG = """
pools:
  chat:
    backends:
      a: {url: "http://127.0.0.1:9001", weight: 3}
      b: {url: "http://127.0.0.1:9002", weight: 1}
"""
ADDRESSES = {"127.0.0.1": "127.0.0.1"}


def snapshot(weight_a: int = 3, prefix: str = "/") -> Snapshot:
    text = CONFIG.replace("weight: 3", f"weight: {weight_a}")
    config = parse_config(text.replace("  chat:\n", f"  chat:\n    match: {{prefix: {prefix}}}\n"), env={})
    return Snapshot.of(resources.build(config, {name: pool_weights(p) for name, p in config.pools.items()}, ADDRESSES))


def request(type_url: str, version: str = "", nonce: str = "", names=(), error: str | None = None, node: str = "n1"):
    req = discovery_pb2.DiscoveryRequest(
        type_url=type_url, version_info=version, response_nonce=nonce, resource_names=list(names),
        node=base_pb2.Node(id=node, cluster="test"),
    )
    if error:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


class Harness:
    def __init__(self) -> None:
        self.cache = SnapshotCache()
        self.ads = AdsServer(self.cache)

    async def __aenter__(self) -> Harness:
        self.port = free_port()
        self.server = await start_server(self.ads, "127.0.0.1", self.port)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        return self

    def stream(self):
        return ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel).StreamAggregatedResources()

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.server.stop(None)


async def read(call) -> discovery_pb2.DiscoveryResponse:
    return await asyncio.wait_for(call.read(), timeout=5)


async def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_subscribe_ack_and_weight_only_change_pushes_only_eds():
    async def scenario():
        async with Harness() as h:
            first = snapshot()
            h.cache.set(first)
            call = h.stream()
            await call.write(request(typeurls.CLUSTER))
            cds = await read(call)
            assert cds.type_url == typeurls.CLUSTER and cds.version_info == first.version(typeurls.CLUSTER)
            assert len(cds.resources) == 1
            await call.write(request(typeurls.CLUSTER, cds.version_info, cds.nonce))
            await call.write(request(typeurls.ENDPOINT, names=["chat"]))
            eds = await read(call)
            assert eds.version_info == first.version(typeurls.ENDPOINT)
            await call.write(request(typeurls.ENDPOINT, eds.version_info, eds.nonce, names=["chat"]))
            await call.write(request(typeurls.LISTENER))
            lds = await read(call)
            await call.write(request(typeurls.LISTENER, lds.version_info, lds.nonce))
            await call.write(request(typeurls.ROUTE, names=[resources.ROUTE_NAME]))
            rds = await read(call)
            await call.write(request(typeurls.ROUTE, rds.version_info, rds.nonce, names=[resources.ROUTE_NAME]))
            await wait_until(lambda: h.ads.in_sync(first) == ["n1"])

            second = snapshot(weight_a=1)
            h.cache.set(second)
            pushed = await read(call)
            # Only EDS changed; had anything else been sent, it would arrive first (push order CDS, EDS, ...).
            assert pushed.type_url == typeurls.ENDPOINT and pushed.version_info == second.version(typeurls.ENDPOINT)
            await call.write(request(typeurls.ENDPOINT, pushed.version_info, pushed.nonce, names=["chat"]))
            third = snapshot(weight_a=1, prefix="/v1/")
            h.cache.set(third)
            pushed = await read(call)
            assert pushed.type_url == typeurls.ROUTE, "the next push is the route change, nothing was resent"
            assert h.ads.nodes["n1"].acked[typeurls.ENDPOINT] == second.version(typeurls.ENDPOINT)
            call.cancel()

    asyncio.run(scenario())


def test_nack_is_recorded_and_not_resent_until_the_next_change():
    async def scenario():
        async with Harness() as h:
            first = snapshot()
            h.cache.set(first)
            call = h.stream()
            await call.write(request(typeurls.ENDPOINT, names=["chat"]))
            eds = await read(call)
            await call.write(request(typeurls.ENDPOINT, eds.version_info, eds.nonce, names=["chat"]))
            await wait_until(lambda: h.ads.nodes["n1"].acked.get(typeurls.ENDPOINT) == eds.version_info)
            second = snapshot(weight_a=5)
            h.cache.set(second)
            bad = await read(call)
            await call.write(
                request(typeurls.ENDPOINT, eds.version_info, bad.nonce, names=["chat"], error="weights are wrong")
            )
            await wait_until(lambda: typeurls.ENDPOINT in h.ads.nodes["n1"].nacked)
            node = h.ads.nodes["n1"]
            assert node.nacked[typeurls.ENDPOINT].message == "weights are wrong"
            assert node.nacked[typeurls.ENDPOINT].version == second.version(typeurls.ENDPOINT)
            assert node.acked[typeurls.ENDPOINT] == first.version(typeurls.ENDPOINT)
            assert h.ads.stats.nacks == {"EDS": 1}
            assert node.as_dict()["nacked"]["EDS"]["message"] == "weights are wrong"

            third = snapshot(weight_a=2)
            h.cache.set(third)
            fixed = await read(call)
            assert fixed.version_info == third.version(typeurls.ENDPOINT), "the rejected version was not sent again"
            await call.write(request(typeurls.ENDPOINT, fixed.version_info, fixed.nonce, names=["chat"]))
            await wait_until(lambda: typeurls.ENDPOINT not in h.ads.nodes["n1"].nacked)
            call.cancel()

    asyncio.run(scenario())


def test_stale_nonce_is_ignored():
    async def scenario():
        async with Harness() as h:
            h.cache.set(snapshot())
            call = h.stream()
            await call.write(request(typeurls.ENDPOINT, names=["chat"]))
            first = await read(call)
            h.cache.set(snapshot(weight_a=4))
            second = await read(call)
            # A NACK that answers the superseded response must not be recorded.
            await call.write(request(typeurls.ENDPOINT, "", first.nonce, names=["chat"], error="old news"))
            await call.write(request(typeurls.ENDPOINT, second.version_info, second.nonce, names=["chat"]))
            await wait_until(lambda: h.ads.nodes["n1"].acked.get(typeurls.ENDPOINT) == second.version_info)
            assert h.ads.nodes["n1"].nacked == {}
            call.cancel()

    asyncio.run(scenario())


def test_reconnecting_envoy_gets_current_snapshot_only_if_it_lacks_it():
    async def scenario():
        async with Harness() as h:
            old, current = snapshot(weight_a=9), snapshot()
            h.cache.set(current)
            stale = h.stream()
            await stale.write(request(typeurls.ENDPOINT, version=old.version(typeurls.ENDPOINT), names=["chat"]))
            resp = await read(stale)
            assert resp.version_info == current.version(typeurls.ENDPOINT)
            stale.cancel()

            fresh = h.stream()
            await fresh.write(request(typeurls.CLUSTER, version=current.version(typeurls.CLUSTER), node="n2"))
            h.cache.set(snapshot(weight_a=9, prefix="/v2/"))
            # CDS is unchanged and already held: the first thing this stream hears is nothing for CDS.
            await fresh.write(request(typeurls.ROUTE, names=[resources.ROUTE_NAME], node="n2"))
            resp = await read(fresh)
            assert resp.type_url == typeurls.ROUTE
            assert h.ads.nodes["n2"].acked[typeurls.CLUSTER] == current.version(typeurls.CLUSTER)
            fresh.cancel()
            await wait_until(lambda: h.ads.nodes["n2"].streams == 0)

    asyncio.run(scenario())
