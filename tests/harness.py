"""Real processes on loopback for end-to-end tests: mock backends, the control plane, Envoy.

Every process is started with its own free ports and stopped by its PID.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
_port_lock = threading.Lock()
_handed_out: set[int] = set()


def free_port() -> int:
    """A port nobody listens on now, never handed out twice by this process."""
    with _port_lock:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def wait_for(condition: Callable[[], T], timeout: float = 20.0, interval: float = 0.1, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))


def stop_pid(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def running(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: nobody may reap an orphan's corpse here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def http_json(method: str, url: str, body: Any = None, timeout: float = 5.0) -> tuple[int, Any]:
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    path = "/" + url.split("//", 1)[1].split("/", 1)[1]
    conn = http.client.HTTPConnection(host_port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"content-type": "application/json"} if data else {})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode(errors="replace")
    finally:
        conn.close()


class MockBackend:
    def __init__(self, name: str, port: int | None = None, args: list[str] | None = None, env: dict[str, str] | None = None):
        self.name = name
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane.demo.mockbackend", "--port", str(self.port), "--name", name, *(args or [])],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})},
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if "listening" not in line:
            stop_pid(self.proc)
            raise RuntimeError(f"mock backend {name} did not start: {line!r}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_pid(self.proc)


class ControlPlane:
    """`python -m controlplane run` as a child process, with its supervised Envoy."""

    def __init__(
        self,
        tmp: Path,
        pools: dict[str, Any] | None,
        env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
        ports: dict[str, int] | None = None,
        start: bool = True,
    ):
        """Write the config and start `run` (unless `start=False`: then call `start()`)."""
        self.tmp = tmp
        self.ports = ports or {k: free_port() for k in ("listener", "admin", "xds", "api")}
        self.config_path = tmp / "config.yaml"
        if pools is not None:
            self.write_config(pools)
        self.log_path = tmp / "controlplane.log"
        self.env = {**os.environ, **(env or {})}
        self.args = [sys.executable, "-m", "controlplane", "run", "--config", str(self.config_path),
                     "--state-dir", str(tmp / "state"), *(extra_args or [])]
        if start:
            self.start()

    def start(self) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        try:
            wait_for(lambda: self.status()["in_sync"], timeout=30, what="Envoy to accept the first snapshot")
            wait_for(self.listener_up, timeout=15, what="Envoy's listener")
        except BaseException:
            self.stop()
            raise

    def document(self, pools: dict[str, Any]) -> dict[str, Any]:
        p = self.ports
        return {
            "envoy": {
                "listener": {"address": "127.0.0.1", "port": p["listener"]},
                "admin": {"address": "127.0.0.1", "port": p["admin"]},
                "concurrency": 2,
            },
            "controlplane": {
                "xds": {"address": "127.0.0.1", "port": p["xds"]},
                "api": {"address": "127.0.0.1", "port": p["api"]},
            },
            "pools": pools,
        }

    def write_config(self, pools: dict[str, Any] | None = None, text: str | None = None) -> None:
        """Replace the file atomically, as editors do."""
        content = text if text is not None else yaml.safe_dump(self.document(pools or {}), sort_keys=False)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(content, encoding="utf-8")
        tmp.replace(self.config_path)

    @property
    def listener(self) -> str:
        return f"127.0.0.1:{self.ports['listener']}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.ports['admin']}"

    def status(self) -> dict[str, Any]:
        code, body = http_json("GET", f"{self.api}/v1/status")
        assert code == 200 and isinstance(body, dict), body
        return body

    def listener_up(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.ports["listener"])) == 0

    def wait_applied(self, timeout: float = 20.0) -> dict[str, Any]:
        """Wait until the file on disk is live and every Envoy acknowledged the snapshot."""
        from controlplane.controllers.reload import digest as file_digest

        digest = file_digest(self.config_path.read_bytes())

        def applied() -> dict[str, Any]:
            status = self.status()
            ok = status["config"]["version"] == digest and status["in_sync"]
            return status if ok else {}

        return wait_for(applied, timeout=timeout, what="the config edit to be applied and acknowledged")

    def wait_rejected(self, timeout: float = 20.0) -> dict[str, Any]:
        return wait_for(
            lambda: (s := self.status())["config"]["last_edit"] == "rejected" and s,
            timeout=timeout, what="the config edit to be rejected",
        )

    def envoy_stats(self, prefix: str = "") -> dict[str, int]:
        """Envoy's counters and gauges (admin /stats), by name."""
        code, body = http_json("GET", f"{self.admin}/stats?format=json&filter={prefix}")
        assert code == 200, body
        return {s["name"]: s["value"] for s in body["stats"] if "value" in s}

    def envoy_hosts(self, cluster: str) -> dict[int, dict[str, Any]]:
        """Envoy's view of a cluster's hosts (admin /clusters), keyed by port."""
        code, body = http_json("GET", f"{self.admin}/clusters?format=json")
        assert code == 200, body
        out = {}
        for status in body.get("cluster_statuses", []):
            if status["name"] != cluster:
                continue
            for host in status.get("host_statuses", []):
                port = host["address"]["socket_address"]["port_value"]
                out[port] = {"weight": host.get("weight"), "priority": host.get("priority", 0),
                             "health": host.get("health_status", {})}
        return out

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if hasattr(self, "proc"):
            stop_pid(self.proc)
            self._log.close()


class StandaloneEnvoy:
    """An Envoy run on its own from `controlplane bootstrap`, as in compose."""

    def __init__(self, tmp: Path, config_path: Path):
        from controlplane.envoyproc import find_envoy

        self.bootstrap = tmp / "standalone-bootstrap.json"
        token = tmp / "state" / "xds-token"
        if not token.exists():  # the control plane (run --no-envoy) keeps a token it finds there
            token.parent.mkdir(parents=True, exist_ok=True)
            token.write_text(secrets.token_hex(32) + "\n")
            token.chmod(0o600)
        subprocess.run(
            [sys.executable, "-m", "controlplane", "bootstrap", "--config", str(config_path),
             "--node-id", "standalone", "-o", str(self.bootstrap),
             "--token-file", str(token)],
            cwd=ROOT, check=True, capture_output=True, timeout=60,
        )
        self._log = open(tmp / "standalone-envoy.log", "ab")
        self.proc = subprocess.Popen(
            [find_envoy(), "-c", str(self.bootstrap), "--disable-hot-restart", "--concurrency", "2"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        stop_pid(self.proc)
        self._log.close()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m controlplane ARGS`, with `env` on top of this process's environment."""
    return subprocess.run([sys.executable, "-m", "controlplane", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def stream_from(conn: http.client.HTTPConnection, backend: str, tries: int = 20) -> http.client.HTTPResponse:
    """A streamed completion open on `backend` (its first event read): streams are asked for until one lands
    there, the others read to their end."""
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "long story"}]})
    for _ in range(tries):
        conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
        stream = conn.getresponse()
        if stream.getheader("x-backend") == backend:
            break
        stream.read()
    assert stream.getheader("x-backend") == backend
    assert stream.readline().startswith(b"data: ")
    return stream


def chat_body(stream: bool = False, model: str = "mock-model") -> bytes:
    return json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hello"}]}).encode()


def spread(listener: str, total: int, clients: int = 8, path: str = "/v1/chat/completions") -> tuple[Counter[str], Counter[int]]:
    """Send `total` completions over `clients` keep-alive connections; count backends and statuses."""
    per_client = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]

    def run(count: int) -> tuple[Counter[str], Counter[int]]:
        backends: Counter[str] = Counter()
        statuses: Counter[int] = Counter()
        conn = http.client.HTTPConnection(listener, timeout=10)
        try:
            for _ in range(count):
                try:
                    conn.request("POST", path, body=chat_body(), headers={"content-type": "application/json"})
                    resp = conn.getresponse()
                    resp.read()
                    statuses[resp.status] += 1
                    backends[resp.getheader("x-backend", "?")] += 1
                except (OSError, http.client.HTTPException):
                    statuses[0] += 1  # connection-level failure
                    conn.close()
                    conn = http.client.HTTPConnection(listener, timeout=10)
        finally:
            conn.close()
        return backends, statuses

    backends: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    with ThreadPoolExecutor(clients) as pool:
        for b, s in pool.map(run, per_client):
            backends.update(b)
            statuses.update(s)
    return backends, statuses


class Load:
    """`clients` keep-alive clients sending completions until stopped; every outcome is counted."""

    def __init__(self, listener: str, clients: int = 20, max_seconds: float = 60.0, timeout: float = 30.0,
                 model: str = "mock-model"):
        self.listener = listener
        self.body = chat_body(model=model)
        self.max_seconds = max_seconds
        self.timeout = timeout
        self.backends: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.statuses.values())

    def wait_requests(self, count: int, timeout: float = 30.0) -> None:
        start = self.total
        wait_for(lambda: self.total >= start + count, timeout=timeout, what=f"{count} more requests")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)

    def _client(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        conn = http.client.HTTPConnection(self.listener, timeout=self.timeout)
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                conn.request("POST", "/v1/chat/completions", body=self.body, headers={"content-type": "application/json"})
                resp = conn.getresponse()
                body = resp.read()
                with self._lock:
                    self.statuses[resp.status] += 1
                    self.backends[resp.getheader("x-backend", "?")] += 1
                    if resp.status != 200 and len(self.failures) < 20:
                        self.failures.append(f"{resp.status}: {body[:200]!r} flags={resp.getheader('x-envoy-response-flags')}")
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.statuses[0] += 1
                    if len(self.failures) < 20:
                        self.failures.append(f"connection: {exc!r}")
                conn.close()
                conn = http.client.HTTPConnection(self.listener, timeout=self.timeout)
        conn.close()


class WebhookReceiver:
    """A local webhook: records every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        lock = self.lock = threading.Lock()
        posts, raw = self.posts, self.raw

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                with lock:
                    raw.append(body)
                    posts.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, where: Callable[[dict[str, Any]], bool] = lambda _: True) -> list[dict[str, Any]]:
        with self.lock:
            return [p for p in self.posts if where(p)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
