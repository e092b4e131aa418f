"""Writes the live spend to the ledger once per flush interval, in one transaction, off the event loop.

A crash loses at most what came in since the last flush (one interval), plus
what Envoy had buffered and not yet sent; with a managed Envoy's spool
(telemetry/spool.py) both are charged again from the spool at the next start.
The spool count goes in the same transaction as the spend it covers. A failed
write is kept and retried. The flusher is stopped, never cancelled: a write in
flight always finishes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from ..scoring.ledger import Ledger, SpendBook, SpoolMark

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
        self._written: SpoolMark | None = None  # the spool count last written
        # One writer thread of our own, so a synchronous caller can wait for the write in flight.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._writing: concurrent.futures.Future[None] | None = None

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

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """No flush runs (none is in flight) while this is held."""
        async with self._lock:
            yield

    def wait_written(self, timeout: float = 5.0) -> None:
        """Block until the write in flight, if any, has reached the ledger (or failed): for synchronous
        callers on the event loop, which cannot wait for `flush()`."""
        writing = self._writing
        if writing is not None:
            concurrent.futures.wait([writing], timeout)

    async def flush(self) -> None:
        async with self._lock:  # one write at a time, in order
            rows = self.book.take_pending()
            mark = self.book.spool_mark()
            if not rows and mark == self._written:
                return
            # Rows and the spool count taken in the same step: the count covers exactly the spend written.
            if mark is None:
                self._writing = self._executor.submit(self.ledger.add, rows)
            else:
                self._writing = self._executor.submit(self.ledger.add, rows, spool=mark)
            try:
                await asyncio.wrap_future(self._writing)
            except Exception:
                self.failures += 1
                self.book.give_back(rows)
                log.exception("cannot write %d spend rows to the ledger; kept in memory, retried next flush",
                              len(rows))
                return
            finally:
                self._writing = None
            self._written = mark
            self.flushes += 1
            self.last_flush = time.time()
