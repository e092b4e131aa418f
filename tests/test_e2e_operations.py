"""Operating the system: draining a backend, and the control plane dying under load."""

from __future__ import annotations

import http.client
import os
import signal

import pytest

from .harness import ControlPlane, Load, MockBackend, StandaloneEnvoy, cli, spread, stream_from, wait_for

pytestmark = pytest.mark.e2e


def pools(a: MockBackend, b: MockBackend) -> dict:
    return {"chat": {"match": {"prefix": "/v1/"}, "backends": {"a": {"url": a.url}, "b": {"url": b.url}}}}


def test_drained_backend_takes_no_new_requests_while_its_stream_completes(tmp_path):
    a = MockBackend("a", args=["--stream-chunks", "25", "--chunk-delay-ms", "100"])
    b = MockBackend("b")
    cp = ControlPlane(tmp_path, pools(a, b))
    conn = http.client.HTTPConnection(cp.listener, timeout=30)
    try:
        stream = stream_from(conn, "a")

        drained = cli("drain", "chat", "a", "--api", cp.api)
        assert drained.returncode == 0, drained.stderr
        assert "chat/a: draining" in drained.stdout
        assert cp.status()["pools"]["chat"]["backends"]["a"]["draining"] is True
        wait_for(lambda: cp.envoy_hosts("chat")[a.port]["health"].get("eds_health_status") == "DRAINING",
                 what="Envoy to see the backend draining")

        counts, statuses = spread(cp.listener, 100, clients=4)
        assert statuses == {200: 100} and counts == {"b": 100}, counts
        rest = stream.read()
        assert rest.rstrip().endswith(b"data: [DONE]"), rest[-200:]
        assert rest.count(b"data: ") >= 25, "every chunk of the in-flight stream arrived"

        last = cli("drain", "chat", "b", "--api", cp.api)
        assert last.returncode == 1 and "last backend" in last.stderr
        missing = cli("drain", "chat", "nope", "--api", cp.api)
        assert missing.returncode == 1 and "has no backend 'nope'" in missing.stderr

        assert cli("undrain", "chat", "a", "--api", cp.api).returncode == 0
        wait_for(lambda: spread(cp.listener, 20, clients=2)[0]["a"] > 0, what="a to take traffic again")
        assert "no configured limit" not in (tmp_path / "state" / "envoy.log").read_text(), \
            "the global downstream connection limit is set"
    finally:
        conn.close()
        cp.stop()
        a.stop()
        b.stop()


def test_control_plane_killed_under_load_costs_nothing_and_restores_state(tmp_path):
    a, b, c = MockBackend("a"), MockBackend("b"), MockBackend("c")
    cp = ControlPlane(tmp_path, {
        "chat": {"match": {"prefix": "/v1/"}, "backends": {
            "a": {"url": a.url, "weight": 3}, "b": {"url": b.url, "weight": 1}, "c": {"url": c.url, "weight": 2}}},
    }, extra_args=["--no-envoy"], start=False)
    envoy = StandaloneEnvoy(tmp_path, cp.config_path)
    try:
        cp.start()
        assert cp.status()["envoy"]["managed"] is False
        # A drain is state the restarted control plane must restore, not reset to defaults.
        assert cli("drain", "chat", "c", "--api", cp.api).returncode == 0
        cp.wait_applied()
        wait_for(lambda: cp.envoy_hosts("chat")[c.port]["health"].get("eds_health_status") == "DRAINING",
                 what="Envoy to see c draining")
        before = cp.envoy_hosts("chat")
        assert {p: h["weight"] for p, h in before.items()} == {a.port: 3, b.port: 1, c.port: 2}

        with Load(cp.listener, clients=20, max_seconds=60) as load:
            load.wait_requests(300)
            os.kill(cp.proc.pid, signal.SIGKILL)
            cp.proc.wait()
            wait_for(lambda: cp.envoy_stats("control_plane.connected_state")["control_plane.connected_state"] == 0,
                     what="Envoy to notice the control plane is gone")
            load.wait_requests(500)
            cp.start()
            wait_for(lambda: cp.envoy_stats("control_plane.connected_state")["control_plane.connected_state"] == 1,
                     what="Envoy to reconnect")
            load.wait_requests(500)
        assert load.statuses == {200: load.total}, load.failures
        assert load.backends["c"] == 0
        assert envoy.proc.poll() is None, "Envoy kept running throughout"
        assert cp.envoy_hosts("chat") == before
        assert cp.status()["pools"]["chat"]["backends"]["c"]["draining"] is True
    finally:
        cp.stop()
        envoy.stop()
        for backend in (a, b, c):
            backend.stop()
