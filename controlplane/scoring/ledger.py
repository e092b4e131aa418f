"""The spend ledger: tokens and money per pool, backend and hour, persisted.

A small storage interface (`Ledger`) with SQLite (stdlib) as the default; a
PostgreSQL implementation can stand behind the same methods when one machine
is outgrown. Every request is committed as it is recorded (WAL journal), so a
crash loses nothing already counted.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

HOUR = 3600
DAY = 86400


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
    def record(self, at: float, pool: str, backend: str, prompt_tokens: int, completion_tokens: int,
               cost: float) -> None: ...

    def spend(self, since: float, pool: str | None = None) -> dict[tuple[str, str], Spend]:
        """Spend per (pool, backend) from the hour bucket holding `since` on."""
        ...

    def close(self) -> None: ...


class SqliteLedger:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
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
        with self._lock:
            self._db.execute(
                """INSERT INTO spend VALUES (?, ?, ?, 1, ?, ?, ?)
                   ON CONFLICT (hour, pool, backend) DO UPDATE SET
                     requests = requests + 1, prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                     completion_tokens = completion_tokens + excluded.completion_tokens,
                     cost = cost + excluded.cost""",
                (int(at // HOUR), pool, backend, prompt_tokens, completion_tokens, cost),
            )

    def spend(self, since: float, pool: str | None = None) -> dict[tuple[str, str], Spend]:
        query = ("SELECT pool, backend, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost) "
                 "FROM spend WHERE hour >= ?")
        args: list[object] = [int(since // HOUR)]
        if pool is not None:
            query += " AND pool = ?"
            args.append(pool)
        with self._lock:
            rows = self._db.execute(query + " GROUP BY pool, backend", args).fetchall()
        return {(p, b): Spend(int(r), int(pt), int(ct), float(c)) for p, b, r, pt, ct, c in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()


def period_start(now: float, window: str) -> float:
    """Budgets run on calendar hours and days, in UTC."""
    size = HOUR if window == "hour" else DAY
    return now - now % size
