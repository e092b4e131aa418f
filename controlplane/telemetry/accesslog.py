"""Envoy's gRPC access log -> one observation per request.

Token usage arrives as dynamic metadata (namespace `llm_lb.usage`) set by the
listener's Lua filter, which reads the `usage` block of a JSON body or of the
final SSE chunk as the body streams past, without buffering it.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

log = logging.getLogger("controlplane.telemetry")

USAGE_NS = "llm_lb.usage"
CHARS_PER_TOKEN = 4  # for estimates when a response carries no usage block


@dataclass(frozen=True)
class Observation:
    request_id: str
    pool: str
    backend: str  # empty when Envoy answered itself (overflow, no healthy host)
    status: int
    latency_ms: float
    ttfb_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    usage_estimated: bool
    response_flags: str
    quality_header: float | None

    @property
    def ok(self) -> bool:
        return 0 < self.status < 500 and self.status != 429


def _ms(duration) -> float:  # google.protobuf.Duration
    return duration.seconds * 1000.0 + duration.nanos / 1e6


def _flags(flags: accesslog_pb2.ResponseFlags) -> str:
    return ",".join(f.name for f, value in flags.ListFields() if value is True)


def parse(entry: accesslog_pb2.HTTPAccessLogEntry) -> Observation:
    common = entry.common_properties
    usage = common.metadata.filter_metadata.get(USAGE_NS)
    fields = dict(usage.fields) if usage is not None else {}

    def number(key: str) -> int | None:
        value = fields.get(key)
        return int(value.number_value) if value is not None and value.HasField("number_value") else None

    prompt, completion = number("prompt_tokens"), number("completion_tokens")
    estimated = prompt is None or completion is None
    if prompt is None:
        prompt = max(1, entry.request.request_body_bytes // CHARS_PER_TOKEN) if entry.request.request_body_bytes else 0
    if completion is None:
        chunks = number("content_chunks")
        # A streamed chunk carries about one token; a plain body about 4 characters per token.
        completion = chunks if chunks is not None else entry.response.response_body_bytes // CHARS_PER_TOKEN
    quality = None
    raw_quality = entry.response.response_headers.get("x-quality-score")
    if raw_quality:
        try:
            value = float(raw_quality)
        except ValueError:
            value = math.nan
        quality = min(1.0, max(0.0, value)) if math.isfinite(value) else None
    ttfb = _ms(common.time_to_first_upstream_rx_byte) if common.HasField("time_to_first_upstream_rx_byte") else None
    last = common.time_to_last_downstream_tx_byte if common.HasField("time_to_last_downstream_tx_byte") else common.duration
    return Observation(
        request_id=entry.request.request_id,
        pool=common.upstream_cluster,
        backend=common.custom_tags.get("backend", "") if common.upstream_remote_address.ByteSize() else "",
        status=entry.response.response_code.value,
        latency_ms=_ms(last),
        ttfb_ms=ttfb,
        prompt_tokens=prompt,
        completion_tokens=completion,
        usage_estimated=estimated,
        response_flags=_flags(common.response_flags),
        quality_header=quality,
    )


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):
    """Stream-unary: iterate the stream and return once (an async generator would drop everything).

    Each message's entries go to the sink as one batch.
    """

    def __init__(self, sink: Callable[[list[Observation]], None]) -> None:
        self.sink = sink
        self.entries = 0
        self.errors = 0

    async def StreamAccessLogs(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: grpc.aio.ServicerContext
    ) -> als_pb2.StreamAccessLogsResponse:
        try:
            async for message in request_iterator:
                if message.HasField("http_logs"):
                    self.receive(message.http_logs.log_entry)
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        return als_pb2.StreamAccessLogsResponse()

    def receive(self, entries: Iterable[accesslog_pb2.HTTPAccessLogEntry]) -> None:
        batch = []
        for entry in entries:
            self.entries += 1
            try:
                batch.append(parse(entry))
            except Exception:  # one bad entry must not end the stream
                self.errors += 1
                log.exception("cannot read an access log entry")
        try:
            self.sink(batch)
        except Exception:
            self.errors += len(batch)
            log.exception("cannot use a batch of %d access log entries", len(batch))


def add_to_server(service: AccessLogService, server: grpc.aio.Server) -> None:
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(service, server)
