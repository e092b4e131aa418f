"""The config model: valid files load with defaults; every class of bad input names file, line, pool, backend, field."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from controlplane.config import ConfigError, load_config, parse_config, parse_duration

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """
pools:
  chat:
    backends:
      a: {url: "http://127.0.0.1:9001"}
"""

FULL = """
envoy:
  listener: {address: 127.0.0.1, port: 10000}
  admin: {address: 127.0.0.1, port: 9901}
controlplane:
  xds: {address: 127.0.0.1, port: 18000}
  api: {address: 127.0.0.1, port: 8088}
pools:
  chat:
    match: {prefix: /v1/}
    strategy: weighted
    timeout: 60s
    backends:
      local-a:
        url: http://127.0.0.1:9001
        weight: 3
      provider-b:
        url: https://api.example.com
        api_key: ${PROVIDER_B_KEY}
        weight: 1
        priority: 0
        cost: {input_per_1k: 0.20, output_per_1k: 0.20}
        quality: 0.85
        expected_latency_ms: 2000
        max_requests_per_minute: 100
"""


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), source="pools.yaml", env=env or {})
    return info.value.errors


def test_minimal_file_gets_documented_defaults():
    config = parse_config(MINIMAL, env={})
    assert str(config.envoy.listener) == "127.0.0.1:10000"
    assert str(config.envoy.admin) == "127.0.0.1:9901"
    assert str(config.controlplane.xds) == "127.0.0.1:18000"
    assert str(config.controlplane.api) == "127.0.0.1:8088"
    pool = config.pools["chat"]
    assert pool.match.prefix == "/" and pool.strategy == "weighted" and pool.timeout == timedelta(seconds=60)
    backend = pool.backends["a"]
    assert (backend.weight, backend.priority, backend.tls, backend.host, backend.port) == (1, 0, False, "127.0.0.1", 9001)


def test_issue_example_loads_with_key_from_environment():
    config = parse_config(FULL, env={"PROVIDER_B_KEY": "sk-test-123"})
    b = config.pools["chat"].backends["provider-b"]
    assert b.tls and b.host == "api.example.com" and b.port == 443
    assert b.auth_value == "Bearer sk-test-123"
    assert b.cost.input_per_1k == 0.2 and b.quality == 0.85 and b.max_requests_per_minute == 100
    assert "sk-test-123" not in repr(config) and "sk-test-123" not in str(b)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("500ms", 0.5), ("2s", 2), ("1m", 60), ("1h", 3600), ("1m30s", 90), (3, 3), (0.25, 0.25),
    ],
)
def test_durations(text, expected):
    assert parse_duration(text).total_seconds() == expected


@pytest.mark.parametrize("bad", ["5x", "", "-1s", "0s", "1 s", "s", True, [1]])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_shipped_configs_are_valid():
    files = [ROOT / "configs" / "demo.yaml", *sorted((ROOT / "configs" / "examples").glob("*.yaml"))]
    assert len(files) >= 2
    env = {"OPENAI_API_KEY": "x", "PROVIDER_B_KEY": "x", "RAG_API_KEY": "x", "ANTHROPIC_API_KEY": "x",
           "WEB_APP_KEY": "web-app-example-key-0123", "BATCH_KEY": "batch-example-key-01234"}
    for path in files:
        load_config(path, env=env)


BAD_CASES = {
    "yaml_syntax": (
        "pools:\n  chat: [unclosed\n",
        ["pools.yaml:3:1: YAML syntax error"],
    ),
    "unknown_key": (
        MINIMAL.replace('a: {url: "http://127.0.0.1:9001"}', 'a:\n        url: "http://127.0.0.1:9001"\n        colour: red'),
        ["pools.yaml:7: pool 'chat', backend 'a', field 'colour': unknown key 'colour' (allowed: url, api_key"],
    ),
    "unknown_top_level": (
        MINIMAL + "extra: 1\n",
        ["pools.yaml:6: field 'extra': unknown key 'extra' (allowed: envoy, controlplane, clients, pools)"],
    ),
    "wrong_type": (
        MINIMAL.replace('a: {url: "http://127.0.0.1:9001"}', 'a: {url: "http://127.0.0.1:9001", weight: lots}'),
        ["pools.yaml:5: pool 'chat', backend 'a', field 'weight': Input should be a valid integer", "(got 'lots')"],
    ),
    "out_of_range": (
        MINIMAL.replace('a: {url: "http://127.0.0.1:9001"}', 'a: {url: "http://127.0.0.1:9001", quality: 1.5}'),
        ["pool 'chat', backend 'a', field 'quality': Input should be less than or equal to 1 (got 1.5)"],
    ),
    "missing_env_var": (
        MINIMAL.replace('a: {url: "http://127.0.0.1:9001"}', 'a: {url: "https://x.test", api_key: "${NOPE_KEY}"}'),
        ["pools.yaml:5: pool 'chat', backend 'a', field 'api_key': environment variable NOPE_KEY is not set"],
    ),
    "literal_api_key": (
        MINIMAL.replace('a: {url: "http://127.0.0.1:9001"}', 'a: {url: "https://x.test", api_key: "abc123"}'),
        ["pool 'chat', backend 'a', field 'api_key': must name an environment variable"],
    ),
    "duplicate_ports": (
        "envoy:\n  admin: {port: 18000}\n" + MINIMAL,
        ["port 18000 of controlplane.xds is also used by envoy.admin"],
    ),
    "empty_pool": (
        "pools:\n  chat:\n    backends: {}\n",
        ["pools.yaml:3: pool 'chat', field 'backends': needs at least one entry under 'backends'"],
    ),
    "no_pools": ("envoy: {}\n", ["field 'pools': required field is missing"]),
    "empty_file": ("", ["pools.yaml: file is empty"]),
    "not_a_mapping": ("- a\n- b\n", ["the top level must be a mapping"]),
    "duplicate_backend": (
        MINIMAL + '      a: {url: "http://127.0.0.1:9002"}\n',
        ["pools.yaml:6: pool 'chat', backend 'a': duplicate key 'a' (first at line 5)"],
    ),
    "bad_url": (
        MINIMAL.replace("http://127.0.0.1:9001", "ftp://127.0.0.1"),
        ["backend 'a', field 'url': URL must start with http:// or https://"],
    ),
    "url_with_path": (
        MINIMAL.replace("http://127.0.0.1:9001", "https://api.example.com/v1"),
        ["URL must be scheme://host[:port] only"],
    ),
    "bad_strategy": (
        MINIMAL.replace("  chat:\n", "  chat:\n    strategy: fastest\n"),
        ["pool 'chat', field 'strategy': Input should be 'round_robin', 'weighted', 'least_request'", "'balanced'"],
    ),
    "bad_duration": (
        MINIMAL.replace("  chat:\n", "  chat:\n    timeout: soon\n"),
        ["pools.yaml:4: pool 'chat', field 'timeout': 'soon' is not a duration"],
    ),
    "bad_prefix": (
        MINIMAL.replace("  chat:\n", "  chat:\n    match: {prefix: v1}\n"),
        ["pool 'chat', field 'match.prefix': prefix must start with '/'"],
    ),
    "bad_listen_address": (
        "envoy:\n  listener: {address: localhost, port: 10000}\n" + MINIMAL,
        ["field 'envoy.listener.address': 'localhost' is not an IP address"],
    ),
    "bad_pool_name": (
        MINIMAL.replace("  chat:", "  'chat pool':"),
        ["String should match pattern"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_named_precisely(case):
    text, fragments = BAD_CASES[case]
    joined = "\n".join(errors_of(text))
    for fragment in fragments:
        assert fragment in joined, joined


def test_all_errors_are_listed_at_once():
    text = """
    pools:
      chat:
        timeout: never
        backends:
          a: {url: "ftp://x", weight: 0, api_key: "${MISSING_ONE}"}
          b: {url: "http://127.0.0.1:1", bogus: 1}
    """
    errors = errors_of(text)
    assert len(errors) == 5, errors
    assert any("MISSING_ONE" in e for e in errors)


def test_secret_value_never_appears_in_errors():
    secret = "sk-very-secret-value-0123456789"
    text = MINIMAL.replace(
        'a: {url: "http://127.0.0.1:9001"}', 'a: {url: "https://x.test", api_key: "${K}", api_key_header: "Bad Header"}'
    )
    errors = "\n".join(errors_of(text, env={"K": secret}))
    assert "api_key_header" in errors and secret not in errors


def test_env_default_and_substitution_in_other_fields():
    text = MINIMAL.replace("http://127.0.0.1:9001", "http://${HOST:-127.0.0.1}:${PORT}")
    config = parse_config(text, env={"PORT": "9555"})
    assert config.pools["chat"].backends["a"].url == "http://127.0.0.1:9555"


def test_load_config_names_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert "absent.yaml: cannot read" in str(info.value)


def test_duplicate_prefix_is_refused():
    text = MINIMAL + '  other:\n    backends:\n      b: {url: "http://127.0.0.1:9002"}\n'
    assert any("pools 'chat' and 'other' both have match.prefix '/'" in e for e in errors_of(text))


MODEL_POOLS = """
pools:
  fast:
    match: {prefix: /v1/, models: [gpt-4o-mini, fast]}
    backends: {a: {url: "http://127.0.0.1:9001", model: gpt-4o-mini-2024-07-18}}
  smart:
    match: {prefix: /v1/, models: [gpt-4o, "*"]}
    backends: {b: {url: "http://127.0.0.1:9002"}}
  embeddings:
    match: {prefix: /v1/embeddings}
    backends: {c: {url: "http://127.0.0.1:9003"}}
"""


def test_model_pools_share_a_prefix_and_list_their_models():
    config = parse_config(MODEL_POOLS, env={})
    assert config.routes_by_model
    assert config.served_models() == {"gpt-4o-mini": "fast", "fast": "fast", "gpt-4o": "smart"}
    assert config.pools["smart"].match.default and not config.pools["fast"].match.default
    assert config.pools["fast"].backends["a"].model == "gpt-4o-mini-2024-07-18"
    assert not parse_config(MINIMAL, env={}).routes_by_model


@pytest.mark.parametrize(("change", "expected"), [
    (("models: [gpt-4o, \"*\"]", "models: [gpt-4o, fast]"),
     "pools 'fast' (prefix '/v1/') and 'smart' (prefix '/v1/') both serve model 'fast'"),
    (("prefix: /v1/embeddings}", "prefix: /v1/embeddings, models: ['*']}"),
     "pools 'embeddings', 'smart' all list '*' in match.models"),
    (("match: {prefix: /v1/, models: [gpt-4o-mini, fast]}", "match: {prefix: /v1/}"),
     "pools 'fast' and 'smart' both have match.prefix '/v1/'"),
    (("model: gpt-4o-mini-2024-07-18", "model: 'gpt 4o'"),
     "pool 'fast', backend 'a', field 'model': 'gpt 4o' is not a model name"),
    (("models: [gpt-4o-mini, fast]", "models: [gpt-4o-mini, 4]"),
     "field 'match.models.1': a model name must be a string"),
    (("models: [gpt-4o-mini, fast]", "models: [fast, fast]"), "models lists fast more than once"),
    (("models: [gpt-4o-mini, fast]", "models: []"), "field 'match.models'"),
])
def test_model_routing_mistakes_name_the_pools(change, expected):
    text = MODEL_POOLS.replace(*change)
    assert text != MODEL_POOLS
    errors = errors_of(text)
    assert any(expected in e for e in errors), errors


def test_same_model_under_covering_prefixes_is_refused_and_disjoint_prefixes_are_fine():
    text = MODEL_POOLS.replace("prefix: /v1/embeddings}", "prefix: /v1/embeddings, models: [fast]}")
    assert any("'embeddings' (prefix '/v1/embeddings') and 'fast' (prefix '/v1/') both serve model 'fast'" in e
               for e in errors_of(text))
    disjoint = MODEL_POOLS.replace("prefix: /v1/, models: [gpt-4o-mini, fast]", "prefix: /v2/, models: [gpt-4o]")
    assert parse_config(disjoint, env={}).served_models()["gpt-4o"] == "smart"


def test_per_try_timeout_must_be_shorter_than_the_request_timeout():
    text = MINIMAL.replace("  chat:\n", "  chat:\n    timeout: 2s\n    retry: {per_try_timeout: 5s}\n")
    assert any("retry.per_try_timeout (5s) must be shorter than timeout (2s)" in e for e in errors_of(text))


def test_unknown_retry_condition_is_refused():
    text = MINIMAL.replace("  chat:\n", "  chat:\n    retry: {retry_on: [5xx, sometimes]}\n")
    assert any("pool 'chat', field 'retry.retry_on.1'" in e for e in errors_of(text))
