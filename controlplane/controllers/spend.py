"""Writes the live spend to the ledger once per flush interval, in one transaction, off the event loop.

A crash loses at most what came in since the last flush (one interval), plus
what Envoy had buffered and not yet sent. A failed write is kept and retried.
The flusher is stopped, never cancelled: a write in flight always finishes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..scoring.ledger import Ledger, SpendBook

log = logging.getLogger("controlplane.ledger")


class SpendFlusher:
    def __init__(self, book: SpendBook, ledger: Ledger, interval: Callable[[], float]) -> None:
        self.book = book
        self.ledger = ledger
        self.interval = interval  # read each round: a reload may change it
        self.flushes = 0
        self.failures = 0
        self.last_flush = 0.0  # wall clock of the last successful write
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval())
            except TimeoutError:
                pass
            await self.flush()

    def stop(self) -> None:
        """The loop ends after its current write, with one last flush."""
        self._stopping.set()

    async def flush(self) -> None:
        async with self._lock:  # one write at a time, in order
            rows = self.book.take_pending()
            if not rows:
                return
            try:
                await asyncio.to_thread(self.ledger.add, rows)
            except Exception:
                self.failures += 1
                self.book.give_back(rows)
                log.exception("cannot write %d spend rows to the ledger; kept in memory, retried next flush",
                              len(rows))
                return
            self.flushes += 1
            self.last_flush = time.time()
