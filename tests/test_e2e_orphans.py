"""A managed Envoy never outlives its control plane (issue 10, item 6).

An orphaned Envoy keeps the listener and admin ports, and the next control plane's Envoy would loop on
"cannot bind" forever. The child gets a parent-death signal; a pid file catches an orphan that missed it.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane import envoyproc
from controlplane.envoyproc import EnvoyProcess, find_envoy

from .harness import ControlPlane, MockBackend, chat_body, http_json, running, wait_for


def pools(a: MockBackend) -> dict:
    return {"chat": {"match": {"prefix": "/v1/"}, "backends": {"a": {"url": a.url}}}}


def envoys_with(bootstrap: Path) -> list[int]:
    """Pids of the running envoy processes started with this bootstrap (scans /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = [a.decode() for a in (entry / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if "-c" not in args or args.index("-c") + 1 >= len(args):
            continue
        config = args[args.index("-c") + 1]
        if Path(config) == bootstrap and any(Path(a).name == "envoy" for a in args[:args.index("-c")]):
            if running(int(entry.name)):
                found.append(int(entry.name))
    return sorted(found)


def completion(cp: ControlPlane) -> int:
    conn = http.client.HTTPConnection(cp.listener, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", body=chat_body(), headers={"content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def kill_stragglers(bootstrap: Path) -> None:
    for pid in envoys_with(bootstrap):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.e2e
def test_envoy_dies_with_a_killed_control_plane_and_the_next_one_serves(tmp_path, mocks):
    a = mocks("a")
    cp = ControlPlane(tmp_path, pools(a))
    state = tmp_path / "state"
    bootstrap = state / "envoy-bootstrap.json"
    try:
        assert completion(cp) == 200
        old = cp.status()["envoy"]["pid"]
        assert old and int((state / "envoy.pid").read_text()) == old
        assert envoys_with(bootstrap) == [old]

        os.kill(cp.proc.pid, signal.SIGKILL)
        cp.proc.wait()
        cp._log.close()
        wait_for(lambda: not running(old), timeout=15, what="the killed control plane's Envoy to exit")

        cp.start()  # the same state dir and ports
        wait_for(lambda: completion(cp) == 200, timeout=20, what="the new Envoy to serve")
        status = cp.status()["envoy"]
        assert status["pid"] != old and status["restarts"] == 0, status
        assert envoys_with(bootstrap) == [status["pid"]]
        assert "an orphan from an earlier run" not in cp.log_text(), "the death signal stopped it; the pid file had nothing to do"
    finally:
        cp.stop()
        kill_stragglers(bootstrap)


@pytest.mark.e2e
def test_an_orphan_named_in_the_pid_file_is_stopped_before_envoy_starts(tmp_path, mocks):
    a = mocks("a")
    cp = ControlPlane(tmp_path, pools(a))
    state = tmp_path / "state"
    bootstrap = state / "envoy-bootstrap.json"
    pid_file = state / "envoy.pid"
    orphan: subprocess.Popen[bytes] | None = None
    try:
        assert completion(cp) == 200
        cp.stop()
        assert not pid_file.exists(), "a clean stop removes the pid file"
        assert envoys_with(bootstrap) == [], "a clean stop leaves no Envoy behind"

        # An Envoy that missed its death signal: not our child, in its own session, holding the admin port.
        with open(tmp_path / "orphan-envoy.log", "ab") as sink:
            orphan = subprocess.Popen(
                [find_envoy(), "-c", str(bootstrap), "--disable-hot-restart", "--concurrency", "1"],
                stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            )
        pid_file.write_text(f"{orphan.pid}\n")
        wait_for(lambda: http_json("GET", f"{cp.admin}/ready")[0] in (200, 503), timeout=20,
                 what="the orphan to hold the admin port")
        assert envoys_with(bootstrap) == [orphan.pid]

        cp.start()
        assert orphan.wait(timeout=15) is not None
        wait_for(lambda: completion(cp) == 200, timeout=20, what="the new Envoy to serve")
        status = cp.status()["envoy"]
        assert status["restarts"] == 0, status
        assert envoys_with(bootstrap) == [status["pid"]]
        assert int(pid_file.read_text()) == status["pid"]
        assert f"stopping envoy pid {orphan.pid}, an orphan from an earlier run" in cp.log_text()
    finally:
        cp.stop()
        if orphan is not None and orphan.poll() is None:
            orphan.kill()
            orphan.wait()
        kill_stragglers(bootstrap)


# Without Envoy: a stand-in `envoy` script (a Python process that sleeps) shows which processes are stopped.


def fake_envoy(tmp_path: Path) -> Path:
    script = tmp_path / "bin" / "envoy"
    script.parent.mkdir()
    script.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(120)\n")
    script.chmod(0o755)
    return script


def test_the_pid_file_never_stops_a_process_that_is_not_our_envoy(tmp_path):
    bootstrap = tmp_path / "envoy-bootstrap.json"
    bootstrap.write_text("{}")
    pid_file = tmp_path / "envoy.pid"
    envoy = EnvoyProcess(bootstrap, tmp_path / "envoy.log", binary=str(fake_envoy(tmp_path)), pid_file=pid_file)
    strangers = [
        subprocess.Popen(["sleep", "60"]),
        # the envoy binary, but another bootstrap: another control plane's Envoy
        subprocess.Popen([envoy.binary, "-c", str(tmp_path / "other.json")]),
        # our bootstrap, but not envoy
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-c", str(bootstrap)]),
    ]
    try:
        for proc in strangers:
            wait_for(lambda p=proc: Path(f"/proc/{p.pid}/cmdline").read_bytes().count(b"\0") > 1,
                     what="the process to exec")
            pid_file.write_text(f"{proc.pid}\n")
            assert not envoy.is_ours(proc.pid)
            asyncio.run(envoy.stop_orphan(timeout=1))
            assert proc.poll() is None, f"{proc.args} was stopped"
    finally:
        for proc in strangers:
            proc.kill()
            proc.wait()


def test_an_orphan_is_stopped_the_pid_file_follows_the_child_and_goes_on_a_clean_stop(tmp_path):
    bootstrap = tmp_path / "envoy-bootstrap.json"
    bootstrap.write_text("{}")
    pid_file = tmp_path / "envoy.pid"
    binary = fake_envoy(tmp_path)
    # Started from the state dir with a relative bootstrap path: matched through the process's cwd.
    orphan = subprocess.Popen([str(binary), "-c", bootstrap.name], cwd=tmp_path, start_new_session=True)
    calls: list[int | None] = []
    envoy = EnvoyProcess(bootstrap, tmp_path / "envoy.log", binary=str(binary), pid_file=pid_file)
    envoy.before_spawn = lambda: calls.append(orphan.poll())

    async def run() -> None:
        pid_file.write_text(f"{orphan.pid}\n")
        wait_for(lambda: envoy.is_ours(orphan.pid), what="the orphan to look like our Envoy")
        await envoy.start()
        assert envoy.pid is not None and int(pid_file.read_text()) == envoy.pid
        assert envoy.is_ours(envoy.pid)
        await envoy.stop()

    try:
        asyncio.run(run())
        assert orphan.wait(timeout=5) == -signal.SIGTERM
        assert calls == [-signal.SIGTERM], "before_spawn ran once, after the orphan was gone"
        assert not pid_file.exists()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_the_child_gets_sigterm_when_its_parent_is_killed(tmp_path):
    """The parent-death signal, without Envoy: a parent process running EnvoyProcess is SIGKILLed."""
    bootstrap = tmp_path / "envoy-bootstrap.json"
    bootstrap.write_text("{}")
    binary = fake_envoy(tmp_path)
    code = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from controlplane.envoyproc import EnvoyProcess\n"
        "async def main():\n"
        f"    e = EnvoyProcess(Path({str(bootstrap)!r}), Path({str(tmp_path / 'envoy.log')!r}), binary={str(binary)!r})\n"
        "    await e.start()\n"
        "    print(e.pid, flush=True)\n"
        "    await asyncio.sleep(120)\n"
        "asyncio.run(main())\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                              stdout=subprocess.PIPE, text=True)
    child = None
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert running(child)
        parent.kill()
        parent.wait()
        wait_for(lambda: not running(child), timeout=10, what="the child to die with its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and running(child):
            os.kill(child, signal.SIGKILL)


def test_without_proc_the_command_line_comes_from_ps(tmp_path, monkeypatch):
    """The pid-file check where there is no /proc (macOS): `ps` gives the command line."""
    monkeypatch.setattr(envoyproc, "_PROC", tmp_path / "no-proc")
    bootstrap = tmp_path / "envoy-bootstrap.json"
    bootstrap.write_text("{}")
    binary = fake_envoy(tmp_path)
    envoy = EnvoyProcess(bootstrap, tmp_path / "envoy.log", binary=str(binary))
    ours = subprocess.Popen([str(binary), "-c", str(bootstrap)])
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        wait_for(lambda: envoy.is_ours(ours.pid), what="ps to show our fake Envoy")
        assert not envoy.is_ours(stranger.pid)
    finally:
        for proc in (ours, stranger):
            proc.kill()
            proc.wait()
