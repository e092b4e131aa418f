"""The live spend book in memory, and the flusher that writes it to the ledger in batches."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controlplane.controllers.spend import SpendFlusher
from controlplane.scoring.budget import HOUR
from controlplane.scoring.ledger import KEEP_HOURS, Spend, SpendBook, SqliteLedger

T0 = datetime(2026, 3, 14, 10, tzinfo=UTC).timestamp()
H0 = int(T0 // HOUR)


def test_book_totals_hours_and_budget_input() -> None:
    book = SpendBook()
    book.add(T0 + 1, "chat", "a", "", 100, 50, 0.25)
    book.add(T0 + 2, "chat", "a", "", 200, 25, 0.5)
    book.add(T0 - 1, "chat", "b", "", 1, 2, 1.0)  # the hour before
    book.add(T0 + 3, "embed", "a", "", 7, 0, 0.01)
    assert book.total()[("chat", "a")] == Spend(2, 300, 75, pytest.approx(0.75))
    assert book.since(T0) == {("chat", "a"): Spend(2, 300, 75, pytest.approx(0.75)),
                              ("embed", "a"): Spend(1, 7, 0, pytest.approx(0.01))}
    assert book.since(T0 - HOUR)[("chat", "b")] == Spend(1, 1, 2, 1.0)
    assert book.cost_by_hour() == {(H0, "chat"): pytest.approx(0.75), (H0 - 1, "chat"): 1.0,
                                   (H0, "embed"): pytest.approx(0.01)}


def test_pending_rows_are_taken_once_and_given_back_on_failure() -> None:
    book = SpendBook()
    book.add(T0, "chat", "a", "", 10, 20, 0.3)
    book.add(T0 + 1, "chat", "a", "", 1, 2, 0.1)
    rows = book.take_pending()
    assert rows == [(H0, "chat", "a", "", "", 2, 11, 22, pytest.approx(0.4))]
    assert book.take_pending() == []
    book.add(T0 + 2, "chat", "a", "", 1, 1, 0.1)
    book.give_back(rows)  # the write failed: merged with what came since
    assert book.take_pending() == [(H0, "chat", "a", "", "", 3, 12, 23, pytest.approx(0.5))]
    assert book.total()[("chat", "a")].requests == 3, "totals are not counted twice"


def test_old_hours_are_pruned_but_totals_kept() -> None:
    book = SpendBook()
    book.add(T0, "chat", "a", "", 1, 1, 1.0)
    book.prune(T0 + (KEEP_HOURS + 1) * HOUR)
    assert book.since(0) == {}
    assert book.total()[("chat", "a")].cost == 1.0


def test_book_loads_what_the_ledger_holds(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    try:
        ledger.add([(H0 - 100, "chat", "a", "", "", 5, 50, 50, 5.0), (H0, "chat", "a", "", "", 2, 20, 20, 2.0)])
        book = SpendBook.load(ledger, T0)
    finally:
        ledger.close()
    assert book.total()[("chat", "a")] == Spend(7, 70, 70, 7.0)
    assert book.since(T0) == {("chat", "a"): Spend(2, 20, 20, 2.0)}
    assert book.take_pending() == [], "what was loaded is not written again"


def test_ledger_batch_is_one_transaction(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    try:
        ledger.add([(H0, "chat", "a", "", "", 1, 1, 1, 1.0)])
        with pytest.raises(Exception):  # noqa: B017 - any database error will do
            ledger.add([(H0, "chat", "a", "", "", 1, 1, 1, 1.0), (H0, "chat", None, "", "", 1, 1, 1, 1.0)])  # type: ignore[list-item]
        assert ledger.spend(0)[("chat", "a")].requests == 1, "a failed batch leaves nothing behind"
    finally:
        ledger.close()


class FlakyLedger:
    """A ledger whose writes fail until told otherwise (a full disk, a locked file)."""

    def __init__(self, real: SqliteLedger) -> None:
        self.real = real
        self.failing = True
        self.writes = 0

    def add(self, rows: list) -> None:
        self.writes += 1
        if self.failing:
            raise OSError("disk full")
        self.real.add(rows)


def test_flusher_writes_batches_and_retries_failed_ones(tmp_path: Path) -> None:
    real = SqliteLedger(tmp_path / "l.sqlite3")
    ledger = FlakyLedger(real)
    book = SpendBook()
    flusher = SpendFlusher(book, ledger, interval=lambda: 1.0)  # type: ignore[arg-type]

    async def main() -> None:
        for i in range(1000):
            book.add(T0 + i % 60, "chat", "a" if i % 2 else "b", "", 10, 5, 0.001)
        await flusher.flush()
        assert ledger.writes == 1 and flusher.failures == 1
        book.add(T0, "chat", "a", "", 10, 5, 0.001)
        ledger.failing = False
        await flusher.flush()
        assert ledger.writes == 2 and flusher.flushes == 1
        await flusher.flush()
        assert ledger.writes == 2, "nothing pending: no write"

    try:
        asyncio.run(main())
        spent = real.spend(0)
        assert spent[("chat", "a")].requests == 501 and spent[("chat", "b")].requests == 500
    finally:
        real.close()


def test_a_stopped_flusher_finishes_with_one_last_flush(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    book = SpendBook()
    flusher = SpendFlusher(book, ledger, interval=lambda: 3600.0)  # only the stop makes it write

    async def main() -> None:
        task = asyncio.create_task(flusher.run())
        await asyncio.sleep(0)
        book.add(T0, "chat", "a", "", 1, 1, 0.5)
        flusher.stop()
        await asyncio.wait_for(task, 5)

    try:
        asyncio.run(main())
        assert ledger.spend(0)[("chat", "a")].requests == 1 and flusher.flushes == 1
    finally:
        ledger.close()


# -- per model ------------------------------------------------------------------------------------------

def model_book() -> SpendBook:
    book = SpendBook()
    book.add(T0 + 1, "chat", "a", "gpt-4o", 100, 10, 1.0)
    book.add(T0 + 2, "chat", "a", "gpt-4o-mini", 50, 5, 0.1)
    book.add(T0 + 3, "chat", "b", "gpt-4o", 200, 20, 2.0)
    book.add(T0 + 4, "chat", "b", "", 1, 1, 0.01)  # the request named no model
    book.add(T0 - 1, "chat", "a", "gpt-4o", 1000, 100, 10.0)  # the hour before
    book.add(T0 + 5, "embed", "a", "gpt-4o", 7, 0, 0.5)  # same model name, other pool
    return book


def test_book_reads_per_pool_and_backend_over_all_models() -> None:
    book = model_book()
    assert book.total() == {("chat", "a"): Spend(3, 1150, 115, pytest.approx(11.1)),
                            ("chat", "b"): Spend(2, 201, 21, pytest.approx(2.01)),
                            ("embed", "a"): Spend(1, 7, 0, 0.5)}
    assert book.since(T0) == {("chat", "a"): Spend(2, 150, 15, pytest.approx(1.1)),
                              ("chat", "b"): Spend(2, 201, 21, pytest.approx(2.01)),
                              ("embed", "a"): Spend(1, 7, 0, 0.5)}
    assert book.cost_by_hour() == {(H0, "chat"): pytest.approx(3.11), (H0 - 1, "chat"): 10.0,
                                   (H0, "embed"): 0.5}


def test_book_reads_per_pool_and_model_over_all_backends() -> None:
    book = model_book()
    assert book.by_model() == {("chat", "gpt-4o"): Spend(3, 1300, 130, pytest.approx(13.0)),
                               ("chat", "gpt-4o-mini"): Spend(1, 50, 5, pytest.approx(0.1)),
                               ("chat", ""): Spend(1, 1, 1, pytest.approx(0.01)),
                               ("embed", "gpt-4o"): Spend(1, 7, 0, 0.5)}
    assert book.by_model(T0 + 1800) == {("chat", "gpt-4o"): Spend(2, 300, 30, pytest.approx(3.0)),
                                        ("chat", "gpt-4o-mini"): Spend(1, 50, 5, pytest.approx(0.1)),
                                        ("chat", ""): Spend(1, 1, 1, pytest.approx(0.01)),
                                        ("embed", "gpt-4o"): Spend(1, 7, 0, 0.5)}
    assert book.by_model(T0 + HOUR) == {}
    book.prune(T0 + (KEEP_HOURS + 1) * HOUR)
    assert book.by_model(0) == {}, "windows read the hour buckets, which are pruned"
    assert book.by_model()[("chat", "gpt-4o")].requests == 3, "all time is kept"


def test_reads_do_not_alias_the_counters() -> None:
    book = model_book()
    book.total()
    book.since(0)
    book.by_model()
    book.by_model(0)
    assert book.by_model()[("chat", "gpt-4o")].requests == 3
    assert book.total()[("chat", "a")].requests == 3


def test_pending_rows_are_per_model() -> None:
    book = SpendBook()
    book.add(T0, "chat", "a", "m1", 10, 20, 0.3)
    book.add(T0 + 1, "chat", "a", "m2", 1, 2, 0.1)
    book.add(T0 + 2, "chat", "a", "m1", 1, 1, 0.1)
    rows = book.take_pending()
    assert sorted(rows) == [(H0, "chat", "a", "m1", "", 2, 11, 21, pytest.approx(0.4)),
                            (H0, "chat", "a", "m2", "", 1, 1, 2, pytest.approx(0.1))]
    book.give_back(rows)
    assert book.pending == 2
    book.add(T0 + 3, "chat", "a", "m2", 1, 1, 0.1)
    assert sorted(book.take_pending())[1] == (H0, "chat", "a", "m2", "", 2, 2, 3, pytest.approx(0.2))


def rounded(spent: dict) -> dict:
    """Sums in another order (SQLite's) differ in the last bits."""
    return {k: (s.requests, s.prompt_tokens, s.completion_tokens, round(s.cost, 9)) for k, s in spent.items()}


def test_book_load_restores_models(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    try:
        ledger.add(model_book().take_pending())
        ledger.add([(H0 - 100, "chat", "a", "gpt-4o", "", 5, 50, 50, 5.0)])  # beyond what is held in hours
        book = SpendBook.load(ledger, T0)
    finally:
        ledger.close()
    want = model_book()
    assert rounded(book.since(0)) == rounded(want.since(0))
    assert rounded(book.by_model(0)) == rounded(want.by_model(0))
    assert book.by_model() == {**want.by_model(), ("chat", "gpt-4o"): Spend(8, 1350, 180, pytest.approx(18.0))}
    assert book.total()[("chat", "a")] == Spend(8, 1200, 165, pytest.approx(16.1))
    assert book.cost_by_hour() == pytest.approx(want.cost_by_hour())
    assert book.take_pending() == []


def test_flusher_writes_models(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    book = model_book()
    try:
        asyncio.run(SpendFlusher(book, ledger, interval=lambda: 1.0).flush())
        assert ledger.spend_per_model(0)[("chat", "b", "")] == Spend(1, 1, 1, pytest.approx(0.01))
        assert ledger.spend(0)[("chat", "a")] == Spend(3, 1150, 115, pytest.approx(11.1))
    finally:
        ledger.close()


def test_model_names_per_pool_are_bounded():
    from controlplane.scoring.ledger import MAX_MODELS_PER_POOL, OTHER_MODEL, SpendBook

    book = SpendBook()
    for i in range(MAX_MODELS_PER_POOL + 10):
        book.add(0.0, "chat", "a", f"client-made-{i}", 1, 1, 0.5)
    book.add(0.0, "chat", "a", "client-made-0", 1, 1, 0.5)  # a name already kept stays itself
    book.add(0.0, "other-pool", "a", "m", 1, 1, 0.5)  # another pool has its own allowance
    models = book.by_model()
    assert len([k for k in models if k[0] == "chat"]) == MAX_MODELS_PER_POOL + 1
    assert models[("chat", OTHER_MODEL)].requests == 10
    assert models[("chat", "client-made-0")].requests == 2
    assert models[("other-pool", "m")].requests == 1
