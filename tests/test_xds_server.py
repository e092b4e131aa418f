"""The ADS protocol against a real gRPC client on loopback: ACK, NACK, stale nonces, reconnects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

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


def status(ads: AdsServer, node_id: str) -> dict[str, Any]:
    """The node's entry in `node_status()` (what /v1/status shows), or an empty one while it is unknown."""
    for entry in ads.node_status():
        if entry["id"] == node_id:
            return entry
    return {"id": node_id, "connected": False, "streams": 0, "acked": {}, "nacked": {}}


async def sync_all(call, snap: Snapshot, node: str = "n1") -> dict[str, discovery_pb2.DiscoveryResponse]:
    """Subscribe to every type the way Envoy does (CDS, EDS, LDS, RDS) and ACK each response."""
    got = {}
    for type_url, names in (
        (typeurls.CLUSTER, ()), (typeurls.ENDPOINT, ["chat"]), (typeurls.LISTENER, ()),
        (typeurls.ROUTE, [resources.ROUTE_NAME]),
    ):
        await call.write(request(type_url, names=names, node=node))
        resp = await read(call)
        assert resp.type_url == type_url and resp.version_info == snap.version(type_url)
        await call.write(request(type_url, resp.version_info, resp.nonce, names=names, node=node))
        got[type_url] = resp
    return got


class FakeClock:
    """Injectable wall clock: tests move time instead of sleeping."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeContext:
    """Stands in for grpc.aio.ServicerContext: the servicer does not use it."""


class LocalStream:
    """One ADS stream driven in-process through the real servicer method, without gRPC.

    The servicer's loop only runs while `recv()` or `close()` pull from it:
    between those calls the stream is exactly a stream whose Envoy is not reading.
    """

    def __init__(self, ads: AdsServer) -> None:
        self._requests: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        self._responses = ads.StreamAggregatedResources(self._iterate(), FakeContext())

    async def _iterate(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while (req := await self._requests.get()) is not None:
            yield req

    def send(self, req: discovery_pb2.DiscoveryRequest) -> None:
        self._requests.put_nowait(req)

    async def recv(self) -> discovery_pb2.DiscoveryResponse:
        return await asyncio.wait_for(anext(self._responses), timeout=5)

    async def close(self) -> list[discovery_pb2.DiscoveryResponse]:
        """Envoy half-closes; returns whatever the server still sent before it ended the stream."""
        self._requests.put_nowait(None)

        async def drain() -> list[discovery_pb2.DiscoveryResponse]:
            return [resp async for resp in self._responses]

        return await asyncio.wait_for(drain(), timeout=5)


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
            assert status(h.ads, "n1")["acked"]["EDS"] == second.version(typeurls.ENDPOINT)
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
            await wait_until(lambda: status(h.ads, "n1")["acked"].get("EDS") == eds.version_info)
            second = snapshot(weight_a=5)
            h.cache.set(second)
            bad = await read(call)
            await call.write(
                request(typeurls.ENDPOINT, eds.version_info, bad.nonce, names=["chat"], error="weights are wrong")
            )
            await wait_until(lambda: "EDS" in status(h.ads, "n1")["nacked"])
            node = status(h.ads, "n1")
            assert node["nacked"]["EDS"]["message"] == "weights are wrong"
            assert node["nacked"]["EDS"]["version"] == second.version(typeurls.ENDPOINT)
            assert node["acked"]["EDS"] == first.version(typeurls.ENDPOINT)
            assert h.ads.stats.nacks == {"EDS": 1}

            third = snapshot(weight_a=2)
            h.cache.set(third)
            fixed = await read(call)
            assert fixed.version_info == third.version(typeurls.ENDPOINT), "the rejected version was not sent again"
            await call.write(request(typeurls.ENDPOINT, fixed.version_info, fixed.nonce, names=["chat"]))
            await wait_until(lambda: "EDS" not in status(h.ads, "n1")["nacked"])
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
            await wait_until(lambda: status(h.ads, "n1")["acked"].get("EDS") == second.version_info)
            assert status(h.ads, "n1")["nacked"] == {}
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
            assert status(h.ads, "n2")["acked"]["CDS"] == current.version(typeurls.CLUSTER)
            fresh.cancel()
            await wait_until(lambda: status(h.ads, "n2")["streams"] == 0)
            assert status(h.ads, "n2")["connected"] is False and h.ads.connected() == 0

    asyncio.run(scenario())


def cluster_change(snap: Snapshot) -> Snapshot:
    """`snap` with one cluster setting changed: a new CDS version, every other version the same."""
    changed = {t: dict(snap.resources[t]) for t in typeurls.PUSH_ORDER}
    cluster = type(changed[typeurls.CLUSTER]["chat"])()
    cluster.CopyFrom(changed[typeurls.CLUSTER]["chat"])
    cluster.connect_timeout.seconds += 7
    changed[typeurls.CLUSTER]["chat"] = cluster
    return Snapshot.of(changed)


def test_cds_change_resends_eds_at_unchanged_version():
    async def scenario():
        async with Harness() as h:
            first = snapshot()
            h.cache.set(first)
            call = h.stream()
            before = await sync_all(call, first)
            await wait_until(lambda: h.ads.in_sync(first) == ["n1"])

            second = cluster_change(first)
            assert second.version(typeurls.CLUSTER) != first.version(typeurls.CLUSTER)
            assert all(second.version(t) == first.version(t) for t in typeurls.PUSH_ORDER if t != typeurls.CLUSTER)
            h.cache.set(second)
            cds = await read(call)
            assert cds.type_url == typeurls.CLUSTER and cds.version_info == second.version(typeurls.CLUSTER)
            eds = await read(call)
            assert eds.type_url == typeurls.ENDPOINT, "the warming cluster gets its endpoints again"
            assert eds.version_info == before[typeurls.ENDPOINT].version_info and eds.nonce != before[typeurls.ENDPOINT].nonce
            assert len(eds.resources) == 1
            await call.write(request(typeurls.CLUSTER, cds.version_info, cds.nonce))
            await call.write(request(typeurls.ENDPOINT, eds.version_info, eds.nonce, names=["chat"]))
            await wait_until(lambda: h.ads.in_sync(second) == ["n1"])
            assert h.ads.stats.pushes == {"CDS": 2, "EDS": 2, "LDS": 1, "RDS": 1}

            # Nothing else was queued behind them: the next thing sent is the next change (a route).
            third = cluster_change(snapshot(prefix="/v1/"))
            assert third.version(typeurls.CLUSTER) == second.version(typeurls.CLUSTER)
            h.cache.set(third)
            pushed = await read(call)
            assert pushed.type_url == typeurls.ROUTE
            call.cancel()

    asyncio.run(scenario())


def test_duplicate_node_ids_are_tracked_per_stream():
    async def scenario():
        async with Harness() as h:
            current = snapshot()
            h.cache.set(current)
            one = h.stream()
            await sync_all(one, current, node="x")
            await wait_until(lambda: h.ads.in_sync() == ["x"])

            # A second Envoy with the same node id that has not acknowledged anything yet.
            two = h.stream()
            await two.write(request(typeurls.CLUSTER, node="x"))
            cds = await read(two)
            await wait_until(lambda: status(h.ads, "x")["streams"] == 2)
            assert h.ads.in_sync() == [] and h.ads.connected() == 1
            entry = status(h.ads, "x")
            assert entry["in_sync"] is False and entry["connected"] is True
            assert entry["acked"] == {}, "the streams agree on no type"
            assert sorted(len(s["acked"]) for s in entry["per_stream"]) == [0, 4]

            # It accepts CDS but rejects EDS.
            await two.write(request(typeurls.CLUSTER, cds.version_info, cds.nonce, node="x"))
            await two.write(request(typeurls.ENDPOINT, names=["chat"], node="x"))
            eds = await read(two)
            await two.write(request(typeurls.ENDPOINT, "", eds.nonce, names=["chat"], node="x", error="no thanks"))
            await wait_until(lambda: "EDS" in status(h.ads, "x")["nacked"])
            assert h.ads.in_sync() == []
            entry = status(h.ads, "x")
            assert entry["acked"] == {"CDS": current.version(typeurls.CLUSTER)}
            assert entry["nacked"]["EDS"]["message"] == "no thanks"
            nacks = [s["nacked"] for s in entry["per_stream"]]
            assert sorted(bool(n) for n in nacks) == [False, True], "the detail tells which stream refused"

            # The refusing Envoy goes away: the one left is in sync, and the node agrees with itself again.
            two.cancel()
            await wait_until(lambda: status(h.ads, "x")["streams"] == 1)
            assert h.ads.in_sync() == ["x"]
            entry = status(h.ads, "x")
            assert entry["nacked"] == {} and "per_stream" not in entry
            assert entry["acked"] == {typeurls.SHORT[t]: current.version(t) for t in typeurls.PUSH_ORDER}

            one.cancel()
            await wait_until(lambda: h.ads.connected() == 0)
            assert h.ads.in_sync() == []
            entry = status(h.ads, "x")
            assert entry["connected"] is False and entry["streams"] == 0
            assert entry["acked"]["EDS"] == current.version(typeurls.ENDPOINT), "what it last ran is still shown"

    asyncio.run(scenario())


def test_changes_coalesce_while_the_stream_is_not_read():
    async def scenario():
        cache = SnapshotCache()
        ads = AdsServer(cache)
        cache.set(snapshot())
        stream = LocalStream(ads)
        stream.send(request(typeurls.ENDPOINT, names=["chat"]))
        first = await stream.recv()
        # The servicer is now parked on its `yield`: nobody reads the stream. Changes keep coming,
        # with the event loop free to run in between (the stream's reader task included).
        snaps = [snapshot(weight_a=w) for w in range(4, 104)]
        assert len({s.version(typeurls.ENDPOINT) for s in snaps}) == 100
        for snap in snaps:
            cache.set(snap)
            await asyncio.sleep(0)
        (watch,) = cache.watches()
        assert watch.pending and watch.queue.qsize() == 1, "one pending notification, not 100"

        latest = await stream.recv()
        assert latest.version_info == snaps[-1].version(typeurls.ENDPOINT) != first.version_info
        assert not watch.pending and watch.queue.qsize() == 0
        stream.send(request(typeurls.ENDPOINT, latest.version_info, latest.nonce, names=["chat"]))
        assert await stream.close() == [], "nothing else was owed"
        assert ads.stats.pushes == {"EDS": 2} and ads.stats.acks == {"EDS": 1}
        assert cache.watches() == []

    asyncio.run(scenario())


def test_changes_coalesce_over_grpc():
    async def scenario():
        async with Harness() as h:
            h.cache.set(snapshot())
            call = h.stream()
            await call.write(request(typeurls.ENDPOINT, names=["chat"]))
            first = await read(call)
            await call.write(request(typeurls.ENDPOINT, first.version_info, first.nonce, names=["chat"]))
            await wait_until(lambda: status(h.ads, "n1")["acked"].get("EDS") == first.version_info)
            # The stream's loop is idle on an empty queue; 100 changes arrive before it can run.
            snaps = [snapshot(weight_a=w) for w in range(4, 104)]
            for snap in snaps:
                h.cache.set(snap)
            assert [(w.pending, w.queue.qsize()) for w in h.cache.watches()] == [(True, 1)]
            latest = await read(call)
            assert latest.version_info == snaps[-1].version(typeurls.ENDPOINT)
            await call.write(request(typeurls.ENDPOINT, latest.version_info, latest.nonce, names=["chat"]))
            await wait_until(lambda: status(h.ads, "n1")["acked"].get("EDS") == latest.version_info)
            assert h.ads.stats.pushes == {"EDS": 2}
            call.cancel()

    asyncio.run(scenario())


async def short_stream(ads: AdsServer, node_id: str) -> None:
    """An Envoy that connects, takes CDS, acknowledges it and leaves."""
    stream = LocalStream(ads)
    stream.send(request(typeurls.CLUSTER, node=node_id))
    cds = await stream.recv()
    stream.send(request(typeurls.CLUSTER, cds.version_info, cds.nonce, node=node_id))
    assert await stream.close() == []


def test_thousand_short_streams_are_forgotten_after_a_while():
    async def scenario():
        clock = FakeClock()
        cache = SnapshotCache()
        ads = AdsServer(cache, forget_after=60, clock=clock)
        cache.set(snapshot())
        keeper = LocalStream(ads)  # a long-lived Envoy: never forgotten while connected
        keeper.send(request(typeurls.CLUSTER, node="keeper"))
        await keeper.recv()
        largest = 0
        for i in range(1000):
            await short_stream(ads, f"envoy-{i}")
            clock.advance(1)
            largest = max(largest, len(ads.nodes))
        assert largest <= 62, f"node table grew to {largest}"
        ids = {entry["id"] for entry in ads.node_status()}
        assert "keeper" in ids and "envoy-999" in ids and "envoy-900" not in ids
        assert status(ads, "envoy-999")["acked"] == {"CDS": cache.snapshot.version(typeurls.CLUSTER)}
        assert ads.connected() == 1 and len(cache.watches()) == 1

        clock.advance(61)
        assert [entry["id"] for entry in ads.node_status()] == ["keeper"]
        await keeper.close()
        clock.advance(61)
        assert ads.node_status() == [] and len(ads.nodes) == 0 and cache.watches() == []

    asyncio.run(scenario())


def test_disconnected_nodes_are_capped_oldest_first():
    async def scenario():
        clock = FakeClock()  # time stands still: only the cap bounds the table
        cache = SnapshotCache()
        ads = AdsServer(cache, max_disconnected=100, clock=clock)
        cache.set(snapshot())
        largest = 0
        for i in range(1000):
            await short_stream(ads, f"envoy-{i}")
            largest = max(largest, len(ads.nodes))
        assert largest == 100
        assert [entry["id"] for entry in ads.node_status()] == [f"envoy-{i}" for i in range(900, 1000)]

        # A node that comes back leaves the disconnected list; leaving again makes it the newest.
        await short_stream(ads, "envoy-900")
        await short_stream(ads, "newcomer")
        ids = {entry["id"] for entry in ads.node_status()}
        assert len(ids) == 100 and "envoy-900" in ids and "envoy-901" not in ids and "newcomer" in ids

    asyncio.run(scenario())
