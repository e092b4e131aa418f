"""The spend ledger: tokens and money per pool, backend, model, client and hour.

Two halves. `SpendBook` is the live, in-memory side: every access-log entry
is added to it (a few dict operations), and `/metrics`, `/v1/cost` and the
budgets read it, never the database. `Ledger` is the persisted side, behind a
small interface (SQLite from the stdlib by default; PostgreSQL can stand
behind the same methods when one machine is outgrown). The book hands the
ledger what changed since the last flush as one batch, written in one
transaction off the event loop, so a crash loses at most one flush interval.

The model is the served one ("" when neither the request nor the backend
named one). Spend read per (pool, backend) sums over the models and clients.
The client is the caller's name as Envoy set it from its key ("" when no
clients are configured); spend read per client sums over pools, backends and
models (the client budgets and `/v1/cost` read it).

The managed Envoy also writes every request to a spool file
(telemetry/spool.py). The ledger keeps, in a one-row `spool` table, how many
of the spool's lines the spend already holds (`covered`), written in the same
transaction as that spend: so after a crash exactly the lines beyond it are
charged again from the file, none twice.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from .budget import HOUR

log = logging.getLogger("controlplane.ledger")

Key = tuple[str, str]  # pool, backend
ModelKey = tuple[str, str]  # pool, model
FullKey = tuple[str, str, str]  # pool, backend, model
# hour, pool, backend, model, client, requests, prompt, completion, cost
Row = tuple[int, str, str, str, str, int, int, int, float]
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


SpoolMark = tuple[int, int]  # generation, covered: how many spool lines the spend holds, in which generation


class SpoolState(NamedTuple):
    """The ledger's `spool` row."""

    generation: int  # bumped by each recovery and rotation: a write of an older generation moves no count
    covered: int  # lines of the current spool files (the rotated one first) whose spend the ledger holds
    done: tuple[str, ...]  # spool file names already charged (or retired), still to be deleted
    recovered: Spend  # all time: requests charged from the spool rather than from the gRPC access log


class Ledger(Protocol):
    def add(self, rows: Iterable[Row], spool: SpoolMark | None = None) -> None:
        """Add a batch of per-hour deltas in one transaction: all of it lands, or none.

        With `spool=(generation, covered)` the spool count is written in the same transaction (only
        while its generation is still the current one). Callers pass it only when they keep a spool."""
        ...

    def spend(self, since: float, pool: str | None = None) -> dict[Key, Spend]:
        """Spend per (pool, backend), over all models, from the hour bucket holding `since` on."""
        ...

    def spend_per_model(self, since: float) -> dict[FullKey, Spend]:
        """Spend per (pool, backend, model) from the hour bucket holding `since` on."""
        ...

    def spend_per_client(self, since: float) -> dict[str, Spend]:
        """Spend per client, over pools, backends and models, from the hour bucket holding `since` on."""
        ...

    def hours(self, since: float) -> list[Row]:
        """The per-hour rows from the hour holding `since` on."""
        ...

    def close(self) -> None: ...


_COLUMNS = "hour, pool, backend, model, client, requests, prompt_tokens, completion_tokens, cost"
_CREATE = """CREATE TABLE IF NOT EXISTS {table} (
    hour INTEGER NOT NULL, pool TEXT NOT NULL, backend TEXT NOT NULL, model TEXT NOT NULL DEFAULT '',
    client TEXT NOT NULL DEFAULT '', requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, cost REAL NOT NULL,
    PRIMARY KEY (hour, pool, backend, model, client))"""
_CREATE_SPOOL = """CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY CHECK (id = 0), generation INTEGER NOT NULL, covered INTEGER NOT NULL,
    done TEXT NOT NULL, recovered_requests INTEGER NOT NULL, recovered_prompt_tokens INTEGER NOT NULL,
    recovered_completion_tokens INTEGER NOT NULL, recovered_cost REAL NOT NULL)"""
_UPSERT = f"""INSERT INTO spend ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
   ON CONFLICT (hour, pool, backend, model, client) DO UPDATE SET
     requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens,
     completion_tokens = completion_tokens + excluded.completion_tokens,
     cost = cost + excluded.cost"""


class SqliteLedger:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()  # the flush runs in a worker thread
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._schema()
        except BaseException:
            self._db.close()
            raise

    def _schema(self) -> None:
        """Create the table, or bring one written before spend had a model or a client up to date: one
        transaction, every row kept (with model '' and client '' where it had none). SQLite cannot add a
        column to a primary key, so the table is copied into a new one, which then takes its name.
        IMMEDIATE: a second process opening the file waits, then sees the table already migrated."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(_CREATE.format(table="spend"))
            db.execute(_CREATE_SPOOL)
            db.execute("INSERT OR IGNORE INTO spool VALUES (0, 0, 0, '', 0, 0, 0, 0.0)")
            columns = {row[1] for row in db.execute("PRAGMA table_info(spend)")}
            missing = [c for c in ("model", "client") if c not in columns]
            if missing:
                db.execute("DROP TABLE IF EXISTS spend_migrating")
                db.execute(_CREATE.format(table="spend_migrating"))
                model = "model" if "model" in columns else "''"
                moved = db.execute(
                    f"INSERT INTO spend_migrating ({_COLUMNS}) SELECT hour, pool, backend, {model}, '', requests, "
                    "prompt_tokens, completion_tokens, cost FROM spend").rowcount
                db.execute("DROP TABLE spend")
                db.execute("ALTER TABLE spend_migrating RENAME TO spend")
                log.info("ledger %s: spend rows now carry the %s; %d rows kept (%s)", self.path,
                         " and the ".join(missing), moved, ", ".join(f"{c} ''" for c in missing))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def record(self, at: float, pool: str, backend: str, prompt_tokens: int, completion_tokens: int,
               cost: float, *, model: str = "", client: str = "") -> None:
        """One request, written at once (tools and tests; the service writes batches)."""
        self.add([(int(at // HOUR), pool, backend, model, client, 1, prompt_tokens, completion_tokens, cost)])

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing: what the body writes is committed together, or rolled back on any error."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def add(self, rows: Iterable[Row], spool: SpoolMark | None = None) -> None:
        with self._transaction() as db:
            db.executemany(_UPSERT, rows)
            if spool is not None:
                generation, covered = spool
                db.execute("UPDATE spool SET covered = ? WHERE id = 0 AND generation = ?", (covered, generation))

    def spool_state(self) -> SpoolState:
        with self._lock:
            g, c, done, r, pt, ct, cost = self._db.execute(
                "SELECT generation, covered, done, recovered_requests, recovered_prompt_tokens, "
                "recovered_completion_tokens, recovered_cost FROM spool WHERE id = 0").fetchone()
        return SpoolState(int(g), int(c), tuple(done.split()), Spend(int(r), int(pt), int(ct), float(cost)))

    def set_spool(self, rows: Iterable[Row], *, generation: int, covered: int, done: Iterable[str] = (),
                  recovered: Spend = Spend()) -> None:
        """One transaction: spend rows, a new spool count and generation, the files left to delete, and
        what of the spend came from the spool (added to the all-time sums)."""
        with self._transaction() as db:
            db.executemany(_UPSERT, rows)
            db.execute(
                "UPDATE spool SET generation = ?, covered = ?, done = ?, "
                "recovered_requests = recovered_requests + ?, "
                "recovered_prompt_tokens = recovered_prompt_tokens + ?, "
                "recovered_completion_tokens = recovered_completion_tokens + ?, "
                "recovered_cost = recovered_cost + ? WHERE id = 0",
                (generation, covered, " ".join(done), recovered.requests, recovered.prompt_tokens,
                 recovered.completion_tokens, recovered.cost))

    def clear_spool_done(self) -> None:
        """The files named in `done` are gone."""
        with self._lock:
            self._db.execute("UPDATE spool SET done = '' WHERE id = 0")

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

    def spend_per_model(self, since: float) -> dict[FullKey, Spend]:
        with self._lock:
            rows = self._db.execute(
                "SELECT pool, backend, model, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost) "
                "FROM spend WHERE hour >= ? GROUP BY pool, backend, model", (int(since // HOUR),)).fetchall()
        return {(p, b, m): Spend(int(r), int(pt), int(ct), float(c)) for p, b, m, r, pt, ct, c in rows}

    def spend_per_client(self, since: float) -> dict[str, Spend]:
        with self._lock:
            rows = self._db.execute(
                "SELECT client, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost) "
                "FROM spend WHERE hour >= ? GROUP BY client", (int(since // HOUR),)).fetchall()
        return {k: Spend(int(r), int(pt), int(ct), float(c)) for k, r, pt, ct, c in rows}

    def hours(self, since: float) -> list[Row]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM spend WHERE hour >= ?", (int(since // HOUR),)).fetchall()
        return [(int(h), p, b, m, k, int(r), int(pt), int(ct), float(c)) for h, p, b, m, k, r, pt, ct, c in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


# Model names come from clients (the body's `model`) where a pool does not route by model: past this
# many names per pool, spend is kept under OTHER_MODEL, so a client cannot grow the book without bound.
MAX_MODELS_PER_POOL = 64
OTHER_MODEL = "(other)"
# Client names are Envoy's, set from the configured keys, so they are bounded by the config; this only
# guards the book against a config that churns through names (or a foreign spool file).
MAX_CLIENTS = 1024
OTHER_CLIENT = "(other)"
PendingKey = tuple[int, str, str, str, str]  # hour, pool, backend, model, client


class SpendBook:
    """Live spend in memory: all-time totals, recent hour buckets, and what the ledger has not got yet,
    each per (pool, backend, model); read per (pool, backend) or per (pool, model). Per client, the
    same again (totals and hour buckets), for the client budgets and `/v1/cost`; what is pending for the
    ledger is per (pool, backend, model, client).

    Counters are plain lists mutated in place: this is the per-request path.

    With a spool (a managed Envoy), the pending state also holds the spool count: how many access-log
    entries of that Envoy the book has taken in, against its current spool files (see `count_spooled`).
    """

    def __init__(self) -> None:
        self._total: dict[FullKey, list[float]] = {}
        self._hours: dict[tuple[int, str, str, str], list[float]] = {}
        self._pending: dict[PendingKey, list[float]] = {}
        self._client_total: dict[str, list[float]] = {}
        self._client_hours: dict[tuple[int, str], list[float]] = {}
        self._models: dict[str, set[str]] = {}  # per pool, the model names kept on their own
        self._spool: list[int] | None = None  # [generation, covered] while a spool is kept
        self.recovered = Spend()  # all time: spend charged from the spool (loaded, then added to)

    @classmethod
    def load(cls, ledger: Ledger, now: float) -> SpendBook:
        """What the ledger holds, so budgets and totals carry over a restart."""
        book = cls()
        for key, s in ledger.spend_per_model(0).items():
            book._total[key] = [s.requests, s.prompt_tokens, s.completion_tokens, s.cost]
            book._models.setdefault(key[0], set()).add(key[2])
        for name, s in ledger.spend_per_client(0).items():
            if name:
                _bump(book._client_total, book._client(name), s.requests, s.prompt_tokens, s.completion_tokens,
                      s.cost)
        for hour, pool, backend, model, client, requests, prompt, completion, cost in ledger.hours(
                now - KEEP_HOURS * HOUR):
            _bump(book._hours, (hour, pool, backend, model), requests, prompt, completion, cost)
            if client:
                _bump(book._client_hours, (hour, book._client(client)), requests, prompt, completion, cost)
        return book

    def _model(self, pool: str, model: str) -> str:
        models = self._models.get(pool)
        if models is None:
            models = self._models[pool] = set()
        if model not in models:
            if len(models) >= MAX_MODELS_PER_POOL:
                return OTHER_MODEL
            models.add(model)
        return model

    def _client(self, client: str) -> str:
        if client in self._client_total or len(self._client_total) < MAX_CLIENTS:
            return client
        return OTHER_CLIENT

    def add(self, at: float, pool: str, backend: str, model: str, prompt_tokens: int, completion_tokens: int,
            cost: float, client: str = "") -> None:
        model = self._model(pool, model)
        hour = int(at // HOUR)
        bucket = (hour, pool, backend, model)
        _bump(self._total, (pool, backend, model), 1, prompt_tokens, completion_tokens, cost)
        _bump(self._hours, bucket, 1, prompt_tokens, completion_tokens, cost)
        if client:
            client = self._client(client)
            _bump(self._client_total, client, 1, prompt_tokens, completion_tokens, cost)
            _bump(self._client_hours, (hour, client), 1, prompt_tokens, completion_tokens, cost)
        _bump(self._pending, (*bucket, client), 1, prompt_tokens, completion_tokens, cost)

    def take_pending(self) -> list[Row]:
        """What changed since the last call, as ledger rows; the caller gives it back if writing fails."""
        pending, self._pending = self._pending, {}
        return [(h, p, b, m, k, int(c[0]), int(c[1]), int(c[2]), c[3]) for (h, p, b, m, k), c in pending.items()]

    def give_back(self, rows: Iterable[Row]) -> None:
        """A failed write: merge its rows into what is pending, to be tried again."""
        for hour, pool, backend, model, client, requests, prompt, completion, cost in rows:
            _bump(self._pending, (hour, pool, backend, model, client), requests, prompt, completion, cost)

    def absorb(self, rows: Iterable[Row]) -> None:
        """Rows already written to the ledger (a recovery): into the totals and hours, not pending."""
        for hour, pool, backend, model, client, requests, prompt, completion, cost in rows:
            model = self._model(pool, model)
            _bump(self._total, (pool, backend, model), requests, prompt, completion, cost)
            _bump(self._hours, (hour, pool, backend, model), requests, prompt, completion, cost)
            if client:
                client = self._client(client)
                _bump(self._client_total, client, requests, prompt, completion, cost)
                _bump(self._client_hours, (hour, client), requests, prompt, completion, cost)

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- the spool count (a managed Envoy's spool file; telemetry/spool.py) ---------------------------------

    def set_spool(self, generation: int, covered: int) -> None:
        """Keep a spool count from now on, starting at what the ledger holds (or after a recovery/rotation)."""
        self._spool = [generation, covered]

    def count_spooled(self, entries: int) -> None:
        """`entries` access-log entries of the managed Envoy taken in, their spend added in the same step."""
        if self._spool is not None:
            self._spool[1] += entries

    def spool_mark(self) -> SpoolMark | None:
        """(generation, covered) as of now, None without a spool. An absolute count, not a delta: a
        failed write needs no giving back, the next write carries it."""
        return (self._spool[0], self._spool[1]) if self._spool is not None else None

    def prune(self, now: float) -> None:
        oldest = int(now // HOUR) - KEEP_HOURS
        for bucket in [b for b in self._hours if b[0] < oldest]:
            del self._hours[bucket]
        for key in [k for k in self._client_hours if k[0] < oldest]:
            del self._client_hours[key]

    def total(self) -> dict[Key, Spend]:
        """All time, per (pool, backend), over all models."""
        out: dict[Key, list[float]] = {}
        for (pool, backend, _), c in self._total.items():
            _bump(out, (pool, backend), *c)
        return {k: _spend(c) for k, c in out.items()}

    def since(self, start: float) -> dict[Key, Spend]:
        """Per (pool, backend), over all models, from the hour holding `start` on (at most KEEP_HOURS back)."""
        first = int(start // HOUR)
        out: dict[Key, list[float]] = {}
        for (hour, pool, backend, _), c in self._hours.items():
            if hour >= first:
                _bump(out, (pool, backend), *c)
        return {k: _spend(c) for k, c in out.items()}

    def by_model(self, start: float | None = None) -> dict[ModelKey, Spend]:
        """Per (pool, model), over all backends: all time when `start` is None, else from the hour
        holding `start` on (at most KEEP_HOURS back)."""
        out: dict[ModelKey, list[float]] = {}
        if start is None:
            for (pool, _, model), c in self._total.items():
                _bump(out, (pool, model), *c)
        else:
            first = int(start // HOUR)
            for (hour, pool, _, model), c in self._hours.items():
                if hour >= first:
                    _bump(out, (pool, model), *c)
        return {k: _spend(c) for k, c in out.items()}

    def by_client(self, start: float | None = None) -> dict[str, Spend]:
        """Per client (requests without one are not in it): all time when `start` is None, else from the
        hour holding `start` on (at most KEEP_HOURS back)."""
        if start is None:
            return {k: _spend(c) for k, c in self._client_total.items()}
        first = int(start // HOUR)
        out: dict[str, list[float]] = {}
        for (hour, client), c in self._client_hours.items():
            if hour >= first:
                _bump(out, client, *c)
        return {k: _spend(c) for k, c in out.items()}

    def cost_by_hour(self) -> dict[tuple[int, str], float]:
        """Per (hour, pool): what the budgets read."""
        out: dict[tuple[int, str], float] = {}
        for (hour, pool, _, _), c in self._hours.items():
            out[(hour, pool)] = out.get((hour, pool), 0.0) + c[3]
        return out

    def cost_by_client_hour(self) -> dict[tuple[int, str], float]:
        """Per (hour, client): what the client budgets read (O(clients x hours held))."""
        return {key: c[3] for key, c in self._client_hours.items()}


def _bump(table: dict[Any, list[float]], key: Any, requests: float, prompt: float, completion: float,
          cost: float) -> None:
    """Add to `table[key]`; a new entry is a new list, so a sum never shares a list with its parts."""
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
