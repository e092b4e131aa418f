"""End to end: YAML -> control plane -> real Envoy -> real backends, and live edits of the YAML."""

from __future__ import annotations

import os
import threading
from collections import Counter

import pytest

from .harness import ControlPlane, MockBackend, http_json, spread, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def backends():
    started = [MockBackend("a"), MockBackend("b")]
    yield started
    for b in started:
        b.stop()


def pool(a: MockBackend, b: MockBackend, wa: int, wb: int, strategy: str = "weighted") -> dict:
    return {
        "chat": {
            "match": {"prefix": "/v1/"},
            "strategy": strategy,
            "timeout": "10s",
            "backends": {a.name: {"url": a.url, "weight": wa}, b.name: {"url": b.url, "weight": wb}},
        }
    }


def share(counts: Counter[str], name: str) -> float:
    return counts[name] / sum(counts.values())


def test_weights_follow_the_file_without_restarting_envoy(tmp_path, backends):
    a, b = backends
    cp = ControlPlane(tmp_path, pool(a, b, 3, 1))
    try:
        envoy_pid = cp.status()["envoy"]["pid"]
        assert envoy_pid

        counts, statuses = spread(cp.listener, 2000)
        assert statuses == Counter({200: 2000})
        assert abs(share(counts, "a") - 0.75) <= 0.03, counts

        cp.write_config(pool(a, b, 1, 1))
        status = cp.wait_applied()
        assert status["pools"]["chat"]["backends"]["a"]["weight"] == 1
        counts, statuses = spread(cp.listener, 2000)
        assert statuses == Counter({200: 2000})
        assert abs(share(counts, "a") - 0.5) <= 0.03, counts
        assert cp.status()["envoy"]["pid"] == envoy_pid
        os.kill(envoy_pid, 0)  # the same Envoy process is still alive

        # An invalid edit, made while traffic flows: every request is served, the split stays 1:1.
        result: dict[str, tuple[Counter[str], Counter[int]]] = {}
        load = threading.Thread(target=lambda: result.update(during=spread(cp.listener, 1000, clients=4)))
        load.start()
        broken = cp.config_path.read_text().replace("weight: 1", "weight: 0", 1) + "\nunknown_section: {}\n"
        cp.write_config(text=broken)
        status = cp.wait_rejected()
        load.join(timeout=60)
        assert not load.is_alive()
        errors = "\n".join(status["config"]["errors"])
        assert "config.yaml" in errors and "pool 'chat'" in errors and "'weight'" in errors
        assert "unknown key 'unknown_section'" in errors
        during_counts, during_statuses = result["during"]
        assert during_statuses == Counter({200: 1000})

        counts, statuses = spread(cp.listener, 2000)
        assert statuses == Counter({200: 2000})
        assert abs(share(counts, "a") - 0.5) <= 0.03, counts
        assert cp.status()["envoy"]["pid"] == envoy_pid
        assert "REJECTED" in cp.log_text()
    finally:
        cp.stop()


def test_round_robin_ignores_weights_and_weight_only_change_pushes_only_eds(tmp_path, backends):
    a, b = backends
    cp = ControlPlane(tmp_path, pool(a, b, 9, 1, strategy="round_robin"))
    try:
        counts, statuses = spread(cp.listener, 400, clients=4)
        assert statuses == Counter({200: 400})
        assert abs(share(counts, "a") - 0.5) <= 0.05, counts

        before = cp.status()["snapshot"]
        cp.write_config(pool(a, b, 9, 1, strategy="weighted"))
        after = cp.wait_applied()["snapshot"]
        assert after["EDS"] != before["EDS"]
        assert {k: after[k] for k in ("CDS", "LDS", "RDS")} == {k: before[k] for k in ("CDS", "LDS", "RDS")}
        counts, _ = spread(cp.listener, 1000, clients=4)
        assert abs(share(counts, "a") - 0.9) <= 0.03, counts
    finally:
        cp.stop()


def test_envoy_nack_is_surfaced_and_previous_config_stays(tmp_path, backends):
    a, b = backends
    cp = ControlPlane(tmp_path, pool(a, b, 1, 1))
    try:
        good = cp.status()["snapshot"]["CDS"]
        doc = cp.document(pool(a, b, 1, 1))
        # Valid for the control plane, refused by Envoy: the CA bundle does not exist on its machine.
        doc["envoy"]["ca_file"] = str(tmp_path / "missing-ca.pem")
        doc["pools"]["chat"]["backends"]["tls"] = {"url": f"https://127.0.0.1:{a.port}", "weight": 1}
        import yaml

        cp.write_config(text=yaml.safe_dump(doc, sort_keys=False))

        def nacked():
            nodes = cp.status()["nodes"]
            return nodes and "CDS" in nodes[0]["nacked"] and nodes[0]
        node = wait_for(nacked, what="Envoy to reject the cluster update")
        assert "missing-ca.pem" in node["nacked"]["CDS"]["message"]
        assert node["acked"]["CDS"] == good
        code, ready = http_json("GET", f"{cp.api}/readyz")  # Envoy runs the old snapshot: not ready
        assert code == 503 and not ready["ready"] and "llm-lb-local" in ready["problems"][0], ready
        counts, statuses = spread(cp.listener, 200, clients=4)
        assert statuses == Counter({200: 200})
        assert set(counts) == {"a", "b"}
        assert "REJECTED CDS" in cp.log_text()
        metrics = cp_metrics(cp)
        assert 'llm_lb_xds_nacks_total{type="CDS"} 1.0' in metrics or 'llm_lb_xds_nacks_total{type="CDS"}' in metrics
    finally:
        cp.stop()


def cp_metrics(cp: ControlPlane) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{cp.api}/metrics", timeout=5) as resp:
        return resp.read().decode()
