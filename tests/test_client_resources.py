"""Client keys and limits as Envoy resources (pure builders: config in, protobuf out)."""

from __future__ import annotations

import json

import pytest
import yaml
from google.protobuf.json_format import MessageToDict

from controlplane.config import ConfigError, parse_config
from controlplane.xds import resources

KEYS = {"WEB_KEY": "web-key-0123456789abcdef", "BATCH_KEY": "batch-key-0123456789abcdef"}


def config(clients: dict | None = None):
    doc = {"pools": {"chat": {"match": {"prefix": "/v1/"}, "backends": {"a": {"url": "http://127.0.0.1:9001"}}}}}
    if clients is not None:
        doc["clients"] = clients
    return parse_config(yaml.safe_dump(doc), "c.yaml", env=KEYS)


CLIENTS = {"web-app": {"key": "${WEB_KEY}", "limits": {"requests_per_minute": 601}},
           "batch": {"key": "${BATCH_KEY}"}}


def filters(cfg) -> list[str]:
    listener = resources.listener(cfg)
    manager = MessageToDict(listener.filter_chains[0].filters[0].typed_config)
    return [f["name"] for f in manager["httpFilters"]]


def test_without_clients_no_key_filter_and_no_per_route_settings():
    cfg = config()
    assert resources.API_KEY_FILTER not in filters(cfg)
    host = resources.route_configuration(cfg).virtual_hosts[0]
    assert not host.typed_per_filter_config


def test_clients_put_the_key_check_first_and_keys_in_the_route_config_only():
    cfg = config(CLIENTS)
    names = filters(cfg)
    assert names[:2] == [resources.API_KEY_FILTER, resources.RATE_LIMIT_FILTER]  # before any body is read
    listener_text = str(resources.listener(cfg))
    assert KEYS["WEB_KEY"] not in listener_text, "keys live in RDS, so an edit reaches open connections"
    settings = resources.client_settings(cfg.clients)
    keys = MessageToDict(settings[resources.API_KEY_FILTER])
    assert {c["client"] for c in keys["credentials"]} == {"web-app", "batch"}
    assert keys["forwarding"] == {"header": "x-llm-client", "hideCredentials": True}
    assert [s["header"] for s in keys["keySources"]] == ["authorization", "x-api-key"]


@pytest.mark.parametrize(("envoys", "share"), [(1, 601), (2, 301), (3, 201), (1000, 1)])
def test_request_limits_are_divided_across_connected_envoys(envoys, share):
    cfg = config(CLIENTS)
    limits = MessageToDict(resources.client_settings(cfg.clients, envoys)[resources.RATE_LIMIT_FILTER])
    [descriptor] = limits["descriptors"]  # batch has no limit: no bucket of its own
    assert descriptor["entries"] == [{"key": "client", "value": "web-app"}]
    bucket = descriptor["tokenBucket"]
    assert (bucket["maxTokens"], bucket["tokensPerFill"], bucket["fillInterval"]) == (share, share, "60s")
    assert limits["status"]["code"] == "PaymentRequired"  # mapped to 429 JSON by the local replies


def test_a_blocked_client_gets_its_own_429_route_first():
    cfg = config(CLIENTS)
    routes = resources.route_configuration(cfg, blocked={"web-app": ("budget_exhausted", "over budget", 120)})
    first = routes.virtual_hosts[0].routes[0]
    assert first.name == "client/web-app" and first.direct_response.status == 429
    assert first.match.headers[0].name == "x-llm-client"
    assert json.loads(first.direct_response.body.inline_string)["error"]["code"] == "budget_exhausted"
    assert any(h.header.key == "retry-after" and h.header.value == "120" for h in first.response_headers_to_add)


def test_a_shared_key_is_refused_and_never_shown():
    with pytest.raises(ConfigError) as err:
        config({"a": {"key": "${WEB_KEY}"}, "b": {"key": "${WEB_KEY}"}})
    assert any("same key" in e for e in err.value.errors)
    assert not any(KEYS["WEB_KEY"] in e for e in err.value.errors)


@pytest.mark.parametrize("key", ["short", "has space in it 0123456789"])
def test_a_weak_or_malformed_key_is_refused(key):
    with pytest.raises(ConfigError) as err:
        parse_config(yaml.safe_dump({"clients": {"a": {"key": "${K}"}}, "pools": {"chat": {"backends": {
            "a": {"url": "http://127.0.0.1:9001"}}}}}), "c.yaml", env={"K": key})
    assert any("clients.a.key" in e for e in err.value.errors)
    assert not any(key in e for e in err.value.errors)
