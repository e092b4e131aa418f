"""What every part of the benchmark shares: results, tools on PATH, processes by PID, /proc readings.

Every figure is measured in the run that reports it, next to its baseline
(direct, plain Envoy), because the machines here are shared and noisy.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.harness import free_port, stop_pid, wait_for

__all__ = ["Context", "Missing", "Nginx", "Row", "free_port", "metric_value", "need", "proc_cpu_seconds",
           "proc_rss_mb", "stop_pid", "wait_for", "wrk"]

ROOT = Path(__file__).resolve().parent.parent
CHAT_BODY = b'{"model":"bench","messages":[{"role":"user","content":"hello"}]}'
# A fixed OpenAI-style answer with a usage block, as the fast backend's reply.
COMPLETION = ('{"id":"bench","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
              '"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":30,'
              '"total_tokens":42}}')
DEBIAN = {"wrk": "wrk", "nginx": "nginx"}


class Missing(RuntimeError):  # noqa: N818 - reads as "raise Missing(...)"
    """A tool the benchmark needs is not installed: says which Debian package brings it."""


def need(tool: str) -> str:
    found = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.access(f"/usr/sbin/{tool}", os.X_OK) else None)
    if not found:
        raise Missing(f"'{tool}' is not installed: apt-get install {DEBIAN.get(tool, tool)} "
                      "(.ci/run installs it; see README, Performance)")
    return found


@dataclass
class Row:
    """One measured figure, with its target when the issue sets one; a missed target says what holds it back."""

    part: str
    metric: str
    value: float | None
    unit: str
    target: str | None = None
    met: bool | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Context:
    smoke: bool = False  # a few seconds per part: proves the bench runs (CI), not what it measures
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="llm-lb-bench-")))

    @property
    def seconds(self) -> float:
        """How long each load measurement runs."""
        return 1.0 if self.smoke else 5.0


# -- processes ------------------------------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc, no sampling)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric_value(api: str, name: str) -> float:
    """One unlabelled sample from the control plane's /metrics."""
    with urllib.request.urlopen(f"{api}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    if match is None:
        raise LookupError(f"no {name} in /metrics")
    return float(match.group(1))


class Nginx:
    """A fast static backend: answers every request with the same completion, on each of `ports`."""

    def __init__(self, workdir: Path, ports: list[int]) -> None:
        binary = need("nginx")
        self.ports = ports
        prefix = workdir / f"nginx-{ports[0]}"
        prefix.mkdir(parents=True, exist_ok=True)
        listens = "".join(f"    listen 127.0.0.1:{p};\n" for p in ports)
        body = COMPLETION.replace("'", "\\'")
        conf = prefix / "nginx.conf"
        conf.write_text(f"""worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  keepalive_requests 100000000;
  server {{
{listens}    location / {{
      default_type application/json;
      return 200 '{body}';
    }}
  }}
}}
""")
        self.proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(prefix)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: _answers(ports[0]), timeout=10, what="nginx to answer")
        except BaseException:
            self.stop()
            raise

    def url(self, i: int = 0) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def stop(self) -> None:
        stop_pid(self.proc)


def _answers(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as resp:
        return bool(resp.status == 200)


# -- load -------------------------------------------------------------------------------------------------

_WRK_SCRIPT = """wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx/3xx answers plus socket errors


def wrk(url: str, connections: int, seconds: float, workdir: Path, threads: int = 1) -> WrkResult:
    """Closed-loop load from wrk (POSTing a chat completion); latency percentiles from --latency."""
    script = workdir / "post.lua"
    script.write_text(_WRK_SCRIPT % CHAT_BODY.decode())
    out = subprocess.run(
        [need("wrk"), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
         "-s", str(script), url],
        capture_output=True, text=True, timeout=seconds + 60, check=True,
    ).stdout
    pct = {m.group(1): float(m.group(2)) * _UNITS[m.group(3)]
           for m in re.finditer(r"^\s+(50|99)%\s+([0-9.]+)(us|ms|s|m)\s*$", out, re.MULTILINE)}
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    return WrkResult(rps, pct["50"], pct["99"], requests, errors)


def settle(seconds: float = 0.5) -> None:
    """A pause between measurements, so one's tail does not land in the next."""
    time.sleep(seconds)
