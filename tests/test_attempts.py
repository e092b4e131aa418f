"""Every attempt counts: the attempts log (one entry per failed upstream attempt) and the request log together.

The rules: a failed attempt is an error (and, when slower than the estimate, latency) for the backend that
failed it, from its own entry; the request's entry counts in the scores only as a success (with its final
attempt's time) or as a failure no attempt entry records (the route's timeout); cost, spend, clients and the
spool follow the request's entry alone. So each failure is counted once and each request charged once.

Entries are shaped as Envoy 1.40 sends them (envoy/README.md, "Every attempt counts").
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.accesslog.v3 import als_pb2 as service_pb2

from controlplane.config import parse_config
from controlplane.scoring.engine import Engine
from controlplane.scoring.stats import LATENCY_ALPHA
from controlplane.telemetry.accesslog import (
    ATTEMPT_FAILURE_CODES,
    ATTEMPTS_LOG,
    REQUEST_LOG,
    AccessLogService,
    Attempt,
    Observation,
    Stream,
    parse,
    parse_attempt,
)
from controlplane.xds import resources

from .test_accesslog import entry
from .test_telemetry_bounds import config, telemetry


def attempt(backend: str = "a", status: int | None = 503, duration_ms: float = 2.0, flags: tuple[str, ...] = (),
            retry_after: str | None = None, request_id: str = "req-1", pool: str = "chat"
            ) -> accesslog_pb2.HTTPAccessLogEntry:
    """An attempts-log entry as Envoy sends it: backend tag, the attempt's own duration, its status if one came."""
    e = entry(backend=backend, status=status, duration_ms=duration_ms, request_id=request_id, pool=pool)
    for flag in flags:
        setattr(e.common_properties.response_flags, flag, True)
    if retry_after is not None:
        e.response.response_headers["retry-after"] = retry_after
    return e


def retried(backend: str = "b", first_attempt_ms: float = 30.0, final_ms: float = 20.0, attempts: int = 2,
            **kw: Any) -> accesslog_pb2.HTTPAccessLogEntry:
    """The request's entry of a request answered by `backend` after `attempts - 1` failed attempts."""
    e = entry(backend=backend, last_byte_ms=first_attempt_ms + final_ms, **kw)
    c = e.common_properties
    c.upstream_request_attempt_count = attempts
    c.time_to_first_upstream_tx_byte.FromNanoseconds(int(first_attempt_ms * 1e6))
    return e


# -- parsing ---------------------------------------------------------------------------------------------

def test_an_attempt_entry_names_its_backend_status_time_flags_and_retry_after() -> None:
    a = parse_attempt(attempt("a", 429, 1.5, retry_after="3"))
    assert a == Attempt("req-1", "chat", "a", 429, 1.5, "", "3")
    refused = parse_attempt(attempt("a", None, 0.1, flags=("upstream_connection_failure",)))
    assert (refused.backend, refused.status, refused.response_flags) == ("a", 0, "upstream_connection_failure")


@pytest.mark.parametrize(
    ("status", "flags", "failed"),
    [
        pytest.param(503, (), True, id="5xx"),
        pytest.param(500, (), True, id="500"),
        pytest.param(429, (), True, id="429"),
        pytest.param(None, ("upstream_connection_failure",), True, id="refused-UF"),
        pytest.param(None, ("upstream_request_timeout",), True, id="per-try-timeout-UT"),
        pytest.param(200, ("upstream_protocol_error",), True, id="cut-mid-body-UPE"),
        pytest.param(200, ("upstream_remote_reset",), True, id="reset-UR"),
        pytest.param(None, (), False, id="client-hung-up-no-status-no-flag"),
        pytest.param(200, (), False, id="route-timeout-mid-stream-no-flag"),
        pytest.param(404, (), False, id="4xx-is-the-request's"),
        pytest.param(None, ("upstream_overflow",), False, id="overflow-is-envoy's-breaker"),
    ],
)
def test_which_attempts_are_the_backends_failures(status: int | None, flags: tuple[str, ...], failed: bool) -> None:
    assert parse_attempt(attempt(status=status, flags=flags)).failed is failed


def test_the_request_entry_knows_its_final_attempts_time_and_the_failures_no_attempt_records() -> None:
    obs = parse(retried(first_attempt_ms=30.0, final_ms=20.0))
    assert obs.latency_ms == pytest.approx(50.0) and obs.retried_ms == pytest.approx(30.0)
    assert parse(retried(attempts=1)).retried_ms == 0.0, "one attempt: its time is all the backend's"
    timeout = entry(status=504)
    timeout.common_properties.response_flags.upstream_request_timeout = True
    timeout.response.response_code_details = "response_timeout"  # the route's timeout (Envoy 1.40)
    assert parse(timeout).unattempted
    per_try = entry(status=504)
    per_try.common_properties.response_flags.upstream_request_timeout = True
    per_try.response.response_code_details = "upstream_per_try_timeout"  # its attempt entry has it
    assert not parse(per_try).unattempted
    assert not parse(entry(status=503)).unattempted


# -- counting ---------------------------------------------------------------------------------------------

def test_a_failed_attempt_retried_elsewhere_counts_against_its_backend_once_and_is_never_charged() -> None:
    tel, engine, book = telemetry()
    clients: list[Observation] = []
    tel.clients = lambda obs, at: clients.append(obs)
    assert tel.observe_attempts([parse_attempt(attempt("a", 503, 4.0))]) == 0
    assert tel.observe_batch([parse(retried("b", first_attempt_ms=30.0, final_ms=20.0, usage={
        "prompt_tokens": 10, "completion_tokens": 5}))]) == 0
    a, b = engine.stats[("chat", "a")], engine.stats[("chat", "b")]
    assert (a.requests, a.errors, a.cost) == (1, 1, 0.0)
    assert (b.requests, b.errors) == (1, 0)
    assert b.latency_ewma_ms == pytest.approx(20.0), "the final attempt's time, not the failed one's too"
    assert set(book.total()) == {("chat", "b")} and book.total()[("chat", "b")].requests == 1
    assert b.cost == pytest.approx(book.total()[("chat", "b")].cost)
    assert len(clients) == 0, "no client configured in the entry: the clients hook sees request entries only"
    assert set(tel.recent.by_class()) == {("chat", "b")}, "the recent window is the clients' view: requests only"
    assert tel.attempt_failures == 1


def test_a_request_that_failed_everywhere_counts_each_attempt_once_and_its_entry_none() -> None:
    tel, engine, book = telemetry()
    tel.observe_attempts([parse_attempt(attempt("a", 503)), parse_attempt(attempt("b", 503)),
                          parse_attempt(attempt("b", 503))])
    final = entry(backend="b", status=503)
    final.common_properties.response_flags.upstream_retry_limit_exceeded = True
    tel.observe_batch([parse(final)])
    assert [(engine.stats[("chat", n)].requests, engine.stats[("chat", n)].errors) for n in "ab"] == [(1, 1), (2, 2)]
    assert book.total() == {}


def test_an_answer_cut_short_is_one_failure_from_its_attempt_and_charged_once_from_its_request() -> None:
    tel, engine, book = telemetry()
    tel.observe_attempts([parse_attempt(attempt("a", 200, 60.0, flags=("upstream_protocol_error",)))])
    cut = entry(backend="a", status=200, usage={"prompt_tokens": 10, "completion_tokens": 5}, last_byte_ms=61.0)
    cut.common_properties.response_flags.upstream_protocol_error = True
    tel.observe_batch([parse(cut)])
    st = engine.stats[("chat", "a")]
    assert (st.requests, st.errors) == (1, 1)
    spent = book.total()[("chat", "a")]
    assert (spent.requests, spent.prompt_tokens, spent.completion_tokens) == (1, 10, 5)
    assert st.cost == pytest.approx(spent.cost) and st.cost > 0
    assert st.take_window() == (1, 15), "the quota's rate: one request sent, its tokens paid for"


def test_the_routes_timeout_is_counted_from_the_request_entry_and_a_client_hang_up_from_neither() -> None:
    tel, engine, _ = telemetry()
    # The attempt the route's timeout ended has no status and no flag: Envoy's filter drops it, and were it
    # sent, it would not count (as one a client hung up on, which looks the same).
    tel.observe_attempts([parse_attempt(attempt("a", None, 10_000.0))])
    assert engine.stats[("chat", "a")].requests == 0
    timeout = entry(backend="a", status=504, last_byte_ms=10_000.0)
    timeout.common_properties.response_flags.upstream_request_timeout = True
    timeout.response.response_code_details = "response_timeout"
    hung_up = entry(backend="b", status=None)
    hung_up.common_properties.response_flags.downstream_connection_termination = True
    tel.observe_batch([parse(timeout), parse(hung_up)])
    assert (engine.stats[("chat", "a")].requests, engine.stats[("chat", "a")].errors) == (1, 1)
    assert engine.stats[("chat", "b")].requests == 0


def test_a_failures_time_can_only_raise_the_latency_estimate() -> None:
    tel, engine, _ = telemetry()
    st = engine.stats[("chat", "a")]
    tel.observe_attempts([parse_attempt(attempt("a", 503, 5000.0))])
    assert st.latency_ewma_ms is None, "a failure never starts the estimate"
    engine.observe_request("chat", "a", True, 100.0)
    tel.observe_attempts([parse_attempt(attempt("a", 503, 1.0))])
    assert st.latency_ewma_ms == pytest.approx(100.0), "a quick refusal does not make it look fast"
    tel.observe_attempts([parse_attempt(attempt("a", None, 1100.0, flags=("upstream_request_timeout",)))])
    assert st.latency_ewma_ms == pytest.approx(100.0 + LATENCY_ALPHA * 1000.0), "a timeout shows it slow"
    assert (st.requests, st.errors) == (4, 3)


def test_attempts_of_unknown_pools_or_backends_and_without_a_backend_are_skipped() -> None:
    tel, engine, _ = telemetry()
    batch = [parse_attempt(attempt("gone")), parse_attempt(attempt("a", pool="other")),
             parse_attempt(attempt(""))]
    assert tel.observe_attempts(batch) == 0 and tel.attempt_failures == 0
    assert all(st.requests == 0 for st in engine.stats.values())


def test_adaptive_learning_rewards_a_failed_attempt_with_nothing() -> None:
    cfg = parse_config(yaml.safe_dump({"pools": {"chat": {"strategy": "adaptive_learning", "backends": {
        "a": {"url": "http://127.0.0.1:9001"}}}}}))
    engine = Engine()
    engine.sync(cfg)
    st = engine.stats[("chat", "a")]
    assert engine.observe_attempt_failure("chat", "a", 3.0)
    assert st.reward_beta > 1.0 and st.reward_alpha == pytest.approx(1.0)


# -- the streams ------------------------------------------------------------------------------------------

def test_attempt_streams_go_to_their_own_sink_and_never_to_the_request_sink_or_the_spool_count() -> None:
    requests: list[tuple[int, str, int]] = []
    attempts: list[list[Attempt]] = []

    def request_sink(batch: list[Observation], stream: Stream, received: int) -> int:
        requests.append((len(batch), stream.log_name, received))
        return 0

    def attempt_sink(batch: list[Attempt]) -> int:
        attempts.append(batch)
        return 0

    service = AccessLogService(request_sink, attempt_sink)

    def message(log_name: str, entries: list[accesslog_pb2.HTTPAccessLogEntry]) -> service_pb2.StreamAccessLogsMessage:
        m = service_pb2.StreamAccessLogsMessage()
        m.identifier.node.id = "envoy-1"
        m.identifier.log_name = log_name
        m.http_logs.log_entry.extend(entries)
        return m

    async def stream_of(*messages: service_pb2.StreamAccessLogsMessage) -> None:
        async def it() -> AsyncIterator[service_pb2.StreamAccessLogsMessage]:
            for m in messages:
                yield m
        await service.StreamAccessLogs(it(), None)

    async def scenario() -> None:
        await stream_of(message(REQUEST_LOG, [entry(), entry()]))
        await stream_of(message(ATTEMPTS_LOG, [attempt("a", 503), attempt("a", 429, retry_after="1")]))

    asyncio.run(scenario())
    assert requests == [(2, REQUEST_LOG, 2)]
    assert [[(a.backend, a.status) for a in batch] for batch in attempts] == [[("a", 503), ("a", 429)]]
    assert service.streams == {"envoy-1": 1}, "attempt streams are not reconnects of the request log"
    assert (service.attempt_streams, service.attempt_entries, service.entries) == (1, 2, 4)


def test_an_attempts_stream_without_a_sink_is_read_and_dropped() -> None:
    def request_sink(batch: list[Observation], stream: Stream, received: int) -> int:
        pytest.fail("not a request stream")

    service = AccessLogService(request_sink)
    stream = Stream(1)
    service._named(stream, "envoy-1", ATTEMPTS_LOG)
    service.receive([attempt()], stream)
    assert service.attempt_entries == 1 and service.errors == 0
    assert service.open_streams("envoy-1") == 0


# -- what Envoy is told ------------------------------------------------------------------------------------

def test_the_router_sends_failed_attempts_to_the_control_plane_on_their_own_log() -> None:
    manager = hcm_pb2.HttpConnectionManager()
    resources.listener(config(), xds_token="secret-token").filter_chains[0].filters[0].typed_config.Unpack(manager)
    router = router_pb2.Router()
    assert manager.http_filters[-1].name == "envoy.filters.http.router"
    manager.http_filters[-1].typed_config.Unpack(router)
    assert len(router.upstream_log) == 1
    upstream = router.upstream_log[0]
    grpc = als_pb2.HttpGrpcAccessLogConfig()
    upstream.typed_config.Unpack(grpc)
    request = als_pb2.HttpGrpcAccessLogConfig()
    manager.access_log[0].typed_config.Unpack(request)
    assert (grpc.common_config.log_name, request.common_config.log_name) == (ATTEMPTS_LOG, REQUEST_LOG)
    assert grpc.common_config.grpc_service == request.common_config.grpc_service, "same cluster, same token"
    assert [t.tag for t in grpc.common_config.custom_tags] == ["backend"]
    assert list(grpc.additional_response_headers_to_log) == ["retry-after"]
    either = upstream.filter.or_filter.filters
    assert [f.status_code_filter.comparison.value.default_value for f in either[:2]] == [500, 429]
    assert list(either[2].response_flag_filter.flags) == list(ATTEMPT_FAILURE_CODES)
    assert "UO" not in ATTEMPT_FAILURE_CODES
