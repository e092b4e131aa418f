"""Envoy's gRPC access log -> one observation per request.

Token usage arrives as dynamic metadata (namespace `llm_lb.usage`) set by the
listener's Lua filter, which reads the `usage` block of a JSON body or of the
final SSE chunk as the body streams past, without buffering it.

The model comes in two parts: the one the app asked for (the request header
MODEL_HEADER, which Envoy logs with the request headers) and the one a backend
serves under its own name (the custom tag MODEL_TAG, set per backend; absent
when the backend serves the requested name).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import NamedTuple

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import duration_pb2, struct_pb2

log = logging.getLogger("controlplane.telemetry")

USAGE_NS = "llm_lb.usage"
MAX_TOKENS = 10_000_000  # more than any model's context; beyond it a count is a lie or a bug
CHARS_PER_TOKEN = 4  # for estimates when a response carries no usage block
MODEL_HEADER = "x-llm-model"  # the requested model: Envoy logs it via additional_request_headers_to_log
MODEL_TAG = "model"  # the served model, when the backend has a name of its own for it (a custom tag)
MAX_MODEL_CHARS = 256  # the requested name is the client's: a bound on what it may make us keep


class Observation(NamedTuple):
    """One request as the scores and the spend need it (a tuple: built once per request, so cheap)."""

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
    requested_model: str  # as the app asked for it; "" when the request named none
    model: str  # as served: the backend's own name for it, else the requested one; "" when neither

    @property
    def ok(self) -> bool:
        return 0 < self.status < 500 and self.status != 429


def _ms(duration: duration_pb2.Duration) -> float:
    return float(duration.seconds * 1000.0 + duration.nanos / 1e6)


def _flags(flags: accesslog_pb2.ResponseFlags) -> str:
    return ",".join(f.name for f, value in flags.ListFields() if value is True)


def _count(value: struct_pb2.Value) -> int | None:
    """A token count as the usage filter found it; anything but a plausible count is treated as absent
    (the request is then estimated), so a lying backend cannot make a request free or ruin a budget."""
    if not value.HasField("number_value"):
        return None
    number = value.number_value
    return int(number) if 0 <= number <= MAX_TOKENS else None


def _quality(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return min(1.0, max(0.0, value)) if math.isfinite(value) else None


def parse(entry: accesslog_pb2.HTTPAccessLogEntry) -> Observation:
    """Runs once per request: each protobuf field is read at most once, and only what is there."""
    common = entry.common_properties
    request = entry.request
    response = entry.response
    prompt = completion = chunks = None
    metadata = common.metadata.filter_metadata
    if USAGE_NS in metadata:
        fields = metadata[USAGE_NS].fields
        if "prompt_tokens" in fields:
            prompt = _count(fields["prompt_tokens"])
        if "completion_tokens" in fields:
            completion = _count(fields["completion_tokens"])
        if "content_chunks" in fields:
            chunks = _count(fields["content_chunks"])
    estimated = prompt is None or completion is None
    if prompt is None:
        body = request.request_body_bytes
        prompt = max(1, body // CHARS_PER_TOKEN) if body else 0
    if completion is None:
        # A streamed chunk carries about one token; a plain body about 4 characters per token.
        completion = chunks if chunks is not None else response.response_body_bytes // CHARS_PER_TOKEN
    headers = response.response_headers
    raw_quality = headers.get("x-quality-score") if headers else None
    request_headers = request.request_headers
    requested = request_headers.get(MODEL_HEADER, "")[:MAX_MODEL_CHARS] if request_headers else ""
    tags = common.custom_tags
    model = tags.get(MODEL_TAG, "")[:MAX_MODEL_CHARS] or requested
    address = common.upstream_remote_address
    served = address.HasField("socket_address") or address.ByteSize() > 0
    return Observation(
        request.request_id,
        common.upstream_cluster,
        tags.get("backend", "") if served else "",
        response.response_code.value,
        _ms(common.time_to_last_downstream_tx_byte if common.HasField("time_to_last_downstream_tx_byte")
            else common.duration),
        _ms(common.time_to_first_upstream_rx_byte) if common.HasField("time_to_first_upstream_rx_byte") else None,
        prompt,
        completion,
        estimated,
        _flags(common.response_flags) if common.HasField("response_flags") else "",
        _quality(raw_quality) if raw_quality else None,
        requested,
        model,
    )


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Stream-unary: iterate the stream and return once (an async generator would drop everything).

    Each message's entries go to the sink as one batch.
    """

    def __init__(self, sink: Callable[[list[Observation]], int]) -> None:
        """`sink` uses a batch and returns how many of its entries it could not use."""
        self.sink = sink
        self.messages = 0  # entries / messages: how well Envoy batches (each message has a fixed cost here)
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

    def receive(self, entries: Sequence[accesslog_pb2.HTTPAccessLogEntry]) -> None:
        self.messages += 1
        self.entries += len(entries)
        batch: list[Observation] = []
        append = batch.append
        for entry in entries:
            try:
                append(parse(entry))
            except Exception:  # one bad entry must not end the stream
                self.errors += 1
                log.exception("cannot read an access log entry")
        try:
            self.errors += self.sink(batch)
        except Exception:  # the stream must outlive a bug in the sink
            self.errors += len(batch)
            log.exception("cannot use a batch of %d access log entries", len(batch))


def add_to_server(service: AccessLogService, server: grpc.aio.Server) -> None:
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(service, server)
