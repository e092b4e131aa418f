"""The one reconciler: desired state -> snapshot; coalesced bursts; only changed types rebuilt."""

from __future__ import annotations

import asyncio

import pytest

from controlplane import reconciler as reconciler_module
from controlplane.config import parse_config
from controlplane.reconciler import Reconciler, build
from controlplane.state import DesiredState
from controlplane.xds import typeurls
from controlplane.xds.server import SnapshotCache

CONFIG_TEXT = """
pools:
  chat:
    strategy: weighted
    backends:
      a: {url: "http://127.0.0.1:9001", weight: 3}
      b: {url: "http://127.0.0.1:9002"}
"""
CONFIG = parse_config(CONFIG_TEXT)
ADDRESSES = {"127.0.0.1": "127.0.0.1"}


class CountingCache(SnapshotCache):
    def __init__(self) -> None:
        super().__init__()
        self.sets = 0

    def set(self, snapshot) -> None:  # type: ignore[no-untyped-def]
        self.sets += 1
        super().set(snapshot)


def weights_in(snapshot) -> dict[str, int]:  # type: ignore[no-untyped-def]
    cla = snapshot.resources[typeurls.ENDPOINT]["chat"]
    return {e.metadata.filter_metadata["llm_lb"]["backend"]: e.load_balancing_weight.value
            for loc in cla.endpoints for e in loc.lb_endpoints}


def state(**changes) -> DesiredState:  # type: ignore[no-untyped-def]
    return DesiredState(config=CONFIG, addresses=ADDRESSES).replace(**changes)


def test_a_weight_change_rebuilds_only_endpoints() -> None:
    first = state(weights={"chat": {"a": 3, "b": 1}})
    before = build(first)
    second = first.replace(weights={"chat": {"a": 1, "b": 1}})
    after = build(second, before, first)
    for t in (typeurls.CLUSTER, typeurls.LISTENER, typeurls.ROUTE):
        assert after.resources[t] is before.resources[t], f"{typeurls.SHORT[t]} was rebuilt"
        assert after.version(t) == before.version(t)
    assert after.version(typeurls.ENDPOINT) != before.version(typeurls.ENDPOINT)
    assert weights_in(after) == {"a": 1, "b": 1}
    # The same content built from scratch has the same versions: hashes, not counters.
    assert build(second).versions == after.versions


def test_a_weight_change_in_one_pool_rebuilds_that_pool_only() -> None:
    two = parse_config(CONFIG_TEXT + """
  embed:
    match: {prefix: /v2/}
    backends:
      e: {url: "http://127.0.0.1:9003"}
""")
    first = DesiredState(config=two, addresses=ADDRESSES, weights={"chat": {"a": 3, "b": 1}, "embed": {"e": 1}})
    before = build(first)
    second = first.replace(weights={"chat": {"a": 1, "b": 1}, "embed": {"e": 1}})
    after = build(second, before, first)
    assert after.resources[typeurls.ENDPOINT]["embed"] is before.resources[typeurls.ENDPOINT]["embed"]
    assert weights_in(after) == {"a": 1, "b": 1}
    drained = build(second.replace(drained=frozenset({("embed", "e")})), after, second)
    assert drained.resources[typeurls.ENDPOINT]["chat"] is after.resources[typeurls.ENDPOINT]["chat"]
    assert drained.resources[typeurls.ENDPOINT]["embed"] is not after.resources[typeurls.ENDPOINT]["embed"]
    moved = build(second.replace(addresses={"127.0.0.1": "127.0.0.2"}), after, second)
    assert all(moved.resources[typeurls.ENDPOINT][p] is not after.resources[typeurls.ENDPOINT][p]
               for p in ("chat", "embed"))
    assert build(second).versions == after.versions, "reused or rebuilt, the content is the same"


def test_a_budget_rejection_rebuilds_only_routes() -> None:
    first = state()
    before = build(first)
    after = build(first.replace(rejected={"chat": "over budget"}), before, first)
    assert after.resources[typeurls.ENDPOINT] is before.resources[typeurls.ENDPOINT]
    assert after.version(typeurls.ROUTE) != before.version(typeurls.ROUTE)


def test_a_proposal_that_changes_nothing_is_no_change() -> None:
    s = state(weights={"chat": {"a": 3, "b": 1}})
    assert s.replace(weights={"chat": {"a": 3, "b": 1}}).changed(s) == frozenset()
    assert s.replace(weights={"chat": {"a": 2, "b": 1}}).changed(s) == {"weights"}


def test_state_is_immutable() -> None:
    raw = {"chat": {"a": 1}}
    s = state(weights=raw)
    raw["chat"]["a"] = 99
    assert s.weights["chat"]["a"] == 1
    with pytest.raises(TypeError):
        s.weights["chat"]["a"] = 2  # type: ignore[index]


def test_a_burst_of_100_weight_changes_gives_a_few_pushes_and_the_last_is_exact() -> None:
    async def main() -> None:
        cache = CountingCache()
        # A hold-off far longer than the burst, so a busy machine's scheduling cannot split it much.
        rec = Reconciler(cache, state(weights={"chat": {"a": 1, "b": 1}}), holdoff=0.05, max_holdoff=0.5)
        rec.apply(rec.state)
        sets_before = cache.sets
        rec.start()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            for i in range(100):  # 100 changes as fast as they come (well within 10 ms)
                rec.propose(weights={"chat": {"a": 1 + i, "b": 1}})
                if i % 10 == 9:
                    await asyncio.sleep(0)  # let the reconciler run in between, as real inputs would
            burst = loop.time() - started
            deadline = loop.time() + 5
            while weights_in(cache.snapshot) != {"a": 100, "b": 1}:
                assert loop.time() < deadline, "the last change was never published"
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # nothing more arrives after the last one
        finally:
            await rec.stop()
        pushes = cache.sets - sets_before
        assert 1 <= pushes <= 3, f"{pushes} snapshots for one burst of {burst * 1000:.1f} ms"
        assert rec.published is rec.state

    asyncio.run(main())


def test_flush_publishes_a_change_the_loop_is_still_holding() -> None:
    async def main() -> None:
        cache = SnapshotCache()
        rec = Reconciler(cache, state(weights={"chat": {"a": 1, "b": 1}}), holdoff=10, max_holdoff=10)
        rec.apply(rec.state)
        rec.start()
        try:
            rec.propose(weights={"chat": {"a": 7, "b": 1}})
            await asyncio.sleep(0.01)  # the loop has woken and is holding off
            await rec.flush()
            assert weights_in(cache.snapshot) == {"a": 7, "b": 1} and rec.published is rec.state
        finally:
            await rec.stop()

    asyncio.run(main())


def test_an_edit_that_cannot_be_built_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = SnapshotCache()
    rec = Reconciler(cache, state(weights={"chat": {"a": 3, "b": 1}}))
    good = rec.apply(rec.state)
    broken = dict(reconciler_module.BUILDERS)

    def boom(*args: object) -> dict:
        raise ValueError("builder bug")

    broken[typeurls.LISTENER] = (frozenset({"config"}), boom)
    monkeypatch.setattr(reconciler_module, "BUILDERS", broken)
    edited = parse_config(CONFIG_TEXT.replace("weight: 3", "weight: 2"))
    with pytest.raises(ValueError, match="builder bug"):
        rec.apply(rec.state.replace(config=edited))
    assert rec.state.config is CONFIG and cache.snapshot is good


def test_a_failed_background_rebuild_keeps_serving_the_last_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        cache = SnapshotCache()
        rec = Reconciler(cache, state(weights={"chat": {"a": 3, "b": 1}}), holdoff=0.001)
        good = rec.apply(rec.state)
        broken = dict(reconciler_module.BUILDERS)

        def boom(*args: object) -> dict:
            raise ValueError("builder bug")

        broken[typeurls.ENDPOINT] = (broken[typeurls.ENDPOINT][0], boom)
        monkeypatch.setattr(reconciler_module, "BUILDERS", broken)
        rec.propose(weights={"chat": {"a": 1, "b": 1}})
        await rec.flush()
        assert cache.snapshot is good and rec.failures == 1
        monkeypatch.undo()
        rec.propose(drained=frozenset({("chat", "b")}))
        await rec.flush()
        assert weights_in(cache.snapshot) == {"a": 1, "b": 1}, "the next change publishes everything pending"

    asyncio.run(main())


def test_a_rollout_step_rebuilds_its_pools_endpoints_and_keeps_the_shadows() -> None:
    from controlplane.rollouts.plan import RolloutPlan

    two = parse_config(CONFIG_TEXT + """
  embed:
    match: {prefix: /v2/}
    backends:
      e: {url: "http://127.0.0.1:9003"}
      f: {url: "http://127.0.0.1:9004"}
    rollout: {mode: shadow, candidate: f, shadow: {percent: 50, budget: 1}}
""")
    plans = {"embed": RolloutPlan("shadow", "f", 0.0, 0.5)}
    first = DesiredState(config=two, addresses=ADDRESSES, weights={"chat": {"a": 3, "b": 1}}, rollouts=plans)
    before = build(first)
    assert "embed~shadow" in before.resources[typeurls.ENDPOINT] and "embed~shadow" in before.resources[typeurls.CLUSTER]
    second = first.replace(weights={"chat": {"a": 1, "b": 1}})
    after = build(second, before, first)
    eds = after.resources[typeurls.ENDPOINT]
    assert eds["embed"] is before.resources[typeurls.ENDPOINT]["embed"]
    assert eds["embed~shadow"] is before.resources[typeurls.ENDPOINT]["embed~shadow"]
    stopped = build(second.replace(rollouts={"embed": RolloutPlan("shadow", "f", 0.0, 0.0)}), after, second)
    assert stopped.resources[typeurls.ENDPOINT]["chat"] is eds["chat"]
    assert stopped.version(typeurls.ROUTE) != after.version(typeurls.ROUTE), "the mirror is gone from the routes"
    assert not stopped.problems()
    assert build(second).versions == after.versions, "reused or rebuilt, the content is the same"
