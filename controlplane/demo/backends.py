"""`run --mock-backends`: start the demo's mock backends for every plain-HTTP loopback backend."""

from __future__ import annotations

import ipaddress
import logging
import subprocess
import sys
import time
from pathlib import Path

from ..config import Config

log = logging.getLogger("controlplane.demo")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start_mock_backends(config: Config, log_dir: Path) -> list[subprocess.Popen[bytes]]:
    procs: list[subprocess.Popen[bytes]] = []
    started: set[tuple[str, int]] = set()
    log_dir.mkdir(parents=True, exist_ok=True)
    for pool in config.pools.values():
        for name, backend in pool.backends.items():
            where = (backend.host, backend.port)
            if backend.tls or not _loopback(backend.host) or where in started:
                continue
            started.add(where)
            with open(log_dir / f"mock-{name}.log", "ab") as sink:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "controlplane.demo.mockbackend",
                         "--host", "127.0.0.1" if backend.host == "localhost" else backend.host,
                         "--port", str(backend.port), "--name", name],
                        stdin=subprocess.DEVNULL, stdout=sink, stderr=sink,
                    )
                )
            log.info("mock backend %s on %s:%d (pid %d)", name, backend.host, backend.port, procs[-1].pid)
    return procs


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 5.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
