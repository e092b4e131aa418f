"""Envoy's gRPC access logs -> one observation per request, one attempt per failed upstream attempt.

Token usage arrives as dynamic metadata (namespace `llm_lb.usage`) set by the
listener's Lua filter, which reads the `usage` block of a JSON body or of the
final SSE chunk as the body streams past, without buffering it.

The model comes in two parts: the one the app asked for (the request header
MODEL_HEADER, which Envoy logs with the request headers) and the one a backend
serves under its own name (the custom tag MODEL_TAG, set per backend; absent
when the backend serves the requested name).

Two logs arrive here, told apart by the `log_name` in each stream's first message:
- REQUEST_LOG, the connection manager's: one entry per request, with its final attempt's backend. It
  drives cost, spend, feedback, client accounting, histograms and the spool, and the scores' successes.
- ATTEMPTS_LOG, the router's `upstream_log`: one entry per FAILED upstream attempt (Envoy's filter drops
  the rest, so a success costs nothing here), retried ones included. Each is an error for the backend
  that failed it (parse_attempt()); a 429 with Retry-After cools that backend.
A failure is counted once: by its attempt entry, or, for the causes no attempt entry records (Envoy's
own timers on the whole request, REQUEST_FAILURES), by the request's entry (Observation.unattempted).
Envoy's gRPC access log is at most once: an attempt entry lost on the way (a reconnect, a full buffer,
`logs_dropped` in Envoy) is a failure the scores never see, so a backend's error rate can read low, never
high; its request's entry (a success elsewhere, or a failure) is counted as usual.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import duration_pb2, struct_pb2

from ..rollouts.plan import SHADOW_HEADER, USER_HEADER

log = logging.getLogger("controlplane.telemetry")

USAGE_NS = "llm_lb.usage"
STREAM_HEADER = "x-llm-stream"  # the body's `stream`, copied into a header by the listener (xds/resources.py)
CHARS_PER_TOKEN = 4  # for estimates when a response carries no usage block
MODEL_HEADER = "x-llm-model"  # the requested model: Envoy logs it via additional_request_headers_to_log
CLIENT_HEADER = "x-llm-client"  # the caller's client name: set by Envoy from its key (never by the caller)
MODEL_TAG = "model"  # the served model, when the backend has a name of its own for it (a custom tag)
MAX_MODEL_CHARS = 256  # the requested name is the client's: a bound on what it may make us keep

# A backend reports its own usage, so a count is used only when the request could have cost it: a whole
# number from 0 to MAX_TOKENS, and no more than the bytes that carried the text (a token is at least
# about one byte of it) plus an allowance for what a request costs without carrying it:
#   prompt_tokens     <= request body bytes + PROMPT_ALLOWANCE
#                        (chat template, images or files named by URL or id)
#   completion_tokens <= response body bytes + COMPLETION_ALLOWANCE
#                        + GENERATION_TOKENS_PER_SECOND x the request's duration
#                        (reasoning tokens are billed but not sent; generating them takes time)
# Any other count (negative, NaN, infinite, fractional, not a number, over a bound) is replaced by the
# estimate, as if absent, and the observation is marked `usage_suspicious` (counted per backend,
# llm_lb_usage_suspicious_total). So a request is charged at most what it carried plus the allowances.
MAX_TOKENS = 10_000_000  # more than any model's context; beyond it a count is a lie or a bug
PROMPT_ALLOWANCE = 32_768
COMPLETION_ALLOWANCE = 4_096
GENERATION_TOKENS_PER_SECOND = 10_000  # several times the fastest single stream served today
_TOKENS_PER_MS = GENERATION_TOKENS_PER_SECOND / 1000

# Response flags of an answer cut short by a timeout or a reset on the backend's side. The status can
# still be 200 (the headers had gone out), but the answer did not arrive whole: not a success for the
# scores, though it is charged (the backend did the work). Long names are the gRPC log's (fields of
# envoy.data.accesslog.v3.ResponseFlags), short codes the file log's (%RESPONSE_FLAGS%).
CUT_FLAGS = frozenset({  # the backend's side failed; a client that hangs up (DC, DR, DPE, DT) is not its fault
    "upstream_request_timeout", "stream_idle_timeout", "upstream_max_stream_duration_reached",
    "upstream_remote_reset", "local_reset", "upstream_connection_termination", "upstream_protocol_error",
    "UT", "SI", "UMSDR", "UR", "LR", "UC", "UPE",
})
# A failed upstream attempt, by its response flags (besides a status >= 500 or 429): CUT_FLAGS, and a
# connection that could not be made. Not `upstream_overflow` (UO): that is Envoy's own circuit breaker for
# the whole pool, whichever host it had picked. The short codes are those the attempts log's filter sends
# (xds/resources.py); Envoy checks them when it loads the filter.
ATTEMPT_FAILURE_CODES = ("UF", "UT", "SI", "UMSDR", "UR", "LR", "UC", "UPE")
ATTEMPT_FAILURE_FLAGS = CUT_FLAGS | {"upstream_connection_failure", "UF"}
# Failures of the whole request that no attempt entry records (response_code_details of the request's
# entry): the route's timeout resets the attempt in flight without a status or flag of its own (seen with
# Envoy 1.40: the attempt is logged with status 0 or 200 and no flag, like one a client hung up on), and
# so do the connection manager's stream timers. Counted from the request's entry instead. (Should the
# route's timeout end a request while it waits to retry, its last attempt's failure was counted already:
# that request counts twice. The back-off is at most `retry.backoff.max_interval`, 250 ms by default.)
REQUEST_FAILURES = frozenset({"response_timeout", "stream_idle_timeout"})  # flags UT and SI
REQUEST_LOG = "llm_lb"  # the connection manager's access log: one entry per request
ATTEMPTS_LOG = "llm_lb_attempts"  # the router's upstream log: one entry per failed attempt
# The client went away (hung up, reset, sent garbage): before any answer, nothing about the backend is known.
CLIENT_FLAGS = frozenset({
    "downstream_connection_termination", "downstream_remote_reset", "downstream_protocol_error", "DC", "DR", "DPE",
})


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
    usage_suspicious: bool = False  # a count was reported but could not be true: estimated instead
    client: str = ""  # the calling client's name (clients configured), from the header Envoy set from its key
    retry_after: str = ""  # the backend's Retry-After on a 429/503, as sent (parsed where it is used)
    route: str = ""  # the route's name, read only when Envoy answered itself (e.g. `client/<name>`: a blocked client)
    # A failure no attempt entry records (REQUEST_FAILURES): the scores count it from this entry.
    unattempted: bool = False
    # Retried: the time before the final attempt began (earlier attempts, back-off), which is not the final
    # backend's. Its latency for the scores is latency_ms - retried_ms; 0 when there was one attempt.
    retried_ms: float = 0.0
    user: str = ""  # an A/B rollout's user (the pool's user_header, copied by the route): per-arm user counts

    @property
    def charged(self) -> bool:
        """The backend answered, so the request costs: also when its answer was cut short."""
        return 0 < self.status < 500 and self.status != 429

    @property
    def cut(self) -> bool:
        """The answer was cut short after it began (CUT_FLAGS)."""
        flags = self.response_flags
        return bool(flags) and not CUT_FLAGS.isdisjoint(flags.split(","))

    @property
    def abandoned(self) -> bool:
        """The client left before any answer (e.g. aborted its own upload): neither a success nor the backend's
        failure, so it must not count in the scores (nor could it in Envoy's outlier detection)."""
        flags = self.response_flags
        return self.status == 0 and bool(flags) and not CLIENT_FLAGS.isdisjoint(flags.split(","))

    @property
    def ok(self) -> bool:
        """A success for the scores (errors, latency): answered, and not cut short."""
        return 0 < self.status < 500 and self.status != 429 and not (self.response_flags and self.cut)


def _ms(duration: duration_pb2.Duration) -> float:
    return float(duration.seconds * 1000.0 + duration.nanos / 1e6)


def _flags(flags: accesslog_pb2.ResponseFlags) -> str:
    return ",".join(f.name for f, value in flags.ListFields() if value is True)


def _count(value: struct_pb2.Value) -> int | None:
    """A token count as the usage filter found it: token_count() of a number, else None."""
    if not value.HasField("number_value"):
        return None
    number = value.number_value
    if 0 <= number <= MAX_TOKENS:  # false for NaN too
        count = int(number)
        if count == number:
            return count
    return None


def token_count(number: object) -> int | None:
    """A reported token count if it is a whole number from 0 to MAX_TOKENS, else None (shared with the
    spool's reader)."""
    if isinstance(number, bool) or not isinstance(number, int | float):
        return None
    if not 0 <= number <= MAX_TOKENS:  # false for NaN too
        return None
    count = int(number)
    return count if count == number else None


def plausible(prompt: int | None, completion: int | None, request_body_bytes: int, response_body_bytes: int,
              latency_ms: float = 0.0) -> tuple[int | None, int | None]:
    """The counts the request could have cost (the rule above); one it could not have is None.
    `latency_ms` 0 (unknown): no allowance for time."""
    if prompt is not None and prompt > request_body_bytes + PROMPT_ALLOWANCE:
        prompt = None
    if completion is not None and completion > (response_body_bytes + COMPLETION_ALLOWANCE
                                                + max(0.0, latency_ms) * _TOKENS_PER_MS):
        completion = None
    return prompt, completion


def _estimate(prompt: int | None, completion: int | None, chunks: int | None, request_body_bytes: int,
              response_body_bytes: int) -> tuple[int, int]:
    if prompt is None:
        prompt = max(1, request_body_bytes // CHARS_PER_TOKEN) if request_body_bytes else 0
    if completion is None:
        # A streamed chunk carries about one token (the only measure of a stream cut before its usage
        # chunk); a plain body about 4 characters per token.
        completion = chunks if chunks is not None else response_body_bytes // CHARS_PER_TOKEN
    return prompt, completion


def usage(prompt: int | None, completion: int | None, chunks: int | None, request_body_bytes: int,
          response_body_bytes: int, latency_ms: float = 0.0) -> tuple[int, int, bool]:
    """(prompt, completion, estimated): the counts reported if plausible(), else estimates from the body sizes."""
    prompt, completion = plausible(prompt, completion, request_body_bytes, response_body_bytes, latency_ms)
    if prompt is None or completion is None:
        return (*_estimate(prompt, completion, chunks, request_body_bytes, response_body_bytes), True)
    return prompt, completion, False


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
    prompt: int | None = None
    completion: int | None = None
    chunks: int | None = None
    suspicious = False
    metadata = common.metadata.filter_metadata
    if USAGE_NS in metadata:
        fields = metadata[USAGE_NS].fields
        if "prompt_tokens" in fields:
            prompt = _count(fields["prompt_tokens"])
            suspicious = prompt is None
        if "completion_tokens" in fields:
            completion = _count(fields["completion_tokens"])
            if completion is None:
                suspicious = True
        if "content_chunks" in fields:
            chunks = _count(fields["content_chunks"])
    latency = _ms(common.time_to_last_downstream_tx_byte if common.HasField("time_to_last_downstream_tx_byte")
                  else common.duration)
    # A count within its allowance is plausible whatever the body: only a larger one needs the body sizes.
    if (prompt is not None and prompt > PROMPT_ALLOWANCE) or (completion is not None
                                                               and completion > COMPLETION_ALLOWANCE):
        checked = plausible(prompt, completion, request.request_body_bytes, response.response_body_bytes, latency)
        if checked != (prompt, completion):
            suspicious = True
            prompt, completion = checked
    if prompt is None or completion is None:
        estimated = True
        prompt, completion = _estimate(prompt, completion, chunks, request.request_body_bytes,
                                       response.response_body_bytes)
    else:
        estimated = False
    flags = _flags(common.response_flags) if common.HasField("response_flags") else ""
    headers = response.response_headers
    raw_quality = headers.get("x-quality-score") if headers else None
    request_headers = request.request_headers
    requested = request_headers.get(MODEL_HEADER, "")[:MAX_MODEL_CHARS] if request_headers else ""
    client = request_headers.get(CLIENT_HEADER, "")[:MAX_MODEL_CHARS] if request_headers else ""
    user = request_headers.get(USER_HEADER, "")[:MAX_MODEL_CHARS] if request_headers else ""
    tags = common.custom_tags
    model = tags.get(MODEL_TAG, "")[:MAX_MODEL_CHARS] or requested
    address = common.upstream_remote_address
    served = address.HasField("socket_address") or address.ByteSize() > 0
    retried = 0.0
    if common.upstream_request_attempt_count > 1 and common.HasField("time_to_first_upstream_tx_byte"):
        retried = min(latency, _ms(common.time_to_first_upstream_tx_byte))  # when the final attempt began
    return Observation(
        request.request_id,
        common.upstream_cluster,
        tags.get("backend", "") if served else "",
        response.response_code.value,
        latency,
        _ms(common.time_to_first_upstream_rx_byte) if common.HasField("time_to_first_upstream_rx_byte") else None,
        prompt,
        completion,
        estimated,
        flags,
        _quality(raw_quality) if raw_quality else None,
        requested,
        model,
        suspicious,
        client,
        headers.get("retry-after", "")[:32] if headers else "",
        "" if served else common.route_name[:MAX_MODEL_CHARS],
        bool(flags) and response.response_code_details in REQUEST_FAILURES,  # each such timeout sets a flag
        retried,
        user,
    )


class Attempt(NamedTuple):
    """One upstream attempt from the attempts log (Envoy sends only failed ones: see ATTEMPTS_LOG)."""

    request_id: str
    pool: str
    backend: str  # from the chosen endpoint's metadata: also set when no connection could be made
    status: int  # 0 when no response began (connection failure, reset, timeout)
    latency_ms: float  # the attempt's own duration: from its start to its end
    response_flags: str
    retry_after: str = ""  # the backend's Retry-After on a 429/503, as sent
    # A shadow rollout's mirrored request (SHADOW_HEADER): logged failed or not, and its only record.
    shadow: bool = False
    ttfb_ms: float | None = None  # from the attempt's start to the backend's first byte
    request_bytes: int = 0  # the body sizes as the backend saw them (for the shadow's token estimate)
    response_bytes: int = 0
    streamed: bool = False  # the request asked for a stream (SSE): its answer's bytes are mostly framing

    @property
    def failed(self) -> bool:
        """The backend failed this attempt: status >= 500 or 429, or a failure flag (ATTEMPT_FAILURE_FLAGS).
        Checked here too, so the log's filter only saves work: what passes it is judged by this rule. An
        attempt with no status and no flag is not a failure: the client hung up on it (or the route's
        timeout fired, which the request's entry counts: REQUEST_FAILURES)."""
        status = self.status
        if status >= 500 or status == 429:
            return True
        flags = self.response_flags
        return bool(flags) and not ATTEMPT_FAILURE_FLAGS.isdisjoint(flags.split(","))


def parse_attempt(entry: accesslog_pb2.HTTPAccessLogEntry) -> Attempt:
    """An attempts-log entry: what counts against the backend that failed it, nothing about usage or cost.
    (In these entries Envoy's request/response body byte counts are from the upstream's side, i.e.
    swapped: not read.)"""
    common = entry.common_properties
    request = entry.request
    response = entry.response
    headers = response.response_headers
    request_headers = request.request_headers
    return Attempt(
        request.request_id[:MAX_MODEL_CHARS],
        common.upstream_cluster,
        common.custom_tags.get("backend", ""),
        response.response_code.value,
        _ms(common.duration),
        _flags(common.response_flags) if common.HasField("response_flags") else "",
        headers.get("retry-after", "")[:32] if headers else "",
        bool(request_headers) and SHADOW_HEADER in request_headers,
        _ms(common.time_to_first_upstream_rx_byte) if common.HasField("time_to_first_upstream_rx_byte") else None,
        response.response_body_bytes,  # swapped, as said above: this is what was sent to the backend
        request.request_body_bytes,
        bool(request_headers) and request_headers.get(STREAM_HEADER) == "true",
    )


MAX_NODES = 256  # node ids named in the stream counts; any further ones are counted together
OTHER_NODE = "(other)"


@dataclass(eq=False)
class Stream:
    """One access-log stream. Each Envoy worker thread opens its own, and opens a new one after a break."""

    seq: int  # in the order streams were opened, from 1
    node: str = ""  # the Envoy's node id, from the stream's first message ("" until it arrives)
    entries: int = 0  # entries received on it, whether or not they could be read
    log_name: str = ""  # which log (REQUEST_LOG, ATTEMPTS_LOG), from the stream's first message

    @property
    def attempts(self) -> bool:
        return self.log_name == ATTEMPTS_LOG


# A batch of observations, the stream it came on, and how many entries its message held (some may not
# have been readable) -> how many of them could not be used.
Sink = Callable[[list[Observation], Stream, int], int]
# A batch of failed attempts (the attempts log) -> how many of them could not be used.
AttemptSink = Callable[[list[Attempt]], int]


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Stream-unary: iterate the stream and return once (an async generator would drop everything).

    Each message's entries go to the sink as one batch, with the stream they came on (its node id
    names the Envoy); those of an attempts-log stream go to `attempts` instead (dropped without one).
    Request-log streams are counted per node: every stream after a node's first ones is a reconnect, and
    entries Envoy held while it had no stream may be lost (`logs_dropped` in Envoy). Attempts-log streams
    open lazily, at a worker's first failed attempt: counted apart (`attempt_streams`).
    """

    def __init__(self, sink: Sink, attempts: AttemptSink | None = None) -> None:
        self.sink = sink
        self.attempts = attempts
        self.attempt_entries = 0  # of `entries`: those from attempts-log streams
        self.attempt_streams = 0
        self.messages = 0  # entries / messages: how well Envoy batches (each message has a fixed cost here)
        self.entries = 0
        self.errors = 0
        self.lag_seconds = 0.0  # the latest batch: from its last request's end to its arrival here
        self.opened = 0  # streams ever opened (the latest one's seq)
        self.streams: dict[str, int] = {}  # per node id: streams opened
        self._open: dict[int, Stream] = {}

    def open_streams(self, node: str) -> int:
        """Request-log streams of `node` open now."""
        return sum(1 for s in self._open.values() if s.node == node and not s.attempts)

    async def StreamAccessLogs(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: grpc.aio.ServicerContext
    ) -> als_pb2.StreamAccessLogsResponse:
        self.opened += 1
        stream = self._open[self.opened] = Stream(self.opened)
        try:
            async for message in request_iterator:
                if not stream.node and message.HasField("identifier"):
                    identifier = message.identifier
                    self._named(stream, identifier.node.id, identifier.log_name)
                if message.HasField("http_logs"):
                    self.receive(message.http_logs.log_entry, stream)
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        finally:
            del self._open[stream.seq]
        return als_pb2.StreamAccessLogsResponse()

    def _named(self, stream: Stream, node: str, log_name: str = "") -> None:
        stream.node = node[:MAX_MODEL_CHARS] or "(unnamed)"
        stream.log_name = log_name[:MAX_MODEL_CHARS]
        if stream.attempts:
            self.attempt_streams += 1
            return
        label = stream.node if stream.node in self.streams or len(self.streams) < MAX_NODES else OTHER_NODE
        self.streams[label] = self.streams.get(label, 0) + 1

    def receive(self, entries: Sequence[accesslog_pb2.HTTPAccessLogEntry], stream: Stream | None = None) -> None:
        if stream is None:
            stream = Stream(0)
        self.messages += 1
        self.entries += len(entries)
        stream.entries += len(entries)
        if stream.attempts:
            self._attempts(entries)
            return
        if entries:
            self._lag(entries[-1].common_properties)
        batch: list[Observation] = []
        append = batch.append
        for entry in entries:
            try:
                append(parse(entry))
            except Exception:  # one bad entry must not end the stream
                self.errors += 1
                log.exception("cannot read an access log entry")
        try:
            self.errors += self.sink(batch, stream, len(entries))
        except Exception:  # the stream must outlive a bug in the sink
            self.errors += len(batch)
            log.exception("cannot use a batch of %d access log entries", len(batch))

    def _attempts(self, entries: Sequence[accesslog_pb2.HTTPAccessLogEntry]) -> None:
        self.attempt_entries += len(entries)
        if self.attempts is None:
            return
        batch: list[Attempt] = []
        for entry in entries:
            try:
                batch.append(parse_attempt(entry))
            except Exception:  # one bad entry must not end the stream
                self.errors += 1
                log.exception("cannot read an attempts log entry")
        try:
            self.errors += self.attempts(batch)
        except Exception:  # the stream must outlive a bug in the sink
            self.errors += len(batch)
            log.exception("cannot use a batch of %d attempts log entries", len(batch))

    def _lag(self, common: accesslog_pb2.AccessLogCommon) -> None:
        """Once per batch: how far behind the requests this process learns of them (Envoy's buffering,
        the network, this loop's backlog)."""
        if common.HasField("start_time"):
            start = common.start_time
            end = start.seconds + start.nanos / 1e9 + (_ms(common.duration) / 1000 if common.HasField("duration")
                                                        else 0.0)
            self.lag_seconds = max(0.0, time.time() - end)


def add_to_server(service: AccessLogService, server: grpc.aio.Server) -> None:
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(service, server)
