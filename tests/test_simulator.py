"""The simulator drives the real Engine: the issue's acceptance figures on the shipped workload, plus its rules."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest

from controlplane.config import Objective, parse_config
from controlplane.scoring.simulator import (
    FOLLOW_WINDOW,
    ORACLE,
    TELEMETRY_STRATEGIES,
    Change,
    Outcome,
    Quality,
    Result,
    Truth,
    Workload,
    WorkloadError,
    Yardstick,
    drift_changes,
    follow,
    format_table,
    load_workload,
    main_simulate,
    oracle_pick,
    parse_workload,
    pick,
    simulate,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "configs" / "workloads" / "heterogeneous.yaml"
DRIFT = ROOT / "configs" / "workloads" / "drift.yaml"


@pytest.fixture(scope="module")
def shipped() -> Workload:
    return load_workload(SHIPPED)


def _late(workload: Workload, by: int, requests: int) -> Workload:
    """The same story told later, so the engine has long settled before the degradation."""
    events = [e.model_copy(update={"at": e.at + by}) for e in workload.events]
    return workload.model_copy(update={"requests": requests, "events": events})


def _degradation_at(workload: Workload) -> int:
    return next(e.at for e in workload.events if e.set is not None)


# -- acceptance ---------------------------------------------------------------------------------


def test_shipped_workload_is_self_contained_and_heterogeneous(shipped: Workload) -> None:
    assert shipped.config is not None and shipped.requests == 5000
    pool = shipped.config.pools[shipped.pool or ""]
    assert len(pool.backends) >= 4 and pool.scoring.min_quality == 0.75
    assert any(e.down for e in shipped.events) and any(e.down is False for e in shipped.events)


def test_cost_optimized_is_30_percent_cheaper_than_round_robin_at_acceptable_quality(shipped: Workload) -> None:
    assert shipped.config is not None
    cost = simulate(shipped.config, shipped, "cost_optimized")
    rr = simulate(shipped.config, shipped, "round_robin")
    assert cost.total_cost <= 0.70 * rr.total_cost, (cost.total_cost, rr.total_cost)
    assert cost.mean_quality_ok >= 0.80, cost.mean_quality_ok


def test_adaptive_learning_reaches_90_percent_of_oracle_reward(shipped: Workload) -> None:
    assert shipped.config is not None
    adaptive = simulate(shipped.config, shipped, "adaptive_learning", requests=5000)
    oracle = simulate(shipped.config, shipped, "oracle", requests=5000)
    assert _degradation_at(shipped) < 4000
    ratio = adaptive.window(4000, 5000).mean_reward / oracle.window(4000, 5000).mean_reward
    assert ratio >= 0.90, ratio


def test_adaptive_learning_reconverges_after_a_late_degradation(shipped: Workload) -> None:
    assert shipped.config is not None
    late = _late(shipped, 4000 - _degradation_at(shipped), 8000)
    assert _degradation_at(late) == 4000
    adaptive = simulate(shipped.config, late, "adaptive_learning")
    oracle = simulate(shipped.config, late, "oracle")
    before = adaptive.window(3000, 4000).mean_reward / oracle.window(3000, 4000).mean_reward
    after = adaptive.window(7000, 8000).mean_reward / oracle.window(7000, 8000).mean_reward
    assert before >= 0.90 and after >= 0.90, (before, after)
    # It did move: the degraded backend carried most traffic before and little at the end.
    assert adaptive.window(3000, 4000).shares().get("fast", 0.0) > 0.5 > 0.1 > adaptive.window(7000, 8000).shares().get("fast", 0.0)


def test_same_seed_same_result_other_seed_other_choices(shipped: Workload) -> None:
    assert shipped.config is not None
    first = simulate(shipped.config, shipped, "adaptive_learning")
    again = simulate(shipped.config, shipped, "adaptive_learning")
    other = simulate(shipped.config, shipped.model_copy(update={"seed": shipped.seed + 1}), "adaptive_learning")
    assert first == again
    assert [o.backend for o in first.outcomes] != [o.backend for o in other.outcomes]


# -- rules ----------------------------------------------------------------------------------------


def test_weight_zero_is_never_picked_and_all_zero_picks_uniformly() -> None:
    rng = random.Random(1)
    names = ["a", "b", "c"]
    assert {pick({"a": 0, "b": 5, "c": 1}, names, rng) for _ in range(2000)} == {"b", "c"}
    assert {pick({"a": 0, "b": 0, "c": 0}, names, rng) for _ in range(200)} == set(names)


def test_down_backend_gets_no_engine_traffic_once_recomputed(shipped: Workload) -> None:
    assert shipped.config is not None
    down = next(e for e in shipped.events if e.down)
    up = next(e for e in shipped.events if e.down is False)
    for strategy in ("adaptive_learning", "cost_optimized"):
        result = simulate(shipped.config, shipped, strategy, requests=up.at)
        assert all(o.backend != down.backend for o in result.window(down.at, up.at).outcomes)


def test_oracle_never_chooses_a_down_backend(shipped: Workload) -> None:
    assert shipped.config is not None
    oracle = simulate(shipped.config, shipped, "oracle")
    down = next(e for e in shipped.events if e.down)
    up = next(e for e in shipped.events if e.down is False)
    assert down.backend in oracle.window(0, down.at).shares()  # it was the oracle's choice before
    assert down.backend not in oracle.window(down.at, up.at).shares()
    assert all(o.ok or o.latency_ms < 5000 for o in oracle.outcomes)  # no connect timeouts at all

    truth = {"best": Truth.model_validate({"latency_ms": {"mean": 100}, "quality": {"mean": 0.9}}),
             "worse": Truth.model_validate({"latency_ms": {"mean": 900}, "quality": {"mean": 0.8}})}
    costs = {"best": 0.001, "worse": 0.001}
    yard = Yardstick(Objective(), cost_ref=0.01, latency_ref=2000.0)
    assert oracle_pick(truth, set(), costs, yard, None) == "best"
    assert oracle_pick(truth, {"best"}, costs, yard, None) == "worse"
    bad = {**truth, "worse": truth["worse"].model_copy(update={"quality": Quality(mean=0.5)})}
    assert oracle_pick(bad, {"best"}, costs, yard, 0.75) == "worse"  # nothing else is up


def test_window_gives_the_same_figures_over_a_slice(shipped: Workload) -> None:
    assert shipped.config is not None
    result = simulate(shipped.config, shipped, "balanced", requests=600)
    whole = result.window(0, 600)
    assert (whole.total_cost, whole.mean_reward, whole.p95_latency_ms) == (
        result.total_cost, result.mean_reward, result.p95_latency_ms)
    head, tail = result.window(0, 200), result.window(200, 600)
    assert head.requests == 200 and tail.requests == 400
    assert head.total_cost + tail.total_cost == pytest.approx(result.total_cost)
    assert 0 <= result.mean_quality <= result.mean_quality_ok <= 1 and 0 <= result.error_rate <= 1


# -- validation -----------------------------------------------------------------------------------

CONFIG = """
pools:
  chat:
    backends:
      a: {url: "http://127.0.0.1:9001", cost: {input_per_1k: 0.001, output_per_1k: 0.002}}
      b: {url: "http://127.0.0.1:9002", cost: {input_per_1k: 0.01, output_per_1k: 0.02}}
"""

WORKLOAD = """\
requests: 300
seed: 3
backends:
  a: {latency_ms: {mean: 800, sd: 100}, error_rate: 0.01, quality: {mean: 0.8, sd: 0.05}}
  b: {latency_ms: {mean: 400, sd: 50}, quality: {mean: 0.9}}
"""


def _errors(text: str, config_text: str | None = CONFIG) -> str:
    config = parse_config(config_text) if config_text else None
    with pytest.raises(WorkloadError) as info:
        parse_workload(textwrap.dedent(text), "w.yaml", config)
    return "\n".join(info.value.errors)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (WORKLOAD + "colour: red\n", "w.yaml:6: field 'colour': unknown key 'colour' (allowed: requests,"),
        (WORKLOAD.replace("error_rate: 0.01", "error_rate: 2"), "w.yaml:4: field 'backends.a.error_rate'"),
        (WORKLOAD.replace("latency_ms: {mean: 400, sd: 50}, ", ""),
         "w.yaml:5: field 'backends.b.latency_ms': required field is missing"),
        (WORKLOAD.replace("sd: 0.05", "sdev: 0.05"),
         "field 'backends.a.quality.sdev': unknown key 'sdev' (allowed: mean, sd)"),
        (WORKLOAD + "events:\n  - {at: 10, backend: a}\n", "w.yaml:7: field 'events.0': an event needs 'set', 'down'"),
        (WORKLOAD + "events:\n  - {at: 10, backend: zz, down: true}\n",
         "w.yaml:7: field 'events.0.backend': pool 'chat' has no backend 'zz'"),
        (WORKLOAD + "events:\n  - {at: 1, backend: a, set: {qualty: {mean: 1}}}\n",
         "field 'events.0.set.qualty': unknown key 'qualty' (allowed: latency_ms, error_rate, quality)"),
        (WORKLOAD + "pool: nope\n", "w.yaml:6: field 'pool': the config has no pool 'nope' (has: chat)"),
        (WORKLOAD.replace("  b: {", "  c: {"), "field 'backends.c': pool 'chat' has no backend 'c' (has: a, b)"),
        (WORKLOAD + "config: 3\n", "w.yaml:6: field 'config': must be an operator config (with 'pools')"),
        ("requests: [1\n", "w.yaml:2:1: YAML syntax error"),
        ("- 1\n", "the top level must be a mapping"),
    ],
)
def test_validation_errors_name_the_field(text: str, expected: str) -> None:
    assert expected in _errors(text)


def test_embedded_config_errors_keep_the_workload_file_lines() -> None:
    text = WORKLOAD + "config:\n" + textwrap.indent(CONFIG.replace('"http://127.0.0.1:9002"', "ftp://x"), "  ")
    message = _errors(text, None)
    line = text.splitlines().index(next(ln for ln in text.splitlines() if "ftp://x" in ln)) + 1
    assert f"w.yaml:{line}: pool 'chat', backend 'b', field 'url'" in message


def test_embedded_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(WORKLOAD + "config:\n" + textwrap.indent(CONFIG, "  "))
    workload = load_workload(path)
    assert workload.config is not None and simulate(workload.config, workload, "oracle").requests == 300


# -- command ----------------------------------------------------------------------------------------


def test_main_prints_every_strategy_round_robin_and_oracle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, workload = tmp_path / "c.yaml", tmp_path / "w.yaml"
    config.write_text(CONFIG)
    workload.write_text(WORKLOAD)
    assert main_simulate(str(config), str(workload), None, 200) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines()[3:]]
    assert rows == [*TELEMETRY_STRATEGIES, "round_robin", "oracle"]
    assert "+0.0%" in out.splitlines()[-2] and "200 requests" in out


def test_main_reports_bad_input_with_exit_code_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workload = tmp_path / "w.yaml"
    workload.write_text(WORKLOAD)
    assert main_simulate(None, str(workload), None, None) == 1  # no config anywhere
    assert "pass --config FILE or embed one" in capsys.readouterr().err
    assert main_simulate(None, str(tmp_path / "missing.yaml"), None, None) == 1
    assert "cannot read" in capsys.readouterr().err
    assert main_simulate(None, str(SHIPPED), ["fastest"], None) == 1
    assert "unknown strategy 'fastest'" in capsys.readouterr().err


def test_format_table_shows_cost_relative_to_round_robin(shipped: Workload) -> None:
    assert shipped.config is not None
    results = [simulate(shipped.config, shipped, s, requests=300) for s in ("cost_optimized", "round_robin", "oracle")]
    table = format_table(results).splitlines()
    assert table[0].split()[:4] == ["strategy", "cost", "vs", "rr"]
    assert [line.split()[0] for line in table[1:]] == ["cost_optimized", "round_robin", "oracle"]
    expected = 100 * (results[0].total_cost / results[1].total_cost - 1)
    assert f"{expected:+.1f}%" in table[1]
    assert len({len(line) for line in table}) == 1  # aligned


# -- drift: how fast a run follows a change ---------------------------------------------------------


def _run(strategy: str, backends: str, total: int | None = None) -> Result:
    """A hand-made run: one request per letter, padded with 'x' (another backend) to `total`."""
    names = list(backends) + ["x"] * ((total or 0) - len(backends))
    return Result(strategy, tuple(Outcome(n, True, 100.0, 0.0, 1.0, 1.0) for n in names))


def test_drift_workload_parses_with_a_backend_that_improves_and_one_that_degrades() -> None:
    drift = load_workload(DRIFT)
    assert drift.config is not None and drift.pool in drift.config.pools
    assert not any(e.down is not None for e in drift.events)  # drift only: nothing goes down
    changes = drift_changes(drift.config, drift)
    assert [(c.label, c.gains) for c in changes] == [("from fast@1500", False), ("to bargain@3000", True)]
    assert [c.until for c in changes] == [3000, drift.requests]
    for change in changes:  # the truth moved the way the label says
        event = next(e for e in drift.events if e.at == change.at)
        assert event.set is not None and event.set.quality is not None
        before = drift.backends[change.backend].quality.mean
        assert (event.set.quality.mean > before) is change.gains
    # The shipped workload's degradation is a change too; its outage (a `down` event) is not.
    shipped = load_workload(SHIPPED)
    assert shipped.config is not None
    assert [c.label for c in drift_changes(shipped.config, shipped)] == ["from fast@2500"]
    # Cut short, a change with no room for a window is left out.
    assert [c.label for c in drift_changes(drift.config, drift, requests=3000 + FOLLOW_WINDOW - 1)] == ["from fast@1500"]
    assert drift_changes(drift.config, drift, requests=1500) == []


def test_follow_counts_requests_until_the_first_window_after_the_change_that_qualifies() -> None:
    # Gains: b needs >= 50% of a window of 10. After the change at 4: a*8 b*3 a*2 b*...; b's count in the
    # window starting at k is 2, 3, 3, 3, 4, 5 for k = 0..5, so it follows after 5 requests.
    gains = Change(at=4, backend="b", gains=True, until=40)
    run = _run("s", "bbbb" + "a" * 8 + "bbb" + "aa" + "b" * 20)
    assert follow(run, gains, window=10) == 5
    # The requests before the change do not count, however many went to b.
    assert follow(_run("s", "b" * 4 + "a" * 36), gains, window=10) is None
    # Exactly 50% is enough (5 of the 10 requests 9..18); a window must end by `until`.
    exact = _run("s", "aaaa" + "a" * 10 + "b" * 5 + "a" * 21)
    assert follow(exact, Change(4, "b", True, 19), window=10) == 5
    assert follow(exact, Change(4, "b", True, 18), window=10) is None

    # Loses: b must fall to at most 10% (1 of 10). After the change at 0: b*5 a*3 b a*...; b's count is
    # 6, 5, 4, 3, 2, 1 for k = 0..5.
    loses = Change(at=0, backend="b", gains=False, until=40)
    assert follow(_run("s", "b" * 5 + "aaa" + "b" + "a" * 31), loses, window=10) == 5
    assert follow(_run("s", "a" * 40), loses, window=10) == 0  # already there: nothing to wait for
    # A run shorter than one window cannot be measured.
    assert follow(_run("s", "a" * 8), loses, window=10) is None


def test_a_run_that_never_follows_reads_never_not_a_number() -> None:
    change = Change(at=10, backend="b", gains=True, until=60)
    stays = _run("round_robin", "ab" * 5 + "abcd" * 13, total=60)  # b keeps 25% after the change
    moves = _run(ORACLE, "a" * 10 + "b" * 50)
    assert follow(stays, change, window=10) is None and follow(moves, change, window=10) == 0
    table = format_table([stays, moves], [change], window=10).splitlines()
    assert _column(table, "to b@10") == ["never", "0"]
    assert len({len(line) for line in table}) == 1


def _column(table: list[str], label: str) -> list[str]:
    """The cells under a header no narrower than its cells (they are right-aligned to it)."""
    start = table[0].index(label)
    return [line[start:start + len(label)].strip() for line in table[1:]]


def test_drift_table_has_a_follow_column_per_change(capsys: pytest.CaptureFixture[str]) -> None:
    assert main_simulate(None, str(DRIFT), ["adaptive_learning"], None) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "to B@t / from B@t" in lines[2] and f"window of {FOLLOW_WINDOW} consecutive requests" in lines[2]
    table = lines[3:]
    head = table[0]
    assert head.index("vs oracle") < head.index("from fast@1500") < head.index("to bargain@3000") < head.index("%bargain")
    assert [line.split()[0] for line in table[1:]] == ["adaptive_learning", "round_robin", "oracle"]
    degraded, improved = _column(table, "from fast@1500"), _column(table, "to bargain@3000")
    assert degraded[2] == improved[2] == "0"  # the oracle
    assert degraded[1] == improved[1] == "never"  # round robin never moves traffic at all
    # Learning from ratings, adaptive learning leaves the regressed backend within a bound.
    assert degraded[0] != "never" and int(degraded[0]) <= 1000, degraded[0]
    assert improved[0] == "never" or int(improved[0]) >= 0  # a count or "never", whichever the Engine earns
