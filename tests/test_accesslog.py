"""Envoy access log entries -> observations: tokens, estimates, backend, status, latency, quality header."""

from __future__ import annotations

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import struct_pb2

from controlplane.telemetry.accesslog import (
    CHARS_PER_TOKEN,
    MAX_MODEL_CHARS,
    MODEL_HEADER,
    MODEL_TAG,
    USAGE_NS,
    Observation,
    parse,
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
        pytest.param(2.9, 2, id="fraction-truncated"),
        pytest.param(-5, None, id="negative"),
        pytest.param(1e18, None, id="absurd"),
        pytest.param(float("nan"), None, id="nan"),
        pytest.param(float("inf"), None, id="infinite"),
        pytest.param("45", None, id="string"),
    ],
)
def test_implausible_usage_counts_are_estimated_not_trusted(reported: object, counted: int | None) -> None:
    obs = parse(entry(usage={"prompt_tokens": 10, "completion_tokens": reported}, response_bytes=400))
    if counted is None:
        assert obs.completion_tokens == 400 // CHARS_PER_TOKEN and obs.usage_estimated
    else:
        assert obs.completion_tokens == counted and not obs.usage_estimated
    assert obs.prompt_tokens == 10


# -- the model ------------------------------------------------------------------------------------------

def test_names_envoy_is_configured_with() -> None:
    assert (MODEL_HEADER, MODEL_TAG, MAX_MODEL_CHARS) == ("x-llm-model", "model", 256)
    assert Observation._fields[-2:] == ("requested_model", "model")


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
