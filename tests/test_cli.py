"""The command line as an operator runs it: real processes, exit codes, messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from controlplane.envoyproc import find_envoy

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controlplane", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env
    )


def test_validate_ok_exits_zero():
    result = cli("validate", "configs/demo.yaml")
    assert result.returncode == 0, result.stderr
    assert "configs/demo.yaml: ok (1 pools, 2 backends)" in result.stdout


def test_validate_lists_every_error_and_exits_one(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools:\n  chat:\n    strategy: fastest\n    backends:\n      a: {url: 'ftp://x', weight: -1}\n")
    result = cli("validate", str(bad), "configs/demo.yaml")
    assert result.returncode == 1
    assert f"{bad}: invalid (3 errors)" in result.stderr
    assert f"{bad}:3: pool 'chat', field 'strategy'" in result.stderr
    assert f"{bad}:5: pool 'chat', backend 'a', field 'url'" in result.stderr
    assert f"{bad}:5: pool 'chat', backend 'a', field 'weight'" in result.stderr
    assert "configs/demo.yaml: ok" in result.stdout


def test_run_refuses_invalid_config_before_starting_anything(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: {}\n")
    result = cli("run", "--config", str(bad), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 1
    assert "needs at least one entry under 'pools'" in result.stderr
    assert not (tmp_path / "state").exists()


def test_bootstrap_is_accepted_by_envoy(tmp_path):
    out = tmp_path / "bootstrap.json"
    token = tmp_path / "xds-token"
    token.write_text("a-token-of-the-running-control-plane\n")
    result = cli("bootstrap", "--config", "configs/demo.yaml", "--output", str(out), "--xds-host", "controlplane",
                 "--token-file", str(token))
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o077 == 0, "the bootstrap holds the token: owner-only"
    content = json.loads(out.read_text())
    [ads] = content["dynamic_resources"]["ads_config"]["grpc_services"]
    assert ads["initial_metadata"] == [{"key": "authorization", "value": "Bearer a-token-of-the-running-control-plane"}]
    xds = content["static_resources"]["clusters"][0]
    assert xds["type"] == "STRICT_DNS"
    assert xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": "controlplane", "port_value": 18000,
    }
    assert content["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    check = subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(out), "--disable-hot-restart"],
        capture_output=True, text=True, timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_bootstrap_without_a_token_says_where_to_find_one(tmp_path):
    result = cli("bootstrap", "--config", "configs/demo.yaml", "--output", str(tmp_path / "b.json"))
    assert result.returncode == 2
    assert "controlplane.xds.token is not set" in result.stderr and "xds-token" in result.stderr
    assert not (tmp_path / "b.json").exists()
