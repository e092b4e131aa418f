"""Envoy access log entries -> observations: tokens, estimates, backend, status, latency, quality header."""

from __future__ import annotations

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import struct_pb2

from controlplane.telemetry.accesslog import (
    CHARS_PER_TOKEN,
    COMPLETION_ALLOWANCE,
    CUT_FLAGS,
    GENERATION_TOKENS_PER_SECOND,
    MAX_MODEL_CHARS,
    MAX_TOKENS,
    MODEL_HEADER,
    MODEL_TAG,
    PROMPT_ALLOWANCE,
    USAGE_NS,
    Observation,
    parse,
    token_count,
    usage,
)


def entry(
    *,
    status: int | None = 200,
    backend: str | None = "a",
    upstream: bool = True,
    usage: dict[str, object] | None = None,
    request_bytes: int = 0,
    response_bytes: int = 0,
    last_byte_ms: float | None = None,
    duration_ms: float | None = None,
    first_byte_ms: float | None = None,
    quality: str | None = None,
    request_id: str = "req-1",
    pool: str = "chat",
    requested_model: str | None = None,
    served_model: str | None = None,
) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    c = e.common_properties
    c.upstream_cluster = pool
    if backend is not None:
        c.custom_tags["backend"] = backend
    if upstream:
        c.upstream_remote_address.socket_address.address = "127.0.0.1"
        c.upstream_remote_address.socket_address.port_value = 9001
    if usage is not None:
        s = struct_pb2.Struct()
        s.update(usage)
        c.metadata.filter_metadata[USAGE_NS].CopyFrom(s)
    if last_byte_ms is not None:
        c.time_to_last_downstream_tx_byte.FromNanoseconds(int(last_byte_ms * 1e6))
    if duration_ms is not None:
        c.duration.FromNanoseconds(int(duration_ms * 1e6))
    if first_byte_ms is not None:
        c.time_to_first_upstream_rx_byte.FromNanoseconds(int(first_byte_ms * 1e6))
    if status is not None:
        e.response.response_code.value = status
    e.request.request_id = request_id
    e.request.request_body_bytes = request_bytes
    e.response.response_body_bytes = response_bytes
    if quality is not None:
        e.response.response_headers["x-quality-score"] = quality
    if requested_model is not None:
        e.request.request_headers[MODEL_HEADER] = requested_model
    if served_model is not None:
        c.custom_tags[MODEL_TAG] = served_model
    return e


def test_usage_metadata_gives_exact_tokens() -> None:
    obs = parse(entry(usage={"prompt_tokens": 123, "completion_tokens": 45}, request_bytes=99999,
                      response_bytes=99999, last_byte_ms=250.0, first_byte_ms=80.0))
    assert (obs.prompt_tokens, obs.completion_tokens, obs.usage_estimated) == (123, 45, False)
    assert obs.usage_suspicious is False
    assert obs.request_id == "req-1" and obs.pool == "chat" and obs.backend == "a"
    assert obs.status == 200 and obs.ok is True
    assert obs.latency_ms == pytest.approx(250.0) and obs.ttfb_ms == pytest.approx(80.0)
    assert obs.quality_header is None and obs.response_flags == ""


@pytest.mark.parametrize(
    ("usage", "request_bytes", "response_bytes", "prompt", "completion"),
    [
        pytest.param(None, 4000, 2000, 1000, 500, id="no-usage-body-bytes"),
        pytest.param({"content_chunks": 37}, 4000, 99999, 1000, 37, id="stream-chunks"),
        pytest.param({"prompt_tokens": 12}, 4000, 80, 12, 20, id="prompt-only"),
        pytest.param({"completion_tokens": 9}, 4000, 80, 1000, 9, id="completion-only"),
        pytest.param(None, 3, 3, 1, 0, id="tiny-request-is-one-token"),
        pytest.param(None, 0, 0, 0, 0, id="empty"),
        pytest.param({"prompt_tokens": "12"}, 400, 40, 100, 10, id="non-number-ignored"),
    ],
)
def test_estimates_when_usage_is_absent(usage, request_bytes, response_bytes, prompt, completion) -> None:
    obs = parse(entry(usage=usage, request_bytes=request_bytes, response_bytes=response_bytes))
    assert (obs.prompt_tokens, obs.completion_tokens) == (prompt, completion)
    assert obs.usage_estimated is True
    assert obs.usage_suspicious is (usage == {"prompt_tokens": "12"})  # absent is not suspicious; a string is
    assert CHARS_PER_TOKEN == 4


def test_backend_only_when_an_upstream_answered() -> None:
    assert parse(entry(backend="b")).backend == "b"
    assert parse(entry(backend="b", upstream=False)).backend == ""  # Envoy answered itself
    assert parse(entry(backend=None)).backend == ""


@pytest.mark.parametrize(
    ("status", "ok"),
    [
        pytest.param(200, True, id="200"),
        pytest.param(201, True, id="201"),
        pytest.param(400, True, id="400-client-error-is-the-clients"),
        pytest.param(404, True, id="404"),
        pytest.param(429, False, id="429"),
        pytest.param(499, True, id="499"),
        pytest.param(500, False, id="500"),
        pytest.param(503, False, id="503"),
        pytest.param(None, False, id="no-response"),
    ],
)
def test_status_and_ok(status: int | None, ok: bool) -> None:
    obs = parse(entry(status=status))
    assert obs.status == (status or 0)
    assert obs.ok is ok


def test_latency_prefers_last_downstream_byte_then_duration() -> None:
    assert parse(entry(last_byte_ms=1234.5, duration_ms=9999.0)).latency_ms == pytest.approx(1234.5)
    assert parse(entry(duration_ms=2500.0)).latency_ms == pytest.approx(2500.0)
    assert parse(entry(last_byte_ms=62_000.25)).latency_ms == pytest.approx(62_000.25)  # seconds + nanos
    assert parse(entry()).latency_ms == 0.0
    assert parse(entry()).ttfb_ms is None


@pytest.mark.parametrize(
    ("header", "quality"),
    [
        pytest.param("0.8", 0.8, id="plain"),
        pytest.param(" 0.25 ", 0.25, id="spaces"),
        pytest.param("1", 1.0, id="one"),
        pytest.param("0", 0.0, id="zero"),
        pytest.param("1.7", 1.0, id="clamped-high"),
        pytest.param("-3", 0.0, id="clamped-low"),
        pytest.param("great", None, id="junk"),
        pytest.param("", None, id="empty"),
        pytest.param("0.5,0.6", None, id="list-is-junk"),
    ],
)
def test_quality_header(header: str, quality: float | None) -> None:
    assert parse(entry(quality=header)).quality_header == quality


def test_nan_quality_header_is_ignored() -> None:
    assert parse(entry(quality="nan")).quality_header is None


def test_response_flags_are_named() -> None:
    e = entry(status=503, upstream=False)
    e.common_properties.response_flags.upstream_overflow = True
    e.common_properties.response_flags.no_healthy_upstream = True
    obs = parse(e)
    assert set(obs.response_flags.split(",")) == {"no_healthy_upstream", "upstream_overflow"}
    assert obs.backend == "" and obs.ok is False


@pytest.mark.parametrize(
    ("reported", "counted"),
    [
        pytest.param(45, 45, id="plausible"),
        pytest.param(0, 0, id="zero"),
        pytest.param(3.0, 3, id="whole-float"),
        pytest.param(2.9, None, id="fraction"),
        pytest.param(12.5, None, id="half"),
        pytest.param(-5, None, id="negative"),
        pytest.param(-0.0, 0, id="negative-zero"),
        pytest.param(1e18, None, id="absurd"),
        pytest.param(1e20, None, id="past-sqlite-integers"),
        pytest.param(MAX_TOKENS + 1, None, id="over-the-cap"),
        pytest.param(float("nan"), None, id="nan"),
        pytest.param(float("inf"), None, id="infinite"),
        pytest.param(float("-inf"), None, id="minus-infinite"),
        pytest.param("45", None, id="string"),
        pytest.param(True, None, id="bool"),
        pytest.param(None, None, id="null"),
    ],
)
def test_implausible_usage_counts_are_estimated_not_trusted(reported: object, counted: int | None) -> None:
    obs = parse(entry(usage={"prompt_tokens": 10, "completion_tokens": reported}, response_bytes=400))
    if counted is None:
        assert obs.completion_tokens == 400 // CHARS_PER_TOKEN and obs.usage_estimated and obs.usage_suspicious
    else:
        assert obs.completion_tokens == counted and not obs.usage_estimated and not obs.usage_suspicious
    assert obs.prompt_tokens == 10, "the other count is still used"
    assert token_count(reported) == counted, "the spool's reader applies the same rule"


# -- plausibility for the body sizes ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("prompt", "request_bytes", "trusted"),
    [
        pytest.param(PROMPT_ALLOWANCE, 0, True, id="within-the-allowance-whatever-the-body"),
        pytest.param(PROMPT_ALLOWANCE + 1, 0, False, id="past-the-allowance-with-no-body"),
        pytest.param(PROMPT_ALLOWANCE + 100_000, 100_000, True, id="body-plus-allowance"),
        pytest.param(PROMPT_ALLOWANCE + 100_001, 100_000, False, id="one-past"),
        pytest.param(MAX_TOKENS, 500, False, id="cap-on-a-small-body"),
    ],
)
def test_prompt_tokens_must_fit_the_request_body(prompt: int, request_bytes: int, trusted: bool) -> None:
    obs = parse(entry(usage={"prompt_tokens": prompt, "completion_tokens": 7}, request_bytes=request_bytes,
                      response_bytes=100))
    assert obs.completion_tokens == 7
    if trusted:
        assert obs.prompt_tokens == prompt and not obs.usage_suspicious and not obs.usage_estimated
    else:
        assert obs.prompt_tokens == (max(1, request_bytes // CHARS_PER_TOKEN) if request_bytes else 0)
        assert obs.usage_suspicious and obs.usage_estimated


@pytest.mark.parametrize(
    ("completion", "response_bytes", "last_byte_ms", "trusted"),
    [
        pytest.param(COMPLETION_ALLOWANCE, 0, None, True, id="within-the-allowance-whatever-the-body"),
        pytest.param(COMPLETION_ALLOWANCE + 1, 0, None, False, id="past-the-allowance-no-body-no-time"),
        pytest.param(COMPLETION_ALLOWANCE + 5000, 5000, None, True, id="body-plus-allowance"),
        pytest.param(COMPLETION_ALLOWANCE + 5001, 5000, None, False, id="one-past"),
        # hidden reasoning tokens: billed, not sent, but they took time to generate
        pytest.param(COMPLETION_ALLOWANCE + 20 * GENERATION_TOKENS_PER_SECOND, 50, 20_000.0, True,
                     id="reasoning-within-the-time"),
        pytest.param(COMPLETION_ALLOWANCE + 20 * GENERATION_TOKENS_PER_SECOND + 100, 50, 20_000.0, False,
                     id="faster-than-any-backend"),
        pytest.param(9_999_999, 2000, 400.0, False, id="under-the-cap-but-not-in-400-ms"),
    ],
)
def test_completion_tokens_must_fit_the_response_body_and_time(completion: int, response_bytes: int,
                                                               last_byte_ms: float | None, trusted: bool) -> None:
    obs = parse(entry(usage={"prompt_tokens": 5, "completion_tokens": completion}, request_bytes=100,
                      response_bytes=response_bytes, last_byte_ms=last_byte_ms))
    assert obs.prompt_tokens == 5
    if trusted:
        assert obs.completion_tokens == completion and not obs.usage_suspicious
    else:
        assert obs.completion_tokens == response_bytes // CHARS_PER_TOKEN
        assert obs.usage_suspicious and obs.usage_estimated


def test_an_implausible_count_falls_back_to_the_stream_chunks() -> None:
    obs = parse(entry(usage={"prompt_tokens": 5, "completion_tokens": 1e9, "content_chunks": 42},
                      response_bytes=9000))
    assert (obs.completion_tokens, obs.usage_suspicious) == (42, True)


def test_the_spool_helper_applies_the_same_rules() -> None:
    assert usage(10, 20, None, 40, 80) == (10, 20, False)
    assert usage(PROMPT_ALLOWANCE + 41, 20, None, 40, 80) == (10, 20, True)
    assert usage(10, COMPLETION_ALLOWANCE + 81, 7, 40, 80) == (10, 7, True)
    # 80 bytes + the allowance + 100 ms of generation
    assert usage(10, COMPLETION_ALLOWANCE + 1080, None, 40, 80, latency_ms=100.0) == (10, COMPLETION_ALLOWANCE + 1080,
                                                                                     False)
    assert usage(10, COMPLETION_ALLOWANCE + 1081, None, 40, 80, latency_ms=100.0) == (10, 20, True)
    assert usage(None, None, None, 0, 0) == (0, 0, True)


# -- answers cut short -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "flag",
    ["upstream_request_timeout", "upstream_remote_reset", "local_reset", "upstream_connection_termination",
     "stream_idle_timeout", "upstream_max_stream_duration_reached", "upstream_protocol_error"],
)
def test_a_200_cut_short_is_a_failure_that_is_still_charged(flag: str) -> None:
    e = entry(status=200, usage={"content_chunks": 17}, request_bytes=400, response_bytes=9000)
    setattr(e.common_properties.response_flags, flag, True)
    obs = parse(e)
    assert obs.response_flags == flag and obs.cut
    assert obs.ok is False and obs.charged is True
    assert (obs.prompt_tokens, obs.completion_tokens, obs.usage_estimated) == (100, 17, True), \
        "a stream cut before its usage chunk is estimated from its content chunks, not its bytes"
    assert not obs.usage_suspicious


def test_flags_that_do_not_cut_an_answer_leave_it_a_success() -> None:
    e = entry(status=200)
    e.common_properties.response_flags.delay_injected = True
    obs = parse(e)
    assert obs.response_flags == "delay_injected" and not obs.cut and obs.ok and obs.charged


def test_every_cut_flag_is_an_envoy_flag() -> None:
    names = {f.name for f in accesslog_pb2.ResponseFlags.DESCRIPTOR.fields}
    long_names = {f for f in CUT_FLAGS if f.islower()}
    assert long_names <= names
    assert {f for f in CUT_FLAGS if f.isupper()} == {"UT", "SI", "UMSDR", "UR", "LR", "UC", "UPE"}


@pytest.mark.parametrize("flag", ["downstream_connection_termination", "downstream_remote_reset"])
def test_a_client_that_leaves_is_not_the_backends_failure(flag: str) -> None:
    mid_answer = entry(status=200)
    setattr(mid_answer.common_properties.response_flags, flag, True)
    obs = parse(mid_answer)
    assert obs.ok and not obs.abandoned, "hung up mid-answer: the backend was answering fine"
    before_answer = entry(status=0)
    setattr(before_answer.common_properties.response_flags, flag, True)
    obs = parse(before_answer)
    assert obs.abandoned, "left before any answer (an aborted upload): not counted for or against the backend"


def test_short_codes_from_the_file_log_cut_too() -> None:
    obs = parse(entry(status=200))._replace(response_flags="URX,UT")
    assert obs.cut and not obs.ok and obs.charged
    assert parse(entry(status=503))._replace(response_flags="UT").charged is False


# -- the model ------------------------------------------------------------------------------------------

def test_names_envoy_is_configured_with() -> None:
    assert (MODEL_HEADER, MODEL_TAG, MAX_MODEL_CHARS) == ("x-llm-model", "model", 256)
    assert Observation._fields[-9:] == ("requested_model", "model", "usage_suspicious", "client", "retry_after",
                                        "route", "unattempted", "retried_ms", "user")


@pytest.mark.parametrize(
    ("requested", "served", "want_requested", "want_model"),
    [
        pytest.param("gpt-4o", None, "gpt-4o", "gpt-4o", id="served-falls-back-to-requested"),
        pytest.param("gpt-4o", "", "gpt-4o", "gpt-4o", id="empty-tag-falls-back"),
        pytest.param("gpt-4o", "llama-3-70b", "gpt-4o", "llama-3-70b", id="backend-own-name"),
        pytest.param(None, "llama-3-70b", "", "llama-3-70b", id="no-header-backend-name"),
        pytest.param(None, None, "", "", id="neither"),
        pytest.param("", None, "", "", id="empty-header"),
    ],
)
def test_requested_and_served_model(requested: str | None, served: str | None, want_requested: str,
                                    want_model: str) -> None:
    obs = parse(entry(requested_model=requested, served_model=served, usage={"prompt_tokens": 1,
                                                                              "completion_tokens": 2}))
    assert (obs.requested_model, obs.model) == (want_requested, want_model)
    assert (obs.backend, obs.prompt_tokens, obs.completion_tokens) == ("a", 1, 2), "the rest is unchanged"


def test_model_names_are_bounded() -> None:
    obs = parse(entry(requested_model="m" * 300))
    assert obs.requested_model == "m" * 256 and obs.model == "m" * 256
    obs = parse(entry(requested_model="x" * 300, served_model="s" * 1000))
    assert obs.requested_model == "x" * 256 and obs.model == "s" * 256


def test_model_is_read_even_when_envoy_answered_itself() -> None:
    obs = parse(entry(status=429, upstream=False, requested_model="gpt-4o"))
    assert obs.backend == "" and obs.requested_model == "gpt-4o" and obs.model == "gpt-4o"
