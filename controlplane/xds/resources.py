"""Pure builders: the config model (plus weights and resolved addresses) -> Envoy protobufs.

Nothing here does I/O. Envoy's vocabulary lives only in this module, so a new
Envoy feature touches one builder and its test.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    extension_pb2,
    grpc_service_pb2,
    health_check_pb2,
    protocol_pb2,
)
from envoy.config.core.v3 import substitution_format_string_pb2 as format_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.extensions.filters.http.api_key_auth.v3 import api_key_auth_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.json_to_metadata.v3 import json_to_metadata_pb2 as j2m_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.http.transform.v3 import transform_pb2
from envoy.extensions.filters.http.upstream_codec.v3 import upstream_codec_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    header_mutation_pb2 as early_mutation_pb2,
)
from envoy.extensions.retry.priority.previous_priorities.v3 import previous_priorities_config_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2 as tls_common_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.metadata.v3 import metadata_pb2
from envoy.type.tracing.v3 import custom_tag_pb2
from envoy.type.v3 import http_status_pb2, percent_pb2, range_pb2, token_bucket_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from ..bootstrap import AUTH_HEADER, XDS_CLUSTER
from ..config import CircuitBreaker, Client, Config, HealthCheck, OutlierDetection, Pool
from ..rollouts import plan as rollout_plan
from ..rollouts.plan import SHADOW_HEADER, USER_HEADER, Plans, RolloutPlan, shadow_cluster
from ..state import Addresses, Drained, Weights
from ..telemetry import spool
from ..telemetry.accesslog import (
    ATTEMPT_FAILURE_CODES,
    ATTEMPTS_LOG,
    CLIENT_HEADER,
    MAX_MODEL_CHARS,
    MODEL_HEADER,
    MODEL_TAG,
    REQUEST_LOG,
    STREAM_HEADER,
    USAGE_NS,
)
from . import typeurls

LISTENER_NAME = "ingress"
ROUTE_NAME = "ingress"
# Endpoint metadata namespace: backend identity and its upstream credential.
METADATA_NS = "llm_lb"
_MODEL_KEY = "model"  # endpoint metadata: the backend's own model name (rewrite, access-log tag)
_TLS_MATCH_NS = "envoy.transport_socket_match"
# Copied from the JSON body by the listener (any client-sent value is stripped first): STREAM_HEADER.
# Set per attempt from the chosen endpoint's metadata, read and removed by the upstream rewrite.
UPSTREAM_MODEL_HEADER = "x-llm-lb-model"
USAGE_FILTER = "llm_lb.usage"
USAGE_SOURCE = "usage"  # the stream scanner's name in the usage filter's source_codes
# JSON content types json_to_metadata reads usage from (its default is `application/json` only).
JSON_TYPES = ("application/json", "application/json; charset=utf-8", "application/json;charset=utf-8",
              "application/json; charset=UTF-8")
MODELS_PATH = "/v1/models"
API_KEY_FILTER = "envoy.filters.http.api_key_auth"
RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
CLIENT_KEY_HEADERS = ("authorization", "x-api-key")  # where clients put their key (OpenAI / Anthropic style)
_CLIENT_DESCRIPTOR = "client"
Blocked = Mapping[str, tuple[str, str, int]]  # client -> (error code, message, Retry-After seconds)
RATE_LIMITED_STATUS = 402  # what the client limit answers; never a local reply otherwise (mapped to 429)
RATE_WINDOW = 60  # seconds: limits are per minute, one bucket refilled whole each minute



def _any(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _duration(value: timedelta) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(value)
    return out


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def _struct(values: Mapping[str, object]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(dict(values))
    return out


def clusters(config: Config) -> dict[str, Message]:
    out: dict[str, Message] = {name: cluster(name, pool, config) for name, pool in config.pools.items()}
    for name, pool in config.pools.items():
        if _shadows(pool):
            out[shadow_cluster(name)] = shadow_cluster_resource(name, pool, config)
    return out


def endpoints(config: Config, weights: Weights, addresses: Addresses, drained: Drained = frozenset(),
              plans: Plans | None = None) -> dict[str, Message]:
    out: dict[str, Message] = {}
    for name, pool in config.pools.items():
        out.update(pool_endpoints(name, pool, weights.get(name, {}), addresses,
                                  frozenset(b for p, b in drained if p == name), (plans or {}).get(name)))
    return out


def pool_endpoints(name: str, pool: Pool, weights: Mapping[str, int], addresses: Addresses,
                   drained: frozenset[str], plan: RolloutPlan | None) -> dict[str, Message]:
    """The pool's endpoints (the candidate at its rollout's share) and, in a shadow rollout, the shadow's."""
    out: dict[str, Message] = {
        name: load_assignment(name, pool, rollout_plan.weights(pool, weights, plan, drained), addresses, drained)}
    if _shadows(pool):
        alone = _shadow_pool(pool)
        out[shadow_cluster(name)] = load_assignment(shadow_cluster(name), alone, dict.fromkeys(alone.backends, 1),
                                                    addresses)
    return out


def _shadow_pool(pool: Pool) -> Pool:
    """The pool as its shadow cluster serves it: the candidate alone, no health checks, no ejection, round
    robin, and a small circuit breaker (a slow shadow cannot pile up requests; none is retried)."""
    assert pool.rollout is not None and pool.rollout.shadow is not None
    candidate, limit = pool.rollout.candidate, pool.rollout.shadow.max_requests
    return pool.model_copy(update={
        "backends": {candidate: pool.backends[candidate]}, "health_check": None, "strategy": "weighted",
        "outlier_detection": OutlierDetection(enabled=False),
        "circuit_breaker": CircuitBreaker(max_connections=limit, max_pending_requests=limit, max_requests=limit,
                                          max_retries=0, retry_budget=None),
    })


def _shadows(pool: Pool) -> bool:
    """A shadow rollout has its own cluster (the candidate alone) for as long as the config holds it."""
    return pool.rollout is not None and pool.rollout.shadow is not None and pool.rollout.mode == "shadow"


def _sticky(pool: Pool) -> str | None:
    """The header an A/B rollout hashes users by (Maglev), if any."""
    rollout = pool.rollout
    return rollout.ab.user_header if rollout is not None and rollout.mode == "ab" else None


def listeners(config: Config, xds_token: str = "", spool_path: str | None = None) -> dict[str, Message]:
    return {LISTENER_NAME: listener(config, xds_token, spool_path)}


def routes(config: Config, rejected: Mapping[str, str] | None = None, blocked: Blocked | None = None,
           envoys: int = 1, plans: Plans | None = None) -> dict[str, Message]:
    return {ROUTE_NAME: route_configuration(config, rejected or {}, blocked, envoys, plans)}


def build(
    config: Config,
    weights: Weights,
    addresses: Addresses,
    drained: Drained = frozenset(),
    rejected: Mapping[str, str] | None = None,
    xds_token: str = "",
    spool_path: str | None = None,
    blocked: Blocked | None = None,
    envoys: int = 1,
    plans: Plans | None = None,
) -> dict[str, dict[str, Message]]:
    """Every resource Envoy needs, keyed by type URL and resource name."""
    return {
        typeurls.CLUSTER: clusters(config),
        typeurls.ENDPOINT: endpoints(config, weights, addresses, drained, plans),
        typeurls.LISTENER: listeners(config, xds_token, spool_path),
        typeurls.ROUTE: routes(config, rejected, blocked, envoys, plans),
    }


@functools.cache
def lua_source(name: str) -> str:
    """A Lua filter's code, kept as a real .lua file so it can be read and linted as Lua.

    Its leading comment stays out of the resource, so editing the comment
    changes no version (a new listener version makes Envoy drain its listener).
    """
    lines = Path(__file__).with_name(name).read_text(encoding="utf-8").splitlines(keepends=True)
    while lines and lines[0].startswith("--"):
        lines.pop(0)
    return "\n" + "".join(lines)


def usage_lua() -> str:
    return lua_source("usage.lua")


def _request_fields_filter() -> hcm_pb2.HttpFilter:
    """Copies the JSON body's `model` and `stream` into headers, then routes are matched again.

    A body that is not JSON, or has no such field, sets no header; whatever the
    client sent in these headers was removed before (early header mutation).
    """
    def copy(header: str, field: str) -> mutation_rules_pb2.HeaderMutation:
        return mutation_rules_pb2.HeaderMutation(append=base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=header, value=f"%REQUEST_BODY({field})%"),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD))

    return hcm_pb2.HttpFilter(
        name="llm_lb.request_fields",
        typed_config=_any(transform_pb2.TransformConfig(
            request_transformation=transform_pb2.Transformation(
                headers_mutations=[copy(MODEL_HEADER, "model"), copy(STREAM_HEADER, "stream")]),
            clear_route_cache=True,
        )),
    )


def _json_usage_filter() -> hcm_pb2.HttpFilter:
    """Usage of non-streamed JSON answers, natively (the response is buffered up to the listener's limit)."""
    rules = [
        j2m_pb2.JsonToMetadata.Rule(
            selectors=[j2m_pb2.JsonToMetadata.Selector(key="usage"), j2m_pb2.JsonToMetadata.Selector(key=key)],
            on_present=j2m_pb2.JsonToMetadata.KeyValuePair(
                metadata_namespace=USAGE_NS, key=key, type=j2m_pb2.JsonToMetadata.NUMBER),
        )
        for key in ("prompt_tokens", "completion_tokens")
    ]
    return hcm_pb2.HttpFilter(
        name="llm_lb.json_usage",
        typed_config=_any(j2m_pb2.JsonToMetadata(
            response_rules=j2m_pb2.JsonToMetadata.MatchRules(rules=rules, allow_content_types=JSON_TYPES))),
    )


def _usage_filter() -> hcm_pb2.HttpFilter:
    """The stream scanner: no default code, so it runs only on routes that name it (`stream: true`)."""
    return hcm_pb2.HttpFilter(
        name=USAGE_FILTER,
        typed_config=_any(lua_pb2.Lua(
            source_codes={USAGE_SOURCE: base_pb2.DataSource(inline_string=usage_lua())})),
    )


def _strip_internal_headers() -> list[extension_pb2.TypedExtensionConfig]:
    """Before routing: a client cannot choose a pool or a rewrite by sending our headers itself, nor the
    request id (Envoy makes one for every request: feedback names it, so a client must not pick it)."""
    return [extension_pb2.TypedExtensionConfig(
        name="llm_lb.strip",
        typed_config=_any(early_mutation_pb2.HeaderMutation(mutations=[
            mutation_rules_pb2.HeaderMutation(remove=name)
            for name in (MODEL_HEADER, STREAM_HEADER, UPSTREAM_MODEL_HEADER, CLIENT_HEADER, "x-request-id",
                         SHADOW_HEADER, USER_HEADER)
        ])),
    )]


def _local_replies(limit_kb: int) -> hcm_pb2.LocalReplyConfig:
    """Envoy's own answers as OpenAI-style JSON errors: 413 (body over the buffer limit, naming the limit),
    401 (no valid client key), and a client's request limit. That one is answered with RATE_LIMITED_STATUS
    and turned into 429 here: a mapper cannot tell it from the 429s of budget routes by its flag (the rate
    limit filter sets it after its reply) and those carry their own bodies."""
    message = (f"request body too large: the limit is {limit_kb} KiB "
               "(envoy.listener.per_connection_buffer_limit_kb)")
    return hcm_pb2.LocalReplyConfig(mappers=[
        hcm_pb2.ResponseMapper(filter=_status_is(413), body_format_override=_json_error(
            message, "invalid_request_error", "request_too_large")),
        hcm_pb2.ResponseMapper(filter=_status_is(401), body_format_override=_json_error(
            "missing or invalid API key: send 'Authorization: Bearer <key>' with the key you were given",
            "invalid_request_error", "invalid_api_key")),
        hcm_pb2.ResponseMapper(  # the client limit answers 402 (see client_settings), shown to clients as 429
            filter=_status_is(RATE_LIMITED_STATUS), status_code=wrappers_pb2.UInt32Value(value=429),
            body_format_override=_json_error(
                "rate limit reached: this client's requests_per_minute is used up; retry after the time in "
                "the Retry-After header", "requests", "rate_limit_exceeded")),
    ])


def _status_is(code: int) -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(status_code_filter=accesslog_pb2.StatusCodeFilter(
        comparison=accesslog_pb2.ComparisonFilter(
            op=accesslog_pb2.ComparisonFilter.EQ,
            value=base_pb2.RuntimeUInt32(default_value=code, runtime_key=f"llm_lb.local_reply.{code}"))))


def _client_filters() -> list[hcm_pb2.HttpFilter]:
    """Client keys and request limits: the filters sit in the listener with no settings of their own; the
    keys and limits live in the route configuration (client_settings), so an edit is an RDS update that
    every connection sees at once (a listener update would leave open connections on the old keys)."""
    return [
        hcm_pb2.HttpFilter(name=API_KEY_FILTER, typed_config=_any(api_key_auth_pb2.ApiKeyAuth())),
        hcm_pb2.HttpFilter(name=RATE_LIMIT_FILTER, typed_config=_any(
            local_rate_limit_pb2.LocalRateLimit(stat_prefix="llm_lb_clients"))),
    ]


def client_settings(clients: Mapping[str, Client], envoys: int = 1) -> dict[str, any_pb2.Any]:
    """Per-filter settings for the virtual host: who may call, and each client's requests per minute
    divided across the `envoys` that share the limit (each Envoy keeps its own bucket)."""
    keys = api_key_auth_pb2.ApiKeyAuthPerRoute(
        credentials=[api_key_auth_pb2.Credential(key=c.key.get_secret_value(), client=name)
                     for name, c in sorted(clients.items())],
        key_sources=[api_key_auth_pb2.KeySource(header=h) for h in CLIENT_KEY_HEADERS],
        forwarding=api_key_auth_pb2.Forwarding(header=CLIENT_HEADER, hide_credentials=True),
    )
    limits = local_rate_limit_pb2.LocalRateLimit(
        stat_prefix="llm_lb_clients",
        status=http_status_pb2.HttpStatus(code=RATE_LIMITED_STATUS),
        token_bucket=token_bucket_pb2.TokenBucket(  # requests of no limited client: not limited
            max_tokens=1 << 30, tokens_per_fill=wrappers_pb2.UInt32Value(value=1 << 30),
            fill_interval=duration_pb2.Duration(seconds=1)),
        filter_enabled=_always(), filter_enforced=_always(),
        rate_limits=[route_components_pb2.RateLimit(actions=[route_components_pb2.RateLimit.Action(
            request_headers=route_components_pb2.RateLimit.Action.RequestHeaders(
                header_name=CLIENT_HEADER, descriptor_key=_CLIENT_DESCRIPTOR, skip_if_absent=True))])],
        response_headers_to_add=[base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="retry-after", value=str(RATE_WINDOW)),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)],
    )
    for name, client in sorted(clients.items()):
        rpm = client.limits.requests_per_minute
        if rpm is None:
            continue
        share = max(1, -(-rpm // max(1, envoys)))  # ceil: a limit is never rounded to zero
        limits.descriptors.add(
            entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=_CLIENT_DESCRIPTOR, value=name)],
            token_bucket=token_bucket_pb2.TokenBucket(
                max_tokens=share, tokens_per_fill=wrappers_pb2.UInt32Value(value=share),
                fill_interval=duration_pb2.Duration(seconds=RATE_WINDOW)))
    return {API_KEY_FILTER: _any(keys), RATE_LIMIT_FILTER: _any(limits)}


def _always() -> base_pb2.RuntimeFractionalPercent:
    return base_pb2.RuntimeFractionalPercent(default_value=percent_pb2.FractionalPercent(
        numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED))


def _json_error(message: str, kind: str, code: str, param: str | None = None) -> format_pb2.SubstitutionFormatString:
    """An OpenAI-style error body; Envoy fills `%...%` operators and escapes them as JSON."""
    error: dict[str, object] = {"message": message, "type": kind, "code": code}
    if param is not None:
        error["param"] = param
    return format_pb2.SubstitutionFormatString(json_format=_struct({"error": error}))


def control_plane_service(xds_token: str) -> grpc_service_pb2.GrpcService:
    """The way to the control plane, with the token it requires on every stream (ADS and access log)."""
    service = grpc_service_pb2.GrpcService(envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=XDS_CLUSTER))
    if xds_token:
        service.initial_metadata.add(key=AUTH_HEADER, value=f"Bearer {xds_token}")
    return service


def _grpc_log_config(log_name: str, xds_token: str,
                     tags: list[custom_tag_pb2.CustomTag]) -> als_pb2.CommonGrpcAccessLogConfig:
    return als_pb2.CommonGrpcAccessLogConfig(
        log_name=log_name,
        grpc_service=control_plane_service(xds_token),
        transport_api_version=config_source_pb2.ApiVersion.V3,
        buffer_flush_interval=duration_pb2.Duration(nanos=200_000_000),
        custom_tags=tags,
    )


def _access_log(xds_token: str) -> accesslog_pb2.AccessLog:
    """Every request, batched, to the control plane over the ADS cluster (gRPC ALS)."""
    backend_tag = _host_tag("backend", "backend")
    return accesslog_pb2.AccessLog(
        name="envoy.access_loggers.http_grpc",
        typed_config=_any(
            als_pb2.HttpGrpcAccessLogConfig(
                common_config=_grpc_log_config(REQUEST_LOG, xds_token,
                                               [backend_tag, _host_tag(MODEL_TAG, _MODEL_KEY)]),
                additional_request_headers_to_log=[MODEL_HEADER, CLIENT_HEADER, USER_HEADER],
                additional_response_headers_to_log=["x-quality-score", "retry-after"],
            )
        ),
    )


def attempts_log(xds_token: str) -> accesslog_pb2.AccessLog:
    """Every FAILED upstream attempt, retried ones included, to the control plane (the router's
    `upstream_log`, its own gRPC stream named ATTEMPTS_LOG): so a backend that failed an attempt another
    one then answered counts the error. The filter leaves successes out (they would double the entries
    the control plane reads for nothing: the request's entry has them): status >= 500 or 429, or a
    failure flag (telemetry/accesslog.py: ATTEMPT_FAILURE_CODES). An attempt cut off by the client, or
    by the route's timeout, carries neither (seen): the request's entry tells those apart."""
    def status(op: int, code: int, key: str) -> accesslog_pb2.AccessLogFilter:
        return accesslog_pb2.AccessLogFilter(status_code_filter=accesslog_pb2.StatusCodeFilter(
            comparison=accesslog_pb2.ComparisonFilter(
                op=op, value=base_pb2.RuntimeUInt32(default_value=code, runtime_key=f"llm_lb.attempts.{key}"))))

    failed = accesslog_pb2.AccessLogFilter(or_filter=accesslog_pb2.OrFilter(filters=[
        status(accesslog_pb2.ComparisonFilter.GE, 500, "min_status"),
        status(accesslog_pb2.ComparisonFilter.EQ, 429, "rate_limited"),
        accesslog_pb2.AccessLogFilter(response_flag_filter=accesslog_pb2.ResponseFlagFilter(
            flags=list(ATTEMPT_FAILURE_CODES))),
        # A mirrored request (shadow rollout), failed or not: the shadow's only record (rollouts/).
        accesslog_pb2.AccessLogFilter(header_filter=accesslog_pb2.HeaderFilter(
            header=route_components_pb2.HeaderMatcher(name=SHADOW_HEADER, present_match=True))),
    ]))
    return accesslog_pb2.AccessLog(
        name="envoy.access_loggers.http_grpc",
        filter=failed,
        typed_config=_any(als_pb2.HttpGrpcAccessLogConfig(
            common_config=_grpc_log_config(ATTEMPTS_LOG, xds_token, [_host_tag("backend", "backend")]),
            additional_request_headers_to_log=[SHADOW_HEADER, STREAM_HEADER],
            additional_response_headers_to_log=["retry-after"],
        )),
    )


def spool_log(path: str) -> accesslog_pb2.AccessLog:
    """Every request, also as one JSON line in a local file: what its spend needs, nothing more.

    The control plane charges from it what never reached it over gRPC (telemetry/spool.py). Numbers
    come out as JSON numbers, absent values as null; Envoy escapes strings as JSON.
    """
    def usage(key: str) -> str:
        return f"%DYNAMIC_METADATA({USAGE_NS}:{key})%"

    line = {
        spool.KEY_ID: "%REQ(X-REQUEST-ID)%",
        spool.KEY_TIME: "%START_TIME(%s)%",
        spool.KEY_POOL: "%UPSTREAM_CLUSTER%",
        spool.KEY_BACKEND: f"%UPSTREAM_METADATA({METADATA_NS}:backend)%",
        spool.KEY_MODEL: f"%UPSTREAM_METADATA({METADATA_NS}:{_MODEL_KEY})%",
        spool.KEY_REQUESTED: f"%REQ({MODEL_HEADER}):{MAX_MODEL_CHARS}%",
        spool.KEY_STATUS: "%RESPONSE_CODE%",
        spool.KEY_FLAGS: "%RESPONSE_FLAGS%",
        spool.KEY_RECEIVED: "%BYTES_RECEIVED%",
        spool.KEY_SENT: "%BYTES_SENT%",
        spool.KEY_DURATION: "%DURATION%",
        spool.KEY_PROMPT: usage("prompt_tokens"),
        spool.KEY_COMPLETION: usage("completion_tokens"),
        spool.KEY_CHUNKS: usage("content_chunks"),
        spool.KEY_CLIENT: f"%REQ({CLIENT_HEADER}):{MAX_MODEL_CHARS}%",  # Envoy's, from the key: recovery charges the client
    }
    return accesslog_pb2.AccessLog(
        name="envoy.access_loggers.file",
        typed_config=_any(file_pb2.FileAccessLog(
            path=path, log_format=format_pb2.SubstitutionFormatString(json_format=_struct(line)))),
    )


def _host_tag(tag: str, key: str) -> custom_tag_pb2.CustomTag:
    """An access-log tag from the chosen endpoint's metadata."""
    return custom_tag_pb2.CustomTag(
        tag=tag,
        metadata=custom_tag_pb2.CustomTag.Metadata(
            kind=metadata_pb2.MetadataKind(host=metadata_pb2.MetadataKind.Host()),
            metadata_key=metadata_pb2.MetadataKey(key=METADATA_NS, path=[metadata_pb2.MetadataKey.PathSegment(key=key)]),
        ),
    )


def listener(config: Config, xds_token: str = "", spool_path: str | None = None) -> listener_pb2.Listener:
    """Every request passes: strip our headers, copy model/stream from the body, (re)route, forward.

    Usage is read natively from JSON answers; the Lua scanner runs only on
    routes for `stream: true` requests.
    """
    addr = config.envoy.listener
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=LISTENER_NAME,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=ROUTE_NAME),
        early_header_mutation_extensions=_strip_internal_headers(),
        http_filters=[
            *(_client_filters() if config.clients else []),  # first: a request without a key reads no body
            _request_fields_filter(),
            _json_usage_filter(),
            _usage_filter(),
            hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=_any(
                router_pb2.Router(upstream_log=[attempts_log(xds_token)]))),
        ],
        local_reply_config=_local_replies(addr.per_connection_buffer_limit_kb),
        access_log=[_access_log(xds_token), *([spool_log(spool_path)] if spool_path else [])],
        always_set_request_id_in_response=True,
        # Route on the path the backend will resolve: `/v1/../admin` must not reach a `/v1/` pool.
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.UNESCAPE_AND_FORWARD,
        max_request_headers_kb=wrappers_pb2.UInt32Value(value=addr.max_request_headers_kb),
        request_headers_timeout=_duration(addr.request_headers_timeout),
        common_http_protocol_options=protocol_pb2.HttpProtocolOptions(
            idle_timeout=_duration(addr.idle_timeout),
            max_headers_count=wrappers_pb2.UInt32Value(value=addr.max_headers_count),
            headers_with_underscores_action=protocol_pb2.HttpProtocolOptions.REJECT_REQUEST,
        ),
    )
    return listener_pb2.Listener(
        name=LISTENER_NAME,
        per_connection_buffer_limit_bytes=wrappers_pb2.UInt32Value(value=addr.per_connection_buffer_limit_kb * 1024),
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=addr.address, port_value=addr.port)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_any(manager),
                    )
                ]
            )
        ],
    )


def route_configuration(config: Config, rejected: Mapping[str, str] | None = None, blocked: Blocked | None = None,
                        envoys: int = 1, plans: Plans | None = None) -> route_pb2.RouteConfiguration:
    """Routes per path prefix, the longest first, so specific pools win.

    At a prefix whose pools name their models, each model routes to its pool
    (models of pools at shorter, covering prefixes count here too), then the
    `*` pool if any; Envoy itself answers 404 for any other model and 400 for
    a request without one. Every forwarding route has a twin for `stream:
    true` requests, the only ones the Lua usage scanner runs for. A pool in
    `rejected` (budget exhausted, action `reject`) is answered 429 by Envoy.
    """
    rejected = rejected or {}
    mirrors = {name: p.mirror for name, p in (plans or {}).items() if p.mirror > 0}
    routes: list[route_components_pb2.Route] = [_blocked(name, *why) for name, why in sorted((blocked or {}).items())]
    if config.routes_by_model:
        routes += _model_list_routes(config)
    by_prefix: dict[str, list[tuple[str, Pool]]] = {}
    for name, pool in sorted(config.pools.items()):
        by_prefix.setdefault(pool.match.prefix, []).append((name, pool))
    for prefix in sorted(by_prefix, key=lambda p: (-len(p), p)):
        here = by_prefix[prefix]
        if here[0][1].match.models is None:  # validation: then it is the only pool at this prefix
            name, pool = here[0]
            routes += _forward(name, pool, route_components_pb2.RouteMatch(prefix=prefix), rejected, mirrors)
            continue
        covering = [(n, p) for q, pools in by_prefix.items() if q != prefix and prefix.startswith(q)
                    for n, p in pools if p.match.models is not None]
        candidates = here + sorted(covering, key=lambda item: -len(item[1].match.prefix))
        for name, pool in candidates:
            for model in pool.match.named_models:
                routes += _forward(name, pool, _by_model(prefix, exact=model), rejected, mirrors)
        default = next(((n, p) for n, p in candidates if p.match.default), None)
        if default is not None:
            routes += _forward(*default, _by_model(prefix), rejected, mirrors)
        served = sorted(m for _, p in candidates for m in p.match.named_models)
        routes += _model_errors(prefix, served)
    host = route_components_pb2.VirtualHost(name="pools", domains=["*"], routes=routes)
    if config.clients:
        for name, settings in client_settings(config.clients, envoys).items():
            host.typed_per_filter_config[name].CopyFrom(settings)
    return route_pb2.RouteConfiguration(
        name=ROUTE_NAME,
        virtual_hosts=[host],
        # Envoy's default (4 KiB) would refuse a long model list.
        max_direct_response_body_size_bytes=wrappers_pb2.UInt32Value(value=1 << 20),
    )


def _blocked(client: str, code: str, message: str, retry_after: int) -> route_components_pb2.Route:
    """A client over its budget or its tokens per minute: Envoy answers it 429 until the control plane lifts
    the block. The client header is Envoy's (set from the key), so only that client matches; it is present
    once the body has been read and the route matched again (the request-fields filter)."""
    route = route_components_pb2.Route(name=f"client/{client}", match=route_components_pb2.RouteMatch(
        prefix="/", headers=[route_components_pb2.HeaderMatcher(
            name=CLIENT_HEADER, string_match=string_pb2.StringMatcher(exact=client))]))
    route.direct_response.status = 429
    route.direct_response.body.inline_string = json.dumps(
        {"error": {"message": message, "type": "requests", "code": code, "client": client}})
    route.response_headers_to_add.append(_json_content_type())
    route.response_headers_to_add.append(base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key="retry-after", value=str(max(1, retry_after))),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD))
    return route


def _by_model(prefix: str, exact: str | None = None) -> route_components_pb2.RouteMatch:
    """The prefix and the copied model header: that exact name, or any name at all."""
    header = route_components_pb2.HeaderMatcher(name=MODEL_HEADER)
    if exact is None:
        header.present_match = True
    else:
        header.string_match.exact = exact
    return route_components_pb2.RouteMatch(prefix=prefix, headers=[header])


def _forward(name: str, pool: Pool, match: route_components_pb2.RouteMatch, rejected: Mapping[str, str],
             mirrors: Mapping[str, float] | None = None) -> list[route_components_pb2.Route]:
    """The streamed twin (with the usage scanner) before the plain route (without any Lua)."""
    if name in rejected:
        body = json.dumps({"error": {"message": rejected[name], "type": "budget_exhausted", "pool": name}})
        route = route_components_pb2.Route(name=name, match=match)
        route.direct_response.status = 429
        route.direct_response.body.inline_string = body
        route.response_headers_to_add.append(_json_content_type())
        return [route]
    action = route_components_pb2.RouteAction(
        cluster=name,
        timeout=_duration(pool.timeout),
        auto_host_rewrite=wrappers_pb2.BoolValue(value=True),
        retry_policy=retry_policy(pool),
    )
    mirror = (mirrors or {}).get(name, 0.0)
    if mirror > 0:
        action.request_mirror_policies.append(mirror_policy(name, pool, mirror))
    user_header = _sticky(pool)
    if user_header is not None:
        action.hash_policy.append(route_components_pb2.RouteAction.HashPolicy(
            header=route_components_pb2.RouteAction.HashPolicy.Header(header_name=user_header)))
    streamed = route_components_pb2.Route(name=f"{name}/stream", match=match, route=action)
    plain = route_components_pb2.Route(name=name, match=match, route=action)
    if user_header is not None:  # the access log names the user: per-arm statistics count users
        for route in (streamed, plain):
            route.request_headers_to_add.append(base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=USER_HEADER, value=f"%REQ({user_header})%"),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD))
    streamed.match.headers.append(
        route_components_pb2.HeaderMatcher(name=STREAM_HEADER, string_match=string_pb2.StringMatcher(exact="true")))
    streamed.typed_per_filter_config[USAGE_FILTER].CopyFrom(_any(lua_pb2.LuaPerRoute(name=USAGE_SOURCE)))
    return [streamed, plain]


def mirror_policy(name: str, pool: Pool, share: float) -> route_components_pb2.RouteAction.RequestMirrorPolicy:
    """A share of the pool's requests, copied to its shadow cluster (the candidate alone): the client only
    ever sees the primary's answer. The copy carries SHADOW_HEADER, which selects its attempts-log entry,
    and the candidate's own Host."""
    assert pool.rollout is not None
    policy = route_components_pb2.RouteAction.RequestMirrorPolicy(
        cluster=shadow_cluster(name),
        disable_shadow_host_suffix_append=True,
        host_rewrite_literal=pool.backends[pool.rollout.candidate].host,
        request_headers_mutations=[mutation_rules_pb2.HeaderMutation(append=base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=SHADOW_HEADER, value="1"),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD))],
    )
    policy.runtime_fraction.default_value.numerator = round(min(1.0, share) * 1_000_000)
    policy.runtime_fraction.default_value.denominator = percent_pb2.FractionalPercent.MILLION
    policy.runtime_fraction.runtime_key = f"llm_lb.shadow.{name}"
    return policy


def _json_content_type() -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key="content-type", value="application/json"),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _listing(served: list[str], limit: int = 50) -> str:
    shown = ", ".join(served[:limit]) + (f" and {len(served) - limit} more" if len(served) > limit else "")
    return f"{shown}; GET {MODELS_PATH} lists them" if served else f"none; GET {MODELS_PATH} lists them"


def _model_errors(prefix: str, served: list[str]) -> list[route_components_pb2.Route]:
    """At a prefix routed by model: an unknown model -> 404, no model (or no JSON body) -> 400."""
    unknown = route_components_pb2.Route(name=f"unknown-model:{prefix}", match=_by_model(prefix))
    unknown.direct_response.status = 404
    unknown.direct_response.body_format.CopyFrom(_json_error(
        f"The model '%REQ({MODEL_HEADER})%' is not served here. Available: {_listing(served)}",
        "invalid_request_error", "model_not_found", param="model"))
    missing = route_components_pb2.Route(name=f"no-model:{prefix}", match=route_components_pb2.RouteMatch(prefix=prefix))
    missing.direct_response.status = 400
    missing.direct_response.body_format.CopyFrom(_json_error(
        "This path routes by model: send a JSON body (content-type: application/json) with a \"model\" field. "
        f"Available: {_listing(served)}",
        "invalid_request_error", "missing_model", param="model"))
    return [unknown, missing]


def _model_list_routes(config: Config) -> list[route_components_pb2.Route]:
    """`GET /v1/models` and `GET /v1/models/{id}`, answered by Envoy in OpenAI's format."""
    served = config.served_models()

    def entry(model: str, pool: str) -> dict[str, object]:
        return {"id": model, "object": "model", "created": 0, "owned_by": pool}

    def get(match: route_components_pb2.RouteMatch, status: int, body: str | format_pb2.SubstitutionFormatString,
            name: str) -> route_components_pb2.Route:
        match.headers.append(route_components_pb2.HeaderMatcher(
            name=":method", string_match=string_pb2.StringMatcher(exact="GET")))
        route = route_components_pb2.Route(name=name, match=match)
        route.direct_response.status = status
        if isinstance(body, str):
            route.direct_response.body.inline_string = body
            route.response_headers_to_add.append(_json_content_type())
        else:
            route.direct_response.body_format.CopyFrom(body)
        return route

    listing = json.dumps({"object": "list", "data": [entry(m, p) for m, p in sorted(served.items())]})
    routes = [get(route_components_pb2.RouteMatch(path=MODELS_PATH), 200, listing, "models")]
    routes += [get(route_components_pb2.RouteMatch(path=f"{MODELS_PATH}/{m}"), 200, json.dumps(entry(m, p)),
                   f"models/{m}") for m, p in sorted(served.items())]
    unknown = _json_error(f"The model '%REQ(:path)%' is not served here. Available: {_listing(sorted(served))}",
                          "invalid_request_error", "model_not_found", param="model")
    routes.append(get(route_components_pb2.RouteMatch(prefix=f"{MODELS_PATH}/"), 404, unknown, "models/unknown"))
    return routes


def retry_policy(pool: Pool) -> route_components_pb2.RetryPolicy:
    """Retries always go to a host that has not failed this request yet, with back-off.

    A 429's `Retry-After` / `x-ratelimit-reset` is waited when it is short; with
    several tiers, a retry leaves a tier after as many tries as it has hosts
    (up to the retry count), so a tier that is all down or all rate-limited
    fails over to the next (e.g. a fallback model) within one request.
    """
    retry = pool.retry
    retry_on = list(retry.retry_on)
    if retry.retriable_status_codes and "retriable-status-codes" not in retry_on:
        retry_on.append("retriable-status-codes")
    policy = route_components_pb2.RetryPolicy(
        retry_on=",".join(retry_on),
        num_retries=wrappers_pb2.UInt32Value(value=retry.attempts),
        retriable_status_codes=retry.retriable_status_codes,
        retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(
            base_interval=_duration(retry.backoff.base_interval),
            max_interval=_duration(retry.backoff.max_interval),
        ),
        retry_host_predicate=[
            route_components_pb2.RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=_any_by_name(
                    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                ),
            )
        ],
        host_selection_retry_max_attempts=5,
    )
    reset = route_components_pb2.RetryPolicy.ResetHeader
    policy.rate_limited_retry_back_off.CopyFrom(route_components_pb2.RetryPolicy.RateLimitedRetryBackOff(
        reset_headers=[
            reset(name="retry-after", format=route_components_pb2.RetryPolicy.SECONDS),
            reset(name="x-ratelimit-reset", format=route_components_pb2.RetryPolicy.UNIX_TIMESTAMP),
        ],
        max_interval=_duration(retry.backoff.max_rate_limited_interval),
    ))
    if retry.per_try_timeout is not None:
        policy.per_try_timeout.CopyFrom(_duration(retry.per_try_timeout))
    tiers = sorted({b.priority for b in pool.backends.values()})
    if len(tiers) > 1:
        first_tier = sum(1 for b in pool.backends.values() if b.priority == tiers[0])
        policy.retry_priority.CopyFrom(route_components_pb2.RetryPolicy.RetryPriority(
            name="envoy.retry_priorities.previous_priorities",
            typed_config=_any(previous_priorities_config_pb2.PreviousPrioritiesConfig(
                update_frequency=max(1, min(first_tier, retry.attempts))))))
    return policy


def _any_by_name(full_name: str) -> any_pb2.Any:
    """An empty typed config, for extensions whose config message has no fields."""
    return any_pb2.Any(type_url=f"type.googleapis.com/{full_name}")


def cluster(name: str, pool: Pool, config: Config) -> cluster_pb2.Cluster:
    tls_hosts = sorted({b.host for b in pool.backends.values() if b.tls})
    options = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions()
        ),
        http_filters=[*_credential_filters(pool), *_model_rewrite_filters(pool), _upstream_codec()],
    )
    lb_policy = (
        cluster_pb2.Cluster.MAGLEV if _sticky(pool) is not None  # A/B: a user stays in one arm
        else cluster_pb2.Cluster.LEAST_REQUEST if pool.strategy == "least_request" else cluster_pb2.Cluster.ROUND_ROBIN
    )
    out = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads(), service_name=name),
        connect_timeout=_duration(pool.connect_timeout),
        lb_policy=lb_policy,
        common_lb_config=cluster_pb2.Cluster.CommonLbConfig(
            # Weight changes apply at once instead of being batched for a second.
            update_merge_window=duration_pb2.Duration(),
            healthy_panic_threshold=percent_pb2.Percent(value=pool.panic_threshold),
        ),
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(options)
        },
        circuit_breakers=circuit_breakers(pool.circuit_breaker),
    )
    if _rewrites_model(pool):
        # The rewrite reads the whole request body per attempt: as much as the listener accepts.
        out.per_connection_buffer_limit_bytes.value = config.envoy.listener.per_connection_buffer_limit_kb * 1024
    if pool.outlier_detection.enabled:
        out.outlier_detection.CopyFrom(outlier_detection(pool.outlier_detection))
    if pool.health_check is not None:
        out.health_checks.append(health_check(pool.health_check))
    # One TLS socket per host name, chosen by endpoint metadata: Envoy's auto_sni would take
    # SNI from the app's Host header (chosen before the endpoint is), not the backend's.
    for host in tls_hosts:
        out.transport_socket_matches.append(
            cluster_pb2.Cluster.TransportSocketMatch(
                name=f"tls:{host}",
                match=_struct({"tls_host": host}),
                transport_socket=base_pb2.TransportSocket(
                    name="envoy.transport_sockets.tls",
                    typed_config=_any(upstream_tls(config.envoy.ca_file, host)),
                ),
            )
        )
    return out


def shadow_cluster_resource(name: str, pool: Pool, config: Config) -> cluster_pb2.Cluster:
    """The candidate alone, for mirrored requests, with the pool's TLS and credentials (_shadow_pool)."""
    return cluster(shadow_cluster(name), _shadow_pool(pool), config)


def health_check(check: HealthCheck) -> health_check_pb2.HealthCheck:
    interval = _duration(check.interval)
    return health_check_pb2.HealthCheck(
        timeout=_duration(check.timeout),
        interval=interval,
        # Idle pools are checked as often as busy ones, so failover is ready before traffic comes.
        no_traffic_interval=interval,
        unhealthy_threshold=wrappers_pb2.UInt32Value(value=check.unhealthy_threshold),
        healthy_threshold=wrappers_pb2.UInt32Value(value=check.healthy_threshold),
        http_health_check=health_check_pb2.HealthCheck.HttpHealthCheck(
            path=check.path,
            expected_statuses=[range_pb2.Int64Range(start=code, end=code + 1) for code in check.expected_statuses],
        ),
    )


def outlier_detection(od: OutlierDetection) -> outlier_detection_pb2.OutlierDetection:
    def u32(value: int) -> wrappers_pb2.UInt32Value:
        return wrappers_pb2.UInt32Value(value=value)

    out = outlier_detection_pb2.OutlierDetection(
        consecutive_5xx=u32(od.consecutive_5xx),
        enforcing_consecutive_5xx=u32(100),
        consecutive_gateway_failure=u32(od.consecutive_gateway_failure),
        enforcing_consecutive_gateway_failure=u32(100),
        interval=_duration(od.interval),
        base_ejection_time=_duration(od.base_ejection_time),
        max_ejection_time=_duration(od.max_ejection_time),
        max_ejection_percent=u32(od.max_ejection_percent),
        enforcing_success_rate=u32(100 if od.success_rate_stdev_factor else 0),
        success_rate_request_volume=u32(od.success_rate_request_volume),
        success_rate_minimum_hosts=u32(od.success_rate_minimum_hosts),
        enforcing_failure_percentage=u32(100 if od.failure_percentage_threshold else 0),
        failure_percentage_request_volume=u32(od.failure_percentage_request_volume),
        failure_percentage_minimum_hosts=u32(od.failure_percentage_minimum_hosts),
        # A host that passes its active check again takes traffic again.
        successful_active_health_check_uneject_host=wrappers_pb2.BoolValue(value=True),
    )
    if od.success_rate_stdev_factor:
        out.success_rate_stdev_factor.value = round(od.success_rate_stdev_factor * 1000)
    if od.failure_percentage_threshold:
        out.failure_percentage_threshold.value = od.failure_percentage_threshold
    return out


def circuit_breakers(cb: CircuitBreaker) -> circuit_breaker_pb2.CircuitBreakers:
    thresholds = circuit_breaker_pb2.CircuitBreakers.Thresholds(
        priority=base_pb2.RoutingPriority.DEFAULT,
        max_connections=wrappers_pb2.UInt32Value(value=cb.max_connections),
        max_pending_requests=wrappers_pb2.UInt32Value(value=cb.max_pending_requests),
        max_requests=wrappers_pb2.UInt32Value(value=cb.max_requests),
        max_retries=wrappers_pb2.UInt32Value(value=cb.max_retries),
        track_remaining=True,
    )
    if cb.retry_budget is not None:
        thresholds.retry_budget.budget_percent.value = cb.retry_budget.budget_percent
        thresholds.retry_budget.min_retry_concurrency.value = cb.retry_budget.min_retry_concurrency
    return circuit_breaker_pb2.CircuitBreakers(thresholds=[thresholds])


def upstream_tls(ca_file: str, host: str) -> tls_pb2.UpstreamTlsContext:
    """TLS to one backend host: its name as SNI, and its certificate must name it."""
    try:
        ipaddress.ip_address(host)
        san_type, sni = tls_common_pb2.SubjectAltNameMatcher.IP_ADDRESS, ""  # no SNI for an IP
    except ValueError:
        san_type, sni = tls_common_pb2.SubjectAltNameMatcher.DNS, host
    return tls_pb2.UpstreamTlsContext(
        sni=sni,
        common_tls_context=tls_pb2.CommonTlsContext(
            validation_context=tls_common_pb2.CertificateValidationContext(
                trusted_ca=base_pb2.DataSource(filename=ca_file),
                match_typed_subject_alt_names=[
                    tls_common_pb2.SubjectAltNameMatcher(
                        san_type=san_type, matcher=string_pb2.StringMatcher(exact=host)
                    )
                ],
            )
        ),
    )


def _credential_filters(pool: Pool) -> list[hcm_pb2.HttpFilter]:
    """One upstream header_mutation filter per credential header the pool's backends use.

    Route-level header formatting runs before a host is chosen, so only an
    upstream filter can read the chosen endpoint's metadata. Whatever the app
    sent in that header is replaced.
    """
    headers = sorted({b.api_key_header for b in pool.backends.values() if b.api_key is not None})
    return [
        hcm_pb2.HttpFilter(
            name=f"llm_lb.credential.{header}",
            typed_config=_any(
                header_mutation_pb2.HeaderMutation(
                    mutations=header_mutation_pb2.Mutations(
                        request_mutations=[
                            mutation_rules_pb2.HeaderMutation(
                                append=base_pb2.HeaderValueOption(
                                    header=base_pb2.HeaderValue(
                                        key=header, value=f"%UPSTREAM_METADATA({METADATA_NS}:{header})%"
                                    ),
                                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                                )
                            )
                        ]
                    )
                )
            ),
        )
        for header in headers
    ]


def _rewrites_model(pool: Pool) -> bool:
    return any(b.model is not None for b in pool.backends.values())


def _model_rewrite_filters(pool: Pool) -> list[hcm_pb2.HttpFilter]:
    """Per attempt, the chosen backend's own model name into the body (only pools that have one).

    header_mutation hands the endpoint's `model` metadata to the Lua filter in a
    header (Lua cannot see the upstream host); a retry on another backend is
    rewritten for that backend.
    """
    if not _rewrites_model(pool):
        return []
    hand_over = header_mutation_pb2.HeaderMutation(mutations=header_mutation_pb2.Mutations(request_mutations=[
        mutation_rules_pb2.HeaderMutation(append=base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=UPSTREAM_MODEL_HEADER, value=f"%UPSTREAM_METADATA({METADATA_NS}:{_MODEL_KEY})%"),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        ))
    ]))
    rewrite = lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=lua_source("model.lua")))
    return [
        hcm_pb2.HttpFilter(name="llm_lb.model_name", typed_config=_any(hand_over)),
        hcm_pb2.HttpFilter(name="llm_lb.model_rewrite", typed_config=_any(rewrite)),
    ]


def _upstream_codec() -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(
        name="envoy.filters.http.upstream_codec", typed_config=_any(upstream_codec_pb2.UpstreamCodec())
    )


def load_assignment(
    name: str, pool: Pool, weights: Mapping[str, int], addresses: Addresses, drained: frozenset[str] = frozenset()
) -> endpoint_pb2.ClusterLoadAssignment:
    """One locality per priority tier, in tier order."""
    tiers: dict[int, list[endpoint_components_pb2.LbEndpoint]] = {}
    for backend_name, backend in sorted(pool.backends.items()):
        ip = addresses.get(backend.host)
        weight = weights.get(backend_name, backend.weight)
        if ip is None or weight == 0:
            # Unresolved, or scored out: left out, not published unhealthy, which would count
            # against its tier's health and spill traffic to the next tier. In-flight requests finish.
            continue
        metadata: dict[str, object] = {"pool": name, "backend": backend_name}
        if backend.auth_value is not None:
            metadata[backend.api_key_header] = backend.auth_value
        if backend.model is not None:
            metadata[_MODEL_KEY] = backend.model
        filter_metadata = {METADATA_NS: _struct(metadata)}
        if backend.tls:
            filter_metadata[_TLS_MATCH_NS] = _struct({"tls_host": backend.host})
        tiers.setdefault(backend.priority, []).append(
            endpoint_components_pb2.LbEndpoint(
                endpoint=endpoint_components_pb2.Endpoint(
                    address=address_pb2.Address(
                        socket_address=address_pb2.SocketAddress(address=ip, port_value=backend.port)
                    ),
                    hostname=backend.host,
                    health_check_config=endpoint_components_pb2.Endpoint.HealthCheckConfig(hostname=backend.host),
                ),
                load_balancing_weight=wrappers_pb2.UInt32Value(value=weight),
                metadata=base_pb2.Metadata(filter_metadata=filter_metadata),
                # Draining: no new requests; requests in flight finish on their open connections.
                health_status=health_check_pb2.DRAINING if backend_name in drained else health_check_pb2.UNKNOWN,
            )
        )
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        policy=endpoint_pb2.ClusterLoadAssignment.Policy(
            overprovisioning_factor=wrappers_pb2.UInt32Value(value=round(pool.overprovisioning_factor * 100))
        ),
        endpoints=[
            # Envoy wants dense priorities (0..N, no gaps): tiers 0 and 2 become 0 and 1.
            endpoint_components_pb2.LocalityLbEndpoints(priority=rank, lb_endpoints=lbs)
            for rank, (_, lbs) in enumerate(sorted(tiers.items()))
        ],
    )
