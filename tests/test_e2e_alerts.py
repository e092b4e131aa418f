"""Alerts end to end: a local webhook receiver gets a firing event when a backend is SIGKILLed under load
and the matching resolved event when it comes back; a rejected config edit and an Envoy NACK fire and
resolve the same way. Real Envoy, control plane and mock backends on loopback; bounded load."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml

from .harness import ControlPlane, Load, MockBackend, http_json, wait_for
from .harness import WebhookReceiver as Receiver

pytestmark = pytest.mark.e2e

SECRET = "sk-alert-test-0123456789abcdef"
EVENT_FIELDS = {"event", "kind", "key", "severity", "message", "pool", "backend", "at", "since", "details"}


def start(tmp_path: Any, pools: dict[str, Any], receiver: Receiver, env: dict[str, str] | None = None
          ) -> tuple[ControlPlane, dict[str, Any]]:
    cp = ControlPlane(tmp_path, None, env=env, start=False)
    doc = cp.document(pools)
    doc["controlplane"]["alerts"] = {"webhook": receiver.url, "interval": "500ms"}
    cp.write_config(text=yaml.safe_dump(doc, sort_keys=False))
    cp.start()
    return cp, doc


def assert_episodes(receiver: Receiver) -> dict[str, list[str]]:
    """Per key: firing, resolved, firing, ... never two firings in a row (no duplicate while it held)."""
    by_key: dict[str, list[str]] = {}
    for event in receiver.events():
        assert EVENT_FIELDS <= set(event), event
        assert event["since"] <= event["at"], event
        by_key.setdefault(event["key"], []).append(event["event"])
    for key, events in by_key.items():
        assert events[0] == "firing" and all(a != b for a, b in zip(events, events[1:], strict=False)), (key, events)
    return by_key


CHECKS = {
    # Envoy's active checks (every second, one failure marks the host) and outlier detection together:
    # Envoy's /clusters then mostly shows the host as failing its checks (the worse reason) by the time
    # the control plane reads it, so the alert is backend_unhealthy (backend_ejected if read first).
    "active": {
        "health_check": {"interval": "1s", "timeout": "500ms", "unhealthy_threshold": 1, "healthy_threshold": 1},
        "outlier_detection": {"consecutive_gateway_failure": 1, "consecutive_5xx": 1, "interval": "1s",
                              "base_ejection_time": "10s"},
    },
    # Outlier detection alone: the failed connects eject the host at once; it is let back in once its
    # ejection time is over and requests succeed.
    "passive": {
        "outlier_detection": {"consecutive_gateway_failure": 1, "consecutive_5xx": 1, "interval": "500ms",
                              "base_ejection_time": "2s", "max_ejection_time": "4s"},
    },
}


@pytest.mark.parametrize("checks", sorted(CHECKS))
def test_killed_backend_fires_and_resolves_when_it_returns(tmp_path, mocks, checks):
    a, b = mocks("a"), mocks("b")
    pools = {"chat": {"match": {"prefix": "/v1/"}, "timeout": "20s", **CHECKS[checks],
                      "backends": {"a": {"url": a.url}, "b": {"url": b.url}}}}
    kinds = ("backend_ejected", "backend_unhealthy") if checks == "active" else ("backend_ejected",)
    receiver = Receiver()
    cp, _ = start(tmp_path, pools, receiver)
    revived: MockBackend | None = None
    try:
        with Load(cp.listener, clients=10, max_seconds=60) as load:
            load.wait_requests(200)
            assert receiver.events() == [], "nothing to tell while all is well"
            a.proc.kill()  # SIGKILL
            a.proc.wait()
            killed_at = time.monotonic()

            def down(event: dict[str, Any]) -> bool:
                return event["kind"] in kinds and event["backend"] == "a" and event["event"] == "firing"

            first = wait_for(lambda: receiver.events(down), timeout=20, what=f"a {kinds} alert for the killed backend")[0]
            print(f"{first['kind']} for the killed backend after {time.monotonic() - killed_at:.2f}s")
            assert first["pool"] == "chat" and first["key"] == f"{first['kind']}:chat:a"
            assert first["details"]["url"] == a.url and first["severity"] == "warning"
            load.wait_requests(100)
            time.sleep(2)  # several evaluations while it stays down

            revived = MockBackend("a", port=a.port)
            revived_at, revived_wall = time.monotonic(), time.time()
            fired = {e["key"] for e in receiver.events(down)}

            def all_resolved() -> bool:
                last = {e["key"]: e for e in receiver.events(lambda e: e["key"] in fired)}
                return all(e["event"] == "resolved" and e["at"] >= revived_wall for e in last.values())

            wait_for(all_resolved, timeout=20, what=f"resolved events for {sorted(fired)} after the restart")
            print(f"resolved {sorted(fired)} after {time.monotonic() - revived_at:.2f}s")
        episodes = assert_episodes(receiver)
        for key in fired:
            assert episodes[key][:2] == ["firing", "resolved"], (key, episodes[key])
        resolved = receiver.events(lambda e: e["key"] == first["key"] and e["event"] == "resolved")[0]
        assert resolved["since"] == first["since"] and resolved["duration_seconds"] > 0
        assert not [k for k in episodes if ":chat:b" in k], episodes
        assert load.statuses[200] > 0
    finally:
        cp.stop()
        receiver.stop()
        if revived is not None:
            revived.stop()


def test_rejected_edit_and_envoy_nack_fire_and_resolve(tmp_path, mocks):
    a, b = mocks("a"), mocks("b")
    pools = {"chat": {"match": {"prefix": "/v1/"}, "backends": {
        "a": {"url": a.url, "api_key": "${ALERT_TEST_KEY}"}, "b": {"url": b.url}}}}
    receiver = Receiver()
    cp, doc = start(tmp_path, pools, receiver, env={"ALERT_TEST_KEY": SECRET})
    good = cp.config_path.read_text()
    try:
        # A bad edit: refused, the last good config stays live; the file restored: resolved.
        bad = json.loads(json.dumps(doc))
        bad["pools"]["chat"]["backends"]["b"]["weight"] = 0
        cp.write_config(text=yaml.safe_dump(bad, sort_keys=False))
        cp.wait_rejected()
        rejected = wait_for(lambda: receiver.events(lambda e: e["kind"] == "config_rejected"), timeout=10,
                            what="config_rejected firing")[0]
        assert rejected["event"] == "firing" and rejected["key"] == "config_rejected"
        assert any("weight" in err for err in rejected["details"]["errors"]), rejected
        assert [a["key"] for a in cp.status()["alerts"]] == ["config_rejected"]  # what the page shows
        _, text = http_json("GET", f"{cp.api}/metrics")
        assert 'llm_lb_alerts_active{kind="config_rejected"} 1.0' in str(text)
        cp.write_config(text=good)
        wait_for(lambda: len(receiver.events(lambda e: e["kind"] == "config_rejected")) == 2, timeout=10,
                 what="config_rejected resolved")

        # Valid for the control plane, refused by Envoy (its CA bundle is missing): a NACK, then fixed.
        nack = json.loads(json.dumps(doc))
        nack["envoy"]["ca_file"] = str(tmp_path / "missing-ca.pem")
        nack["pools"]["chat"]["backends"]["tls"] = {"url": f"https://127.0.0.1:{a.port}"}
        cp.write_config(text=yaml.safe_dump(nack, sort_keys=False))
        fired = wait_for(lambda: receiver.events(lambda e: e["kind"] == "envoy_nack"), timeout=15,
                         what="envoy_nack firing")[0]
        assert fired["key"] == "envoy_nack:llm-lb-local:CDS" and fired["severity"] == "critical"
        assert "missing-ca.pem" in fired["details"]["envoy_message"]
        cp.write_config(text=good)
        cp.wait_applied()
        wait_for(lambda: len(receiver.events(lambda e: e["kind"] == "envoy_nack")) == 2, timeout=10,
                 what="envoy_nack resolved")
        time.sleep(1)  # a couple more evaluations: nothing else arrives
        episodes = assert_episodes(receiver)
        assert episodes == {"config_rejected": ["firing", "resolved"],
                            "envoy_nack:llm-lb-local:CDS": ["firing", "resolved"]}, episodes
        with receiver.lock:
            assert not any(SECRET.encode() in body for body in receiver.raw), "a backend key in an alert"
        assert SECRET not in cp.log_text()
    finally:
        cp.stop()
        receiver.stop()
