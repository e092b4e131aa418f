"""Reaction: how long from an event (a dead backend, an edit, a degraded probe, a spent budget, a dead
control plane) until Envoy acts on it, measured against real processes on loopback.

Each time runs from the event to the moment Envoy's admin `/clusters` shows the change, polled every few
milliseconds, so each figure carries up to one poll interval of error. The control plane reacts on timers
(file poll, probe interval, scoring interval); each row's note names the timer that bounds it.
"""

from __future__ import annotations

import http.client
import os
import random
import signal
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.harness import ControlPlane, Load, MockBackend, StandaloneEnvoy, chat_body, http_json, wait_for

from .common import Context, Row

T = TypeVar("T")
PART = "reaction"
POLL = 0.005  # seconds between reads of Envoy's admin /clusters
POOL = "chat"
WATCH_INTERVAL = 0.1  # the config file poll in controlplane/controllers/reload.py (App's default)
PROBE_TICK = 0.25  # the prober's loop in controlplane/telemetry/prober.py
ALS_FLUSH = 0.2  # the access log's buffer_flush_interval in controlplane/xds/resources.py


def run(ctx: Context) -> list[Row]:
    """Each scenario gets its own processes and directory, so one cannot disturb the next."""
    rows: list[Row] = []
    for name, scenario in (("killed-backend", _killed_backend), ("config-edit", _config_edits),
                           ("deep-health", _deep_health), ("budget", _budget),
                           ("controlplane-restart", _controlplane_restart)):
        workdir = ctx.workdir / f"reaction-{name}"
        workdir.mkdir(parents=True, exist_ok=True)
        t = time.monotonic()
        rows += scenario(ctx, workdir)
        print(f"   {name}: {time.monotonic() - t:.1f}s", flush=True)
    return rows


# -- helpers ----------------------------------------------------------------------------------------------


def _pool(backends: dict[str, MockBackend], **settings: Any) -> dict[str, Any]:
    spec: dict[str, dict[str, Any]] = {name: {"url": b.url} for name, b in backends.items()}
    for name, extra in settings.pop("per_backend", {}).items():
        spec[name].update(extra)
    return {POOL: {"match": {"prefix": "/v1/"}, "timeout": "20s", **settings, "backends": spec}}


def _hosts(cp: ControlPlane) -> dict[int, dict[str, Any]]:
    """Envoy's hosts of the pool by port: weight, health flags and per-host counters (admin /clusters)."""
    code, body = http_json("GET", f"{cp.admin}/clusters?format=json", timeout=2)
    if code != 200:
        raise RuntimeError(f"Envoy admin /clusters answered {code}")
    out: dict[int, dict[str, Any]] = {}
    for cluster in body.get("cluster_statuses", []):
        if cluster["name"] != POOL:
            continue
        for host in cluster.get("host_statuses", []):
            stats = {s["name"]: int(s.get("value", 0)) for s in host.get("stats", [])}
            out[host["address"]["socket_address"]["port_value"]] = {
                "weight": host.get("weight"), "health": host.get("health_status", {}), "stats": stats}
    return out


def _weights(cp: ControlPlane) -> dict[int, int]:
    return {port: h["weight"] for port, h in _hosts(cp).items()}


def _poll(condition: Callable[[], T], timeout: float, what: str, interval: float = POLL) -> tuple[T, float]:
    """Check `condition` every `interval` s; return its first truthy value and when (monotonic) it was seen."""
    value = wait_for(condition, timeout=timeout, interval=interval, what=what)
    return value, time.monotonic()


def _stable(read: Callable[[], T], quiet: float, timeout: float, what: str) -> T:
    """Wait until `read()` has not changed for `quiet` seconds: the baseline an event is measured against."""
    value, since = read(), time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return value
    raise RuntimeError(f"{what} did not settle within {timeout:g}s (last: {value})")


def _attempts(host: dict[str, Any]) -> int:
    """Every try Envoy made on a host: requests and connections (a connect to a dead port counts here)."""
    stats = host["stats"]
    return int(stats.get("rq_total", 0) + stats.get("cx_total", 0) + stats.get("cx_connect_fail", 0))


def _percentile(values: list[float], pct: float) -> float:
    """Nearest rank: with few samples p99 is the largest, which is the honest reading."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def _spread(values: list[float]) -> str:
    """How many samples a median is of, and their range: one sample of a timer-bound reaction says little."""
    if len(values) == 1:
        return "1 sample"
    return f"median of {len(values)}, min {min(values):.0f} ms, max {max(values):.0f} ms"


def _failures(load: Load) -> int:
    return load.total - load.statuses.get(200, 0)


def _failure_note(load: Load) -> str:
    note = f"{load.total} requests from 20 keep-alive clients"
    if load.failures:
        note += f"; first failure: {load.failures[0][:120]}"
    return note


def _mocks(started: list[Any], *names: str, args: list[str] | None = None) -> dict[str, MockBackend]:
    """Start mock backends, each recorded in `started` as soon as it runs, for the caller's finally."""
    out: dict[str, MockBackend] = {}
    for name in names:
        out[name] = MockBackend(name, args=args)
        started.append(out[name])
    return out


def _stop_all(started: list[Any]) -> None:
    """Stop every process started here, by PID, newest first, even if stopping one of them fails."""
    errors: list[BaseException] = []
    for proc in reversed(started):
        try:
            proc.stop()
        except Exception as exc:  # noqa: BLE001 - stop the others, then report
            errors.append(exc)
    if errors:
        raise errors[0]


# -- 1. a backend SIGKILLed under load ----------------------------------------------------------------------


def _killed_backend(ctx: Context, workdir: Path) -> list[Row]:
    """Envoy must stop sending to a dead backend by itself (retries + outlier detection), with no client error."""
    started: list[Any] = []
    try:
        backends = _mocks(started, "a", "b", "c")
        cp = ControlPlane(workdir, _pool(backends))
        started.append(cp)
        victim = backends["c"]
        load = Load(cp.listener, clients=20, max_seconds=120)
        started.append(load)  # stop() joins its clients
        load.__enter__()
        load.wait_requests(200 if ctx.smoke else 500)

        seen = first = _attempts(_hosts(cp)[victim.port])
        os.kill(victim.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        last_attempt = killed
        ejected_at: float | None = None
        quiet = 0.5 if ctx.smoke else 1.0  # no attempt for this long after ejection: Envoy has stopped
        polls = 0
        while True:
            host = _hosts(cp)[victim.port]
            now = time.monotonic()  # when the answer arrived: an upper bound for what it shows
            if now - killed > 30:
                raise RuntimeError("Envoy kept sending to the killed backend for 30 s (never ejected)")
            polls += 1
            count = _attempts(host)
            if count != seen:
                seen, last_attempt = count, now
            health = host["health"]
            if ejected_at is None and (health.get("failed_outlier_check") or health.get("failed_active_health_check")):
                ejected_at = now
            if ejected_at is not None and now - max(last_attempt, ejected_at) >= quiet:
                break
            time.sleep(POLL)
        poll_ms = (time.monotonic() - killed) / polls * 1000
        load.wait_requests(200 if ctx.smoke else 500)
        load.stop()
        failures = _failures(load)
        no_traffic_ms = (max(last_attempt, ejected_at) - killed) * 1000
        return [
            Row(PART, "killed backend: time until no traffic", round(no_traffic_ms, 1), "ms",
                note=f"last try Envoy made on the dead host ({seen - first} tries after the kill, per-host rq/cx "
                     f"counters in /clusters read every ~{poll_ms:.0f} ms); ejected by outlier detection after "
                     f"{(ejected_at - killed) * 1000:.0f} ms: its reset requests and refused connects are gateway "
                     "failures, and 3 in a row (consecutive_gateway_failure) eject at once, not on the 2 s interval"),
            Row(PART, "killed backend: client failures", failures, "count", target="0", met=failures == 0,
                note=_failure_note(load) + "; requests on the dead host are retried on another (previous_hosts)"),
        ]
    finally:
        _stop_all(started)


# -- 2. a config edit ------------------------------------------------------------------------------------


def _config_edits(ctx: Context, workdir: Path) -> list[Row]:
    """Edit a backend's weight in the file; time until Envoy holds the new weight."""
    started: list[Any] = []
    edits = 3 if ctx.smoke else 20
    rng = random.Random(8)
    try:
        backends = _mocks(started, "a", "b", "c")
        cp = ControlPlane(workdir, _pool(backends))
        started.append(cp)
        port = backends["a"].port
        times: list[float] = []
        for i in range(edits):
            # A random pause first: edits land at random points of the file poll's cycle, as an operator's do,
            # instead of locked to the moment just after the previous one was applied.
            time.sleep(rng.uniform(0, WATCH_INTERVAL))
            weight = 10 + i
            written = time.monotonic()
            cp.write_config(_pool(backends, per_backend={"a": {"weight": weight}}))
            def shows(w: int = weight) -> bool:
                return _weights(cp)[port] == w

            _, seen = _poll(shows, 10, f"Envoy to show weight {weight} after edit {i + 1}")
            times.append((seen - written) * 1000)
        p50, p99 = statistics.median(times), _percentile(times, 99)
        floor = min(times)
        why = (f"{_spread(times)}. The control plane polls the file every {WATCH_INTERVAL * 1000:.0f} ms (reload.py, "
               f"App watch_interval): an edit waits 0-{WATCH_INTERVAL * 1000:.0f} ms for the next poll; the fastest "
               f"({floor:.0f} ms, an edit just before a poll) is about what loading, building EDS and pushing take")
        held = "" if p99 <= 500 else "; missed: held back by the file poll interval, not the push"
        return [
            Row(PART, "config edit: applied by Envoy, p50", round(p50, 1), "ms", note=why),
            Row(PART, "config edit: applied by Envoy, p99", round(p99, 1), "ms", target="<= 500 ms p99",
                met=p99 <= 500, note=f"nearest rank over {edits} edits{held}"),
        ]
    finally:
        _stop_all(started)


# -- 3a. a deep-health degradation ------------------------------------------------------------------------


def _deep_health(ctx: Context, workdir: Path) -> list[Row]:
    """A backend reports `degraded` in its health JSON; time until Envoy's weight for it changes (and back)."""
    started: list[Any] = []
    rounds = 1 if ctx.smoke else 3
    probe, scoring = 1.0, 1.0
    rng = random.Random(8)
    try:
        backends = _mocks(started, "a", "b", "c")
        # smoothing 1.0: one scoring round takes the whole step, so the weights are settled one round later.
        settings = {"strategy": "health_aware", "deep_health": {"path": "/health", "interval": f"{probe:g}s"},
                    "scoring": {"interval": f"{scoring:g}s", "smoothing": 1.0}}
        cp = ControlPlane(workdir, _pool(backends, **settings))
        started.append(cp)
        victim = backends["b"]
        degrade: list[float] = []
        recover: list[float] = []
        for _ in range(rounds):
            for status, out in (("degraded", degrade), ("healthy", recover)):
                before = _stable(lambda: _weights(cp), quiet=scoring * 1.2, timeout=30, what="Envoy's weights")
                # At a random point of the probe and scoring cycles, not locked to the last change.
                time.sleep(rng.uniform(0, max(probe, scoring)))
                changed_at = time.monotonic()
                code, body = http_json("POST", f"{victim.url}/admin/config", {"health_status": status})
                if code != 200:
                    raise RuntimeError(f"mock backend refused health_status={status}: {code} {body}")
                def moved(b: dict[int, int] = before) -> bool:
                    return _weights(cp)[victim.port] != b[victim.port]

                _, seen = _poll(moved, 15, f"Envoy's weight for the {status} backend to change")
                out.append((seen - changed_at) * 1000)
        bound = (f"bounded by deep_health.interval {probe:g} s (+ the prober's {PROBE_TICK * 1000:.0f} ms tick) "
                 f"+ scoring.interval {scoring:g} s: at most ~{(probe + PROBE_TICK + scoring) * 1000:.0f} ms")
        return [
            Row(PART, "deep health degraded: time until weight changes", round(statistics.median(degrade), 1), "ms",
                note=f"{_spread(degrade)}; strategy health_aware; {bound}"),
            Row(PART, "deep health recovered: time until weight changes", round(statistics.median(recover), 1), "ms",
                note=f"{_spread(recover)}; back to healthy; same bound"),
        ]
    finally:
        _stop_all(started)


# -- 3b. a budget crossing --------------------------------------------------------------------------------


def _budget(ctx: Context, workdir: Path) -> list[Row]:
    """Spend a known amount per request until the hourly budget is crossed; time until Envoy shifts traffic.

    Each further round raises the budget in the file (Envoy's weights return to normal) and crosses it again.
    """
    started: list[Any] = []
    scoring = 1.0
    rounds = 1 if ctx.smoke else 3
    rng = random.Random(8)
    tokens = ["--prompt-tokens", "100", "--completion-tokens", "100"]  # 200 tokens: cost = 0.2 x price per 1k
    price = {"cheap": 0.5, "dear": 5.0}
    per_request = {name: 0.2 * p for name, p in price.items()}  # 0.1 and 1.0
    step = 3.0  # each round's budget: a handful of requests
    costs = {name: {"cost": {"input_per_1k": p, "output_per_1k": p}} for name, p in price.items()}

    def pools(hourly: float) -> dict[str, Any]:
        return _pool(backends, strategy="round_robin", scoring={"interval": f"{scoring:g}s"},
                     budget={"hourly": hourly, "on_exhausted": "shift_to_cheapest"}, per_backend=costs)

    try:
        backends = _mocks(started, *price, args=tokens)
        # Budgets are per calendar hour: do not start where the window would reset mid-measurement.
        left = 3600 - time.time() % 3600
        if left < 90:
            time.sleep(left + 1)
        hourly = step
        cp = ControlPlane(workdir, pools(hourly))
        started.append(cp)
        normal = _stable(lambda: _weights(cp), quiet=scoring * 1.2, timeout=20, what="Envoy's weights")
        spent, times, counts = 0.0, [], []
        conn = http.client.HTTPConnection(cp.listener, timeout=20)
        try:
            for r in range(rounds):
                if r:
                    hourly = spent + step
                    cp.write_config(pools(hourly))
                    _poll(lambda: _weights(cp) == normal, 15, "Envoy's weights back to normal after raising the budget")
                    _stable(lambda: _weights(cp), quiet=scoring * 1.2, timeout=20, what="Envoy's weights")
                time.sleep(rng.uniform(0, scoring))  # cross at a random point of the scoring cycle
                sent = 0
                while spent < hourly:
                    if sent > 10 * step / min(per_request.values()):
                        raise RuntimeError(f"sent {sent} requests without crossing the budget of {hourly:g}")
                    conn.request("POST", "/v1/chat/completions", body=chat_body(),
                                 headers={"content-type": "application/json"})
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"a request answered {resp.status} before the budget was crossed")
                    sent += 1
                    spent += per_request[resp.getheader("x-backend", "?")]
                crossed = time.monotonic()
                _, seen = _poll(lambda: _weights(cp) != normal, 15,
                                "Envoy's weights to change after the budget crossing")
                times.append((seen - crossed) * 1000)
                counts.append(sent)
                code, cost = http_json("GET", f"{cp.api}/v1/cost")
                window = cost["pools"][POOL]["budget"][0] if code == 200 else {}
                if not window.get("exhausted"):
                    raise RuntimeError(f"weights changed but the budget is not reported exhausted: {window}")
        finally:
            conn.close()
        return [Row(PART, "budget crossed: time until weights change", round(statistics.median(times), 1), "ms",
                    note=f"{_spread(times)}, each a budget of {step:g} crossed by "
                         f"requests costing 0.1 or 1.0, on_exhausted shift_to_cheapest; bounded by the access log "
                         f"flush ({ALS_FLUSH * 1000:.0f} ms) + scoring.interval {scoring:g} s (budgets are checked "
                         "on each scoring round)")]
    finally:
        _stop_all(started)


# -- 4. the control plane SIGKILLed under load and restarted --------------------------------------------


def _controlplane_restart(ctx: Context, workdir: Path) -> list[Row]:
    """Envoy runs on its own; the control plane dies under load and comes back: no client may notice."""
    started: list[Any] = []
    down = 1.0 if ctx.smoke else 3.0
    try:
        backends = _mocks(started, "a", "b", "c")
        cp = ControlPlane(workdir, _pool(backends), extra_args=["--no-envoy"], start=False)
        envoy = StandaloneEnvoy(workdir, cp.config_path)
        started += [envoy, cp]
        cp.start()
        _poll(lambda: "standalone" in cp.status()["in_sync"], 20, "the standalone Envoy in sync")

        def connected() -> int:
            return cp.envoy_stats("control_plane.connected_state")["control_plane.connected_state"]

        load = Load(cp.listener, clients=20, max_seconds=120)
        started.append(load)
        load.__enter__()
        load.wait_requests(200 if ctx.smoke else 500)
        os.kill(cp.proc.pid, signal.SIGKILL)
        cp.proc.wait()
        cp.stop()  # already dead: only closes its log
        _, lost_at = _poll(lambda: connected() == 0, 20, "Envoy to notice the control plane is gone", interval=0.01)
        # Down for a while, as a crashed process is before its supervisor restarts it; Envoy serves alone on its
        # last config meanwhile, and its reconnect backoff grows.
        time.sleep(down)
        load.wait_requests(100)

        # start() blocks until it sees a node in sync (0.1 s polls); time it from here at a finer grain.
        failed: list[BaseException] = []

        def start() -> None:
            try:
                cp.start()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, in the measuring thread
                failed.append(exc)

        starter = threading.Thread(target=start, daemon=True)
        restarted = time.monotonic()
        starter.start()
        _, api_at = _poll(lambda: cp.status(), 30, "the restarted control plane's API", interval=0.01)
        _, synced = _poll(lambda: "standalone" in cp.status()["in_sync"], 30,
                          "the standalone Envoy back in sync", interval=0.01)
        starter.join(40)
        if failed:
            raise failed[0]
        load.wait_requests(200 if ctx.smoke else 500)
        load.stop()
        if envoy.proc.poll() is not None:
            raise RuntimeError("the standalone Envoy died while the control plane was down")
        failures = _failures(load)
        total_ms, api_ms = (synced - restarted) * 1000, (api_at - restarted) * 1000
        return [
            Row(PART, "control plane killed: client failures", failures, "count", target="0", met=failures == 0,
                note=_failure_note(load) + f"; Envoy served alone on its last config for "
                     f"{synced - lost_at:.1f} s (control plane down {down:g} s, then its start-up)"),
            Row(PART, "control plane restarted: time until Envoy in sync", round(total_ms, 1), "ms",
                note=f"from the new process's start: its API answered after {api_ms:.0f} ms (Python start-up, "
                     f"imports, config); Envoy reconnected and ACKed every type {total_ms - api_ms:.0f} ms later "
                     "(xDS reconnect backoff 0.25-2 s, jittered)"),
        ]
    finally:
        _stop_all(started)
