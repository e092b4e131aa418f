"""Data plane: direct vs plain Envoy vs the full product, same backends, same Envoy worker count, one run."""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from controlplane.envoyproc import find_envoy
from tests.harness import ControlPlane, MockBackend, http_json

from .common import (
    Context,
    Nginx,
    Row,
    WrkResult,
    free_port,
    metric_value,
    proc_cpu_seconds,
    proc_rss_mb,
    settle,
    stop_pid,
    wait_for,
    wrk,
)
from .openloop import open_loop

WORKERS = 1  # Envoy worker threads, the same for plain Envoy and the product
ROUNDS, ROUNDS_SMOKE = 3, 1
HELD_BACK_RPS = ("every request's JSON body is read to route by model (transform) and every JSON answer for usage "
                 "(json_to_metadata), and Envoy's worker shares 2 cores with wrk, nginx and the control plane "
                 "(see the CPU row)")
HELD_BACK_CPU = ("it shares 2 cores with Envoy, nginx and wrk, and wakes for each batch; compare the scale part's "
                 "ingest row, where it has a core to itself")
RATE = 1000  # requests per second for the fixed-rate comparison
PATH = "/v1/completions"  # to the fast static backend
STREAM_PATH = "/v1/chat/completions"  # to the streaming mock


class PlainEnvoy:
    """Envoy with a static config: listener -> router -> the same backends. The baseline."""

    def __init__(self, workdir: Path, backends: list[int]) -> None:
        self.port, admin = free_port(), free_port()
        endpoints = [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
                     for p in backends]
        config = {
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {
                "listeners": [{
                    "name": "plain",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": self.port}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
                                     ".v3.HttpConnectionManager",
                            "stat_prefix": "plain",
                            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                                {"match": {"prefix": "/"}, "route": {"cluster": "backends"}}]}]},
                            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                        },
                    }]}],
                }],
                "clusters": [{
                    "name": "backends", "type": "STATIC", "connect_timeout": "5s",
                    "load_assignment": {"cluster_name": "backends", "endpoints": [{"lb_endpoints": endpoints}]},
                }],
            },
        }
        path = workdir / "plain-envoy.json"
        path.write_text(json.dumps(config))
        self._log = open(workdir / "plain-envoy.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([find_envoy(), "-c", str(path), "--disable-hot-restart", "--concurrency",
                                      str(WORKERS), "--base-id", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: http_json("POST", self.url, {})[0] == 200, timeout=20, what="plain Envoy")
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    def stop(self) -> None:
        stop_pid(self.proc)
        self._log.close()


def product(workdir: Path, nginx: Nginx, stream: MockBackend) -> ControlPlane:
    cp = ControlPlane(workdir / "product", None, start=False)
    p = cp.ports
    doc: dict[str, Any] = {
        "envoy": {"listener": {"port": p["listener"]}, "admin": {"port": p["admin"]}, "concurrency": WORKERS,
                  "log_level": "warning"},
        "controlplane": {"xds": {"port": p["xds"]}, "api": {"port": p["api"]}},
        "pools": {
            "chat": {"match": {"prefix": "/v1/"}, "strategy": "health_aware", "backends": {
                "a": {"url": nginx.url(0), "cost": {"input_per_1k": 0.5, "output_per_1k": 1.5}},
                "b": {"url": nginx.url(1), "cost": {"input_per_1k": 0.5, "output_per_1k": 1.5}}}},
            "stream": {"match": {"prefix": STREAM_PATH}, "backends": {"s": {"url": stream.url}}},
        },
    }
    cp.config_path.parent.mkdir(parents=True, exist_ok=True)
    cp.write_config(text=yaml.safe_dump(doc, sort_keys=False))
    cp.start()
    return cp


def timed_stream(hostport: str) -> tuple[float, float]:
    """Time to the first byte of the body and to its last, in ms."""
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    conn = http.client.HTTPConnection(hostport, timeout=30)
    try:
        start = time.perf_counter()
        conn.request("POST", STREAM_PATH, body=body, headers={"content-type": "application/json"})
        resp = conn.getresponse()
        resp.read(1)
        first = time.perf_counter() - start
        resp.read()
        return first * 1000, (time.perf_counter() - start) * 1000
    finally:
        conn.close()


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    nginx = Nginx(ctx.workdir, [free_port(), free_port()])
    stream: MockBackend | None = None
    plain = cp = None
    try:
        stream = MockBackend("stream", args=["--stream-chunks", "20", "--chunk-delay-ms", "5"])
        plain = PlainEnvoy(ctx.workdir, nginx.ports)
        cp = product(ctx.workdir, nginx, stream)
        targets = {"direct": f"{nginx.url(0)}{PATH}", "plain Envoy": plain.url,
                   "product": f"http://{cp.listener}{PATH}"}
        runs: dict[tuple[str, int], list[WrkResult]] = {}
        cpu_used = entries_seen = 0.0  # the control plane's, over the product's 32-connection runs only
        for connections in (1, 32):
            for _ in range(ROUNDS_SMOKE if ctx.smoke else ROUNDS):  # interleaved, so drift hits all alike
                for name, url in targets.items():
                    settle()
                    measure = name == "product" and connections == 32
                    if measure:
                        cpu, entries = proc_cpu_seconds(cp.proc.pid), _entries(cp)
                    got = wrk(url, connections, ctx.seconds, ctx.workdir)
                    if got.errors:
                        raise RuntimeError(f"{name}: {got.errors} failed requests of {got.requests} under wrk")
                    runs.setdefault((name, connections), []).append(got)
                    if measure:
                        used, seen = _cpu_per_entry(cp, cpu, entries)
                        cpu_used, entries_seen = cpu_used + used, entries_seen + seen
        cpu_per_entry = (cpu_used / entries_seen * 1e6, entries_seen)
        closed = {key: sorted(got, key=lambda r: r.rps)[len(got) // 2] for key, got in runs.items()}  # median
        for (name, connections), got in closed.items():
            rows.append(Row("dataplane", f"{name}, {connections} conn", got.rps, "rps",
                            note=f"p50 {got.p50_ms:.2f} ms, p99 {got.p99_ms:.2f} ms (median of "
                                 f"{len(runs[(name, connections)])} runs)"))
        for connections in (1, 32):
            ratio = 100 * closed[("product", connections)].rps / closed[("plain Envoy", connections)].rps
            target = ">= 85%" if connections == 32 else None
            rows.append(Row("dataplane", f"product / plain Envoy rps, {connections} conn", ratio, "%",
                            target=target, met=ratio >= 85 if target else None,
                            note="" if ratio >= 85 or not target else HELD_BACK_RPS))
        rows.append(Row("dataplane", "control plane CPU per access-log entry", cpu_per_entry[0], "µs",
                        target="<= 15 µs", met=cpu_per_entry[0] <= 15,
                        note=f"{cpu_per_entry[1]:,.0f} entries over the product's 32-connection runs"
                             + ("" if cpu_per_entry[0] <= 15 else f"; {HELD_BACK_CPU}")))
        rows.append(Row("dataplane", "control plane RSS after the runs", proc_rss_mb(cp.proc.pid), "MB"))
        als = cp.envoy_stats("access_logs.grpc_access_log")
        written = als.get("access_logs.grpc_access_log.logs_written", 0)
        dropped = als.get("access_logs.grpc_access_log.logs_dropped", 0)
        rows.append(Row("dataplane", "access-log entries Envoy dropped", dropped, "count",
                        note=f"of {written:,} written (at most once: a full buffer or a broken stream drops them, "
                             "and their spend with them)"))

        settle()
        fixed = {name: open_loop(targets[name], RATE, ctx.seconds) for name in ("direct", "product")}
        for name, r in fixed.items():
            if r.errors:
                raise RuntimeError(f"{name}: {r.errors} failed requests at {RATE} rps")
            rows.append(Row("dataplane", f"{name} at {RATE} rps", r.p50_ms, "ms p50",
                            note=f"p99 {r.p99_ms:.2f} ms; {r.late} of {r.sent} sent late"))
        for q in ("p50", "p99"):
            added = getattr(fixed["product"], f"{q}_ms") - getattr(fixed["direct"], f"{q}_ms")
            target = "<= 1 ms" if q == "p99" else None
            rows.append(Row("dataplane", f"{q} the product adds at {RATE} rps", added, "ms", target=target,
                            met=added <= 1.0 if target else None))

        samples = 5 if ctx.smoke else 20
        direct_s = [timed_stream(f"127.0.0.1:{stream.port}") for _ in range(samples)]
        product_s = [timed_stream(cp.listener) for _ in range(samples)]
        for i, what in enumerate(("first byte", "last byte")):
            d, p = statistics.median(s[i] for s in direct_s), statistics.median(s[i] for s in product_s)
            rows.append(Row("dataplane", f"stream: time to {what}, product vs direct", p - d, "ms added",
                            note=f"median of {samples}: direct {d:.2f} ms, product {p:.2f} ms "
                                 "(20 chunks, 5 ms apart)"))
        return rows
    finally:
        if cp is not None:
            cp.stop()
        if plain is not None:
            plain.stop()
        if stream is not None:
            stream.stop()
        nginx.stop()


def _entries(cp: ControlPlane) -> float:
    return metric_value(cp.api, "llm_lb_access_log_entries_total")


def _cpu_per_entry(cp: ControlPlane, cpu_before: float, entries_before: float) -> tuple[float, float]:
    """Control-plane CPU seconds used since `cpu_before`, and access-log entries received since (waits for
    the last batches, which Envoy sends every 200 ms)."""
    last = -1.0
    while (now := _entries(cp)) != last:
        last = now
        time.sleep(0.3)
    return proc_cpu_seconds(cp.proc.pid) - cpu_before, last - entries_before
