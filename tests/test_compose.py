"""The compose deployment: the file is valid and the checked-in bootstrap is what the CLI generates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml

from controlplane.bootstrap import bootstrap
from controlplane.config import load_config

from .harness import ROOT

ENV = {"LLM_LB_XDS_TOKEN": "compose-test-token-0123456789"}


def test_checked_in_bootstrap_matches_generated():
    config = load_config(ROOT / "configs" / "compose.yaml", env=ENV)
    expected = bootstrap(config, "compose-envoy", xds_host="controlplane", token="__LLM_LB_XDS_TOKEN__")
    assert json.loads((ROOT / "envoy" / "bootstrap.json").read_text()) == expected


def test_compose_services_point_at_each_other():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert services["envoy"]["image"] == "envoyproxy/envoy:v1.40.0"
    config = load_config(ROOT / "configs" / "compose.yaml", env=ENV)
    hosts = {b.host for p in config.pools.values() for b in p.backends.values()}
    assert hosts <= set(services), "every backend host is a compose service"
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"published port {port} must bind loopback"


@pytest.mark.skipif(
    shutil.which("docker-compose") is None and not os.environ.get("CI"),
    reason="docker-compose not installed (.ci/run installs it; under CI this test is required)",
)
def test_compose_file_validates():
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "config", "-q"], capture_output=True, text=True, timeout=60,
        env={**os.environ, **ENV},
    )
    assert result.returncode == 0, result.stderr
