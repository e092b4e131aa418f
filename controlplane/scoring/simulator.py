"""Replay a synthetic workload through the live scoring Engine, one run per strategy.

Why: an operator should see what a strategy would cost and deliver before
switching it on. Only the backends and the clock are simulated: the Engine,
its stats and its strategies are the production code, fed one observation per
request and recomputed every `recompute_every` requests (standing in for the
scoring interval). Envoy's retries and outlier ejection are not simulated.

Every run is scored with one yardstick, the report reward: Engine.reward's
formula (the pool's objective; a failure earns 0; cost relative to the dearest
backend's price at the workload's mean token mix; latency relative to twice the
slowest backend's initial true mean) applied to the request's own sampled
quality. The Engine learns from its own estimate instead; the report does not.
The oracle knows the truth in force at each request and, like the Engine,
honours the pool's min_quality (by true mean quality) when any backend meets it.

Drift: a `set` event that moves the oracle's choice onto a backend ("to B@t")
or off it ("from B@t") is a change to follow. A run follows it after k
requests, k the smallest offset such that among the FOLLOW_WINDOW requests
t+k .. t+k+FOLLOW_WINDOW-1 (all after the change) B's share reaches FOLLOW_TO
(to) or falls to FOLLOW_FROM (from). Such windows must end before the next
event or the run's end; if none qualifies the run never followed (None). The
oracle follows at 0, and so does a run already where the change leads. A run
that switches all at once s requests after t reads s - 100 (to) or s - 20
(from) at the defaults: the figure ranks runs, it is not an exact delay.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import (
    STRATEGIES,
    Config,
    ConfigError,
    Objective,
    describe_error,
    load_config,
    parse_config,
    read_yaml,
    source_line,
    where,
)
from .engine import Engine, objective_reward, request_cost
from .strategies import STRATEGY_FUNCTIONS

TELEMETRY_STRATEGIES = tuple(STRATEGY_FUNCTIONS)
ORACLE = "oracle"
FOLLOW_WINDOW = 200  # requests per window when measuring how fast a run follows a change
FOLLOW_TO = 0.5  # a backend the oracle moved to: followed once it has this share of a window
FOLLOW_FROM = 0.1  # a backend the oracle left: followed once its share of a window is at most this


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Normal(_Model):
    """A normal distribution; samples are clipped to the quantity's sane range."""

    mean: float = Field(ge=0)
    sd: float = Field(0.0, ge=0)


class Latency(Normal):
    mean: float = Field(gt=0)


class Quality(Normal):
    mean: float = Field(ge=0, le=1)


class Tokens(_Model):
    prompt: Normal = Normal(mean=500)
    completion: Normal = Normal(mean=200)


class Truth(_Model):
    """What a backend really does; the Engine only ever sees samples of it."""

    latency_ms: Latency
    error_rate: float = Field(0.0, ge=0, le=1)
    quality: Quality


class TruthUpdate(_Model):
    latency_ms: Latency | None = None
    error_rate: float | None = Field(None, ge=0, le=1)
    quality: Quality | None = None


class Event(_Model):
    """From request `at` on, a backend's truth changes and/or it goes down or comes back."""

    at: int = Field(ge=0)
    backend: str
    set: TruthUpdate | None = None
    down: bool | None = None

    @model_validator(mode="after")
    def _does_something(self) -> Event:
        if self.set is None and self.down is None:
            raise ValueError("an event needs 'set', 'down' or both")
        return self


class Workload(_Model):
    requests: int = Field(ge=1)
    recompute_every: int = Field(50, ge=1)
    seed: int = 0
    pool: str | None = None  # may be omitted when the config has one pool
    tokens: Tokens = Tokens()
    backends: dict[str, Truth] = Field(min_length=1)
    events: list[Event] = Field(default_factory=list)
    config: Config | None = None  # embedded operator config; parsed by parse_config for its messages


class WorkloadError(ConfigError):
    """Every problem found in a workload file, one line each (a ConfigError, so one except catches both)."""


def load_workload(path: str | Path, config: Config | None = None) -> Workload:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkloadError([f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}"]) from None
    return parse_workload(text, str(path), config)


def parse_workload(text: str, source: str = "<workload>", config: Config | None = None) -> Workload:
    """Validate a workload; cross-check it against `config`, else against its embedded config."""
    try:
        data, lines, errors = read_yaml(text, source, "'requests' and 'backends'", "requests, backends, ...")
    except ConfigError as exc:
        raise WorkloadError(exc.errors) from None
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if "config" in data and not isinstance(data["config"], dict):
        errors.append(f"{source_line(('config',), lines, source)}: field 'config': must be an operator config (with 'pools')")
        data["config"] = None
    elif "config" in data:
        assert root is not None  # read_yaml refused an empty file
        node = next(v for k, v in root.value if k.value == "config")
        # Re-parse the section's own text, padded so the config loader's line numbers match this file.
        mark = node.start_mark
        snippet = "\n" * mark.line + " " * mark.column + text[mark.index:node.end_mark.index]
        try:
            data["config"] = parse_config(snippet, source=source)
        except ConfigError as exc:
            errors, data["config"] = errors + list(exc.errors), None
    workload: Workload | None = None
    try:
        workload = Workload.model_validate(data)
    except ValidationError as exc:
        errors += [describe_error(e, lines, source, model=Workload) for e in exc.errors()]
    if errors or workload is None:
        raise WorkloadError(errors)
    operator_config = config or workload.config
    problems = _cross_check(operator_config, workload) if operator_config else []
    if problems:
        raise WorkloadError([f"{source_line(loc, lines, source)}: {where(loc)}: {msg}" for loc, msg in problems])
    return workload


def _cross_check(config: Config, workload: Workload) -> list[tuple[tuple[Any, ...], str]]:
    """The workload must describe exactly the backends of one pool of the config."""
    if workload.pool is None:
        if len(config.pools) == 1:
            return _cross_check(config, workload.model_copy(update={"pool": next(iter(config.pools))}))
        return [(("pool",), f"the config has pools {', '.join(config.pools)}: name one")]
    pool = config.pools.get(workload.pool)
    if pool is None:
        return [(("pool",), f"the config has no pool {workload.pool!r} (has: {', '.join(config.pools)})")]
    problems: list[tuple[tuple[Any, ...], str]] = [(("backends", name), f"pool {workload.pool!r} has no backend {name!r} (has: {', '.join(pool.backends)})")
                for name in workload.backends if name not in pool.backends]
    problems += [(("backends",), f"no truth given for backend {name!r} of pool {workload.pool!r}")
                 for name in pool.backends if name not in workload.backends]
    problems += [(("events", i, "backend"), f"pool {workload.pool!r} has no backend {e.backend!r}")
                 for i, e in enumerate(workload.events) if e.backend not in pool.backends]
    return problems


@dataclass(frozen=True, slots=True)
class Outcome:
    backend: str
    ok: bool
    latency_ms: float
    cost: float
    quality: float  # 0 for a failure
    reward: float  # the report reward (module docstring)


@dataclass(frozen=True)
class Result:
    """Every request of one run; the figures are derived, so any window gives the same ones."""

    strategy: str
    outcomes: tuple[Outcome, ...]

    def window(self, start: int, end: int) -> Result:
        """The same figures over requests [start, end): e.g. after a degradation."""
        return Result(self.strategy, self.outcomes[start:end])

    @property
    def requests(self) -> int:
        return len(self.outcomes)

    @property
    def total_cost(self) -> float:
        return math.fsum(o.cost for o in self.outcomes)

    @property
    def mean_quality(self) -> float:
        """Over all requests, failures counting 0: what users got."""
        return _mean([o.quality for o in self.outcomes])

    @property
    def mean_quality_ok(self) -> float:
        return _mean([o.quality for o in self.outcomes if o.ok])

    @property
    def p95_latency_ms(self) -> float:
        """Over all requests, failures included at the latency they took."""
        ordered = sorted(o.latency_ms for o in self.outcomes)
        return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)] if ordered else 0.0

    @property
    def error_rate(self) -> float:
        return _mean([0.0 if o.ok else 1.0 for o in self.outcomes])

    @property
    def mean_reward(self) -> float:
        return _mean([o.reward for o in self.outcomes])

    def shares(self) -> dict[str, float]:
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[o.backend] = counts.get(o.backend, 0) + 1
        return {name: n / len(self.outcomes) for name, n in counts.items()}


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0


@dataclass(frozen=True)
class Yardstick:
    """Engine.reward's formula with fixed references, so every run is measured alike."""

    objective: Objective
    cost_ref: float
    latency_ref: float

    def reward(self, ok: bool, quality: float, cost: float, latency_ms: float) -> float:
        if not ok:
            return 0.0
        return objective_reward(self.objective, quality, cost, latency_ms, self.cost_ref, self.latency_ref)

    def expected(self, truth: Truth, unit_cost: float) -> float:
        return (1.0 - truth.error_rate) * self.reward(True, truth.quality.mean, unit_cost, truth.latency_ms.mean)


def _with_strategy(config: Config, name: str, strategy: str, seed: int) -> Config:
    """The workload's seed also seeds the Engine's Thompson draws: one seed, one run."""
    pool = config.pools[name]
    pool = pool.model_copy(update={"strategy": strategy, "scoring": pool.scoring.model_copy(update={"seed": seed})})
    return config.model_copy(update={"pools": {**config.pools, name: pool}})


def _draw(mean: float, sd: float, z: float, low: float, high: float) -> float:
    return min(high, max(low, mean + sd * z))


def pick(weights: Mapping[str, int], names: list[str], rng: random.Random) -> str:
    """Envoy's weighted choice: weight 0 is never picked; if every weight is 0, any backend is."""
    live = [n for n in names if weights.get(n, 0) > 0]
    if not live:
        return rng.choice(names)
    return rng.choices(live, weights=[weights[n] for n in live])[0]


def oracle_pick(truth: dict[str, Truth], down: set[str], unit_costs: dict[str, float], yard: Yardstick,
                min_quality: float | None) -> str:
    """The best true expected reward among backends that are up and (if any) meet min_quality."""
    up = [n for n in truth if n not in down] or list(truth)
    good = [n for n in up if min_quality is None or truth[n].quality.mean >= min_quality] or up
    return max(good, key=lambda n: yard.expected(truth[n], unit_costs[n]))


def _measures(config: Config, workload: Workload) -> tuple[dict[str, float], Yardstick]:
    """Each backend's price at the workload's mean token mix, and the report's yardstick."""
    pool = config.pools[workload.pool or next(iter(config.pools))]
    mean_prompt, mean_completion = workload.tokens.prompt.mean, workload.tokens.completion.mean
    unit_costs = {b: request_cost(cfg, round(mean_prompt), round(mean_completion)) for b, cfg in pool.backends.items()}
    yard = Yardstick(pool.scoring.objective, max(unit_costs.values()) or 1.0,
                     2.0 * max(t.latency_ms.mean for t in workload.backends.values()))
    return unit_costs, yard


def simulate(config: Config, workload: Workload, strategy: str, requests: int | None = None) -> Result:
    """One strategy (any config strategy, or "oracle") over the workload; same inputs, same Result."""
    if strategy != ORACLE and strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (choose from {', '.join((*STRATEGIES, ORACLE))})")
    problems = _cross_check(config, workload)
    if problems:
        raise WorkloadError([f"{where(loc)}: {msg}" for loc, msg in problems])
    pname = workload.pool or next(iter(config.pools))
    pool = config.pools[pname]
    n = workload.requests if requests is None else requests
    names = list(pool.backends)
    seed = workload.seed
    tokens_rng, outcome_rng, route_rng = (random.Random(f"{seed}:{s}") for s in ("tokens", "outcome", "route"))
    unit_costs, yard = _measures(config, workload)
    timeout_ms = pool.timeout.total_seconds() * 1000.0
    connect_ms = pool.connect_timeout.total_seconds() * 1000.0
    truth = dict(workload.backends)
    down: set[str] = set()
    events = sorted(workload.events, key=lambda e: e.at)
    engine: Engine | None = None
    if strategy != ORACLE:
        engine = Engine()
        engine.sync(_with_strategy(config, pname, strategy, seed))
        engine.recompute()
    out: list[Outcome] = []
    for i in range(n):
        while events and events[0].at <= i:
            _apply(events.pop(0), truth, down, engine, pname)
        if engine is not None and i and i % workload.recompute_every == 0:
            engine.recompute()
        if engine is None:
            name = oracle_pick(truth, down, unit_costs, yard, pool.scoring.min_quality)
        else:
            name = pick(engine.weights()[pname], names, route_rng)
        # Draw the same numbers per request whatever happens, so every run sees the same luck.
        t = workload.tokens
        prompt = round(_draw(t.prompt.mean, t.prompt.sd, tokens_rng.gauss(0, 1), 1, 1e6))
        completion = round(_draw(t.completion.mean, t.completion.sd, tokens_rng.gauss(0, 1), 1, 1e6))
        u, z_latency, z_quality = outcome_rng.random(), outcome_rng.gauss(0, 1), outcome_rng.gauss(0, 1)
        truth_b = truth[name]
        latency = _draw(truth_b.latency_ms.mean, truth_b.latency_ms.sd, z_latency, 1.0, timeout_ms)
        # Down: refused after the connect timeout. Slower than the route timeout: Envoy's 504.
        ok = name not in down and u >= truth_b.error_rate and latency < timeout_ms
        latency = connect_ms if name in down else latency
        quality = _draw(truth_b.quality.mean, truth_b.quality.sd, z_quality, 0.0, 1.0) if ok else 0.0
        if engine is None:
            cost = request_cost(pool.backends[name], prompt, completion) if ok else 0.0
        else:  # as production would see it: every request, and every success rated by its user
            cost = engine.observe_request(pname, name, ok, latency, prompt, completion)
            if ok:
                engine.observe_feedback(pname, name, quality)
        out.append(Outcome(name, ok, latency, cost, quality, yard.reward(ok, quality, cost, latency)))
    return Result(strategy, tuple(out))


def _apply(event: Event, truth: dict[str, Truth], down: set[str], engine: Engine | None, pool: str) -> None:
    if event.set is not None:
        update = event.set.model_dump(exclude_none=True)
        truth[event.backend] = Truth.model_validate({**truth[event.backend].model_dump(), **update})
    if event.down is not None:
        (down.add if event.down else down.discard)(event.backend)
        if engine is not None:  # what the deep health probe would report
            engine.observe_health(pool, event.backend, 0.0 if event.down else 1.0,
                                  "unhealthy" if event.down else "healthy")


@dataclass(frozen=True, slots=True)
class Change:
    """A truth change at request `at` that moves the oracle's choice onto `backend` (gains) or off it."""

    at: int
    backend: str
    gains: bool
    until: int  # the next event's request, or the run's end: windows must end before it

    @property
    def label(self) -> str:
        return f"{'to' if self.gains else 'from'} {self.backend}@{self.at}"


def drift_changes(config: Config, workload: Workload, requests: int | None = None,
                  window: int = FOLLOW_WINDOW) -> list[Change]:
    """The changes a run can be seen to follow: `set` events that move the oracle, with room for a window.

    The oracle's choice just before request `at` is compared with its choice once every event at `at`
    has applied; a `set` on a backend it moves onto or off is a change. A change with fewer than
    `window` requests before the next event (or the run's end) cannot be measured and is left out.
    """
    pool = config.pools[workload.pool or next(iter(config.pools))]
    n = workload.requests if requests is None else requests
    unit_costs, yard = _measures(config, workload)
    truth, down = dict(workload.backends), set[str]()
    events = sorted(workload.events, key=lambda e: e.at)
    times = sorted({e.at for e in events})
    changes: list[Change] = []
    for i, at in enumerate(times):
        before = oracle_pick(truth, down, unit_costs, yard, pool.scoring.min_quality)
        here = [e for e in events if e.at == at]
        for event in here:
            _apply(event, truth, down, None, "")
        after = oracle_pick(truth, down, unit_costs, yard, pool.scoring.min_quality)
        until = min(n, times[i + 1]) if i + 1 < len(times) else n
        if before == after or until - at < window:
            continue
        changes += [Change(at, name, name == after, until)
                    for name in dict.fromkeys(e.backend for e in here if e.set is not None) if name in (before, after)]
    return changes


def follow(result: Result, change: Change, window: int = FOLLOW_WINDOW) -> int | None:
    """Requests after the change until the run has followed it (module docstring); None: it never did."""
    picks = [o.backend == change.backend for o in result.outcomes[change.at:change.until]]
    if window < 1 or len(picks) < window:
        return None
    count = sum(picks[:window])
    for k in range(len(picks) - window + 1):
        if k:
            count += picks[k + window - 1] - picks[k - 1]
        share = count / window
        if (share >= FOLLOW_TO) if change.gains else (share <= FOLLOW_FROM):
            return k
    return None


def follow_legend(window: int = FOLLOW_WINDOW) -> str:
    return (f"to B@t / from B@t: at request t the truth changed and the oracle moved all traffic onto / off B; "
            f"the number is how many requests after t the first window of {window} consecutive requests starts "
            f"in which B's share is at least {FOLLOW_TO:.0%} / at most {FOLLOW_FROM:.0%} "
            f"(the oracle: 0); never: no such window ends before the next event or the run's end")


def format_table(results: list[Result], changes: Sequence[Change] = (), window: int = FOLLOW_WINDOW) -> str:
    """One aligned row per run; cost relative to round robin, reward relative to the oracle, follow lags."""
    by = {r.strategy: r for r in results}
    rr, oracle = by.get("round_robin"), by.get(ORACLE)
    backends = sorted({o.backend for r in results for o in r.outcomes})
    head = ["strategy", "cost", "vs rr", "quality", "q(ok)", "p95 ms", "errors", "reward", "vs oracle",
            *[c.label for c in changes], *[f"%{b}" for b in backends]]
    rows = [head]
    for r in results:
        shares = r.shares()
        rows.append([
            r.strategy, f"{r.total_cost:.4f}",
            f"{100 * (r.total_cost / rr.total_cost - 1):+.1f}%" if rr and rr.total_cost else "-",
            f"{r.mean_quality:.3f}", f"{r.mean_quality_ok:.3f}", f"{r.p95_latency_ms:.0f}",
            f"{100 * r.error_rate:.1f}%", f"{r.mean_reward:.3f}",
            f"{100 * r.mean_reward / oracle.mean_reward:.1f}%" if oracle and oracle.mean_reward else "-",
            *[_lag(follow(r, c, window)) for c in changes],
            *[f"{100 * shares.get(b, 0.0):.1f}" for b in backends],
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    )


def _lag(requests: int | None) -> str:
    return "never" if requests is None else str(requests)


def main_simulate(config_path: str | None, workload_path: str, strategies: list[str] | None,
                  requests: int | None) -> int:
    """`controlplane simulate`: every telemetry strategy (or the given ones), round robin and the oracle.

    A `--config` file, when given, is used instead of a config embedded in the workload.
    """
    try:
        external = load_config(config_path) if config_path else None
        workload = load_workload(workload_path, external)
        config = external or workload.config
        if config is None:
            raise WorkloadError([f"{workload_path}: no config: pass --config FILE or embed one under 'config:'"])
        if requests is not None and requests < 1:
            raise WorkloadError([f"--requests must be at least 1 (got {requests})"])
        unknown = [s for s in strategies or [] if s not in STRATEGIES and s != ORACLE]
        if unknown:
            raise WorkloadError([f"unknown strategy {s!r} (choose from {', '.join(STRATEGIES)})" for s in unknown])
    except ConfigError as exc:
        print(f"cannot simulate ({len(exc.errors)} error{'s' if len(exc.errors) != 1 else ''}):", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    runs = list(dict.fromkeys([*(strategies or TELEMETRY_STRATEGIES), "round_robin", ORACLE]))
    results = [simulate(config, workload, s, requests) for s in runs]
    pname = workload.pool or next(iter(config.pools))
    print(f"pool {pname!r}: {results[0].requests} requests, seed {workload.seed}, "
          f"recompute every {workload.recompute_every} requests\n"
          "reward: the pool's objective on each request's sampled quality (failure 0); "
          "quality counts failures as 0, q(ok) is over successes; %backend is its share of requests")
    changes = drift_changes(config, workload, requests)
    if changes:
        print(follow_legend())
    print(format_table(results, changes))
    return 0
