"""A rollout's state and its rules: stages, steps, gates, transitions. Pure: the controller brings the
time, the telemetry and the operator's commands; nothing here does I/O.

    canary:  running(step 0) -> running(step 1) -> ... -> promoted
    shadow:  running -> passed (then: stop) | running as canary, step 0 (then: canary)
    ab:      running until the operator promotes or aborts (errors and no-data still guard it)
    any gate failing: failed (on_failure: rollback, the candidate leaves Envoy) or paused (on_failure: pause)
    a step undecided after max_step_duration: paused (inconclusive)
    operator: pause / resume / promote (next step) / promote --full / abort / retry (from the first step)

README (Rollouts) has the statistics; `stats.py` computes them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config.model import QualityGate, Rollout
from .plan import RolloutPlan
from .stats import ArmStats, Sprt, mean_diff

RUNNING, PAUSED, PROMOTED, FAILED, ABORTED, PASSED = "running", "paused", "promoted", "failed", "aborted", "passed"
ACTIVE = frozenset({RUNNING, PAUSED})  # the candidate takes (or mirrors) traffic as planned
PASS, FAIL, WAIT = "pass", "fail", "wait"
NO_DATA_EXPECTED = 10.0  # candidate requests its share should have brought before silence is a failure
HISTORY = 20  # transitions kept per rollout
ACTIONS = ("pause", "resume", "promote", "abort", "retry")


class CommandError(ValueError):
    """An operator's command that does not apply to the rollout as it stands (the API answers 409)."""


def fingerprint(rollout: Rollout) -> str:
    """Identifies the rollout block as configured: an edit to it restarts the rollout."""
    return hashlib.sha256(rollout.model_dump_json().encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Gate:
    name: str
    status: str  # pass | fail | wait
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail}


@dataclass(frozen=True)
class Transition:
    pool: str
    before: str  # the phase before
    after: str
    stage: str
    step: int
    reason: str
    by: str  # gates | operator | config
    at: float

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "from": self.before, "to": self.after, "stage": self.stage, "step": self.step,
                "reason": self.reason, "by": self.by}


@dataclass
class Run:
    """One rollout of one pool, as persisted (controller.py writes it to the state directory)."""

    pool: str
    fingerprint: str
    stage: str  # canary | shadow | ab
    candidate_fingerprint: str = ""  # the candidate backend's config, set by the controller: an edit restarts
    phase: str = RUNNING
    step: int = 0
    step_elapsed: float = 0.0  # seconds this step has run (not paused, not while the control plane was down)
    started_at: float = 0.0  # wall clock
    changed_at: float = 0.0  # the last transition
    reason: str = ""  # why the phase is what it is
    cand: ArmStats = field(default_factory=ArmStats)  # this step's candidate
    base: ArmStats = field(default_factory=ArmStats)  # this step's baseline
    total_cand: ArmStats = field(default_factory=ArmStats)  # since the rollout (re)started
    total_base: ArmStats = field(default_factory=ArmStats)
    # The errors gate's sequential test over this step (an A/B test: the whole run): its log-likelihood
    # ratio, the error rates it tests (acceptable, bad) and its boundaries (pass, fail). Once the ratio
    # crosses one, the test is decided for the step: it is not added to any more.
    llr: float = 0.0
    rates: tuple[float, float] | None = None
    bounds: tuple[float, float] = (-math.inf, math.inf)
    # Latency and cost are judged once per step, when it is ready (a verdict a tick could flip by chance
    # would inflate false alarms): gate name -> (status, detail).
    verdicts: dict[str, tuple[str, str]] = field(default_factory=dict)
    shadow_spend: float = 0.0  # USD of the candidate's shadow answers
    # Mirroring stopped for the budget (latched: the spend still arriving must not start it again).
    shadow_stopped: bool = False
    shadow_arms: tuple[ArmStats, ArmStats] | None = None  # (shadow, primary) once a shadow went on as a canary
    quiet_since: float = 0.0  # the candidate's last request (or the step's start, a resume, a restart)
    base_since_cand: int = 0  # baseline requests since then
    gates: list[Gate] = field(default_factory=list)  # as last evaluated
    history: list[dict[str, Any]] = field(default_factory=list)

    # -- persistence ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "pool": self.pool, "fingerprint": self.fingerprint, "candidate_fingerprint": self.candidate_fingerprint,
            "stage": self.stage, "phase": self.phase,
            "step": self.step, "step_elapsed": self.step_elapsed, "started_at": self.started_at,
            "changed_at": self.changed_at, "reason": self.reason, "cand": self.cand.to_dict(),
            "base": self.base.to_dict(), "total_cand": self.total_cand.to_dict(),
            "total_base": self.total_base.to_dict(), "llr": self.llr,
            "rates": list(self.rates) if self.rates else None, "bounds": list(self.bounds) if self.rates else None,
            "verdicts": {name: list(v) for name, v in self.verdicts.items()},
            "shadow_spend": self.shadow_spend,
            "shadow_stopped": self.shadow_stopped, "history": self.history[-HISTORY:],
            "shadow_arms": [a.to_dict() for a in self.shadow_arms] if self.shadow_arms else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], now: float) -> Run:
        """A persisted run; the no-data clock starts again now (the time the control plane was down
        tells nothing about the candidate)."""
        return cls(
            pool=str(data["pool"]), fingerprint=str(data["fingerprint"]),
            candidate_fingerprint=str(data.get("candidate_fingerprint", "")), stage=str(data["stage"]),
            phase=str(data["phase"]), step=int(data["step"]), step_elapsed=float(data["step_elapsed"]),
            started_at=float(data["started_at"]), changed_at=float(data["changed_at"]),
            reason=str(data.get("reason", "")), cand=ArmStats.from_dict(data["cand"]),
            base=ArmStats.from_dict(data["base"]), total_cand=ArmStats.from_dict(data["total_cand"]),
            total_base=ArmStats.from_dict(data["total_base"]), llr=float(data.get("llr", 0.0)),
            rates=(float(data["rates"][0]), float(data["rates"][1])) if data.get("rates") else None,
            bounds=(float(data["bounds"][0]), float(data["bounds"][1])) if data.get("bounds") else (-math.inf, math.inf),
            verdicts={str(k): (str(v[0]), str(v[1])) for k, v in dict(data.get("verdicts") or {}).items()},
            shadow_spend=float(data.get("shadow_spend", 0.0)),
            shadow_stopped=bool(data.get("shadow_stopped", False)), quiet_since=now,
            shadow_arms=((ArmStats.from_dict(data["shadow_arms"][0]), ArmStats.from_dict(data["shadow_arms"][1]))
                         if data.get("shadow_arms") else None), history=list(data.get("history", [])),
        )


def start(pool: str, rollout: Rollout, now: float, why: str = "started", by: str = "config") -> Run:
    stage = "shadow" if rollout.mode == "shadow" else rollout.mode
    run = Run(pool=pool, fingerprint=fingerprint(rollout), stage=stage, started_at=now, changed_at=now,
              quiet_since=now, reason=why)
    error_test(run, rollout)
    run.history.append(Transition(pool, "none", RUNNING, stage, 0, why, by, now).as_dict())
    return run


# -- what Envoy is asked to do ------------------------------------------------------------------------

def shadow_budget_spent(run: Run, rollout: Rollout) -> bool:
    return run.shadow_stopped or (rollout.shadow is not None and run.shadow_spend >= rollout.shadow.budget)


def plan(run: Run, rollout: Rollout) -> RolloutPlan | None:
    """None once promoted: the candidate is then one of the pool's backends, scored as the rest."""
    if run.phase == PROMOTED:
        return None
    candidate = rollout.candidate
    if run.phase not in ACTIVE:  # failed, aborted, or a shadow that passed and stops: out of traffic
        return RolloutPlan(run.stage, candidate, 0.0)
    if run.stage == "shadow":
        assert rollout.shadow is not None
        mirror = 0.0 if shadow_budget_spent(run, rollout) else rollout.shadow.percent / 100
        return RolloutPlan("shadow", candidate, 0.0, mirror)
    if run.stage == "ab":
        return RolloutPlan("ab", candidate, rollout.ab.percent / 100)
    return RolloutPlan("canary", candidate, rollout.steps[min(run.step, len(rollout.steps) - 1)] / 100)


def candidate_share(run: Run, rollout: Rollout) -> float:
    """The share of the pool's requests the candidate is meant to see now (mirrored ones included)."""
    p = plan(run, rollout)
    if p is None:
        return 0.0
    return p.mirror if p.mode == "shadow" else p.share


# -- telemetry ----------------------------------------------------------------------------------------

def arms(run: Run) -> tuple[ArmStats, ArmStats]:
    """What the gates judge: this step's arms; an A/B test's whole run."""
    return (run.total_cand, run.total_base) if run.stage == "ab" else (run.cand, run.base)


def is_baseline(run: Run, rollout: Rollout, backend: str, baseline: frozenset[str]) -> bool:
    """A shadow is compared with whatever answered the client; the others with their baseline."""
    return backend != rollout.candidate and (run.stage == "shadow" or backend in baseline)


def _filled(run: Run, candidate: bool) -> tuple[ArmStats, ...]:
    """The arms an observation goes to: the step's and the run's; an A/B test keeps its whole run only."""
    if candidate:
        return (run.total_cand,) if run.stage == "ab" else (run.cand, run.total_cand)
    return (run.total_base,) if run.stage == "ab" else (run.base, run.total_base)


def _record(run: Run, candidate: bool, at: float, ok: bool, ttfb_ms: float | None, latency_ms: float,
            prompt: int, completion: int, cost: float, user: str | None) -> None:
    for arm in _filled(run, candidate):
        if ok:
            arm.observe_success(at, ttfb_ms, latency_ms, completion, prompt, cost, user)
        else:
            arm.observe_failure(at, user)


def observe_candidate(run: Run, at: float, ok: bool, ttfb_ms: float | None, latency_ms: float, prompt: int,
                      completion: int, cost: float, user: str | None) -> None:
    if run.rates is not None and run.bounds[0] < run.llr < run.bounds[1]:  # undecided: Wald's test goes on
        p0, p1 = run.rates
        run.llr += math.log(p1 / p0) if not ok else math.log((1 - p1) / (1 - p0))
    _record(run, True, at, ok, ttfb_ms, latency_ms, prompt, completion, cost, user)
    run.quiet_since = max(run.quiet_since, at)
    run.base_since_cand = 0


def observe_baseline(run: Run, at: float, ok: bool, ttfb_ms: float | None, latency_ms: float, prompt: int,
                     completion: int, cost: float, user: str | None) -> None:
    _record(run, False, at, ok, ttfb_ms, latency_ms, prompt, completion, cost, user)
    run.base_since_cand += 1


def observe_feedback(run: Run, candidate: bool, score: float) -> None:
    for arm in _filled(run, candidate):
        arm.observe_feedback(score)


# -- the gates ----------------------------------------------------------------------------------------

def _ratio_gate(name: str, cand: float | None, base: float | None, limit: float, n: int, need: int,
                unit: str) -> Gate:
    if n < need or cand is None or base is None:
        return Gate(name, WAIT, f"{n} of {need} candidate samples")
    ratio = cand / base if base > 0 else (math.inf if cand > 0 else 1.0)
    detail = f"candidate {cand:.4g}{unit} vs baseline {base:.4g}{unit}: x{ratio:.3g} (limit x{limit:g})"
    return Gate(name, FAIL if ratio > limit else PASS, detail)


def error_test(run: Run, rollout: Rollout) -> None:
    """Set the rates the errors gate tests from here on: the configured ones, or, when the baseline's own
    error rate in this step is worse than `baseline_rate`, that rate (and the bad rate as much higher):
    the candidate is not blamed for a provider-wide incident.

    Wald's test, once per step: decided when the ratio crosses a boundary, and then no longer added to,
    so however often it is looked at, a good candidate fails a step with probability at most about alpha
    (a test that kept watching after it passed would fail every good candidate in time). A candidate that
    turns bad after its step's test passed meets a new test at the next step (and, once Envoy ejects it,
    the no-data gate)."""
    g = rollout.gates.errors
    if g is None:
        run.rates = None
        return
    _, base = arms(run)
    p0 = g.baseline_rate
    if base.requests >= rollout.min_requests:
        p0 = min(0.9, max(p0, base.error_rate))
    p1 = min(0.99, p0 + (g.bad_rate - g.baseline_rate))
    run.rates = (p0, p1)
    test = Sprt(p0, p1, g.alpha, g.beta)
    run.bounds = (test.lower, test.upper)


def evaluate(run: Run, rollout: Rollout, now: float, baseline_quality: float | None = None) -> list[Gate]:
    """Each configured gate's verdict on the arms as they stand; `baseline_quality` (the scores'
    estimate) stands in for the baseline's feedback until it has enough of its own."""
    gates = rollout.gates
    cand, base = arms(run)
    need = rollout.min_requests
    # Latency and cost are compared with the step's baseline when it has enough samples; at a step where
    # the baseline gets little traffic (the last, at 100%), with its whole run's.
    ref = base if base.requests >= need else run.total_base
    out: list[Gate] = []
    if gates.errors is not None:
        g = gates.errors
        error_test(run, rollout)
        assert run.rates is not None
        p0, p1 = run.rates
        sprt = Sprt(p0, p1, g.alpha, g.beta, llr=run.llr)
        decision = sprt.decision
        detail = (f"{cand.failures} failed of {cand.requests} (acceptable {p0:.3g}, bad {p1:.3g}; "
                  f"log-likelihood ratio {sprt.llr:.2f}, fail at {sprt.upper:.2f}, pass at {sprt.lower:.2f})")
        out.append(Gate("errors", FAIL if decision == "fail" else PASS if decision == "pass" else WAIT, detail))
    # Judged once, when the step has run its time with its requests; until then they wait.
    ready = run.step_elapsed >= rollout.step_duration.total_seconds() and cand.requests >= need
    judged: list[tuple[str, float | None, bool, Callable[[], Gate]]] = [
        ("ttfb_p95", gates.ttfb_p95_ratio, run.stage != "ab", lambda: _ratio_gate(
            "ttfb_p95", cand.ttfb_ms.quantile(0.95), ref.ttfb_ms.quantile(0.95), gates.ttfb_p95_ratio or 0,
            len(cand.ttfb_ms), need, " ms")),
        ("token_latency_p95", gates.token_latency_p95_ratio, run.stage != "ab", lambda: _ratio_gate(
            "token_latency_p95", cand.token_latency_ms.quantile(0.95), ref.token_latency_ms.quantile(0.95),
            gates.token_latency_p95_ratio or 0, len(cand.token_latency_ms), need, " ms/token")),
        # Not for a shadow: its tokens are estimated from body sizes, the primary's are reported.
        ("cost", gates.cost_ratio, run.stage == "canary", lambda: _ratio_gate(
            "cost", cand.cost.mean if cand.cost.n else None, ref.cost.mean if ref.cost.n else None,
            gates.cost_ratio or 0, cand.cost.n, need, " USD/request")),
    ]
    for name, limit, applies, judge in judged:
        if limit is None or not applies:
            continue
        if name not in run.verdicts and ready:
            verdict = judge()
            if verdict.status != WAIT:
                run.verdicts[name] = (verdict.status, verdict.detail)
        if name in run.verdicts:
            out.append(Gate(name, *run.verdicts[name]))
        else:
            out.append(Gate(name, WAIT, f"judged when the step has run {rollout.step_duration.total_seconds():g}s "
                                        f"with {need} candidate requests ({cand.requests} so far)"))
    if gates.quality is not None and run.stage == "canary":
        out.append(_quality(run, gates.quality, baseline_quality))
    if gates.no_data_after is not None:
        out.append(_no_data(run, rollout, now, gates.no_data_after.total_seconds()))
    return out


QUALITY_CONFIDENCE = 0.99  # the quality gate fails only when the candidate is worse with this confidence


def _quality(run: Run, q: QualityGate, baseline_quality: float | None) -> Gate:
    """Fails only when the whole interval of (candidate - baseline) lies below min_delta: feedback is
    noisy (thumbs up or down, most of all), and a bare mean would fail an equal candidate by chance."""
    scores, own = run.total_cand.quality, run.total_base.quality
    if scores.n < q.min_feedback:
        return Gate("quality", WAIT, f"{scores.n} of {q.min_feedback} candidate feedback scores")
    if own.n >= 2:
        reference, (lo, hi) = own.mean, mean_diff(scores, own, QUALITY_CONFIDENCE)
    elif baseline_quality is not None:  # the scores' estimate of the baseline, taken as known
        reference = baseline_quality
        lo, hi = (x - baseline_quality for x in scores.interval(QUALITY_CONFIDENCE))
    else:
        return Gate("quality", WAIT, "no baseline quality to compare with yet")
    delta = scores.mean - reference
    detail = (f"candidate {scores.mean:.3f} ({scores.n} scores) vs baseline {reference:.3f} ({own.n}): "
              f"{delta:+.3f}, {QUALITY_CONFIDENCE:.0%} interval [{lo:+.3f}, {hi:+.3f}] (fails below {q.min_delta:+.3f})")
    return Gate("quality", FAIL if hi < q.min_delta else PASS, detail)


def _no_data(run: Run, rollout: Rollout, now: float, after: float) -> Gate:
    """Silence is a failure only when the candidate's share should have brought requests: the baseline
    served enough meanwhile (a refused connection, an ejected host, a wrong address all look like this)."""
    quiet = now - run.quiet_since
    share = min(candidate_share(run, rollout), 0.999)
    expected = run.base_since_cand * (share if run.stage == "shadow" else share / (1 - share))
    if quiet >= after and expected >= NO_DATA_EXPECTED:
        return Gate("no_data", FAIL, f"no candidate request for {quiet:.0f}s while the baseline served "
                                     f"{run.base_since_cand} (about {expected:.0f} were due)")
    return Gate("no_data", PASS, f"last candidate request {quiet:.0f}s ago")


# -- transitions --------------------------------------------------------------------------------------

def _move(run: Run, phase: str, reason: str, by: str, now: float) -> Transition:
    t = Transition(run.pool, run.phase, phase, run.stage, run.step, reason, by, now)
    run.phase, run.reason, run.changed_at = phase, reason, now
    run.history = [*run.history[-(HISTORY - 1):], t.as_dict()]
    return t


def _new_step(run: Run, rollout: Rollout, now: float) -> None:
    run.step_elapsed = 0.0
    run.cand, run.base = ArmStats(), ArmStats()
    run.quiet_since, run.base_since_cand = now, 0
    run.llr = 0.0
    run.verdicts = {}
    error_test(run, rollout)


def _advance(run: Run, rollout: Rollout, reason: str, by: str, now: float) -> Transition:
    """The next step, the canary after a passed shadow, or promotion after the last step."""
    if run.stage == "shadow":
        assert rollout.shadow is not None
        if rollout.shadow.then == "canary" or by == "operator":
            # The shadow's arms are kept for its report; the canary's run starts empty.
            run.shadow_arms = (run.total_cand, run.total_base)
            run.total_cand, run.total_base = ArmStats(), ArmStats()
            run.stage, run.step = "canary", 0
            _new_step(run, rollout, now)
            return _move(run, RUNNING, f"{reason}; canary from the first step ({rollout.steps[0]:g}%)", by, now)
        return _move(run, PASSED, reason, by, now)
    if run.stage == "ab" or run.step + 1 >= len(rollout.steps):
        return _move(run, PROMOTED, reason, by, now)
    run.step += 1
    _new_step(run, rollout, now)
    return _move(run, RUNNING, f"{reason}; step {run.step + 1} of {len(rollout.steps)} "
                               f"({rollout.steps[run.step]:g}%)", by, now)


def tick(run: Run, rollout: Rollout, now: float, dt: float, baseline_quality: float | None = None
         ) -> Transition | None:
    """One evaluation: `dt` seconds of running time have passed since the last one."""
    if run.phase == RUNNING:
        run.step_elapsed += max(0.0, dt)
    run.gates = evaluate(run, rollout, now, baseline_quality)
    if run.phase != RUNNING:
        return None
    failed = [g for g in run.gates if g.status == FAIL]
    if failed:
        why = "; ".join(f"{g.name}: {g.detail}" for g in failed)
        if rollout.on_failure == "pause":
            return _move(run, PAUSED, f"gate failed (on_failure: pause): {why}", "gates", now)
        return _move(run, FAILED, f"gate failed: {why}", "gates", now)
    if run.stage == "ab":
        return None  # a fixed split: no automatic winner
    cand, _ = arms(run)
    last = run.stage == "canary" and run.step + 1 >= len(rollout.steps)
    waiting = [g for g in run.gates if g.status == WAIT and (g.name != "quality" or last)]
    ready = run.step_elapsed >= rollout.step_duration.total_seconds() and cand.requests >= rollout.min_requests
    if ready and not waiting:
        name = "shadow" if run.stage == "shadow" else f"step {run.step + 1} ({rollout.steps[run.step]:g}%)"
        return _advance(run, rollout, f"{name} passed its gates after {cand.requests} candidate requests", "gates",
                        now)
    if run.stage == "shadow" and shadow_budget_spent(run, rollout):
        assert rollout.shadow is not None
        return _move(run, PAUSED, f"shadow budget spent ({run.shadow_spend:.4f} of {rollout.shadow.budget:g} USD, "
                                  "mirroring stopped) before the gates decided", "gates", now)
    if run.step_elapsed >= rollout.max_step_duration.total_seconds():
        pending = ", ".join(g.name for g in waiting) or f"{cand.requests} of {rollout.min_requests} requests"
        return _move(run, PAUSED, f"inconclusive: the step ran {rollout.max_step_duration.total_seconds():g}s "
                                  f"without deciding ({pending})", "gates", now)
    return None


def command(run: Run, rollout: Rollout, action: str, now: float, full: bool = False) -> Transition:
    """An operator's command; raises CommandError when it does not apply."""
    phase = run.phase
    if action == "pause":
        if phase != RUNNING:
            raise CommandError(f"the rollout is {phase}, not running")
        return _move(run, PAUSED, "paused by the operator", "operator", now)
    if action == "resume":
        if phase != PAUSED:
            raise CommandError(f"the rollout is {phase}, not paused")
        _new_step(run, rollout, now)  # the step's window starts again: what made it pause is not counted twice
        return _move(run, RUNNING, "resumed by the operator (the step starts again)", "operator", now)
    if action == "promote":
        if phase not in ACTIVE and not (phase == PASSED and run.stage == "shadow"):
            raise CommandError(f"the rollout is {phase}: nothing to promote")
        if full:
            return _move(run, PROMOTED, "promoted by the operator (--full)", "operator", now)
        return _advance(run, rollout, "promoted by the operator", "operator", now)
    if action == "abort":
        if phase not in ACTIVE and phase != PASSED:
            raise CommandError(f"the rollout is {phase} already")
        return _move(run, ABORTED, "aborted by the operator", "operator", now)
    if action == "retry":
        if phase == RUNNING:
            raise CommandError("the rollout is running; pause or abort it first")
        if phase == PROMOTED:
            raise CommandError("the rollout is promoted: its candidate is one of the pool's backends now; "
                               "edit the rollout block to roll out again")
        why = "retried by the operator: from the first step"
        fresh = start(run.pool, rollout, now, why, "operator")
        fresh.history = [*run.history[-(HISTORY - 1):], *fresh.history]
        run.__dict__.update(fresh.__dict__)
        run.history[-1]["from"] = phase
        return Transition(run.pool, phase, RUNNING, run.stage, 0, why, "operator", now)
    raise CommandError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
