"""The config reloader: an edit is applied whole or refused whole, and a refusal says why."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controlplane.config import load_config
from controlplane.controllers.reload import ConfigReloader
from controlplane.reconciler import Reconciler
from controlplane.scoring.engine import Engine
from controlplane.state import DesiredState
from controlplane.xds.server import SnapshotCache

TWO = """
pools:
  chat:
    backends:
      a: {url: "http://127.0.0.1:9001"}
      b: {url: "http://127.0.0.1:9002"}
"""
ONE = TWO.replace('      b: {url: "http://127.0.0.1:9002"}\n', "")


def setup(tmp_path: Path) -> tuple[ConfigReloader, Reconciler, Engine]:
    path = tmp_path / "config.yaml"
    path.write_text(TWO)
    config = load_config(path)
    engine = Engine()
    engine.sync(config)
    reconciler = Reconciler(SnapshotCache(), DesiredState(config=config, addresses={"127.0.0.1": "127.0.0.1"}))
    reconciler.apply(reconciler.state)
    return ConfigReloader(path, reconciler, engine, lambda: frozenset()), reconciler, engine


def settle(reloader: ConfigReloader) -> bool:
    """Two polls: the first sees the edit, the second (same size, mtime and hash) acts on it."""
    return any([asyncio.run(reloader.reload()) for _ in range(2)])


def test_an_edit_is_applied_whole(tmp_path: Path) -> None:
    reloader, reconciler, engine = setup(tmp_path)
    reloader.status.path.write_text(ONE)
    assert asyncio.run(reloader.reload()) is False, "a changed file waits one poll to be sure it is settled"
    assert asyncio.run(reloader.reload()) is True
    assert set(reconciler.state.config.pools["chat"].backends) == {"a"}
    assert reconciler.published is reconciler.state and set(engine.stats) == {("chat", "a")}
    assert (reloader.status.reloads, reloader.status.rejected, reloader.status.errors) == (1, 0, [])
    assert asyncio.run(reloader.reload()) is False, "the same file again is no change"


def test_a_failure_after_the_check_is_refused_and_keeps_every_backend_stats(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reloader, reconciler, engine = setup(tmp_path)
    engine.observe_request("chat", "b", True, 120.0, 10, 10)
    live = reconciler.state

    def broken(state: DesiredState) -> None:
        raise RuntimeError("a bug past the check")

    monkeypatch.setattr(reconciler, "apply", broken)
    reloader.status.path.write_text(ONE)
    assert settle(reloader) is False
    assert reconciler.state is live, "the live config stays"
    assert engine.stats[("chat", "b")].requests == 1, "the removed backend's stats came back"
    assert set(engine.config.pools["chat"].backends) == {"a", "b"}, "the engine follows the live config again"
    assert reloader.status.rejected == 1 and "cannot apply: a bug past the check" in reloader.status.errors[0]
    assert asyncio.run(reloader.reload()) is False and reloader.status.rejected == 1, "said once, not every poll"

    monkeypatch.undo()
    reloader.status.path.write_text(ONE + "\n# fixed\n")
    assert settle(reloader) is True and not reloader.status.errors


def test_an_invalid_edit_is_refused_with_every_error(tmp_path: Path) -> None:
    reloader, reconciler, _ = setup(tmp_path)
    live = reconciler.state
    reloader.status.path.write_text(TWO.replace("pools:", "bogus: 1\npools:"))
    assert settle(reloader) is False
    assert reconciler.state is live
    assert any("unknown key 'bogus'" in e for e in reloader.status.errors)
