"""Simulated Envoys for the scale bench: ADS clients that subscribe and ACK as Envoy does, and gRPC access-log senders.

Both speak the real protocols (xds-protos messages over grpc.aio) so the
control plane does exactly the work a fleet of Envoys would cost it. The
access-log senders run as their own process (`python -m bench.fake_envoy als
...`) so that their CPU is never counted as the control plane's, and they send
pre-serialized messages so that they stay cheap enough to outrun it.

`python -m bench.fake_envoy sink ...` is the reference those senders are
also pointed at: a grpc.aio access-log server that only counts entries, i.e.
what gRPC and protobuf parsing cost in Python before the product does anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path

import grpc
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2, wrappers_pb2

from controlplane.xds import resources, typeurls

# Big enough for the full CDS/EDS of 100 pools; Envoy's own limit is far above that.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]
ALS_METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"
# Envoy's gRPC access logger flushes a stream's buffer once it holds this many bytes (its default).
ENVOY_ALS_BUFFER_BYTES = 16384
_ID_SLOT = 10  # per-message unique part of every request id: 2 digits of stream, 8 of message counter


# -- ADS ------------------------------------------------------------------------------------------------------

class AdsEnvoy:
    """One Envoy's ADS stream: subscribes to CDS, EDS (the given clusters), LDS and RDS, and ACKs every response.

    Each ACK is sent as soon as the response is read, as Envoy does once it
    has applied the resources; what it acked last, and when, is kept per type.
    """

    def __init__(self, target: str, node_id: str, clusters: Sequence[str], on_ack: asyncio.Event,
                 token: str = "") -> None:
        self.target = target
        self.metadata = auth_metadata(token)
        self.node = base_pb2.Node(id=node_id, cluster="bench")
        self.names: dict[str, list[str]] = {
            typeurls.CLUSTER: [], typeurls.ENDPOINT: sorted(clusters),
            typeurls.LISTENER: [], typeurls.ROUTE: [resources.ROUTE_NAME],
        }
        self.acked: dict[str, str] = {}  # type URL -> version acked last
        self.acked_at: dict[str, float] = {}  # type URL -> time.monotonic() of that ACK
        self.last_size: dict[str, int] = {}  # type URL -> bytes of the last response
        self._on_ack = on_ack
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        self._call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel).StreamAggregatedResources(
            metadata=self.metadata)
        for type_url in typeurls.PUSH_ORDER:
            await self._call.write(self._request(type_url))
        self._reader = asyncio.create_task(self._read())

    def _request(self, type_url: str, version: str = "", nonce: str = "") -> discovery_pb2.DiscoveryRequest:
        return discovery_pb2.DiscoveryRequest(
            node=self.node, type_url=type_url, version_info=version, response_nonce=nonce,
            resource_names=self.names[type_url],
        )

    async def _read(self) -> None:
        assert self._call is not None
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    raise ConnectionError("the control plane ended the stream")
                self.last_size[response.type_url] = response.ByteSize()
                await self._call.write(self._request(response.type_url, response.version_info, response.nonce))
                self.acked[response.type_url] = response.version_info
                self.acked_at[response.type_url] = time.monotonic()
                self._on_ack.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - reported by the fleet, which knows what was expected
            self.error = exc
            self._on_ack.set()

    def synced(self, versions: dict[str, str]) -> bool:
        return all(self.acked.get(t) == v for t, v in versions.items())

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close()


class Fleet:
    """N simulated Envoys on one control plane, and the waits the bench needs on them."""

    def __init__(self, target: str, count: int, clusters: Sequence[str], prefix: str, token: str = "") -> None:
        self.acked = asyncio.Event()
        self.envoys = [AdsEnvoy(target, f"{prefix}-{i}", clusters, self.acked, token) for i in range(count)]

    async def start(self) -> None:
        await asyncio.gather(*(e.start() for e in self.envoys))

    async def wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Wake on every ACK and re-check `done` (no polling, so the wait adds no delay of its own)."""
        deadline = time.monotonic() + timeout
        while not done():
            failed = [e for e in self.envoys if e.error is not None]
            if failed:
                raise RuntimeError(f"simulated Envoy {failed[0].node.id} lost its ADS stream: {failed[0].error!r}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
            self.acked.clear()
            try:
                await asyncio.wait_for(self.acked.wait(), min(left, 0.5))
            except TimeoutError:
                pass

    async def wait_synced(self, versions: dict[str, str], timeout: float) -> None:
        await self.wait(lambda: all(e.synced(versions) for e in self.envoys), timeout,
                        f"{len(self.envoys)} simulated Envoys to ACK the snapshot")

    async def wait_eds_moved(self, old: str, timeout: float) -> str:
        """Until every Envoy has ACKed one and the same EDS version other than `old`; returns it."""
        def moved() -> bool:
            versions = {e.acked.get(typeurls.ENDPOINT) for e in self.envoys}
            return len(versions) == 1 and old not in versions

        await self.wait(moved, timeout, f"{len(self.envoys)} simulated Envoys to ACK the new EDS version")
        return self.envoys[0].acked[typeurls.ENDPOINT]

    def last_ack(self, type_url: str) -> float:
        return max(e.acked_at[type_url] for e in self.envoys)

    async def close(self) -> None:
        await asyncio.gather(*(e.close() for e in self.envoys), return_exceptions=True)


# -- access log -----------------------------------------------------------------------------------------------

def _entry(pool: str, backend: str, port: int, slot: bytes, n: int) -> accesslog_pb2.HTTPAccessLogEntry:
    """One served request as Envoy's gRPC access logger writes it for the product's listener."""
    ms = duration_pb2.Duration
    usage = struct_pb2.Struct()
    usage.update({"prompt_tokens": 12 + n % 50, "completion_tokens": 30 + n % 200})
    common = accesslog_pb2.AccessLogCommon(
        sample_rate=1.0,
        downstream_remote_address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=40000 + n % 20000)),
        downstream_local_address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=10000)),
        start_time=timestamp_pb2.Timestamp(seconds=1_800_000_000 + n, nanos=123_456_000),
        time_to_last_rx_byte=ms(nanos=40_000),
        time_to_first_upstream_tx_byte=ms(nanos=150_000),
        time_to_last_upstream_tx_byte=ms(nanos=160_000),
        time_to_first_upstream_rx_byte=ms(nanos=80_000_000 + n * 1000),
        time_to_last_upstream_rx_byte=ms(nanos=420_000_000 + n * 1000),
        time_to_first_downstream_tx_byte=ms(nanos=80_100_000 + n * 1000),
        time_to_last_downstream_tx_byte=ms(nanos=420_100_000 + n * 1000),
        duration=ms(nanos=420_100_000 + n * 1000),
        upstream_remote_address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)),
        upstream_local_address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=50000 + n % 10000)),
        upstream_cluster=pool,
        route_name="",
        custom_tags={"backend": backend},
        upstream_request_attempt_count=1,
        stream_id=str(9_876_543_210_123 + n),
        access_log_type=accesslog_pb2.AccessLogType.DownstreamEnd,
        downstream_wire_bytes_sent=700, downstream_wire_bytes_received=260,
        upstream_wire_bytes_sent=300, upstream_wire_bytes_received=650,
    )
    common.metadata.filter_metadata["llm_lb.usage"].CopyFrom(usage)
    return accesslog_pb2.HTTPAccessLogEntry(
        common_properties=common,
        protocol_version=accesslog_pb2.HTTPAccessLogEntry.HTTP11,
        request=accesslog_pb2.HTTPRequestProperties(
            request_method=base_pb2.POST, scheme="http", authority="127.0.0.1:10000",
            path=f"/{pool}/v1/chat/completions", user_agent="python-requests/2.32", forwarded_for="",
            request_id=f"{slot.decode()}-{n:04d}-4c1e-9a6f-0b2d3e4f5a6b", request_headers_bytes=180,
            request_body_bytes=80, upstream_header_bytes_sent=210, downstream_header_bytes_received=180,
        ),
        response=accesslog_pb2.HTTPResponseProperties(
            response_code=wrappers_pb2.UInt32Value(value=200), response_headers_bytes=120,
            response_body_bytes=520, response_code_details="via_upstream",
            upstream_header_bytes_received=120, downstream_header_bytes_sent=130,
        ),
    )


def log_batch(backends: Sequence[tuple[str, str, int]], start: int = 0
              ) -> tuple[bytes, list[int], int]:
    """One `http_logs` message as Envoy flushes it (~16 KB of entries), serialized once.

    Returns the bytes, where each entry's request id holds its per-message
    unique part (so a sender can make every id unique without re-serializing),
    and how many entries it carries.
    """
    placeholder = b"\x01" * _ID_SLOT
    message = als_pb2.StreamAccessLogsMessage()
    n = start
    while message.ByteSize() < ENVOY_ALS_BUFFER_BYTES:
        pool, backend, port = backends[n % len(backends)]
        message.http_logs.log_entry.append(_entry(pool, backend, port, placeholder, n))
        n += 1
    data = message.SerializeToString()
    offsets = []
    at = data.find(placeholder)
    while at >= 0:
        offsets.append(at)
        at = data.find(placeholder, at + _ID_SLOT)
    count = n - start
    if len(offsets) != count:
        raise RuntimeError(f"request id slots: found {len(offsets)}, expected {count}")
    return data, offsets, count


def identifier_message(node_id: str) -> bytes:
    """The first message of each stream names the Envoy and the log (only the first does)."""
    message = als_pb2.StreamAccessLogsMessage(
        identifier=als_pb2.StreamAccessLogsMessage.Identifier(node=base_pb2.Node(id=node_id, cluster="bench"),
                                                              log_name="llm_lb"),
    )
    return bytes(message.SerializeToString())


def auth_metadata(token: str) -> tuple[tuple[str, str], ...] | None:
    """What a real Envoy sends on each stream (controlplane/xds/auth.py)."""
    return (("authorization", f"Bearer {token}"),) if token else None


async def send_logs(target: str, streams: int, seconds: float, backends: Sequence[tuple[str, str, int]],
                    token: str = "") -> int:
    """`streams` Envoys each stream access logs as fast as the control plane reads them; returns entries sent."""
    first = log_batch(backends)
    # Enough distinct messages that every backend appears (as Envoy's traffic would spread over them).
    rounds = min(64, max(4, -(-len(backends) // first[2])))
    templates = [first, *(log_batch(backends, start=i * first[2]) for i in range(1, rounds))]
    sent = [0] * streams
    started = asyncio.Event()
    ready = 0

    async def stream(index: int) -> None:
        nonlocal ready
        async with grpc.aio.insecure_channel(target) as channel:
            method = channel.stream_unary(ALS_METHOD, request_serializer=lambda b: b,
                                          response_deserializer=als_pb2.StreamAccessLogsResponse.FromString)
            call = method(metadata=auth_metadata(token))
            await call.write(identifier_message(f"bench-als-{index}"))
            ready += 1
            if ready == streams:
                started.set()
            deadline = time.monotonic() + seconds
            buffers = [(bytearray(data), offsets, count) for data, offsets, count in templates]
            n = 0
            while time.monotonic() < deadline:
                buf, offsets, count = buffers[n % len(buffers)]
                slot = b"%02d%08d" % (index % 100, n)
                for at in offsets:
                    buf[at:at + _ID_SLOT] = slot
                await call.write(bytes(buf))
                sent[index] += count
                n += 1
            await call.done_writing()
            await call

    async def announce() -> None:
        await started.wait()
        print("streaming", flush=True)

    announcer = asyncio.create_task(announce())
    await asyncio.gather(*(stream(i) for i in range(streams)))
    announcer.cancel()
    return sum(sent)


class CountingSink(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Receives and parses every message (as the control plane's servicer does) and only counts entries."""

    def __init__(self) -> None:
        self.entries = 0
        self.first = asyncio.Event()

    async def StreamAccessLogs(self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],  # noqa: N802
                               context: grpc.aio.ServicerContext) -> als_pb2.StreamAccessLogsResponse:
        try:
            async for message in request_iterator:
                self.entries += len(message.http_logs.log_entry)
                self.first.set()
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        return als_pb2.StreamAccessLogsResponse()


async def run_sink(port: int, warmup: float, window: float) -> dict[str, float]:
    """Serve; from `warmup` s after the first entry, count entries and this process's CPU for `window` s."""
    sink = CountingSink()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)])
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(sink, server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    print("listening", flush=True)
    try:
        await sink.first.wait()
        await asyncio.sleep(warmup)
        entries0, cpu0, t0 = sink.entries, time.process_time(), time.monotonic()
        await asyncio.sleep(window)
        entries1, cpu1, t1 = sink.entries, time.process_time(), time.monotonic()
    finally:
        await server.stop(None)
    return {"entries": entries1 - entries0, "cpu_s": cpu1 - cpu0, "elapsed_s": t1 - t0}


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fake_envoy", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    als = sub.add_parser("als", help="stream access logs from simulated Envoys; prints 'streaming', then a JSON result")
    als.add_argument("--target", required=True, help="host:port of the control plane's gRPC server")
    als.add_argument("--streams", type=int, default=10)
    als.add_argument("--seconds", type=float, required=True)
    als.add_argument("--backends", required=True, help="JSON list of [pool, backend, port]")
    als.add_argument("--token-file", default=None, help="the control plane's xds-token file")
    sink = sub.add_parser("sink", help="count entries only; prints 'listening', then a JSON result, and exits")
    sink.add_argument("--port", type=int, required=True)
    sink.add_argument("--warmup", type=float, default=1.0)
    sink.add_argument("--window", type=float, required=True)
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.command == "sink":
        print(json.dumps(asyncio.run(run_sink(args.port, args.warmup, args.window))), flush=True)
        return 0
    backends = [(str(pool), str(name), int(port)) for pool, name, port in json.loads(args.backends)]
    token = Path(args.token_file).read_text().strip() if args.token_file else ""
    sent = asyncio.run(send_logs(args.target, args.streams, args.seconds, backends, token))
    print(json.dumps({"sent": sent}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
