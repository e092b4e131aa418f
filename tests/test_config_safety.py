"""Hostile or careless config files: refused quickly and plainly, never a hang, a crash or an echoed secret."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from controlplane.config import ConfigError, load_config, parse_config, read_yaml
from controlplane.config.loader import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH
from controlplane.controllers import reload as reload_module

from .harness import ROOT, ControlPlane, Load, MockBackend, http_json, wait_for
from .test_reload import ONE, TWO
from .test_reload import setup as live_reloader


def bomb(levels: int) -> str:
    """A "billion laughs": each level nine aliases of the one before; 9 levels: 324 bytes, 9**9 strings.

    The full bomb runs only in processes with capped memory (a regression must not take the test machine
    down); in-process tests use a small one, which the loader refuses just the same.
    """
    return 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(levels - 1)
    )


BOMB, SMALL_BOMB = bomb(9), bomb(3)
DEEP_FLOW = "pools: " + "[" * 5000 + "]" * 5000 + "\n"
DEEP_BLOCK = "pools:\n" + "  " + "- " * 5000 + "x\n"
SECRET = "sk-distinctive-0123456789abcdef"


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="pools.yaml", env=env or {})
    return info.value.errors


def nested(depth: int) -> str:
    """A YAML document whose collections nest exactly `depth` levels (the top-level mapping is one)."""
    return "k: " + "[" * (depth - 1) + "]" * (depth - 1) + "\n"


# --- the loader -----------------------------------------------------------------------------------------


def test_alias_bomb_is_refused_naming_file_and_line() -> None:
    assert len(BOMB) < 500
    errors = errors_of(SMALL_BOMB)
    assert errors == ["pools.yaml:1: YAML anchors and aliases are not allowed (write each value out in full)"]


@pytest.mark.parametrize("text,line", [
    ("base: &b {url: 'http://127.0.0.1:1'}\npools: {}\n", 1),  # an anchor alone
    ("pools:\n  chat:\n    backends:\n      a: {<<: *b}\n", 4),  # an alias alone (and a merge key)
])
def test_any_anchor_or_alias_is_refused(text: str, line: int) -> None:
    assert errors_of(text) == [f"pools.yaml:{line}: YAML anchors and aliases are not allowed (write each value out "
                               "in full)"]


def test_validate_refuses_the_bomb_with_bounded_memory(tmp_path: Path) -> None:
    """`validate` in a process capped at 1 GiB of address space: expanding the bomb would need gigabytes."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    result = subprocess.run([sys.executable, "-m", "controlplane", "validate", str(bomb)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, preexec_fn=cap_memory)
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"{bomb}:1: YAML anchors and aliases are not allowed" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("text,line", [(DEEP_FLOW, 1), (DEEP_BLOCK, 2)], ids=["flow", "block"])
def test_deep_nesting_is_a_depth_error_not_a_recursion_error(text: str, line: int) -> None:
    errors = errors_of(text)
    assert errors == [f"pools.yaml:{line}: nested deeper than {MAX_CONFIG_DEPTH} levels"]


def test_depth_cap_is_exact() -> None:
    read_yaml(nested(MAX_CONFIG_DEPTH), "n.yaml", "x", "k")
    with pytest.raises(ConfigError) as info:
        read_yaml(nested(MAX_CONFIG_DEPTH + 1), "n.yaml", "x", "k")
    assert info.value.errors == [f"n.yaml:1: nested deeper than {MAX_CONFIG_DEPTH} levels"]


def test_validate_refuses_a_deep_file_without_a_traceback(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text(DEEP_BLOCK)
    result = subprocess.run([sys.executable, "-m", "controlplane", "validate", str(deep)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and f"{deep}:2: nested deeper than" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "RecursionError" not in result.stderr


def test_oversize_file_is_refused_naming_file_and_cap(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(TWO + "#" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(big, env={})
    assert info.value.errors == [f"{big}: file is larger than {MAX_CONFIG_BYTES} bytes (1 MiB), the most a config "
                                 "may be"]
    exact = tmp_path / "exact.yaml"
    exact.write_text(TWO + "#" * (MAX_CONFIG_BYTES - len(TWO) - 1) + "\n")
    assert exact.stat().st_size == MAX_CONFIG_BYTES
    load_config(exact, env={})  # the cap itself is allowed
    assert "larger than" in errors_of("x" * (MAX_CONFIG_BYTES + 1))[0], "the text cap holds without a file too"


def test_a_value_yaml_cannot_build_is_a_config_error() -> None:
    errors = errors_of(TWO + "huge: " + "9" * 6000 + "\n")
    assert len(errors) == 1 and errors[0].startswith("pools.yaml: YAML value cannot be read")


@pytest.mark.parametrize("field,written", [
    ("quality", "${Q}"),  # a number field: pydantic would show the input
    ("weight", "${Q}"),
    ("model", "${Q} x"),  # a validator that quotes the value
    ("expected_latency_ms", "x-${Q}"),  # part of a value
])
def test_errors_show_values_as_written_never_substituted(field: str, written: str) -> None:
    text = TWO.replace('a: {url: "http://127.0.0.1:9001"}', f'a: {{url: "http://127.0.0.1:9001", {field}: "{written}"}}')
    errors = "\n".join(errors_of(text, env={"Q": SECRET}))
    assert f"field {field!r}" in errors and written in errors, errors
    assert SECRET not in errors and "0123456789abcdef" not in errors, errors


def test_a_substituted_value_in_another_fields_message_is_shown_as_written() -> None:
    text = """
pools:
  one:
    match: {models: ["${M}"]}
    backends: {a: {url: "http://127.0.0.1:9001"}}
  two:
    match: {models: ["${M}"]}
    backends: {a: {url: "http://127.0.0.1:9002"}}
"""
    errors = "\n".join(errors_of(text, env={"M": SECRET}))
    assert "both serve model '${M}'" in errors and SECRET not in errors, errors


def test_existing_behaviours_hold() -> None:
    assert errors_of(TWO + '      a: {url: "http://127.0.0.1:9003"}\n') == [
        "pools.yaml:7: pool 'chat', backend 'a': duplicate key 'a' (first at line 5)"]
    assert errors_of("pools:\n  chat: [unclosed\n")[0].startswith("pools.yaml:3:1: YAML syntax error")
    config = parse_config(TWO.replace("9001", "${PORT:-9009}"), env={})
    assert config.pools["chat"].backends["a"].port == 9009


# --- the reloader ---------------------------------------------------------------------------------------


def poll(reloader: reload_module.ConfigReloader) -> bool:
    return asyncio.run(reloader.reload())


def test_a_file_caught_mid_write_is_applied_only_once_settled(tmp_path: Path) -> None:
    reloader, reconciler, _ = live_reloader(tmp_path)
    full = TWO + '      c: {url: "http://127.0.0.1:9003"}\n'
    reloader.status.path.write_text(ONE)  # the first part of `full`'s edit happens to be a valid config
    assert poll(reloader) is False
    assert set(reconciler.state.config.pools["chat"].backends) == {"a", "b"}, "a half-written file is not applied"
    reloader.status.path.write_text(full)  # the writer finishes
    assert poll(reloader) is False, "changed since the last poll: wait"
    assert set(reconciler.state.config.pools["chat"].backends) == {"a", "b"}
    assert poll(reloader) is True
    assert set(reconciler.state.config.pools["chat"].backends) == {"a", "b", "c"}
    assert reloader.status.reloads == 1 and reloader.status.rejected == 0


def test_reverting_to_the_live_content_clears_the_rejection(tmp_path: Path) -> None:
    reloader, reconciler, _ = live_reloader(tmp_path)
    status = reloader.status
    status.path.write_text(TWO + "bogus: 1\n")
    poll(reloader), poll(reloader)
    assert status.errors and status.rejected_digest and status.rejected == 1
    status.path.write_text(TWO)  # back to what is live
    assert poll(reloader) is False, "nothing to apply"
    assert (status.errors, status.rejected_digest) == ([], ""), "the last edit is ok again"
    assert status.reloads == 0 and status.rejected == 1

    status.path.unlink()
    poll(reloader)
    assert status.errors and "cannot read" in status.errors[0]
    status.path.write_text(TWO)  # restored
    poll(reloader)
    assert (status.errors, status.rejected_digest) == ([], "")


def test_deep_and_bomb_edits_are_rejected_and_the_status_says_so(tmp_path: Path) -> None:
    reloader, reconciler, _ = live_reloader(tmp_path)
    live = reconciler.state
    for text, error in ((DEEP_BLOCK, f"2: nested deeper than {MAX_CONFIG_DEPTH} levels"),
                        (SMALL_BOMB, "1: YAML anchors and aliases are not allowed (write each value out in full)")):
        reloader.status.path.write_text(text)
        assert [poll(reloader), poll(reloader)] == [False, False]
        assert reconciler.state is live
        assert reloader.status.errors == [f"{reloader.status.path}:{error}"]
    assert reloader.status.rejected == 2


def test_an_oversize_or_odd_file_is_rejected(tmp_path: Path) -> None:
    reloader, reconciler, _ = live_reloader(tmp_path)
    path = reloader.status.path
    path.write_text(TWO + "#" * MAX_CONFIG_BYTES)
    assert poll(reloader) is False
    assert reloader.status.errors == [f"{path}: file is larger than {MAX_CONFIG_BYTES} bytes (1 MiB), "
                                      "the most a config may be"]
    path.unlink()
    os.mkfifo(path)  # reading a FIFO would block the loop until someone writes to it
    assert poll(reloader) is False
    assert reloader.status.errors == [f"{path}: not a regular file"]
    path.unlink()
    path.write_text(TWO)
    assert poll(reloader) is False and reloader.status.errors == []


def test_a_parse_over_its_budget_is_rejected_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reloader, reconciler, _ = live_reloader(tmp_path)
    live = reconciler.state
    release = threading.Event()
    calls: list[bytes] = []

    def stuck(data: bytes, source: str) -> object:
        calls.append(data)
        release.wait(30)
        raise ConfigError([f"{source}: parsed at last"])

    monkeypatch.setattr(reload_module, "config_from_bytes", stuck)
    monkeypatch.setattr(reload_module, "PARSE_BUDGET", 0.05)

    async def scenario() -> None:
        try:
            reloader.status.path.write_text(ONE)
            assert [await reloader.reload(), await reloader.reload()] == [False, False]
            assert reconciler.state is live and len(calls) == 1
            assert reloader.status.errors == [f"{reloader.status.path}: took longer than 0.05s to parse; refused"]

            reloader.status.path.write_text(ONE + "# another edit\n")
            assert [await reloader.reload(), await reloader.reload()] == [False, False]
            assert len(calls) == 1, "no second parse while the first still holds a thread"
        finally:
            release.set()
        assert reloader._parsing is not None
        await asyncio.wait([reloader._parsing])
        assert [await reloader.reload(), await reloader.reload()] == [False, False]
        assert len(calls) == 2 and reloader.status.errors == [f"{reloader.status.path}: parsed at last"]

    asyncio.run(scenario())


def test_restart_only_edits_are_listed_until_reverted(tmp_path: Path) -> None:
    reloader, reconciler, _ = live_reloader(tmp_path)
    status = reloader.status
    edited = "envoy:\n  log_level: debug\n  concurrency: 3\n  admin: {port: 9911}\n  listener: {max_connections: 50}\n" \
        "controlplane:\n  api: {port: 8099}\n" + TWO
    status.path.write_text(edited)
    assert poll(reloader) is False and poll(reloader) is True, "the rest of the edit is applied"
    pending = "\n".join(status.restart_pending)
    for fragment in ("envoy.log_level info -> debug", "envoy.concurrency None -> 3", "envoy.admin 127.0.0.1:9901 -> "
                     "127.0.0.1:9911", "envoy.listener.max_connections 10000 -> 50", "controlplane.api 127.0.0.1:8088 "
                     "-> 127.0.0.1:8099"):
        assert fragment in pending, pending
    assert len(status.restart_pending) == 5

    status.path.write_text(edited.replace("  log_level: debug\n", "") + "# pools unchanged\n")
    poll(reloader), poll(reloader)
    assert not any("log_level" in p for p in status.restart_pending) and len(status.restart_pending) == 4, \
        "compared with what runs, not with the previous edit"
    status.path.write_text(TWO + "# all reverted\n")
    assert poll(reloader) is False and poll(reloader) is True
    assert status.restart_pending == []


# --- end to end -----------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_alias_bomb_in_the_watched_file_under_load(tmp_path: Path) -> None:
    a, b = MockBackend("a"), MockBackend("b")
    cp = ControlPlane(tmp_path, {"chat": {"match": {"prefix": "/v1/"},
                                          "backends": {"a": {"url": a.url}, "b": {"url": b.url}}}})
    try:
        # Capped (after Envoy started) so that a regression fails here instead of eating the machine's memory.
        resource.prlimit(cp.proc.pid, resource.RLIMIT_AS, (3 << 30, 3 << 30))
        with Load(cp.listener, clients=4, max_seconds=90) as load:
            load.wait_requests(50)
            cp.write_config(text=BOMB)
            status = cp.wait_rejected(timeout=5)
            assert any("anchors and aliases are not allowed" in e for e in status["config"]["errors"]), status
            assert http_json("GET", f"{cp.api}/healthz", timeout=2)[0] == 200
            load.wait_requests(100)
            for _ in range(20):  # the API keeps answering while the loop polls the bomb every 0.1 s
                assert http_json("GET", f"{cp.api}/healthz", timeout=2)[0] == 200
            assert cp.proc.poll() is None
        assert load.failures == [] and set(load.statuses) == {200}, load.failures
        assert cp.status()["config"]["restart_pending"] == []

        document = cp.document({"chat": {"match": {"prefix": "/v1/"},
                                         "backends": {"a": {"url": a.url}, "b": {"url": b.url}}}})
        document["envoy"]["log_level"] = "debug"
        cp.write_config(text=yaml.safe_dump(document, sort_keys=False))
        status = cp.wait_applied()
        assert status["config"]["last_edit"] == "applied" and status["config"]["errors"] == []
        assert status["config"]["restart_pending"] == ["envoy.log_level info -> debug (Envoy command-line flag)"]
        wait_for(lambda: "envoy.log_level" in cp.log_text(), timeout=5, what="the restart warning in the log")
    finally:
        cp.stop()
        a.stop()
        b.stop()
