"""A control plane SIGKILLed under load loses no spend: what its ledger lacked is charged from the spool.

The managed Envoy dies with its control plane (parent-death signal) and writes
its spool file out as it exits; the next control plane, on the same state
directory and ports, charges the lines the ledger did not cover before it
starts a new Envoy. Afterwards the ledger matches what the backends served,
short at most of the requests in flight at the kill.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict

from controlplane.config import parse_config
from controlplane.controllers.spend import SpendFlusher
from controlplane.envoyproc import find_envoy
from controlplane.scoring.ledger import SpendBook, SqliteLedger
from controlplane.telemetry.accesslog import AccessLogService
from controlplane.telemetry.spool import SPOOL_NAME, Spool, count_lines
from controlplane.xds import resources

from .harness import ControlPlane, Load, chat_body, free_port, http_json, running, stop_pid, wait_for

pytestmark = pytest.mark.e2e

CLIENTS = 8


def ledger_requests(path: Path) -> dict[str, int]:
    """Requests per backend in the SQLite ledger."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {b: int(n) for b, n in db.execute("SELECT backend, SUM(requests) FROM spend GROUP BY backend")}
    finally:
        db.close()


def test_sigkill_under_load_recovers_the_spend_from_the_spool(tmp_path: Path, mocks) -> None:  # type: ignore[no-untyped-def]
    a, b = mocks("a"), mocks("b")
    pools = {"chat": {"match": {"prefix": "/v1/"}, "backends": {
        "a": {"url": a.url, "cost": {"input_per_1k": 1.0, "output_per_1k": 2.0}},
        "b": {"url": b.url, "cost": {"input_per_1k": 0.5, "output_per_1k": 0.5}}}}}
    first = ControlPlane(tmp_path, pools)
    second: ControlPlane | None = None
    ledger = tmp_path / "state" / "ledger.sqlite3"
    envoy_pid = first.status()["envoy"]["pid"]
    try:
        with Load(first.listener, clients=CLIENTS, max_seconds=120) as load:
            load.wait_requests(300)
            wait_for(lambda: sum(ledger_requests(ledger).values()) > 0, timeout=15, what="a first flush")
            load.wait_requests(500)
            os.kill(first.proc.pid, signal.SIGKILL)
            first.proc.wait(10)
            wait_for(lambda: not running(envoy_pid), timeout=10, what="the managed Envoy to exit with its control plane")
            second = ControlPlane(tmp_path, None, ports=first.ports)  # same state dir, same ports
            load.wait_requests(300, timeout=60)
        assert load.statuses[200] > 800, load.failures

        last: list[dict[str, int]] = []

        def settled() -> dict[str, int]:
            """The ledger once every entry is in and flushed: memory and disk agree, twice running."""
            assert second is not None
            code, cost = http_json("GET", f"{second.api}/v1/cost")
            assert code == 200, cost
            in_memory = {n: e["requests"] for n, e in cost["pools"]["chat"]["backends"].items() if e["requests"]}
            on_disk = ledger_requests(ledger)
            stable = bool(last) and on_disk == in_memory == last[-1]
            last.append(on_disk)
            return on_disk if stable else {}

        charged = wait_for(settled, timeout=20, interval=0.7, what="the ledger to settle")
        served = {m.name: http_json("GET", f"{m.url}/admin/stats")[1]["completions"] for m in (a, b)}
        code, cost = http_json("GET", f"{second.api}/v1/cost")
        recovered = cost["recovered_requests"]
        print(f"served {served}, ledger {charged}, recovered {recovered} (cost {cost['recovered_cost']}), "
              f"client outcomes {dict(load.statuses)}")
        assert recovered > 0, "the spool charged what the ledger lacked"
        assert sum(charged.values()) >= load.statuses[200], "every answer a client got is charged"
        # Short at most of the requests in flight at the kill (one per client); each may have reached a
        # backend twice (Envoy retries an attempt reset by its shutdown on the other backend).
        in_flight = 2 * CLIENTS
        missing = sum(served.values()) - sum(charged.values())
        assert 0 <= missing <= in_flight, f"ledger {charged} against served {served}"
        for name in served:  # attribution among the last ~0.2 s of requests may swap (telemetry/spool.py)
            assert abs(served[name] - charged.get(name, 0)) <= in_flight, (name, served, charged)
        code, metrics = http_json("GET", f"{second.api}/metrics")
        assert f"llm_lb_spend_recovered_requests_total {float(recovered)}" in metrics
        assert 'llm_lb_access_log_streams_total{node="llm-lb-local"}' in metrics
        assert "spend recovered from the spool" in second.log_text()
        assert not (tmp_path / "state" / "spool.1.jsonl").exists()
    finally:
        if second is not None:
            second.stop()
        first.stop()
        if running(envoy_pid):
            os.kill(envoy_pid, signal.SIGKILL)


def static_envoy(spool_path: Path, backend_port: int, listener: int, admin: int) -> dict[str, Any]:
    """A static Envoy with the control plane's spool logger in front of one backend (no xDS needed)."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": "ingress",
        "access_log": [MessageToDict(resources.spool_log(str(spool_path)))],
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "chat"}}]}]},
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "ingress", "address": {"socket_address": {"address": "127.0.0.1",
                                                                              "port_value": listener}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": hcm}]}]}],
            "clusters": [{"name": "chat", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
                "cluster_name": "chat", "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": backend_port}}},
                    "metadata": {"filter_metadata": {"llm_lb": {"backend": "a"}}}}]}]}}],
        },
    }


def send(listener: int, count: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", listener, timeout=10)
    try:
        for _ in range(count):
            conn.request("POST", "/v1/chat/completions", body=chat_body(), headers={"content-type": "application/json"})
            response = conn.getresponse()
            response.read()
            assert response.status == 200
    finally:
        conn.close()


def test_rotation_with_a_real_envoy_loses_and_repeats_no_line(tmp_path: Path, mocks) -> None:  # type: ignore[no-untyped-def]
    """rename + /reopen_logs: lines Envoy had buffered go to the new file; the two files hold every request
    once; the rotated one is retired once covered; a recovery charges exactly the uncovered rest."""
    backend = mocks("a")
    spool_path = tmp_path / SPOOL_NAME
    listener, admin = free_port(), free_port()
    bootstrap = tmp_path / "envoy.json"
    bootstrap.write_text(json.dumps(static_envoy(spool_path, backend.port, listener, admin)))
    log = open(tmp_path / "envoy.log", "wb")
    envoy = subprocess.Popen([find_envoy(), "-c", str(bootstrap), "--disable-hot-restart", "--concurrency", "2"],
                             stdout=log, stderr=subprocess.STDOUT)
    config = parse_config(f"""
pools:
  chat:
    backends: {{a: {{url: "{backend.url}", cost: {{input_per_1k: 1.0, output_per_1k: 1.0}}}}}}
""")
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    try:
        wait_for(lambda: http_json("GET", f"http://127.0.0.1:{admin}/ready")[0] == 200, what="Envoy to be ready")
        book = SpendBook()
        spool = Spool(spool_path, "n", book, ledger, SpendFlusher(book, ledger, lambda: 1.0),
                      AccessLogService(lambda batch, stream, received: 0), lambda: config,
                      lambda: f"http://127.0.0.1:{admin}", max_bytes=1)
        send(listener, 300)  # over the file logger's 64 KiB buffer: some of it reaches the file at once
        wait_for(lambda: spool_path.stat().st_size > 0, what="Envoy to write its spool")

        async def main() -> None:
            await spool.maintain()  # renamed, and Envoy reopened its log
            assert spool.rotated.exists() and spool.path.exists()
            rotated = count_lines(spool.rotated)
            assert 0 < rotated <= 300
            send(listener, 50)
            assert count_lines(spool.rotated) == rotated, "Envoy writes only to the new file now"
            book.count_spooled(rotated)
            await spool.maintain()  # covered: retired
            assert not spool.rotated.exists() and spool.covered == 0
            stop_pid(envoy)  # SIGTERM: Envoy writes out what it buffered
            assert rotated + count_lines(spool.path) == 350, "no line lost or written twice"
            book.count_spooled(350 - rotated - 10)
            spent = spool.recover()
            assert spent.requests == 10 and ledger.spend(0)[("chat", "a")].requests == 10

        asyncio.run(main())
    finally:
        stop_pid(envoy)
        log.close()
        ledger.close()
