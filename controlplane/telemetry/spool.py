"""The managed Envoy's spool: every request also written to a local file, so spend survives a crash.

The gRPC access log (accesslog.py) is at most once: a control plane that dies
loses the spend it had not yet flushed to the ledger, and whatever Envoy had
buffered or had in flight on the stream. So the Envoy this process runs (App
with run_envoy) also writes one JSON line per request to `spool.jsonl` in the
state directory (Envoy's file access logger; the listener's second logger,
xds/resources.py), holding only what the spend needs.

Exactly once, by count. Both loggers see the same requests, so the N-th
entry received over gRPC from the managed node is, give or take ordering, the
N-th line of the spool. The control plane counts the entries it takes in from
that node (`covered`) and writes the count in the same SQLite transaction as
their spend (scoring/ledger.py). Before each Envoy start (`recover`: at start,
after a crash, and before the supervisor restarts a dead Envoy) the spool is
read, its first `covered` lines skipped, and every remaining line charged as
spend (at the engine's prices; it does not feed the scores), counted as
recovered; the spool files are then deleted and the count reset to 0, in one
transaction with that spend, before the new Envoy starts. Entries of an old
Envoy's stream that arrive after its spool was recovered are dropped: their
lines were charged from the file.

The number of requests is exact; which requests are charged is exact too,
except near the end: Envoy's worker threads each batch their own gRPC
entries while the file is written in completion order, so the lines charged
(the last ones in the file) may differ from the entries missed (the last
ones of each worker's stream) among the requests of the last ~0.2 s (the
access log's buffer interval): a few requests' backend, model or tokens may
be swapped, never their number. A line whose usage is missing or absurd is
estimated as accesslog.parse() does. Each line names its client (when
clients are configured), so recovered spend is charged to it as well.

Rotation. When `spool.jsonl` grows past MAX_BYTES it is renamed to
`spool.1.jsonl` and Envoy is told to reopen its logs (admin `/reopen_logs`,
which makes it create a new `spool.jsonl`; lines it had buffered go to the
new file, so the two files hold the lines in order). `covered` counts lines
across both files, the rotated one first. Once the count covers the rotated
file, it is deleted and its line count subtracted from the count, in one
transaction. (If it never gets covered, e.g. Envoy dropped gRPC entries, it is
retired when the new file is full too, its uncovered lines charged as
recovered.) A crash at any point leaves the files and the count consistent:
files already accounted for are named in the ledger and deleted on the next
pass, never read again.

Not covered: an Envoy this process does not run (compose, `run_envoy=False`).
Requests it serves while the control plane is down, and entries it had
buffered when the control plane died, are not recovered; the stream counts
(`llm_lb_access_log_streams_total{node}`) show each reconnect, i.e. each gap
where this may have happened. Nor lines an Envoy never wrote: the managed one
is run with ENVOY_FLAGS, so its file logger writes as soon as it has a line
(Envoy's default keeps up to 64 KiB for up to 10 s, and on SIGTERM does not
always write it out: seen, envoy/README.md); it is stopped by SIGTERM, also
when the control plane dies (parent-death signal). An Envoy that crashes or
is SIGKILLed may still lose the few lines its writer thread had not written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

from ..config import Config
from ..scoring.engine import request_cost
from ..scoring.ledger import Spend, SpendBook, SqliteLedger
from .accesslog import MAX_MODEL_CHARS, AccessLogService, Observation, Stream, plausible, token_count, usage

log = logging.getLogger("controlplane.spool")

SPOOL_NAME = "spool.jsonl"
ROTATED_NAME = "spool.1.jsonl"
MAX_BYTES = 64 * 1024 * 1024  # past this, spool.jsonl is rotated
REOPEN_WAIT = 2.0  # seconds to wait for Envoy to create the new spool.jsonl after /reopen_logs
STREAM_WAIT = 2.0  # seconds to wait for a stopped Envoy's access-log streams to end
# Envoy's file logs: written as soon as there is anything to write (default: once 64 KiB are buffered,
# else every 10 s). Envoy usually writes its buffer out when it stops, but not always: with the defaults,
# 2 of 10 SIGTERMs under load lost the last ~70 ms of lines (up to 64 KiB); with these, none of 12 did
# (envoy/README.md). Command-line flags: the 1.40 bootstrap has no field for them.
ENVOY_FLAGS = ("--file-flush-min-size-kb", "0", "--file-flush-interval-msec", "100")

# The keys of a spool line (the listener's file logger writes them: xds/resources.py).
KEY_ID = "id"
KEY_TIME = "time"  # start of the request, Unix seconds (a string)
KEY_POOL = "pool"  # the upstream cluster
KEY_BACKEND = "backend"  # the chosen endpoint's metadata: null when Envoy answered itself
KEY_MODEL = "model"  # the backend's own model name (endpoint metadata), null when it has none
KEY_REQUESTED = "requested_model"  # the x-llm-model request header
KEY_STATUS = "status"
KEY_FLAGS = "flags"  # Envoy's short codes ("UF,URX"), "-" when none; the gRPC log gives long names instead
KEY_RECEIVED = "bytes_received"  # request body bytes
KEY_SENT = "bytes_sent"  # response body bytes
KEY_DURATION = "duration_ms"  # start to last byte out: the time allowance in accesslog.plausible()
KEY_PROMPT = "prompt_tokens"  # from the usage dynamic metadata: numbers, or null when absent
KEY_COMPLETION = "completion_tokens"
KEY_CHUNKS = "content_chunks"
KEY_CLIENT = "client"  # the x-llm-client request header (Envoy's, from the key): null without clients
KEYS = (KEY_ID, KEY_TIME, KEY_POOL, KEY_BACKEND, KEY_MODEL, KEY_REQUESTED, KEY_STATUS, KEY_FLAGS, KEY_RECEIVED,
        KEY_SENT, KEY_DURATION, KEY_PROMPT, KEY_COMPLETION, KEY_CHUNKS, KEY_CLIENT)


def _text(value: object, limit: int | None = None) -> str:
    if not isinstance(value, str):
        return ""
    return value[:limit] if limit is not None else value


def _int(value: object) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value == value and abs(value) < 2**62:
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return 0
    return 0


def observation(record: Mapping[str, Any]) -> Observation:
    """One spool line (decoded) as the Observation accesslog.parse() makes of the same request's gRPC entry:
    the same counts, estimates and suspicion (accesslog's token_count(), plausible() and usage()).

    Not in the file, so left empty: time to first byte and the quality header (None). Response flags are
    Envoy's short codes; the latency is Envoy's DURATION (the gRPC log's last-byte time, to the ms).
    """
    received, sent = max(0, _int(record.get(KEY_RECEIVED))), max(0, _int(record.get(KEY_SENT)))
    latency = float(max(0, _int(record.get(KEY_DURATION))))
    raw_prompt, raw_completion = record.get(KEY_PROMPT), record.get(KEY_COMPLETION)
    prompt, completion = token_count(raw_prompt), token_count(raw_completion)
    suspicious = (raw_prompt is not None and prompt is None) or (raw_completion is not None and completion is None)
    suspicious = suspicious or plausible(prompt, completion, received, sent, latency) != (prompt, completion)
    prompt_tokens, completion_tokens, estimated = usage(prompt, completion, token_count(record.get(KEY_CHUNKS)),
                                                        received, sent, latency)
    requested = _text(record.get(KEY_REQUESTED), MAX_MODEL_CHARS)
    flags = _text(record.get(KEY_FLAGS))
    return Observation(
        _text(record.get(KEY_ID)),
        _text(record.get(KEY_POOL)),
        _text(record.get(KEY_BACKEND)),
        _int(record.get(KEY_STATUS)),
        latency,
        None,
        prompt_tokens,
        completion_tokens,
        estimated,
        "" if flags == "-" else flags,
        None,
        requested,
        _text(record.get(KEY_MODEL), MAX_MODEL_CHARS) or requested,
        suspicious,
        _text(record.get(KEY_CLIENT), MAX_MODEL_CHARS),  # a line written before lines had it: no client
    )


def parse_line(raw: bytes | str) -> Observation:
    """One spool line -> an Observation; raises ValueError if it is not a JSON object."""
    record = json.loads(raw)
    if not isinstance(record, dict):
        raise ValueError("a spool line is a JSON object")
    return observation(record)


def started_at(record: Mapping[str, Any], now: float) -> float:
    """When the request started (its hour bucket), else `now`; never in the future."""
    at = _int(record.get(KEY_TIME))
    return float(at) if 0 < at <= now else now


def count_lines(path: Path) -> int:
    """Lines in a file; a last line without its newline counts."""
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def _lines(paths: list[Path], skip: int) -> Iterator[tuple[int, bytes | None]]:
    """(number, line) of `paths` read as one sequence, from 1; lines up to `skip` come as (number, None),
    whole files of them counted in bulk rather than read line by line."""
    number = 0
    for path in paths:
        if skip - number >= (count := count_lines(path)):
            number += count
            yield number, None
            continue
        with open(path, "rb") as f:
            for line in f:
                number += 1
                yield number, (line if number > skip else None)


class Writer(Protocol):
    """The spend flusher (controllers/spend.py), as far as the spool needs it."""

    def wait_written(self, timeout: float = 5.0) -> None: ...

    def paused(self) -> AbstractAsyncContextManager[None]: ...


class Spool:
    """Counts the managed Envoy's entries, recovers its spool before each Envoy start, rotates it."""

    def __init__(self, path: Path, node: str, book: SpendBook, ledger: SqliteLedger, writer: Writer,
                 streams: AccessLogService, config: Callable[[], Config], admin_url: Callable[[], str],
                 max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.rotated = path.with_name(ROTATED_NAME)
        self.node = node
        self.book = book
        self.ledger = ledger
        self.writer = writer
        self.streams = streams
        self.config = config
        self.admin_url = admin_url
        self.max_bytes = max_bytes
        self.late = 0  # entries of an Envoy whose spool was already recovered: dropped
        self.rotations = 0
        self._stale_through = 0  # streams up to this seq belong to Envoys whose spool was recovered
        self._line_counts: dict[tuple[int, int], int] = {}  # (inode, size) of the rotated file -> its lines
        state = ledger.spool_state()
        book.set_spool(state.generation, state.covered)
        self._done = state.done

    @property
    def generation(self) -> int:
        mark = self.book.spool_mark()
        return mark[0] if mark is not None else 0

    @property
    def covered(self) -> int:
        mark = self.book.spool_mark()
        return mark[1] if mark is not None else 0

    # -- the per-batch path ----------------------------------------------------------------------------

    def count(self, stream: Stream, received: int) -> bool:
        """A batch of `received` entries from the managed node: counted, or False if it must be dropped
        (its Envoy's spool was recovered already). Call it in the same step as the batch's spend is added."""
        if stream.seq <= self._stale_through:
            self.late += received
            return False
        self.book.count_spooled(received)
        return True

    # -- recovery --------------------------------------------------------------------------------------

    def before_spawn(self) -> None:
        """The Envoy supervisor's hook: the previous Envoy (if any) has exited, the next is about to start.

        The hook is synchronous; on a restart the supervisor has waited at least a second since the old
        Envoy exited, time enough for its last access-log messages to come in (any later one is dropped).
        """
        self.recover()

    def recover(self, reason: str = "before envoy starts") -> Spend:
        """Charge every spool line the ledger lacks, then delete the spool and reset the count, in one
        transaction. Synchronous: runs while no Envoy of ours runs (the supervisor's before-spawn hook,
        and after Envoy stopped). If the write fails, nothing changes: the lines stay uncovered and are
        charged by a later recovery (the count stays exact)."""
        self._delete_done()
        still_open = self.streams.open_streams(self.node)
        if still_open:
            log.warning("%d access-log stream(s) of the old Envoy still open; what still arrives on them is "
                        "dropped (charged from the spool instead)", still_open)
        self.writer.wait_written()  # a flush in flight lands first: its count is part of `covered`
        files = [p for p in (self.rotated, self.path) if p.exists()]
        generation, covered = self.generation, self.covered
        scratch, spent, lines, unreadable = self._charge(files, covered)
        pending = self.book.take_pending()  # the gRPC spend `covered` stands for goes in the same transaction
        recovered = scratch.take_pending()
        try:
            self.ledger.set_spool(pending + recovered, generation=generation + 1, covered=0,
                                  done=[p.name for p in files], recovered=spent)
        except Exception:
            self.book.give_back(pending)
            log.exception("cannot write the spend recovered from the spool (%d requests); the spool is kept "
                          "and charged later", spent.requests)
            return Spend()
        self.book.set_spool(generation + 1, 0)
        self.book.absorb(recovered)
        self.book.recovered += spent
        self._stale_through = self.streams.opened
        self._done = tuple(p.name for p in files)
        self._delete_done()
        if lines > covered:
            log.warning("spend recovered from the spool (%s): %d requests, cost %.6f; %d spool lines were "
                        "beyond the %d the ledger held%s", reason, spent.requests, spent.cost, lines - covered,
                        covered, f", {unreadable} unreadable" if unreadable else "")
        elif files:
            log.info("spool (%s): the ledger held all %d lines; nothing to recover", reason, lines)
        return spent

    def _charge(self, files: list[Path], skip: int, upto: int | None = None
                ) -> tuple[SpendBook, Spend, int, int]:
        """Lines [skip, upto) of `files` read as one sequence, the served ones charged to a scratch book.
        Returns it, the spend charged, the number of lines read and how many could not be read."""
        scratch = SpendBook()
        pools = self.config().pools
        now = time.time()
        lines = unreadable = 0
        requests = prompt = completion = 0
        cost = 0.0
        for lines, raw in _lines(files, skip):
            if upto is not None and lines > upto:
                lines = upto
                break
            if raw is None:
                continue
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                obs = observation(record)
            except ValueError:
                unreadable += 1
                continue
            pool = pools.get(obs.pool)
            if not obs.backend or pool is None or not obs.charged:
                continue  # answered by Envoy itself, an unknown pool, or not answered: no spend (as in ingest)
            backend = pool.backends.get(obs.backend)
            charge = request_cost(backend, obs.prompt_tokens, obs.completion_tokens) if backend else 0.0
            scratch.add(started_at(record, now), obs.pool, obs.backend, obs.model, obs.prompt_tokens,
                        obs.completion_tokens, charge, obs.client)
            requests += 1
            prompt += obs.prompt_tokens
            completion += obs.completion_tokens
            cost += charge
        if unreadable:
            log.warning("%d spool lines could not be read (not charged)", unreadable)
        return scratch, Spend(requests, prompt, completion, cost), lines, unreadable

    def _delete_done(self) -> None:
        """Delete the files the ledger says are accounted for, then say so in the ledger."""
        if not self._done:
            return
        for name in self._done:
            with contextlib.suppress(FileNotFoundError):
                (self.path.parent / name).unlink()
        self.ledger.clear_spool_done()
        self._done = ()

    async def settle(self, timeout: float = STREAM_WAIT) -> None:
        """Wait (bounded) until the managed node has no access-log stream open: its last entries are in."""
        deadline = time.monotonic() + timeout
        while self.streams.open_streams(self.node) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    # -- rotation --------------------------------------------------------------------------------------

    async def run(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.maintain()
            except Exception:  # noqa: BLE001 - tried again next round
                log.exception("spool rotation failed; tried again in %.0fs", interval)

    async def maintain(self) -> None:
        """One rotation step, if one is due (see the module docstring)."""
        try:
            await self._maintain()
        except FileNotFoundError:
            pass  # a recovery (an Envoy restart) took the files meanwhile: nothing left to rotate

    async def _maintain(self) -> None:
        self._delete_done()
        generation = self.generation
        if self.rotated.exists():
            if not self.path.exists():  # Envoy has not reopened its logs yet (or was not reachable)
                await self._reopen()
                return
            stat = self.rotated.stat()
            lines = self._line_counts.get((stat.st_ino, stat.st_size))
            if lines is None:  # final now: Envoy writes only to the new file
                lines = await asyncio.to_thread(count_lines, self.rotated)
                self._line_counts = {(stat.st_ino, stat.st_size): lines}
            if self.covered < lines and self.path.stat().st_size <= self.max_bytes:
                return  # entries still on their way
            async with self.writer.paused():  # no flush in flight: the count and the spend stay together
                if self.generation == generation:  # no recovery ran meanwhile
                    self._retire(lines)
        elif self.path.exists() and self.path.stat().st_size > self.max_bytes:
            self.path.rename(self.rotated)
            self.rotations += 1
            await self._reopen()

    def _retire(self, lines: int) -> None:
        """Delete the rotated file, its lines taken off the count, in one transaction with the pending
        spend; lines of it never covered (entries Envoy dropped) are charged as recovered."""
        generation, covered = self.generation, self.covered
        scratch, spent = SpendBook(), Spend()
        if covered < lines:
            scratch, spent, _, _ = self._charge([self.rotated], covered, lines)
        pending = self.book.take_pending()
        recovered = scratch.take_pending()
        left = max(0, covered - lines)
        try:
            self.ledger.set_spool(pending + recovered, generation=generation + 1, covered=left,
                                  done=[self.rotated.name], recovered=spent)
        except Exception:
            self.book.give_back(pending)
            raise
        self.book.set_spool(generation + 1, left)
        self.book.absorb(recovered)
        self.book.recovered += spent
        self._done = (self.rotated.name,)
        self._delete_done()
        self._line_counts = {}
        if spent.requests:
            log.warning("spool rotation: %d requests (cost %.6f) of the rotated spool never arrived over gRPC; "
                        "charged from the file", spent.requests, spent.cost)

    async def _reopen(self) -> None:
        """Ask Envoy to reopen its log files, then wait (bounded) for the new spool file."""
        url = self.admin_url().rstrip("/") + "/reopen_logs"

        def post() -> None:
            with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=2.0):
                pass

        try:
            await asyncio.to_thread(post)
        except OSError as exc:
            log.warning("cannot ask Envoy to reopen its logs (%s): %s; tried again", url, exc)
            return
        deadline = time.monotonic() + REOPEN_WAIT
        while not self.path.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
