"""The spend ledger: tokens and money per pool, backend and hour.

Two halves. `SpendBook` is the live, in-memory side: every access-log entry
is added to it (a few dict operations), and `/metrics`, `/v1/cost` and the
budgets read it, never the database. `Ledger` is the persisted side, behind a
small interface (SQLite from the stdlib by default; PostgreSQL can stand
behind the same methods when one machine is outgrown). The book hands the
ledger what changed since the last flush as one batch, written in one
transaction off the event loop, so a crash loses at most one flush interval.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .budget import HOUR

Key = tuple[str, str]  # pool, backend
Row = tuple[int, str, str, int, int, int, float]  # hour, pool, backend, requests, prompt, completion, cost
KEEP_HOURS = 48  # hour buckets held in memory: today's and yesterday's, for day windows across midnight


@dataclass(frozen=True)
class Spend:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    def __add__(self, other: Spend) -> Spend:
        return Spend(self.requests + other.requests, self.prompt_tokens + other.prompt_tokens,
                     self.completion_tokens + other.completion_tokens, self.cost + other.cost)


class Ledger(Protocol):
    def add(self, rows: Iterable[Row]) -> None:
        """Add a batch of per-hour deltas in one transaction: all of it lands, or none."""
        ...

    def spend(self, since: float, pool: str | None = None) -> dict[Key, Spend]:
        """Spend per (pool, backend) from the hour bucket holding `since` on."""
        ...

    def hours(self, since: float) -> list[Row]:
        """The per-hour rows from the hour holding `since` on."""
        ...

    def close(self) -> None: ...


_UPSERT = """INSERT INTO spend VALUES (?, ?, ?, ?, ?, ?, ?)
   ON CONFLICT (hour, pool, backend) DO UPDATE SET
     requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens,
     completion_tokens = completion_tokens + excluded.completion_tokens,
     cost = cost + excluded.cost"""


class SqliteLedger:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()  # the flush runs in a worker thread
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            """CREATE TABLE IF NOT EXISTS spend (
                hour INTEGER NOT NULL, pool TEXT NOT NULL, backend TEXT NOT NULL,
                requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
                completion_tokens INTEGER NOT NULL, cost REAL NOT NULL,
                PRIMARY KEY (hour, pool, backend))"""
        )

    def record(self, at: float, pool: str, backend: str, prompt_tokens: int, completion_tokens: int,
               cost: float) -> None:
        """One request, written at once (tools and tests; the service writes batches)."""
        self.add([(int(at // HOUR), pool, backend, 1, prompt_tokens, completion_tokens, cost)])

    def add(self, rows: Iterable[Row]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(_UPSERT, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def spend(self, since: float, pool: str | None = None) -> dict[Key, Spend]:
        query = ("SELECT pool, backend, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost) "
                 "FROM spend WHERE hour >= ?")
        args: list[object] = [int(since // HOUR)]
        if pool is not None:
            query += " AND pool = ?"
            args.append(pool)
        with self._lock:
            rows = self._db.execute(query + " GROUP BY pool, backend", args).fetchall()
        return {(p, b): Spend(int(r), int(pt), int(ct), float(c)) for p, b, r, pt, ct, c in rows}

    def hours(self, since: float) -> list[Row]:
        with self._lock:
            rows = self._db.execute(
                "SELECT hour, pool, backend, requests, prompt_tokens, completion_tokens, cost FROM spend "
                "WHERE hour >= ?", (int(since // HOUR),)).fetchall()
        return [(int(h), p, b, int(r), int(pt), int(ct), float(c)) for h, p, b, r, pt, ct, c in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class SpendBook:
    """Live spend in memory: all-time totals, recent hour buckets, and what the ledger has not got yet.

    Counters are plain lists mutated in place: this is the per-request path.
    """

    def __init__(self) -> None:
        self._total: dict[Key, list[float]] = {}
        self._hours: dict[tuple[int, str, str], list[float]] = {}
        self._pending: dict[tuple[int, str, str], list[float]] = {}

    @classmethod
    def load(cls, ledger: Ledger, now: float) -> SpendBook:
        """What the ledger holds, so budgets and totals carry over a restart."""
        book = cls()
        for key, s in ledger.spend(0).items():
            book._total[key] = [s.requests, s.prompt_tokens, s.completion_tokens, s.cost]
        for hour, pool, backend, requests, prompt, completion, cost in ledger.hours(now - KEEP_HOURS * HOUR):
            book._hours[(hour, pool, backend)] = [requests, prompt, completion, cost]
        return book

    def add(self, at: float, pool: str, backend: str, prompt_tokens: int, completion_tokens: int,
            cost: float) -> None:
        bucket = (int(at // HOUR), pool, backend)
        _bump(self._total, (pool, backend), 1, prompt_tokens, completion_tokens, cost)
        _bump(self._hours, bucket, 1, prompt_tokens, completion_tokens, cost)
        _bump(self._pending, bucket, 1, prompt_tokens, completion_tokens, cost)

    def take_pending(self) -> list[Row]:
        """What changed since the last call, as ledger rows; the caller gives it back if writing fails."""
        pending, self._pending = self._pending, {}
        return [(h, p, b, int(c[0]), int(c[1]), int(c[2]), c[3]) for (h, p, b), c in pending.items()]

    def give_back(self, rows: Iterable[Row]) -> None:
        """A failed write: merge its rows into what is pending, to be tried again."""
        for hour, pool, backend, requests, prompt, completion, cost in rows:
            _bump(self._pending, (hour, pool, backend), requests, prompt, completion, cost)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def prune(self, now: float) -> None:
        oldest = int(now // HOUR) - KEEP_HOURS
        for bucket in [b for b in self._hours if b[0] < oldest]:
            del self._hours[bucket]

    def total(self) -> dict[Key, Spend]:
        return {k: _spend(c) for k, c in self._total.items()}

    def since(self, start: float) -> dict[Key, Spend]:
        """Per (pool, backend) from the hour holding `start` on (at most KEEP_HOURS back)."""
        first = int(start // HOUR)
        out: dict[Key, Spend] = {}
        for (hour, pool, backend), c in self._hours.items():
            if hour >= first:
                out[(pool, backend)] = out.get((pool, backend), Spend()) + _spend(c)
        return out

    def cost_by_hour(self) -> dict[tuple[int, str], float]:
        """Per (hour, pool): what the budgets read."""
        out: dict[tuple[int, str], float] = {}
        for (hour, pool, _), c in self._hours.items():
            out[(hour, pool)] = out.get((hour, pool), 0.0) + c[3]
        return out


def _bump(table: dict[Any, list[float]], key: Any, requests: int, prompt: int, completion: int,
          cost: float) -> None:
    c = table.get(key)
    if c is None:
        table[key] = [requests, prompt, completion, cost]
    else:
        c[0] += requests
        c[1] += prompt
        c[2] += completion
        c[3] += cost


def _spend(c: list[float]) -> Spend:
    return Spend(int(c[0]), int(c[1]), int(c[2]), c[3])
