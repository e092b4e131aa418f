"""Runs every pool's rollout: follows the config, feeds the telemetry to the arms, evaluates the gates
on a tick, applies the operator's commands, and proposes each rollout's plan to the reconciler.

Every transition is logged, counted, sent to the alert webhook and written at once to
`<state dir>/rollouts.json` (atomically); the arms' statistics are written at most every
SAVE_INTERVAL. On start the file is read back before the first snapshot is built, so a restarted
control plane serves Envoy the same resources it served before (a persisted run whose rollout block
was since edited starts again from the first step).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from ..alerts import Alerter
from ..config import Config
from ..config.model import Rollout
from ..scoring.engine import Engine, request_cost
from ..statefile import atomic_write, keep_aside
from ..telemetry.accesslog import CHARS_PER_TOKEN, Attempt, Observation
from . import machine
from .machine import ACTIVE, CommandError, Run, Transition
from .plan import RolloutPlan, shadow_pool
from .stats import readout

log = logging.getLogger("controlplane.rollouts")

FILE_NAME = "rollouts.json"
VERSION = 1
SAVE_INTERVAL = 1.0  # seconds: the arms' statistics and step time; transitions are written at once
# A shadow stops mirroring once its spend plus what it spent in the last RESERVE_SECONDS reaches its
# budget: answers still on their way (the access log's buffer, the push) then land about on the budget.
RESERVE_SECONDS = 1.0
# A streamed answer's bytes are mostly SSE framing: an OpenAI-style chunk of one token is ~150-200 bytes.
SSE_BYTES_PER_TOKEN = 160


class Proposer(Protocol):
    def propose(self, **changes: Any) -> None: ...


class Rollouts:
    def __init__(self, state_dir: Path, engine: Engine, alerter: Alerter | None = None,
                 clock: Callable[[], float] = time.time, tick: float = 0.5) -> None:
        self.path = state_dir / FILE_NAME
        self.engine = engine
        self.alerter = alerter
        self.clock = clock
        self.tick = tick
        self.reconciler: Proposer | None = None
        self.runs: dict[str, Run] = {}
        self.transitions: dict[tuple[str, str], int] = {}  # (pool, phase entered) -> count, for the metrics
        self._config: Config | None = None
        self._baselines: dict[str, frozenset[str]] = {}
        self.watched: frozenset[str] = frozenset()  # pools whose telemetry the rollouts need (cheap test per entry)
        self._last_tick: float | None = None
        self._shadow_costs: dict[str, deque[tuple[float, float]]] = {}  # pool -> (at, cost) of recent shadows
        self.shadow_overflow: dict[str, int] = {}  # pool -> mirrored requests its breaker refused (max_requests)
        self._saved_at = 0.0
        self._unreadable = ""  # why the state file could not be read, until the first sync has acted on it
        self._persisted = self._load()

    # -- config and plans -------------------------------------------------------------------------

    def sync(self, config: Config, commit: bool = True) -> dict[str, RolloutPlan]:
        """Follow the config (a new, edited or removed rollout block); returns the plans it gives.
        Without `commit`, only what they would be (a reload checks the edit builds before taking it)."""
        now = self.clock()
        kept: dict[str, Run] = {}
        started: list[Transition] = []
        for name, pool in config.pools.items():
            rollout = pool.rollout
            if rollout is None:
                continue
            fp = machine.fingerprint(rollout)
            # The candidate's own config too (its URL, model, prices): fixing it is a reason to roll out again.
            cand_fp = hashlib.sha256(pool.backends[rollout.candidate].model_dump_json().encode()).hexdigest()[:16]
            run = self.runs.get(name)
            if run is None and name in self._persisted and self._persisted[name].fingerprint == fp:
                run = self._persisted[name]
                if commit:
                    log.info("rollout %s: resumed %s at %s, step %d (%.0fs into it)", name, run.stage, run.phase,
                             run.step + 1, run.step_elapsed, extra={"pool": name})
            if run is not None and run.candidate_fingerprint not in ("", cand_fp):
                run = replace(run, fingerprint="")  # as if the block was edited: a fresh run below
            if run is None and self._unreadable:
                # Its state is lost (it may have failed): the safe side is the candidate out of traffic.
                why = (f"the rollout state could not be read ({self._unreadable}): stopped with the candidate out "
                       "of traffic; `retry` starts it again from its first step")
                run = machine.start(name, rollout, now, why)
                run.phase = machine.ABORTED
                run.history[-1]["to"] = machine.ABORTED
                started.append(Transition(name, "none", machine.ABORTED, run.stage, 0, why, "config", now))
            elif run is None or run.fingerprint != fp:
                edited = run is not None or name in self._persisted
                why = "rollout block or candidate edited: restarted from the first step" if edited else "started"
                history = run.history if run is not None else []
                run = machine.start(name, rollout, now, why)
                run.history = [*history[-(machine.HISTORY - 1):], *run.history]
                started.append(Transition(name, "none", machine.RUNNING, run.stage, 0, why, "config", now))
            if not run.candidate_fingerprint:
                run.candidate_fingerprint = cand_fp
            kept[name] = run
        plans = _plans(config, kept)
        if not commit:
            return plans
        for name in sorted(set(self.runs) - set(kept)):
            old = self.runs[name]
            self._announce(Transition(name, old.phase, "removed", old.stage, old.step,
                                      "the rollout block was removed from the config: its candidate, if still "
                                      "configured, is scored as any backend", "config", now))
        self._config, self.runs, self._persisted, self._unreadable = config, kept, {}, ""
        self._baselines = {name: frozenset(config.pools[name].rollout_baseline()) for name in kept}
        for t in started:
            self._announce(t)
        self._watch()
        self.save()
        return plans

    def checkpoint(self) -> tuple[Any, ...]:
        """What sync() changes, so a reload that fails after it can put it back (runs not restarted)."""
        return self._config, dict(self.runs), dict(self._persisted), dict(self._baselines), self.watched

    def restore(self, saved: tuple[Any, ...]) -> None:
        self._config, runs, persisted, baselines, self.watched = saved
        self.runs, self._persisted, self._baselines = dict(runs), dict(persisted), dict(baselines)

    def plans(self) -> dict[str, RolloutPlan]:
        return {} if self._config is None else _plans(self._config, self.runs)

    def _rollout(self, pool: str) -> Rollout:
        assert self._config is not None
        rollout = self._config.pools[pool].rollout
        assert rollout is not None
        return rollout

    # -- telemetry (per access-log entry: only pools in `watched` get here) ------------------------

    def observe(self, obs: Observation, ok: bool, cost: float, at: float) -> None:
        run = self.runs.get(obs.pool)
        if run is None or run.phase not in ACTIVE:
            return
        rollout = self._rollout(obs.pool)
        backend = obs.backend
        if not ok and not obs.unattempted:
            return  # a failed final attempt is counted from its attempts-log entry (observe_attempt)
        # A 4xx other than 429 is a success for the scores (the client's own mistake, mostly), but the
        # client saw it and no retry hid it: for the arms it is a failure (a candidate with a wrong model
        # name or key answers nothing but 4xx). The baseline's count moves the acceptable rate with it.
        ok = ok and not 400 <= obs.status < 500
        ttfb = None if obs.ttfb_ms is None else max(0.0, obs.ttfb_ms - obs.retried_ms)
        args = (at, ok, ttfb, obs.latency_ms - obs.retried_ms, obs.prompt_tokens, obs.completion_tokens, cost,
                _user_key(obs.user))
        if backend == rollout.candidate and run.stage != "shadow":
            machine.observe_candidate(run, *args)
        elif machine.is_baseline(run, rollout, backend, self._baselines[obs.pool]):
            machine.observe_baseline(run, *args)

    def observe_attempt(self, attempt: Attempt, at: float) -> None:
        """A failed attempt of a watched pool, or a shadow's answer (failed or not)."""
        pool = shadow_pool(attempt.pool) if attempt.shadow else attempt.pool
        run = self.runs.get(pool or "")
        if pool is None or run is None or run.phase not in ACTIVE:
            return
        rollout = self._rollout(pool)
        if attempt.shadow:
            if run.stage != "shadow" or attempt.backend != rollout.candidate:
                return
            self._observe_shadow(run, rollout, attempt, at)
        elif attempt.failed:
            if attempt.backend == rollout.candidate:
                machine.observe_candidate(run, at, False, None, attempt.latency_ms, 0, 0, 0.0, None)
            elif machine.is_baseline(run, rollout, attempt.backend, self._baselines[pool]):
                machine.observe_baseline(run, at, False, None, attempt.latency_ms, 0, 0, 0.0, None)

    def _observe_shadow(self, run: Run, rollout: Rollout, attempt: Attempt, at: float) -> None:
        """The router's log has no usage block: tokens are estimated from the bodies' sizes, as for any
        answer without one (telemetry/accesslog.py), and priced at the candidate's prices."""
        if attempt.failed:
            machine.observe_candidate(run, at, False, None, attempt.latency_ms, 0, 0, 0.0, None)
            return
        if not attempt.status:  # the shadow cluster's own breaker (UO), seen: never sent, nothing to judge
            self.shadow_overflow[run.pool] = self.shadow_overflow.get(run.pool, 0) + 1
            return
        prompt = attempt.request_bytes // CHARS_PER_TOKEN
        completion = attempt.response_bytes // (SSE_BYTES_PER_TOKEN if attempt.streamed else CHARS_PER_TOKEN)
        assert self._config is not None
        backend = self._config.pools[run.pool].backends[rollout.candidate]
        cost = request_cost(backend, prompt, completion)
        run.shadow_spend += cost
        machine.observe_candidate(run, at, True, attempt.ttfb_ms, attempt.latency_ms, prompt, completion, cost, None)
        recent = self._shadow_costs.setdefault(run.pool, deque())
        recent.append((at, cost))
        while recent and recent[0][0] < at - RESERVE_SECONDS:
            recent.popleft()
        assert rollout.shadow is not None
        reserve = sum(c for _, c in recent)
        if not run.shadow_stopped and run.shadow_spend + reserve >= rollout.shadow.budget:
            run.shadow_stopped = True
            log.warning("rollout %s: shadow spend %.4f USD (+%.4f in the last %gs) reaches its budget of %g USD: "
                        "mirroring stops", run.pool, run.shadow_spend, reserve, RESERVE_SECONDS,
                        rollout.shadow.budget, extra={"pool": run.pool})
            self._propose()  # now, not at the next tick

    def observe_feedback(self, pool: str, backend: str, score: float) -> None:
        run = self.runs.get(pool)
        if run is None or run.phase not in ACTIVE:
            return
        rollout = self._rollout(pool)
        if backend == rollout.candidate:
            machine.observe_feedback(run, True, score)
        elif machine.is_baseline(run, rollout, backend, self._baselines[pool]):
            machine.observe_feedback(run, False, score)

    # -- the loop ---------------------------------------------------------------------------------

    def step(self, now: float | None = None) -> list[Transition]:
        now = self.clock() if now is None else now
        dt = 0.0 if self._last_tick is None else min(now - self._last_tick, 5 * self.tick)
        self._last_tick = now
        done = []
        for name, run in self.runs.items():
            if run.phase not in ACTIVE:
                continue
            t = machine.tick(run, self._rollout(name), now, dt, self._baseline_quality(name))
            if t is not None:
                done.append(t)
                self._announce(t)
        if done:
            self._changed()
        elif self.watched and now - self._saved_at >= SAVE_INTERVAL:
            self.save(now)  # a running step's time and statistics, at most SAVE_INTERVAL old after a crash
        return done

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                self.step()
            except Exception:
                log.exception("rollout evaluation failed; the rollouts stay as they are")

    def command(self, pool: str, action: str, full: bool = False) -> dict[str, Any]:
        """An operator's command; LookupError: no rollout there; CommandError: not now."""
        run = self.runs.get(pool)
        if run is None:
            raise LookupError(f"pool {pool!r} has no rollout" if self._config and pool in self._config.pools
                              else f"no pool {pool!r}")
        t = machine.command(run, self._rollout(pool), action, self.clock(), full)
        self._announce(t)
        self._changed()
        return self.report(pool)

    def _baseline_quality(self, pool: str) -> float | None:
        """The scores' quality estimate of the baseline (their mean), for the quality gate."""
        names = self._baselines.get(pool, frozenset())
        values = [st.quality for n in names if (st := self.engine.stats.get((pool, n))) is not None]
        return sum(values) / len(values) if values else None

    def _watch(self) -> None:
        self.watched = frozenset(n for n, r in self.runs.items() if r.phase in ACTIVE)

    def _changed(self) -> None:
        self._watch()
        self._propose()
        self.save()

    def _propose(self) -> None:
        if self.reconciler is not None:
            self.reconciler.propose(rollouts=self.plans())

    def _announce(self, t: Transition) -> None:
        key = (t.pool, t.after)
        self.transitions[key] = self.transitions.get(key, 0) + 1
        level = logging.WARNING if t.after in (machine.FAILED, machine.PAUSED) else logging.INFO
        log.log(level, "rollout %s (%s, step %d): %s -> %s by %s: %s", t.pool, t.stage, t.step + 1, t.before,
                t.after, t.by, t.reason, extra={"pool": t.pool})
        if self.alerter is not None:
            self.alerter.send("rollout", f"rollout {t.pool}: {t.before} -> {t.after} ({t.reason})",
                              pool=t.pool, stage=t.stage, step=t.step + 1, phase=t.after, previous=t.before,
                              by=t.by, reason=t.reason)

    # -- persistence --------------------------------------------------------------------------------

    def save(self, now: float | None = None) -> None:
        body = {"version": VERSION, "rollouts": {name: run.to_dict() for name, run in sorted(self.runs.items())}}
        try:
            atomic_write(self.path, json.dumps(body) + "\n")
        except OSError:
            log.exception("cannot write %s; the rollouts' state would not survive a restart", self.path)
            return
        self._saved_at = self.clock() if now is None else now

    def _load(self) -> dict[str, Run]:
        if not self.path.exists():
            return {}
        now = self.clock()
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return {str(name): Run.from_dict(run, now) for name, run in data["rollouts"].items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            kept = keep_aside(self.path)
            self._unreadable = f"{type(exc).__name__}, {kept}"
            log.error("rollout state %s is unreadable (%s); %s. Every rollout stops with its candidate out of "
                      "traffic until `controlplane rollout retry POOL`", self.path, exc, kept)
            return {}

    # -- reports ------------------------------------------------------------------------------------

    def report(self, pool: str) -> dict[str, Any]:
        run = self.runs[pool]
        rollout = self._rollout(pool)
        cand, base = machine.arms(run)
        plan = machine.plan(run, rollout)
        body: dict[str, Any] = {
            "pool": pool, "mode": rollout.mode, "stage": run.stage, "phase": run.phase, "reason": run.reason,
            "candidate": rollout.candidate, "baseline": sorted(self._baselines.get(pool, ())),
            "step": run.step + 1 if run.stage == "canary" else None,
            "steps": rollout.steps if run.stage == "canary" else None,
            "share": None if plan is None else plan.share, "mirror": None if plan is None else plan.mirror,
            "step_elapsed_seconds": round(run.step_elapsed, 1),
            "step_duration_seconds": rollout.step_duration.total_seconds(),
            "started_at": run.started_at, "changed_at": run.changed_at,
            "gates": [g.as_dict() for g in run.gates],
            "candidate_arm": _arm(cand), "baseline_arm": _arm(base),
            "history": run.history,
        }
        if run.stage == "shadow" or rollout.mode == "shadow":
            assert rollout.shadow is not None
            body["shadow"] = {"spend": round(run.shadow_spend, 6), "budget": rollout.shadow.budget,
                              "overflow": self.shadow_overflow.get(pool, 0),
                              "budget_spent": machine.shadow_budget_spent(run, rollout),
                              "report": _shadow_report(run)}
        if run.stage == "ab":
            body["readout"] = readout(run.total_base, run.total_cand, rollout.ab.percent / 100, rollout.ab.alpha)
        return body

    def reasons(self, pool: str) -> dict[str, str]:
        """The candidate's weight explained, for the weight history (the scores do not set it)."""
        run = self.runs.get(pool)
        if run is None or run.phase == machine.PROMOTED:
            return {}
        rollout = self._rollout(pool)
        plan = machine.plan(run, rollout)
        where = (f"step {run.step + 1} of {len(rollout.steps)}" if run.stage == "canary" else run.stage)
        share = "" if plan is None else (f", mirrored {plan.mirror:.0%}" if plan.mode == "shadow"
                                         else f", {plan.share:.1%} of its tier")
        return {rollout.candidate: f"rollout {run.phase} ({where}{share}): {run.reason}"}

    def status(self) -> dict[str, Any]:
        return {name: self.report(name) for name in sorted(self.runs)}


def _user_key(user: str) -> str | None:
    """A user as the arms keep it: a short hash, never the header's value (it goes to the state file)."""
    return hashlib.blake2b(user.encode(), digest_size=8).hexdigest() if user else None


def _plans(config: Config, runs: Mapping[str, Run]) -> dict[str, RolloutPlan]:
    out = {}
    for name, run in runs.items():
        rollout = config.pools[name].rollout
        assert rollout is not None
        p = machine.plan(run, rollout)
        if p is not None:
            out[name] = p
    return out


def _arm(arm: Any) -> dict[str, Any]:
    return {
        "requests": arm.requests, "failures": arm.failures, "error_rate": round(arm.error_rate, 4),
        "ttfb_p95_ms": _round(arm.ttfb_ms.quantile(0.95)),
        "token_latency_p95_ms": _round(arm.token_latency_ms.quantile(0.95)),
        "cost_per_request": _round(arm.cost.mean if arm.cost.n else None, 6),
        "quality": _round(arm.quality.mean if arm.quality.n else None), "feedback": arm.quality.n,
        "users": arm.users_seen,
    }


def _shadow_report(run: Run) -> dict[str, Any]:
    """The shadow against the primary, since the rollout began: errors, latency, tokens and cost (not
    quality: nobody sees the shadow's answers to rate them)."""
    out = {}
    shadow, primary = run.shadow_arms or (run.total_cand, run.total_base)
    for label, arm in (("shadow", shadow), ("primary", primary)):
        ok = max(1, arm.requests - arm.failures)
        out[label] = {**_arm(arm), "tokens_in_per_request": round(arm.tokens_in / ok, 1),
                      "tokens_out_per_request": round(arm.tokens_out / ok, 1), "spend": round(arm.spend, 6)}
        del out[label]["quality"], out[label]["feedback"], out[label]["users"]
    return out


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


__all__ = ["CommandError", "Rollouts"]
