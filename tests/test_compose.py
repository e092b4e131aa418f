"""The compose deployment: the file is valid, its services and ports agree with configs/compose.yaml,
Prometheus scrapes what the config serves, the Grafana dashboard asks only for metrics that exist, and
the control plane's Dockerfile passes the static check (tests/dockerfile_check.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from controlplane.bootstrap import bootstrap
from controlplane.config import load_config

from . import dockerfile_check
from .harness import ROOT

ENV = {"LLM_LB_XDS_TOKEN": "compose-test-token-0123456789", "LLM_LB_API_TOKEN": "compose-test-api-token-0123456789"}
GRAFANA = ROOT / "configs" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "llm-lb.json"

# The metric names the dashboard may query: the control plane's contract (controlplane/metrics.py) and
# the two Envoy statistics it shows. A name outside this list is a typo or an undocumented metric.
DASHBOARD_METRICS = {
    "llm_lb_backend_traffic_share", "llm_lb_backend_weight", "llm_lb_backend_requests_total",
    "llm_lb_backend_error_rate", "llm_lb_backend_envoy_state", "llm_lb_backend_health", "llm_lb_backend_quality",
    "gen_ai_server_request_duration_seconds_bucket", "gen_ai_server_time_to_first_token_seconds_bucket",
    "gen_ai_client_token_usage_sum",
    "llm_lb_spend_total", "llm_lb_budget_used_ratio",
    "llm_lb_envoys_connected", "llm_lb_envoys_in_sync", "llm_lb_xds_nacks_total", "llm_lb_config_reloads_total",
    "llm_lb_access_log_ingest_lag_seconds", "llm_lb_alerts_total",
    "envoy_cluster_outlier_detection_ejections_active", "envoy_cluster_membership_healthy",
    "llm_lb_rollout_candidate_share", "llm_lb_rollout_transitions_total", "llm_lb_rollout_gate",
}
PUBLISHED = {"controlplane": {8088}, "envoy": {10000, 9901}, "prometheus": {9090}, "grafana": {3000}}


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's bind mounts, container path -> repository path (named volumes left out)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            out[target] = source[2:]
    return out


def test_checked_in_bootstrap_matches_generated():
    config = load_config(ROOT / "configs" / "compose.yaml", env=ENV)
    expected = bootstrap(config, "compose-envoy", xds_host="controlplane", token="__LLM_LB_XDS_TOKEN__")
    assert json.loads((ROOT / "envoy" / "bootstrap.json").read_text()) == expected


def test_compose_services_point_at_each_other():
    compose = _compose()
    services = compose["services"]
    assert services["envoy"]["image"] == "envoyproxy/envoy:v1.40.0"
    config = load_config(ROOT / "configs" / "compose.yaml", env=ENV)
    hosts = {b.host for p in config.pools.values() for b in p.backends.values()}
    assert hosts <= set(services), "every backend host is a compose service"
    admin = urlsplit(config.controlplane.envoy_admin or "")
    assert (admin.hostname, admin.port) == ("envoy", config.envoy.admin.port), "envoy_admin is the envoy service"
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"published port {port} must bind loopback"


def test_every_published_port_binds_loopback_and_matches_the_config():
    services = _compose()["services"]
    published = {}
    for name, service in services.items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"{name}: write ports as \"127.0.0.1:HOST:CONTAINER\", not {port!r}"
            ip, host, container = port.split(":")
            assert ip == "127.0.0.1", f"{name}: published port {port} must bind 127.0.0.1"
            assert host == container, f"{name}: {port} publishes under another number"
            published.setdefault(name, set()).add(int(container))
    assert published == PUBLISHED
    config = load_config(ROOT / "configs" / "compose.yaml", env=ENV)
    assert {config.controlplane.api.port} == published["controlplane"]
    assert {config.envoy.listener.port, config.envoy.admin.port} == published["envoy"]


def test_controlplane_service_needs_both_tokens_and_keeps_its_state():
    compose = _compose()
    service = compose["services"]["controlplane"]
    command = service["command"]
    assert command[:3] == ["run", "--config", "/config/compose.yaml"] and "--no-envoy" in command
    state_dir = command[command.index("--state-dir") + 1]
    volumes = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    assert volumes[state_dir] in compose["volumes"], "the state directory is a named volume"
    assert _mounts(service)["/config"] == "configs"
    for variable in ENV:
        assert service["environment"][variable].startswith(f"${{{variable}:?"), f"{variable} is required"
    raw = yaml.safe_load((ROOT / "configs" / "compose.yaml").read_text())["controlplane"]
    assert raw["api"]["token"] == "${LLM_LB_API_TOKEN}" and raw["xds"]["token"] == "${LLM_LB_XDS_TOKEN}"
    config = load_config(ROOT / "configs" / "compose.yaml", env=ENV)
    assert config.controlplane.api.address == "0.0.0.0"
    assert config.controlplane.api.token is not None
    assert config.controlplane.api.token.get_secret_value() == ENV["LLM_LB_API_TOKEN"]


def test_prometheus_scrapes_the_control_plane_and_envoy():
    compose = _compose()
    prometheus = compose["services"]["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"]), "pinned to a version"
    assert _mounts(prometheus)["/etc/prometheus/prometheus.yml"] == "configs/prometheus.yml"
    scrape = yaml.safe_load((ROOT / "configs" / "prometheus.yml").read_text())
    assert scrape["global"]["scrape_interval"] == "5s"
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    config = load_config(ROOT / "configs" / "compose.yaml", env=ENV)

    def targets(job: dict[str, Any]) -> set[str]:
        return {t for group in job["static_configs"] for t in group["targets"]}

    assert jobs["controlplane"]["metrics_path"] == "/metrics"
    assert targets(jobs["controlplane"]) == {f"controlplane:{config.controlplane.api.port}"}
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert f"envoy:{config.envoy.admin.port}" in targets(jobs["envoy"])
    assert {"controlplane", "envoy"} <= set(compose["services"])


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard():
    grafana = _compose()["services"]["grafana"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"]), "pinned to a version"
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == "configs/grafana/provisioning"
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "llm-lb.yml").read_text())
    (provider,) = providers["providers"]
    folder = provider["options"]["path"]
    assert mounts[folder] == "configs/grafana/dashboards", "the provider reads the folder compose mounts"
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{folder}/llm-lb.json"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer", "anonymous users only view"
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD")


_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring", "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords, labels and strings left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = _LABEL_LISTS.sub("", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        if match.group(2) is None and match.group(1) not in _KEYWORDS:
            names.add(match.group(1))
    return names


def test_metric_names_are_read_from_queries():
    expr = 'histogram_quantile(0.95, sum by (le, pool) (rate(gen_ai_x_bucket{pool=~"$pool", a="b c"}[5m])))'
    assert metric_names(expr) == {"gen_ai_x_bucket"}
    assert metric_names("sum by (type) (rate(llm_lb_xds_nack_total[5m])) * 3600") == {"llm_lb_xds_nack_total"}
    assert metric_names("a{x='1'} * 2 or on (pool) b == bool 1e3") == {"a", "b"}


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # inside a collapsed row
    return [p for p in out if p["type"] != "row"]


def test_dashboard_queries_only_the_contracts_metrics_and_shows_each():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "llm-lb" and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["pool"]["definition"] == "label_values(llm_lb_backend_weight, pool)"
    assert variables["pool"]["query"] == variables["pool"]["definition"]
    assert variables["pool"]["includeAll"] and variables["pool"]["allValue"] == ".*"
    panels = _panels(dashboard)
    ids = [p["id"] for p in dashboard["panels"]] + [p["id"] for row in dashboard["panels"] for p in row.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    used: set[str] = set()
    for panel in panels:
        assert panel.get("targets"), f"panel {panel['title']!r} has no queries"
        assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r} has a query without expr"
            names = metric_names(target["expr"])
            assert names, f"panel {panel['title']!r}: {target['expr']!r} reads no metric"
            assert names <= DASHBOARD_METRICS, f"panel {panel['title']!r} reads unknown {names - DASHBOARD_METRICS}"
            used |= names
    assert used == DASHBOARD_METRICS, f"no panel shows {DASHBOARD_METRICS - used}"


def _exprs(panel: dict[str, Any]) -> str:
    return "\n".join(t["expr"] for t in panel["targets"])


def test_dashboard_panels_cover_the_operators_questions():
    panels = _panels(json.loads(DASHBOARD.read_text()))
    for histogram in ("gen_ai_server_request_duration_seconds_bucket", "gen_ai_server_time_to_first_token_seconds_bucket"):
        (panel,) = [p for p in panels if histogram in _exprs(p)]
        quantiles = {float(q) for q in re.findall(r"histogram_quantile\(([0-9.]+),", _exprs(panel))}
        assert quantiles == {0.5, 0.95, 0.99}, panel["title"]
    (budget,) = [p for p in panels if "llm_lb_budget_used_ratio" in _exprs(p)]
    steps = [s["value"] for s in budget["fieldConfig"]["defaults"]["thresholds"]["steps"]]
    assert steps == [None, 0.7, 0.9]
    state_panels = {p["type"] for p in panels if "llm_lb_backend_envoy_state" in _exprs(p)}
    assert state_panels & {"state-timeline", "table", "status-history"}
    (requests,) = [p for p in panels if "llm_lb_backend_requests_total" in _exprs(p)]
    assert "status_class" in _exprs(requests)
    (spend,) = [p for p in panels if "llm_lb_spend_total" in _exprs(p)]
    assert "* 3600" in _exprs(spend), "spend is shown per hour"
    for panel in panels:
        for target in panel["targets"]:
            if "llm_lb_backend" in target["expr"] or "gen_ai_" in target["expr"]:
                assert 'pool=~"$pool"' in target["expr"], f"{panel['title']!r} follows the $pool selector"


def test_dockerfile_check_passes_the_real_dockerfile():
    assert dockerfile_check.check(ROOT / "controlplane" / "Dockerfile", ROOT) == []
    result = subprocess.run(
        [sys.executable, "-m", "tests.dockerfile_check", "controlplane/Dockerfile"], cwd=ROOT,
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr


GOOD = """FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml ./
RUN pip install --no-cache-dir .
USER 10001
"""


@pytest.mark.parametrize(("change", "message"), [
    (("USER 10001", "USER root"), "must not run as root"),
    (("USER 10001", "USER 0:0"), "must not run as root"),
    (("USER 10001\n", ""), "no USER"),
    (("USER 10001\n", "USER 10001\nRUN true\n"), "RUN after the last USER"),
    (("python:3.11-slim", "python:latest"), ":latest"),
    (("python:3.11-slim", "python"), "has no tag"),
    (("python:3.11-slim", "python:3.11"), "not slim, alpine or distroless"),
    (("WORKDIR /app", "ADD https://example.com/tool.tar.gz /opt/"), "ADD https://example.com/tool.tar.gz"),
    (("--no-cache-dir ", ""), "--no-cache-dir"),
    (("RUN pip", "RUN sudo pip"), "sudo"),
    (("WORKDIR /app", "ENV OPENAI_API_KEY=sk-not-a-real-key"), "OPENAI_API_KEY"),
    (("WORKDIR /app", "ENV ADMIN_PASSWORD hunter2"), "ADMIN_PASSWORD"),
    (("pyproject.toml ./", "no-such-file.toml ./"), "no-such-file.toml: not found"),
])
def test_dockerfile_check_fails_bad_examples(tmp_path: Path, change: tuple[str, str], message: str):
    assert dockerfile_check.check(_write(tmp_path, GOOD), ROOT) == []
    old, new = change
    assert old in GOOD
    problems = dockerfile_check.check(_write(tmp_path, GOOD.replace(old, new)), ROOT)
    assert any(message in p for p in problems), problems


def test_dockerfile_check_exits_nonzero_naming_the_line(tmp_path: Path):
    dockerfile = _write(tmp_path, GOOD.replace("python:3.11-slim", "python:latest").replace("USER 10001", "USER root"))
    result = subprocess.run(
        [sys.executable, "-m", "tests.dockerfile_check", "--context", str(ROOT), str(dockerfile)], cwd=ROOT,
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert f"{dockerfile}:1: base image python:latest" in result.stderr
    assert f"{dockerfile}:5: USER root" in result.stderr


def test_dockerfile_check_honours_dockerignore(tmp_path: Path):
    (tmp_path / "app.py").write_text("")
    (tmp_path / ".dockerignore").write_text("*.py\n")
    dockerfile = _write(tmp_path, GOOD.replace("pyproject.toml ./", "app.py ./"))
    assert any("left out of the build context" in p for p in dockerfile_check.check(dockerfile, tmp_path))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    return path


_needs_docker_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None and not os.environ.get("CI"),
    reason="docker-compose not installed (.ci/run installs it; under CI this test is required)",
)


@_needs_docker_compose
def test_compose_file_validates():
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "config", "-q"], capture_output=True, text=True, timeout=60,
        env={**os.environ, **ENV},
    )
    assert result.returncode == 0, result.stderr


@_needs_docker_compose
def test_compose_refuses_to_start_without_the_api_token():
    env = {k: v for k, v in os.environ.items() if k != "LLM_LB_API_TOKEN"}
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "config", "-q"], capture_output=True, text=True, timeout=60,
        env={**env, "LLM_LB_XDS_TOKEN": ENV["LLM_LB_XDS_TOKEN"]},
    )
    assert result.returncode != 0 and "set LLM_LB_API_TOKEN" in result.stderr
