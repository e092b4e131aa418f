"""Resource generation: config in, protobuf out, no network."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf.json_format import MessageToDict

from controlplane.config import parse_config
from controlplane.scoring.weights import pool_weights
from controlplane.xds import resources, typeurls
from controlplane.xds.snapshot import Snapshot

SECRET = "sk-unit-test-secret"

CONFIG = """
envoy:
  listener: {address: 127.0.0.1, port: 10000}
  ca_file: /etc/ssl/certs/ca-certificates.crt
pools:
  chat:
    match: {prefix: /v1/}
    strategy: weighted
    timeout: 45s
    backends:
      local-a: {url: "http://127.0.0.1:9001", weight: 3}
      provider-b: {url: "https://api.example.com", api_key: "${KEY_B}", weight: 1}
      fallback: {url: "http://127.0.0.1:9003", priority: 2}
      claude: {url: "https://api.anthropic.test", api_key: "${KEY_B}", api_key_header: x-api-key, priority: 2}
  rag:
    match: {prefix: /v1/rag/}
    strategy: least_request
    backends:
      r1: {url: "http://127.0.0.1:7001"}
"""
ADDRESSES = {"127.0.0.1": "127.0.0.1", "api.example.com": "203.0.113.7", "api.anthropic.test": "203.0.113.8"}


def built():
    config = parse_config(CONFIG, env={"KEY_B": SECRET})
    return config, resources.build(config, {name: pool_weights(p) for name, p in config.pools.items()}, ADDRESSES)


def as_dict(message):
    return MessageToDict(message, preserving_proto_field_name=True)


def protocol_options(cluster: cluster_pb2.Cluster) -> http_protocol_options_pb2.HttpProtocolOptions:
    options = http_protocol_options_pb2.HttpProtocolOptions()
    cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(options)
    return options


def test_one_cluster_per_pool_with_strategy_and_eds():
    _, res = built()
    clusters = res[typeurls.CLUSTER]
    assert set(clusters) == {"chat", "rag"}
    chat, rag = clusters["chat"], clusters["rag"]
    assert chat.type == cluster_pb2.Cluster.EDS and chat.eds_cluster_config.service_name == "chat"
    assert chat.eds_cluster_config.eds_config.HasField("ads")
    assert chat.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert rag.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert chat.common_lb_config.update_merge_window.ToNanoseconds() == 0


def test_endpoints_carry_weight_priority_hostname_and_tls_marker():
    _, res = built()
    cla = as_dict(res[typeurls.ENDPOINT]["chat"])
    tiers = {loc.get("priority", 0): loc["lb_endpoints"] for loc in cla["endpoints"]}
    assert sorted(tiers) == [0, 1], "priorities 0 and 2 are made dense as 0 and 1"
    tier0 = {e["metadata"]["filter_metadata"]["llm_lb"]["backend"]: e for e in tiers[0]}
    assert tier0["local-a"]["load_balancing_weight"] == 3
    assert tier0["provider-b"]["load_balancing_weight"] == 1
    b = tier0["provider-b"]
    assert b["endpoint"]["address"]["socket_address"] == {"address": "203.0.113.7", "port_value": 443}
    assert b["endpoint"]["hostname"] == "api.example.com"
    assert b["metadata"]["filter_metadata"]["envoy.transport_socket_match"] == {"tls_host": "api.example.com"}
    assert b["metadata"]["filter_metadata"]["llm_lb"]["authorization"] == f"Bearer {SECRET}"
    assert "envoy.transport_socket_match" not in tier0["local-a"]["metadata"]["filter_metadata"]
    assert "authorization" not in tier0["local-a"]["metadata"]["filter_metadata"]["llm_lb"]
    tier1 = {e["metadata"]["filter_metadata"]["llm_lb"]["backend"]: e for e in tiers[1]}
    assert tier1["claude"]["metadata"]["filter_metadata"]["llm_lb"]["x-api-key"] == SECRET


def test_unresolved_hosts_are_left_out():
    config = parse_config(CONFIG, env={"KEY_B": SECRET})
    cla = resources.load_assignment("chat", config.pools["chat"], {}, {"127.0.0.1": "127.0.0.1"})
    names = [e.metadata.filter_metadata["llm_lb"]["backend"] for loc in cla.endpoints for e in loc.lb_endpoints]
    assert sorted(names) == ["fallback", "local-a"]


def test_round_robin_sets_equal_weights():
    config = parse_config(CONFIG.replace("strategy: weighted", "strategy: round_robin"), env={"KEY_B": SECRET})
    assert {name: pool_weights(p) for name, p in config.pools.items()}["chat"] == {"local-a": 1, "provider-b": 1, "fallback": 1, "claude": 1}


def test_credentials_are_set_by_upstream_filters_per_header():
    _, res = built()
    options = protocol_options(res[typeurls.CLUSTER]["chat"])
    names = [f.name for f in options.http_filters]
    assert names == ["llm_lb.credential.authorization", "llm_lb.credential.x-api-key", "envoy.filters.http.upstream_codec"]
    mutation = header_mutation_pb2.HeaderMutation()
    options.http_filters[0].typed_config.Unpack(mutation)
    header = mutation.mutations.request_mutations[0].append
    assert header.header.key == "authorization"
    assert header.header.value == "%UPSTREAM_METADATA(llm_lb:authorization)%"
    assert header.append_action == header.OVERWRITE_IF_EXISTS_OR_ADD
    # auto_sni would take SNI from the app's Host header: each TLS host has its own socket instead
    assert not options.upstream_http_protocol_options.auto_sni
    # no keys in the rag pool: no credential filter, no TLS
    rag = protocol_options(res[typeurls.CLUSTER]["rag"])
    assert [f.name for f in rag.http_filters] == ["envoy.filters.http.upstream_codec"]
    assert not res[typeurls.CLUSTER]["rag"].transport_socket_matches


def test_each_tls_host_gets_its_own_sni_and_san_check_and_secrets_stay_out_of_clusters():
    _, res = built()
    chat = res[typeurls.CLUSTER]["chat"]
    matches = {m.name: m for m in chat.transport_socket_matches}
    assert sorted(matches) == ["tls:api.anthropic.test", "tls:api.example.com"]
    match = matches["tls:api.example.com"]
    assert dict(match.match) == {"tls_host": "api.example.com"}
    tls = tls_pb2.UpstreamTlsContext()
    match.transport_socket.typed_config.Unpack(tls)
    assert tls.sni == "api.example.com"
    validation = tls.common_tls_context.validation_context
    assert validation.trusted_ca.filename == "/etc/ssl/certs/ca-certificates.crt"
    (san,) = validation.match_typed_subject_alt_names
    assert san.matcher.exact == "api.example.com" and san.san_type == san.DNS
    for cluster in res[typeurls.CLUSTER].values():
        assert SECRET.encode() not in cluster.SerializeToString()


def test_routes_longest_prefix_first_with_timeout_host_rewrite_and_retry():
    _, res = built()
    route = res[typeurls.ROUTE][resources.ROUTE_NAME]
    routes = route.virtual_hosts[0].routes
    # Each pool: its streamed twin (x-llm-stream: true, with the usage scanner), then the plain route.
    assert [(r.name, r.match.prefix) for r in routes] == [
        ("rag/stream", "/v1/rag/"), ("rag", "/v1/rag/"), ("chat/stream", "/v1/"), ("chat", "/v1/")]
    assert [h.name for h in routes[2].match.headers] == [resources.STREAM_HEADER]
    assert resources.USAGE_FILTER in routes[2].typed_per_filter_config
    assert not routes[3].match.headers and not routes[3].typed_per_filter_config
    chat = routes[3].route
    assert chat.cluster == "chat" and chat.timeout.seconds == 45 and chat.auto_host_rewrite.value
    assert "connect-failure" in chat.retry_policy.retry_on
    assert chat.retry_policy.retry_host_predicate[0].name == "envoy.retry_host_predicates.previous_hosts"


def test_listener_uses_rds_over_ads_on_configured_address():
    _, res = built()
    listener = res[typeurls.LISTENER][resources.LISTENER_NAME]
    assert listener.address.socket_address.address == "127.0.0.1"
    assert listener.address.socket_address.port_value == 10000
    manager = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert manager.rds.route_config_name == resources.ROUTE_NAME and manager.rds.config_source.HasField("ads")
    assert [f.name for f in manager.http_filters] == [
        "llm_lb.request_fields", "llm_lb.json_usage", resources.USAGE_FILTER, "envoy.filters.http.router"]
    assert manager.always_set_request_id_in_response
    # The usage scanner has no default code: only routes that name it run Lua.
    from envoy.extensions.filters.http.lua.v3 import lua_pb2

    lua = lua_pb2.Lua()
    manager.http_filters[2].typed_config.Unpack(lua)
    assert not lua.HasField("default_source_code") and resources.USAGE_SOURCE in lua.source_codes
    stripped = as_dict(manager.early_header_mutation_extensions[0].typed_config)
    assert {m["remove"] for m in stripped["mutations"]} == {"x-llm-model", "x-llm-stream", "x-llm-lb-model", "x-llm-client",
                                                         "x-request-id", "x-llm-lb-shadow", "x-llm-lb-user"}


def test_builders_are_deterministic_and_weight_change_touches_only_eds():
    config, res = built()
    first = Snapshot.of(res)
    again = Snapshot.of(resources.build(config, {name: pool_weights(p) for name, p in config.pools.items()}, ADDRESSES))
    assert first.versions == again.versions
    weights = {name: pool_weights(p) for name, p in config.pools.items()}
    weights["chat"]["local-a"] = 7
    changed = Snapshot.of(resources.build(config, weights, ADDRESSES))
    assert [typeurls.SHORT[t] for t in typeurls.PUSH_ORDER if changed.version(t) != first.version(t)] == ["EDS"]
    assert first.problems() == []


def test_snapshot_consistency_check_finds_dangling_references():
    _, res = built()
    res[typeurls.ENDPOINT].pop("rag")
    res[typeurls.ROUTE].clear()
    problems = Snapshot.of(res).problems()
    assert any("cluster 'rag' has no endpoints" in p for p in problems)
    assert any("missing route 'ingress'" in p for p in problems)


def test_snapshot_serves_wildcard_types_whole_and_named_types_by_name():
    _, res = built()
    snap = Snapshot.of(res)
    assert len(snap.packed(typeurls.CLUSTER, ["chat"])) == 2
    (only,) = snap.packed(typeurls.ENDPOINT, ["rag", "no-such-cluster"])
    assert only.type_url == typeurls.ENDPOINT


RESILIENT = """
pools:
  chat:
    timeout: 30s
    health_check: {path: /healthz, interval: 1s, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 3,
                   expected_statuses: [200, 204]}
    outlier_detection: {consecutive_5xx: 4, max_ejection_percent: 34, success_rate_stdev_factor: 1.9}
    circuit_breaker: {max_requests: 64, max_pending_requests: 8, retry_budget: {budget_percent: 20, min_retry_concurrency: 4}}
    retry: {attempts: 3, retry_on: [connect-failure, reset], retriable_status_codes: [429, 503], per_try_timeout: 10s}
    overprovisioning_factor: 1.0
    panic_threshold: 25
    backends:
      a: {url: "http://127.0.0.1:9001"}
      b: {url: "http://127.0.0.1:9002", priority: 1}
"""


def resilient():
    config = parse_config(RESILIENT, env={})
    return config, resources.build(config, {name: pool_weights(p) for name, p in config.pools.items()}, ADDRESSES, drained=frozenset({("chat", "b")}))


def test_health_check_outlier_and_breakers_follow_the_pool():
    _, res = resilient()
    chat = res[typeurls.CLUSTER]["chat"]
    (hc,) = chat.health_checks
    assert hc.http_health_check.path == "/healthz"
    assert [(r.start, r.end) for r in hc.http_health_check.expected_statuses] == [(200, 201), (204, 205)]
    assert hc.interval.ToMilliseconds() == 1000 and hc.no_traffic_interval.ToMilliseconds() == 1000
    assert hc.timeout.ToMilliseconds() == 500
    assert (hc.healthy_threshold.value, hc.unhealthy_threshold.value) == (1, 3)
    od = chat.outlier_detection
    assert od.consecutive_5xx.value == 4 and od.enforcing_consecutive_5xx.value == 100
    assert od.enforcing_consecutive_gateway_failure.value == 100
    assert od.max_ejection_percent.value == 34
    assert od.success_rate_stdev_factor.value == 1900 and od.enforcing_success_rate.value == 100
    assert od.failure_percentage_threshold.value == 50 and od.enforcing_failure_percentage.value == 100
    (limits,) = chat.circuit_breakers.thresholds
    assert (limits.max_requests.value, limits.max_pending_requests.value) == (64, 8)
    assert limits.retry_budget.budget_percent.value == 20 and limits.retry_budget.min_retry_concurrency.value == 4
    assert chat.common_lb_config.healthy_panic_threshold.value == 25


def test_defaults_eject_and_never_send_to_unhealthy_hosts():
    config = parse_config("pools:\n  p:\n    backends:\n      a: {url: 'http://127.0.0.1:1'}\n", env={})
    cluster = resources.cluster("p", config.pools["p"], config)
    assert not cluster.health_checks, "active checks are opt-in: a provider may have no health path"
    assert cluster.outlier_detection.consecutive_gateway_failure.value == 3
    assert cluster.outlier_detection.max_ejection_percent.value == 50
    assert cluster.common_lb_config.healthy_panic_threshold.value == 0
    assert cluster.circuit_breakers.thresholds[0].retry_budget.budget_percent.value == 50
    off = parse_config("pools:\n  p:\n    outlier_detection: {enabled: false}\n    backends:\n"
                       "      a: {url: 'http://127.0.0.1:1'}\n", env={})
    assert not resources.cluster("p", off.pools["p"], off).HasField("outlier_detection")


def test_retry_policy_and_failover_policy():
    _, res = resilient()
    route = res[typeurls.ROUTE][resources.ROUTE_NAME].virtual_hosts[0].routes[0].route
    policy = route.retry_policy
    assert policy.retry_on == "connect-failure,reset,retriable-status-codes"
    assert list(policy.retriable_status_codes) == [429, 503]
    assert policy.num_retries.value == 3 and policy.per_try_timeout.seconds == 10
    assert policy.retry_back_off.base_interval.ToMilliseconds() == 25
    cla = res[typeurls.ENDPOINT]["chat"]
    assert cla.policy.overprovisioning_factor.value == 100


def test_drained_endpoint_is_marked_draining_and_keeps_its_weight():
    _, res = resilient()
    cla = res[typeurls.ENDPOINT]["chat"]
    by_name = {e.metadata.filter_metadata["llm_lb"]["backend"]: e for loc in cla.endpoints for e in loc.lb_endpoints}
    from envoy.config.core.v3 import health_check_pb2

    assert by_name["b"].health_status == health_check_pb2.DRAINING
    assert by_name["a"].health_status == health_check_pb2.UNKNOWN
    assert by_name["b"].load_balancing_weight.value == 1
    assert by_name["a"].endpoint.health_check_config.hostname == "127.0.0.1"


def test_listener_limits():
    config = parse_config("envoy:\n  listener: {max_request_headers_kb: 32, per_connection_buffer_limit_kb: 512}\n"
                          + RESILIENT, env={})
    listener = resources.listener(config)
    assert listener.per_connection_buffer_limit_bytes.value == 512 * 1024
    manager = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert manager.max_request_headers_kb.value == 32
    assert manager.common_http_protocol_options.max_headers_count.value == 100
    assert manager.request_headers_timeout.seconds == 10


def test_scored_out_backend_is_left_out_not_published_unhealthy():
    config = parse_config(RESILIENT, env={})
    cla = resources.load_assignment("chat", config.pools["chat"], {"a": 0, "b": 5}, ADDRESSES)
    names = [e.metadata.filter_metadata["llm_lb"]["backend"] for loc in cla.endpoints for e in loc.lb_endpoints]
    assert names == ["b"], "a weight-0 endpoint would count against its tier's health"


def test_tls_to_an_ip_checks_the_ip_san_and_sends_no_sni():
    tls = resources.upstream_tls("/ca.pem", "203.0.113.9")
    (san,) = tls.common_tls_context.validation_context.match_typed_subject_alt_names
    assert tls.sni == "" and san.san_type == san.IP_ADDRESS and san.matcher.exact == "203.0.113.9"


MODELS = """
envoy:
  listener: {per_connection_buffer_limit_kb: 2048}
pools:
  fast:
    match: {prefix: /v1/, models: [gpt-4o-mini, fast]}
    backends:
      a: {url: "http://127.0.0.1:9001", model: gpt-4o-mini-2024-07-18}
      b: {url: "http://127.0.0.1:9002"}
      c: {url: "http://127.0.0.1:9003", priority: 1, model: small}
  smart:
    match: {prefix: /v1/chat/, models: [gpt-4o, "*"]}
    backends: {s: {url: "http://127.0.0.1:9004"}}
  embeddings:
    match: {prefix: /v1/embeddings}
    backends: {e: {url: "http://127.0.0.1:9005"}}
"""


def model_routes(rejected=None):
    config = parse_config(MODELS, env={})
    return config, list(resources.route_configuration(config, rejected).virtual_hosts[0].routes)


def describe(route) -> tuple[str, str, str]:
    """(name, prefix or path, what it does) with its header matches."""
    headers = ",".join(
        f"{h.name}={h.string_match.exact}" if h.HasField("string_match") else f"{h.name}?" for h in route.match.headers)
    where = route.match.prefix or route.match.path
    does = route.route.cluster if route.HasField("route") else str(route.direct_response.status)
    return route.name, f"{where}[{headers}]", does


def test_model_routes_longest_prefix_first_with_covering_models_then_404_and_400():
    _, routes = model_routes()
    table = [describe(r) for r in routes if not r.name.startswith("models")]
    assert table == [
        ("embeddings/stream", "/v1/embeddings[x-llm-stream=true]", "embeddings"),
        ("embeddings", "/v1/embeddings[]", "embeddings"),
        # /v1/chat/: its own model, the covering /v1/ pool's models, then its '*' default, then errors.
        ("smart/stream", "/v1/chat/[x-llm-model=gpt-4o,x-llm-stream=true]", "smart"),
        ("smart", "/v1/chat/[x-llm-model=gpt-4o]", "smart"),
        ("fast/stream", "/v1/chat/[x-llm-model=gpt-4o-mini,x-llm-stream=true]", "fast"),
        ("fast", "/v1/chat/[x-llm-model=gpt-4o-mini]", "fast"),
        ("fast/stream", "/v1/chat/[x-llm-model=fast,x-llm-stream=true]", "fast"),
        ("fast", "/v1/chat/[x-llm-model=fast]", "fast"),
        ("smart/stream", "/v1/chat/[x-llm-model?,x-llm-stream=true]", "smart"),
        ("smart", "/v1/chat/[x-llm-model?]", "smart"),
        ("unknown-model:/v1/chat/", "/v1/chat/[x-llm-model?]", "404"),
        ("no-model:/v1/chat/", "/v1/chat/[]", "400"),
        # /v1/: only its own models; the longer prefix's '*' does not cover it.
        ("fast/stream", "/v1/[x-llm-model=gpt-4o-mini,x-llm-stream=true]", "fast"),
        ("fast", "/v1/[x-llm-model=gpt-4o-mini]", "fast"),
        ("fast/stream", "/v1/[x-llm-model=fast,x-llm-stream=true]", "fast"),
        ("fast", "/v1/[x-llm-model=fast]", "fast"),
        ("unknown-model:/v1/", "/v1/[x-llm-model?]", "404"),
        ("no-model:/v1/", "/v1/[]", "400"),
    ]
    unknown = next(r for r in routes if r.name == "unknown-model:/v1/")
    error = as_dict(unknown.direct_response.body_format)["json_format"]["error"]
    assert error["code"] == "model_not_found" and "%REQ(x-llm-model)%" in error["message"]
    assert "fast, gpt-4o-mini" in error["message"] and "gpt-4o," not in error["message"]


def test_models_endpoint_lists_every_served_name_in_openai_format():
    import json

    _, routes = model_routes()
    listing = next(r for r in routes if r.name == "models")
    assert listing.match.path == "/v1/models" and listing.match.headers[0].name == ":method"
    body = json.loads(listing.direct_response.body.inline_string)
    assert body["object"] == "list"
    assert {m["id"]: m["owned_by"] for m in body["data"]} == {
        "fast": "fast", "gpt-4o-mini": "fast", "gpt-4o": "smart"}
    one = next(r for r in routes if r.name == "models/gpt-4o")
    assert json.loads(one.direct_response.body.inline_string)["id"] == "gpt-4o"
    assert next(r for r in routes if r.name == "models/unknown").direct_response.status == 404
    # Without model routing, /v1/models goes to the backends as before.
    plain = parse_config(RESILIENT, env={})
    assert not [r for r in resources.route_configuration(plain).virtual_hosts[0].routes if r.name.startswith("models")]


def test_a_rejected_pool_answers_429_on_each_of_its_model_routes():
    _, routes = model_routes({"fast": "hourly budget exhausted"})
    fast = [r for r in routes if r.name == "fast"]
    assert fast and all(r.direct_response.status == 429 for r in fast)
    assert not [r for r in routes if r.name == "fast/stream"]
    assert all(r.HasField("route") for r in routes if r.name == "smart")


def test_model_rewrite_only_where_a_backend_has_its_own_name():
    config, _ = model_routes()
    fast = resources.cluster("fast", config.pools["fast"], config)
    names = [f.name for f in protocol_options(fast).http_filters]
    assert names == ["llm_lb.model_name", "llm_lb.model_rewrite", "envoy.filters.http.upstream_codec"]
    assert fast.per_connection_buffer_limit_bytes.value == 2048 * 1024
    smart = resources.cluster("smart", config.pools["smart"], config)
    assert [f.name for f in protocol_options(smart).http_filters] == ["envoy.filters.http.upstream_codec"]
    assert not smart.HasField("per_connection_buffer_limit_bytes")
    cla = resources.load_assignment("fast", config.pools["fast"], {}, ADDRESSES)
    meta = {e.metadata.filter_metadata["llm_lb"]["backend"]: dict(e.metadata.filter_metadata["llm_lb"])
            for loc in cla.endpoints for e in loc.lb_endpoints}
    assert meta["a"]["model"] == "gpt-4o-mini-2024-07-18" and meta["c"]["model"] == "small"
    assert "model" not in meta["b"]


def test_retries_honour_short_retry_after_and_leave_an_exhausted_tier():
    config, routes = model_routes()
    policy = next(r for r in routes if r.name == "fast").route.retry_policy
    backoff = policy.rate_limited_retry_back_off
    assert [(h.name, h.format) for h in backoff.reset_headers] == [
        ("retry-after", policy.SECONDS), ("x-ratelimit-reset", policy.UNIX_TIMESTAMP)]
    assert backoff.max_interval.seconds == 1
    assert policy.retry_priority.name == "envoy.retry_priorities.previous_priorities"
    assert as_dict(policy.retry_priority.typed_config)["update_frequency"] == 2  # two tier-0 hosts
    single_tier = next(r for r in routes if r.name == "smart").route.retry_policy
    assert not single_tier.HasField("retry_priority")


def test_access_log_carries_requested_and_served_model():
    config, _ = model_routes()
    manager = hcm_pb2.HttpConnectionManager()
    resources.listener(config).filter_chains[0].filters[0].typed_config.Unpack(manager)
    als = as_dict(manager.access_log[0].typed_config)
    assert als["additional_request_headers_to_log"] == ["x-llm-model", "x-llm-client", "x-llm-lb-user"]
    tags = {t["tag"]: t["metadata"]["metadata_key"]["path"][0]["key"] for t in als["common_config"]["custom_tags"]}
    assert tags == {"backend": "backend", "model": "model"}
    mapper = as_dict(manager.local_reply_config.mappers[0])
    assert "2048 KiB" in mapper["body_format_override"]["json_format"]["error"]["message"]


def test_the_managed_envoy_also_logs_each_request_to_its_spool_file():
    from controlplane.reconciler import build as build_snapshot
    from controlplane.state import DesiredState
    from controlplane.telemetry import spool

    config, _ = built()

    def loggers(message) -> dict[str, dict]:
        manager = hcm_pb2.HttpConnectionManager()
        message.filter_chains[0].filters[0].typed_config.Unpack(manager)
        return {log.name: as_dict(log.typed_config) for log in manager.access_log}

    assert set(loggers(resources.listener(config))) == {"envoy.access_loggers.http_grpc"}, "no spool by default"
    logged = loggers(resources.listener(config, spool_path="/state/spool.jsonl"))
    file_log = logged["envoy.access_loggers.file"]
    assert file_log["path"] == "/state/spool.jsonl"
    line = file_log["log_format"]["json_format"]
    assert tuple(sorted(line)) == tuple(sorted(spool.KEYS)), "what Envoy writes is what the spool reads"
    assert line[spool.KEY_BACKEND] == "%UPSTREAM_METADATA(llm_lb:backend)%"
    assert line[spool.KEY_PROMPT] == "%DYNAMIC_METADATA(llm_lb.usage:prompt_tokens)%"
    assert line[spool.KEY_REQUESTED] == "%REQ(x-llm-model):256%"
    built_with = resources.build(config, {}, ADDRESSES, spool_path="/s.jsonl")[typeurls.LISTENER]
    assert "envoy.access_loggers.file" in loggers(built_with[resources.LISTENER_NAME])

    state = DesiredState(config=config)
    first = build_snapshot(state)
    second = build_snapshot(state.replace(spool_path="/s.jsonl"), first, state)
    assert first.version(typeurls.LISTENER) != second.version(typeurls.LISTENER)
    assert first.version(typeurls.CLUSTER) == second.version(typeurls.CLUSTER), "only the listener is rebuilt"
