"""How to serve: the ADS state-of-the-world protocol over grpc.aio.

The server never builds resources: it serves whatever snapshot the cache
holds, tracks what each Envoy stream has accepted (ACK) or refused (NACK),
and answers a (re)connecting Envoy with the current snapshot.

Two Envoys may share a node id (a restart overlapping the old process, or a
copy-pasted bootstrap), so acceptance is kept per stream and a node's status
aggregates its streams. Nodes without an open stream are forgotten after a
while, so churn (many short-lived Envoys) cannot grow memory without bound.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from . import typeurls
from .snapshot import Snapshot

log = logging.getLogger("controlplane.xds")

_CHANGED = object()  # queue marker: the cache holds a new snapshot
_CLOSED = object()  # queue marker: Envoy closed its side of the stream


class Watch:
    """One stream's interest in snapshot changes, queueing at most one change marker at a time.

    A stream that is slow to send (Envoy not reading, flow control) must not
    collect one marker per change: only the newest snapshot is worth sending,
    so while a marker waits unhandled, further changes add nothing.
    """

    __slots__ = ("queue", "pending")

    def __init__(self, queue: asyncio.Queue[Any]) -> None:
        self.queue = queue
        self.pending = False  # a marker is in `queue` and the stream has not taken it yet

    def notify(self) -> None:
        if not self.pending:
            self.pending = True
            self.queue.put_nowait(_CHANGED)

    def take(self) -> None:
        """The stream dequeued the marker.

        It must call this *before* it reads the cache's snapshot, with no
        await in between: a change that lands after this call queues a new
        marker, and one that landed before is in the snapshot it reads, so no
        change is ever missed.
        """
        self.pending = False


class SnapshotCache:
    """The one current snapshot, and the streams waiting to hear of a newer one."""

    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._watches: set[Watch] = set()

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def set(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        for watch in self._watches:
            watch.notify()

    def watch(self, queue: asyncio.Queue[Any]) -> Watch:
        watch = Watch(queue)
        self._watches.add(watch)
        return watch

    def unwatch(self, watch: Watch) -> None:
        self._watches.discard(watch)

    def watches(self) -> list[Watch]:
        """The open streams' watches (for tests and diagnostics)."""
        return list(self._watches)


@dataclass
class Nack:
    version: str
    message: str
    at: float


def _short_acked(acked: Mapping[str, str]) -> dict[str, str]:
    return {typeurls.SHORT[t]: acked[t] for t in typeurls.PUSH_ORDER if t in acked}


def _short_nacked(nacked: Mapping[str, Nack]) -> dict[str, dict[str, Any]]:
    return {
        typeurls.SHORT[t]: {"version": n.version, "message": n.message, "at": n.at}
        for t in typeurls.PUSH_ORDER
        if (n := nacked.get(t)) is not None
    }


@dataclass(eq=False)
class StreamState:
    """What one ADS stream (one Envoy process) has accepted and refused."""

    id: int
    opened_at: float
    acked: dict[str, str] = field(default_factory=dict)
    nacked: dict[str, Nack] = field(default_factory=dict)

    def in_sync(self, snapshot: Snapshot) -> bool:
        return all(self.acked.get(t) == snapshot.version(t) for t in typeurls.PUSH_ORDER)

    def signature(self) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
        """What this stream runs and refuses: streams with equal signatures need no separate listing."""
        return (
            tuple(sorted(self.acked.items())),
            tuple(sorted((t, n.version) for t, n in self.nacked.items())),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "stream": self.id,
            "opened_at": self.opened_at,
            "acked": _short_acked(self.acked),
            "nacked": _short_nacked(self.nacked),
        }


@dataclass(eq=False)
class NodeState:
    """One Envoy node id: its open streams, or, once all closed, what the last one knew."""

    id: str
    cluster: str = ""
    open_streams: dict[int, StreamState] = field(default_factory=dict)
    last_closed: StreamState | None = None
    connected_at: float = 0.0
    last_seen: float = 0.0
    disconnected_at: float | None = None

    @property
    def streams(self) -> int:
        """Number of open streams (0: disconnected)."""
        return len(self.open_streams)

    def reporting(self) -> list[StreamState]:
        """The streams that speak for the node: the open ones, else the last one to close."""
        if self.open_streams:
            return list(self.open_streams.values())
        return [self.last_closed] if self.last_closed is not None else []

    @property
    def acked(self) -> dict[str, str]:
        """Per type, the version every reporting stream has accepted; types they disagree on are left out."""
        streams = self.reporting()
        if not streams:
            return {}
        out = {}
        for type_url in typeurls.PUSH_ORDER:
            versions = {s.acked.get(type_url) for s in streams}
            if len(versions) == 1 and (version := versions.pop()) is not None:
                out[type_url] = version
        return out

    @property
    def nacked(self) -> dict[str, Nack]:
        """Per type, the newest outstanding rejection by any reporting stream."""
        out: dict[str, Nack] = {}
        for stream in self.reporting():
            for type_url, nack in stream.nacked.items():
                if type_url not in out or nack.at >= out[type_url].at:
                    out[type_url] = nack
        return out

    def in_sync(self, snapshot: Snapshot) -> bool:
        """Connected, and every open stream has accepted every type of `snapshot`."""
        return bool(self.open_streams) and all(s.in_sync(snapshot) for s in self.open_streams.values())

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "cluster": self.cluster,
            "connected": self.streams > 0,
            "streams": self.streams,
            "acked": _short_acked(self.acked),
            "nacked": _short_nacked(self.nacked),
            "last_seen": self.last_seen,
        }
        streams = self.reporting()
        if len({s.signature() for s in streams}) > 1:
            out["per_stream"] = [s.as_dict() for s in streams]
        return out


@dataclass
class XdsStats:
    pushes: dict[str, int] = field(default_factory=dict)
    acks: dict[str, int] = field(default_factory=dict)
    nacks: dict[str, int] = field(default_factory=dict)
    unauthenticated: dict[str, int] = field(default_factory=dict)  # streams refused, by service (xds/auth.py)

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


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """The ADS servicer, and the per-node/per-stream book-keeping that `/v1/status` shows.

    `forget_after` (seconds) and `max_disconnected` bound what is kept of
    nodes without an open stream: the oldest disconnected ones go first.
    `clock` gives wall-clock seconds (shown in status); tests inject their own.
    """

    def __init__(
        self,
        cache: SnapshotCache,
        *,
        forget_after: float = 600.0,
        max_disconnected: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cache = cache
        self.stats = XdsStats()
        self.forget_after = forget_after
        self.max_disconnected = max_disconnected
        self._clock = clock
        self._nodes: dict[str, NodeState] = {}
        # Node ids with no open stream -> when the last one closed, oldest first.
        self._disconnected: OrderedDict[str, float] = OrderedDict()
        self._nonces = itertools.count(1)
        self._stream_ids = itertools.count(1)
        # Told the number of Envoy processes (open ADS streams) whenever it changes: limits are divided by it.
        self.on_streams: Callable[[int], None] | None = None

    @property
    def nodes(self) -> Mapping[str, NodeState]:
        """Read-only view of the node table; prefer `node_status()` and `connected()`."""
        self._forget()
        return MappingProxyType(self._nodes)

    def node_status(self) -> list[dict[str, Any]]:
        """Per node, what `/v1/status` shows; `per_stream` is present when the node's streams disagree."""
        self._forget()
        snapshot = self.cache.snapshot
        out = []
        for node in self._nodes.values():
            entry = node.as_dict()
            entry["in_sync"] = snapshot is not None and node.in_sync(snapshot)
            out.append(entry)
        return out

    def connected(self) -> int:
        """Number of nodes with at least one open stream."""
        return sum(1 for node in self._nodes.values() if node.open_streams)

    def in_sync(self, snapshot: Snapshot | None = None) -> list[str]:
        """Connected nodes all of whose streams have acknowledged every type of the snapshot."""
        snapshot = snapshot if snapshot is not None else self.cache.snapshot
        if snapshot is None:
            return []
        return [node.id for node in self._nodes.values() if node.in_sync(snapshot)]

    async def StreamAggregatedResources(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        # Requests and change markers share one queue so they are handled in arrival order, one at a time.
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
        watch = self.cache.watch(queue)
        states: dict[str, _TypeState] = {}
        node: NodeState | None = None
        stream: StreamState | None = None
        try:
            while True:
                item = await queue.get()
                if item is _CLOSED:
                    return
                if item is _CHANGED:
                    watch.take()  # before _responses reads the snapshot: see Watch.take
                    wanted = [t for t in typeurls.PUSH_ORDER if states.get(t, _TypeState()).subscribed]
                else:
                    if node is None or stream is None:
                        node, stream = self._open(item)
                    node.last_seen = self._clock()
                    wanted = self._on_request(node, stream, states, item)
                for response in self._responses(states, wanted):
                    if node is not None:
                        log.debug("push %s version %s to %s", typeurls.SHORT.get(response.type_url), response.version_info, node.id)
                    XdsStats.bump(self.stats.pushes, response.type_url)
                    yield response
        finally:
            self.cache.unwatch(watch)
            reader.cancel()
            if node is not None and stream is not None:
                self._close(node, stream)

    def _open(self, request: discovery_pb2.DiscoveryRequest) -> tuple[NodeState, StreamState]:
        node_id = request.node.id or "unknown"
        now = self._clock()
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = NodeState(id=node_id)
        self._disconnected.pop(node_id, None)
        node.disconnected_at = None
        node.cluster = request.node.cluster
        node.connected_at = now
        stream = StreamState(id=next(self._stream_ids), opened_at=now)
        node.open_streams[stream.id] = stream
        if node.streams > 1:
            log.warning("envoy %s has %d streams open: several Envoys share this node id", node_id, node.streams)
        log.info("envoy %s connected (cluster %r, stream %d)", node_id, node.cluster, stream.id,
                 extra={"node": node_id})
        self._forget()
        self._streams_changed()
        return node, stream

    def _close(self, node: NodeState, stream: StreamState) -> None:
        node.open_streams.pop(stream.id, None)
        node.last_closed = stream
        log.info("envoy %s disconnected (stream %d)", node.id, stream.id, extra={"node": node.id})
        if not node.open_streams:
            node.disconnected_at = self._clock()
            self._disconnected[node.id] = node.disconnected_at
        self._forget()
        self._streams_changed()

    def open_streams(self) -> int:
        """Envoy processes connected now (each holds one ADS stream; two may share a node id)."""
        return sum(node.streams for node in self._nodes.values())

    def _streams_changed(self) -> None:
        if self.on_streams is not None:
            try:
                self.on_streams(self.open_streams())
            except Exception:  # noqa: BLE001 - a listener's bug must not break the stream
                log.exception("stream-count listener failed")

    def _forget(self) -> None:
        """Drop nodes disconnected longer than `forget_after`, and the oldest beyond `max_disconnected`."""
        horizon = self._clock() - self.forget_after
        while self._disconnected:
            node_id, since = next(iter(self._disconnected.items()))
            if since > horizon and len(self._disconnected) <= self.max_disconnected:
                return
            del self._disconnected[node_id]
            del self._nodes[node_id]

    def _on_request(
        self,
        node: NodeState,
        stream: StreamState,
        states: dict[str, _TypeState],
        request: discovery_pb2.DiscoveryRequest,
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
                stream.nacked[type_url] = Nack(rejected, request.error_detail.message, self._clock())
                XdsStats.bump(self.stats.nacks, type_url)
                log.error(
                    "envoy %s REJECTED %s version %s (keeps version %s): %s",
                    node.id, typeurls.SHORT[type_url], rejected, request.version_info or "none",
                    request.error_detail.message,
                )
            else:
                stream.acked[type_url] = request.version_info
                stream.nacked.pop(type_url, None)
                XdsStats.bump(self.stats.acks, type_url)
        elif request.version_info:
            # A reconnecting Envoy tells which version it already runs.
            stream.acked[type_url] = request.version_info
            state.sent_version = request.version_info
        names = frozenset(request.resource_names)
        if names != state.names:
            state.names = names
            state.sent_version = None  # a new subscription set always gets an answer
        return [type_url]

    def _responses(
        self, states: dict[str, _TypeState], wanted: list[str]
    ) -> list[discovery_pb2.DiscoveryResponse]:
        """The responses owed for `wanted` types, all from the snapshot current now."""
        snapshot = self.cache.snapshot
        if snapshot is None:
            return []
        out = []
        wanted = list(wanted)
        for type_url in wanted:  # may grow while iterating: EDS follows a CDS push
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
            endpoints = states.get(typeurls.ENDPOINT)
            if type_url == typeurls.CLUSTER and endpoints is not None and endpoints.subscribed:
                # Updated clusters warm again and wait for their endpoints: resend them,
                # even at an unchanged version (Envoy need not ask again for the same names).
                endpoints.sent_version = None
                if typeurls.ENDPOINT not in wanted:
                    wanted.insert(wanted.index(type_url) + 1, typeurls.ENDPOINT)
        return out


async def start_server(
    cache_server: AdsServer,
    address: str,
    port: int,
    extra: Callable[[grpc.aio.Server], None] | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> grpc.aio.Server:
    """The gRPC server Envoy talks to: ADS, plus whatever `extra` adds (the access log service).

    `interceptors` authenticate each stream (xds/auth.py); `credentials` make the port TLS (mTLS).
    """
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ],
    )
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(cache_server, server)
    if extra is not None:
        extra(server)
    target = f"{address}:{port}"
    bound = server.add_secure_port(target, credentials) if credentials else server.add_insecure_port(target)
    if bound == 0:
        raise OSError(f"cannot listen for xDS on {address}:{port}")
    await server.start()
    return server
