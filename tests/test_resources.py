"""Resource generation: config in, protobuf out, no network."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf.json_format import MessageToDict

from controlplane.config import parse_config
from controlplane.scoring.weights import config_weights
from controlplane.xds import resources, types
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
    return config, resources.build(config, config_weights(config), ADDRESSES)


def as_dict(message):
    return MessageToDict(message, preserving_proto_field_name=True)


def protocol_options(cluster: cluster_pb2.Cluster) -> http_protocol_options_pb2.HttpProtocolOptions:
    options = http_protocol_options_pb2.HttpProtocolOptions()
    cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(options)
    return options


def test_one_cluster_per_pool_with_strategy_and_eds():
    _, res = built()
    clusters = res[types.CLUSTER]
    assert set(clusters) == {"chat", "rag"}
    chat, rag = clusters["chat"], clusters["rag"]
    assert chat.type == cluster_pb2.Cluster.EDS and chat.eds_cluster_config.service_name == "chat"
    assert chat.eds_cluster_config.eds_config.HasField("ads")
    assert chat.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert rag.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert chat.common_lb_config.update_merge_window.ToNanoseconds() == 0


def test_endpoints_carry_weight_priority_hostname_and_tls_marker():
    _, res = built()
    cla = as_dict(res[types.ENDPOINT]["chat"])
    tiers = {loc.get("priority", 0): loc["lb_endpoints"] for loc in cla["endpoints"]}
    assert sorted(tiers) == [0, 1], "priorities 0 and 2 are made dense as 0 and 1"
    tier0 = {e["metadata"]["filter_metadata"]["llm_lb"]["backend"]: e for e in tiers[0]}
    assert tier0["local-a"]["load_balancing_weight"] == 3
    assert tier0["provider-b"]["load_balancing_weight"] == 1
    b = tier0["provider-b"]
    assert b["endpoint"]["address"]["socket_address"] == {"address": "203.0.113.7", "port_value": 443}
    assert b["endpoint"]["hostname"] == "api.example.com"
    assert b["metadata"]["filter_metadata"]["envoy.transport_socket_match"] == {"tls": True}
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
    assert config_weights(config)["chat"] == {"local-a": 1, "provider-b": 1, "fallback": 1, "claude": 1}


def test_credentials_are_set_by_upstream_filters_per_header():
    _, res = built()
    options = protocol_options(res[types.CLUSTER]["chat"])
    names = [f.name for f in options.http_filters]
    assert names == ["llm_lb.credential.authorization", "llm_lb.credential.x-api-key", "envoy.filters.http.upstream_codec"]
    mutation = header_mutation_pb2.HeaderMutation()
    options.http_filters[0].typed_config.Unpack(mutation)
    header = mutation.mutations.request_mutations[0].append
    assert header.header.key == "authorization"
    assert header.header.value == "%UPSTREAM_METADATA(llm_lb:authorization)%"
    assert header.append_action == header.OVERWRITE_IF_EXISTS_OR_ADD
    assert options.upstream_http_protocol_options.auto_sni
    assert options.upstream_http_protocol_options.auto_san_validation
    # no keys in the rag pool: no credential filter, no TLS
    rag = protocol_options(res[types.CLUSTER]["rag"])
    assert [f.name for f in rag.http_filters] == ["envoy.filters.http.upstream_codec"]
    assert not res[types.CLUSTER]["rag"].transport_socket_matches


def test_tls_match_uses_the_configured_ca_and_secrets_stay_out_of_clusters():
    _, res = built()
    chat = res[types.CLUSTER]["chat"]
    (match,) = chat.transport_socket_matches
    assert dict(match.match) == {"tls": True}
    tls = tls_pb2.UpstreamTlsContext()
    match.transport_socket.typed_config.Unpack(tls)
    assert tls.common_tls_context.validation_context.trusted_ca.filename == "/etc/ssl/certs/ca-certificates.crt"
    for cluster in res[types.CLUSTER].values():
        assert SECRET.encode() not in cluster.SerializeToString()


def test_routes_longest_prefix_first_with_timeout_host_rewrite_and_retry():
    _, res = built()
    route = res[types.ROUTE][resources.ROUTE_NAME]
    routes = route.virtual_hosts[0].routes
    assert [r.match.prefix for r in routes] == ["/v1/rag/", "/v1/"]
    chat = routes[1].route
    assert chat.cluster == "chat" and chat.timeout.seconds == 45 and chat.auto_host_rewrite.value
    assert "connect-failure" in chat.retry_policy.retry_on
    assert chat.retry_policy.retry_host_predicate[0].name == "envoy.retry_host_predicates.previous_hosts"


def test_listener_uses_rds_over_ads_on_configured_address():
    _, res = built()
    listener = res[types.LISTENER][resources.LISTENER_NAME]
    assert listener.address.socket_address.address == "127.0.0.1"
    assert listener.address.socket_address.port_value == 10000
    manager = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert manager.rds.route_config_name == resources.ROUTE_NAME and manager.rds.config_source.HasField("ads")
    assert manager.http_filters[-1].name == "envoy.filters.http.router"
    assert manager.always_set_request_id_in_response


def test_builders_are_deterministic_and_weight_change_touches_only_eds():
    config, res = built()
    first = Snapshot.of(res)
    again = Snapshot.of(resources.build(config, config_weights(config), ADDRESSES))
    assert first.versions == again.versions
    weights = config_weights(config)
    weights["chat"]["local-a"] = 7
    changed = Snapshot.of(resources.build(config, weights, ADDRESSES))
    assert [types.SHORT[t] for t in types.PUSH_ORDER if changed.version(t) != first.version(t)] == ["EDS"]
    assert first.problems() == []


def test_snapshot_consistency_check_finds_dangling_references():
    _, res = built()
    res[types.ENDPOINT].pop("rag")
    res[types.ROUTE].clear()
    problems = Snapshot.of(res).problems()
    assert any("cluster 'rag' has no endpoints" in p for p in problems)
    assert any("missing route 'ingress'" in p for p in problems)


def test_snapshot_serves_wildcard_types_whole_and_named_types_by_name():
    _, res = built()
    snap = Snapshot.of(res)
    assert len(snap.packed(types.CLUSTER, ["chat"])) == 2
    (only,) = snap.packed(types.ENDPOINT, ["rag", "no-such-cluster"])
    assert only.type_url == types.ENDPOINT
