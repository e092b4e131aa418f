"""How to serve: the ADS state-of-the-world protocol over grpc.aio.

The server never builds resources: it serves whatever snapshot the cache
holds, tracks what each Envoy node has accepted (ACK) or refused (NACK), and
answers a (re)connecting Envoy with the current snapshot.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from . import typeurls
from .snapshot import Snapshot

log = logging.getLogger("controlplane.xds")

_CHANGED = object()  # queue marker: the cache holds a new snapshot
_CLOSED = object()  # queue marker: Envoy closed its side of the stream


class SnapshotCache:
    """The one current snapshot, and the streams waiting to hear of a newer one."""

    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._watchers: set[asyncio.Queue[Any]] = set()

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def set(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        for queue in self._watchers:
            queue.put_nowait(_CHANGED)

    def watch(self, queue: asyncio.Queue[Any]) -> None:
        self._watchers.add(queue)

    def unwatch(self, queue: asyncio.Queue[Any]) -> None:
        self._watchers.discard(queue)


@dataclass
class Nack:
    version: str
    message: str
    at: float


@dataclass
class NodeState:
    """What one Envoy (by node id) has accepted and refused, for status and tests."""

    id: str
    cluster: str = ""
    streams: int = 0
    acked: dict[str, str] = field(default_factory=dict)
    nacked: dict[str, Nack] = field(default_factory=dict)
    connected_at: float = 0.0
    last_seen: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "cluster": self.cluster,
            "connected": self.streams > 0,
            "acked": {typeurls.SHORT[t]: v for t, v in self.acked.items()},
            "nacked": {
                typeurls.SHORT[t]: {"version": n.version, "message": n.message, "at": n.at}
                for t, n in self.nacked.items()
            },
        }


@dataclass
class XdsStats:
    pushes: dict[str, int] = field(default_factory=dict)
    acks: dict[str, int] = field(default_factory=dict)
    nacks: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def bump(counter: dict[str, int], type_url: str) -> None:
        short = typeurls.SHORT.get(type_url, type_url)
        counter[short] = counter.get(short, 0) + 1


@dataclass
class _TypeState:
    """Per stream and type: what was sent last and what Envoy subscribed to."""

    names: frozenset[str] = frozenset()
    nonce: str = ""
    sent_version: str | None = None
    subscribed: bool = False


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, cache: SnapshotCache) -> None:
        self.cache = cache
        self.nodes: dict[str, NodeState] = {}
        self.stats = XdsStats()
        self._nonces = itertools.count(1)

    def in_sync(self, snapshot: Snapshot | None = None) -> list[str]:
        """Connected nodes that have acknowledged every type of the snapshot."""
        snapshot = snapshot or self.cache.snapshot
        if snapshot is None:
            return []
        return [
            node.id
            for node in self.nodes.values()
            if node.streams > 0 and all(node.acked.get(t) == snapshot.version(t) for t in typeurls.PUSH_ORDER)
        ]

    async def StreamAggregatedResources(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    queue.put_nowait(request)
            except (asyncio.CancelledError, grpc.aio.AioRpcError):
                pass
            finally:
                queue.put_nowait(_CLOSED)

        reader = asyncio.create_task(read())
        self.cache.watch(queue)
        states: dict[str, _TypeState] = {}
        node: NodeState | None = None
        try:
            while True:
                item = await queue.get()
                if item is _CLOSED:
                    return
                if item is _CHANGED:
                    wanted = [t for t in typeurls.PUSH_ORDER if states.get(t, _TypeState()).subscribed]
                else:
                    if node is None:
                        node = self._open(item)
                    node.last_seen = time.time()
                    wanted = self._on_request(node, states, item)
                for response in self._responses(states, wanted):
                    if node is not None:
                        log.debug("push %s version %s to %s", typeurls.SHORT.get(response.type_url), response.version_info, node.id)
                    XdsStats.bump(self.stats.pushes, response.type_url)
                    yield response
        finally:
            self.cache.unwatch(queue)
            reader.cancel()
            if node is not None:
                node.streams -= 1
                log.info("envoy %s disconnected", node.id)

    def _open(self, request: discovery_pb2.DiscoveryRequest) -> NodeState:
        node_id = request.node.id or "unknown"
        node = self.nodes.setdefault(node_id, NodeState(id=node_id))
        node.cluster = request.node.cluster
        node.streams += 1
        node.connected_at = time.time()
        log.info("envoy %s connected (cluster %r)", node_id, node.cluster)
        return node

    def _on_request(
        self, node: NodeState, states: dict[str, _TypeState], request: discovery_pb2.DiscoveryRequest
    ) -> list[str]:
        """Book-keep one request; return the types that need a response now."""
        type_url = request.type_url
        if type_url not in typeurls.SHORT:
            log.warning("envoy %s asked for unsupported type %s", node.id, type_url)
            return []
        state = states.setdefault(type_url, _TypeState())
        if request.response_nonce and request.response_nonce != state.nonce:
            return []  # answers a response that has since been superseded
        state.subscribed = True
        if request.response_nonce:
            if request.HasField("error_detail"):
                rejected = state.sent_version or ""
                node.nacked[type_url] = Nack(rejected, request.error_detail.message, time.time())
                XdsStats.bump(self.stats.nacks, type_url)
                log.error(
                    "envoy %s REJECTED %s version %s (keeps version %s): %s",
                    node.id, typeurls.SHORT[type_url], rejected, request.version_info or "none",
                    request.error_detail.message,
                )
            else:
                node.acked[type_url] = request.version_info
                node.nacked.pop(type_url, None)
                XdsStats.bump(self.stats.acks, type_url)
        elif request.version_info:
            # A reconnecting Envoy tells which version it already runs.
            node.acked[type_url] = request.version_info
            state.sent_version = request.version_info
        names = frozenset(request.resource_names)
        if names != state.names:
            state.names = names
            state.sent_version = None  # a new subscription set always gets an answer
        return [type_url]

    def _responses(
        self, states: dict[str, _TypeState], wanted: list[str]
    ) -> list[discovery_pb2.DiscoveryResponse]:
        snapshot = self.cache.snapshot
        if snapshot is None:
            return []
        out = []
        wanted = list(wanted)
        for type_url in wanted:
            state = states[type_url]
            version = snapshot.version(type_url)
            if state.sent_version == version:
                continue
            state.nonce = str(next(self._nonces))
            state.sent_version = version
            out.append(
                discovery_pb2.DiscoveryResponse(
                    version_info=version,
                    type_url=type_url,
                    nonce=state.nonce,
                    resources=snapshot.packed(type_url, state.names),
                )
            )
            if type_url == typeurls.CLUSTER and typeurls.ENDPOINT in states:
                # Updated clusters warm again and wait for their endpoints: resend them.
                states[typeurls.ENDPOINT].sent_version = None
                if typeurls.ENDPOINT not in wanted:
                    wanted.insert(wanted.index(type_url) + 1, typeurls.ENDPOINT)
        return out


async def start_server(
    cache_server: AdsServer, address: str, port: int, extra: Callable[[grpc.aio.Server], None] | None = None
) -> grpc.aio.Server:
    """The gRPC server Envoy talks to: ADS, plus whatever `extra` adds (the access log service)."""
    server = grpc.aio.server(
        options=[
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ]
    )
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(cache_server, server)
    if extra is not None:
        extra(server)
    bound = server.add_insecure_port(f"{address}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen for xDS on {address}:{port}")
    await server.start()
    return server
