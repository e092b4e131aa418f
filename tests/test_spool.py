"""The managed Envoy's spool: lines -> observations, recovery of exactly the uncovered lines, rotation,
and the spool count written in the same transaction as the spend it covers."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from controlplane.config import parse_config
from controlplane.controllers.spend import SpendFlusher
from controlplane.reports import cost_report
from controlplane.scoring.budget import BudgetVerdict
from controlplane.scoring.ledger import Spend, SpendBook, SpoolState, SqliteLedger
from controlplane.state import DesiredState
from controlplane.telemetry.accesslog import (
    CHARS_PER_TOKEN,
    MAX_MODEL_CHARS,
    MAX_TOKENS,
    AccessLogService,
    Observation,
    Stream,
    parse,
)
from controlplane.telemetry.spool import MAX_BYTES, SPOOL_NAME, Spool, count_lines, parse_line

CONFIG = parse_config("""
pools:
  chat:
    backends:
      a: {url: "http://127.0.0.1:9001", cost: {input_per_1k: 1.0, output_per_1k: 2.0}}
      b: {url: "http://127.0.0.1:9002", cost: {input_per_1k: 10.0, output_per_1k: 10.0}}
""")
T = 1_773_482_400  # an hour's start


def line(backend: str | None = "a", *, status: int = 200, prompt: object = 10, completion: object = 20,
         chunks: object = None, received: object = 400, sent: int = 800, pool: str = "chat", requested: Any = "m",
         model: Any = None, flags: str = "-", request_id: str = "r1", at: int = T + 5, duration: int = 0) -> str:
    """A spool line as Envoy's file logger writes it (null for what it has not)."""
    return json.dumps({
        "backend": backend, "bytes_received": received, "bytes_sent": sent, "completion_tokens": completion,
        "content_chunks": chunks, "duration_ms": duration, "flags": flags, "id": request_id, "model": model,
        "pool": pool, "prompt_tokens": prompt, "requested_model": requested, "status": status, "time": str(at)})


# -- one line -> one observation ----------------------------------------------------------------------------

def test_a_line_reads_as_the_observation_of_its_request() -> None:
    obs = parse_line(line(model="own", request_id="abc", flags="UF,URX"))
    assert obs == Observation("abc", "chat", "a", 200, 0.0, None, 10, 20, False, "UF,URX", None, "m", "own")
    assert obs.ok
    assert parse_line(line()).model == "m", "the requested model when the backend has no name of its own"
    assert parse_line(line()).response_flags == "", "'-' is no flags"


def test_a_line_matches_what_the_grpc_entry_of_the_same_request_gives() -> None:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    c = entry.common_properties
    c.upstream_cluster = "chat"
    c.custom_tags["backend"] = "a"
    c.upstream_remote_address.socket_address.address = "127.0.0.1"
    entry.request.request_id = "r1"
    entry.request.request_headers["x-llm-model"] = "m"
    entry.request.request_body_bytes = 400
    entry.response.response_body_bytes = 800
    entry.response.response_code.value = 200
    c.metadata.filter_metadata["llm_lb.usage"].update({"completion_tokens": 20})  # prompt absent: estimated
    from_file = parse_line(line(prompt=None))
    assert from_file == parse(entry)
    assert from_file.prompt_tokens == 400 // CHARS_PER_TOKEN and from_file.usage_estimated


@pytest.mark.parametrize(
    ("fields", "prompt", "completion", "estimated", "suspicious"),
    [
        pytest.param({}, 10, 20, False, False, id="reported"),
        pytest.param({"prompt": None, "completion": None}, 100, 200, True, False, id="missing-estimated-from-bytes"),
        pytest.param({"prompt": None, "received": 0}, 0, 20, True, False, id="no-body-no-prompt"),
        pytest.param({"prompt": None, "received": 3}, 1, 20, True, False, id="a-tiny-body-is-one-token"),
        pytest.param({"completion": None, "chunks": 7}, 10, 7, True, False, id="stream-chunks"),
        pytest.param({"prompt": -5}, 100, 20, True, True, id="negative"),
        pytest.param({"completion": MAX_TOKENS + 1}, 10, 200, True, True, id="absurd"),
        pytest.param({"prompt": "12"}, 100, 20, True, True, id="a-string"),
        pytest.param({"prompt": True}, 100, 20, True, True, id="a-bool"),
        pytest.param({"prompt": {"n": 1}}, 100, 20, True, True, id="an-object"),
        pytest.param({"prompt": 12.9}, 100, 20, True, True, id="fractional"),
        pytest.param({"prompt": 12.0}, 12, 20, False, False, id="a-whole-float"),
        pytest.param({"prompt": 50_000}, 100, 20, True, True, id="more-than-the-body-could-carry"),
        pytest.param({"completion": 100_000, "duration": 60_000}, 10, 100_000, False, False,
                     id="long-generation-within-its-time-allowance"),
        pytest.param({"completion": 100_000}, 10, 200, True, True, id="the-same-without-the-time"),
        pytest.param({"received": "junk", "prompt": None}, 0, 20, True, False, id="junk-bytes"),
    ],
)
def test_usage_missing_or_absurd_is_estimated(fields: dict[str, Any], prompt: int, completion: int,
                                              estimated: bool, suspicious: bool) -> None:
    obs = parse_line(line(**fields))
    assert (obs.prompt_tokens, obs.completion_tokens, obs.usage_estimated) == (prompt, completion, estimated)
    assert obs.usage_suspicious is suspicious


def test_what_envoy_answered_itself_and_odd_values() -> None:
    assert parse_line(line(backend=None, status=503, flags="UH")).backend == ""
    assert not parse_line(line(status=0)).ok
    assert len(parse_line(line(requested="x" * 10_000)).requested_model) == MAX_MODEL_CHARS
    assert parse_line(line(requested=None)).requested_model == ""
    assert parse_line(line(requested=5)).requested_model == ""
    with pytest.raises(ValueError):
        parse_line("[1, 2]")
    with pytest.raises(ValueError):
        parse_line('{"backend": "a", "sta')  # cut short


def test_count_lines_counts_a_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"")
    assert count_lines(path) == 0
    path.write_bytes(b"a\nb\n")
    assert count_lines(path) == 2
    path.write_bytes(b"a\nb")
    assert count_lines(path) == 2


# -- recovery ---------------------------------------------------------------------------------------------

class Writer:
    """The flusher as the spool sees it (no write ever in flight here)."""

    def wait_written(self, timeout: float = 5.0) -> None:
        pass

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        yield


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[SqliteLedger]:
    db = SqliteLedger(tmp_path / "ledger.sqlite3")
    yield db
    db.close()


def make_spool(tmp_path: Path, ledger: SqliteLedger, *, admin: str = "http://127.0.0.1:9",
               max_bytes: int = MAX_BYTES) -> tuple[Spool, SpendBook, AccessLogService]:
    book = SpendBook()
    service = AccessLogService(lambda batch, stream, received: 0)
    spool = Spool(tmp_path / SPOOL_NAME, "envoy-1", book, ledger, Writer(), service, lambda: CONFIG,
                  lambda: admin, max_bytes=max_bytes)
    return spool, book, service


def write_lines(path: Path, backends: list[str | None], **fields: Any) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for i, backend in enumerate(backends):
            f.write(line(backend, request_id=f"{path.name}-{i}", **fields) + "\n")


def requests(ledger: SqliteLedger) -> dict[str, int]:
    return {b: s.requests for (_, b), s in ledger.spend(0).items()}


def test_recovery_charges_exactly_the_lines_beyond_the_count(tmp_path: Path, ledger: SqliteLedger) -> None:
    spool, book, _ = make_spool(tmp_path, ledger)
    write_lines(spool.path, ["a"] * 7 + ["b"] * 3)  # the ledger holds the first 7 (all a), not the last 3
    book.count_spooled(7)
    assert spool.recover() == Spend(3, 30, 60, pytest.approx(3 * (10 * 10 + 20 * 10) / 1000))
    assert requests(ledger) == {"b": 3}, "the first 7 lines were skipped: their spend came over gRPC"
    state = ledger.spool_state()
    assert (state.generation, state.covered, state.done) == (1, 0, ())
    assert state.recovered.requests == 3 and book.recovered.requests == 3
    assert book.total()[("chat", "b")].requests == 3 and book.take_pending() == [], "in the book, not pending"
    assert not spool.path.exists(), "the spool is deleted once charged"
    assert spool.recover() == Spend(), "nothing twice"
    assert requests(ledger) == {"b": 3}


def test_the_count_includes_entries_not_yet_flushed(tmp_path: Path, ledger: SqliteLedger) -> None:
    spool, _, _ = make_spool(tmp_path, ledger)
    write_lines(spool.path, ["a"] * 5 + ["b"] * 2)
    ledger.add([], spool=(0, 2))  # 2 flushed
    again, book, _ = make_spool(tmp_path, ledger)  # a restart: the count comes from the ledger
    assert again.covered == 2
    for _ in range(3):  # 3 more received since, their spend in the book, not yet flushed
        book.add(T, "chat", "a", "m", 1, 1, 0.5)
    book.count_spooled(3)
    assert again.recover().requests == 2
    assert requests(ledger) == {"a": 3, "b": 2}, "the pending spend went in the same transaction"
    assert book.take_pending() == []


def test_only_served_lines_are_charged_at_their_hour(tmp_path: Path, ledger: SqliteLedger) -> None:
    spool, _, _ = make_spool(tmp_path, ledger)
    write_lines(spool.path, ["a"], status=503, flags="UF")
    write_lines(spool.path, ["a"], status=0, flags="DC")  # in flight when Envoy stopped: never answered
    write_lines(spool.path, [None], status=429)
    write_lines(spool.path, ["a"], pool="gone")  # a pool no longer configured
    write_lines(spool.path, ["zz"])  # a backend no longer configured: counted, at no price
    write_lines(spool.path, ["a"], at=T - 7200)
    write_lines(spool.path, ["b"], flags="UR")  # cut short after it began: the backend did the work
    with open(spool.path, "a") as f:
        f.write("not json\n")
        f.write('{"backend": "a", "sta')  # cut short as Envoy died
    assert spool.recover().requests == 3
    assert {(b, h) for h, _, b, *_ in ledger.hours(0)} == {("zz", T // 3600), ("a", T // 3600 - 2),
                                                          ("b", T // 3600)}
    assert ledger.spend(0)[("chat", "zz")].cost == 0.0


def test_recovery_reads_the_rotated_file_first(tmp_path: Path, ledger: SqliteLedger) -> None:
    spool, book, _ = make_spool(tmp_path, ledger)
    write_lines(spool.rotated, ["a"] * 4)
    write_lines(spool.path, ["b"] * 4)
    book.count_spooled(6)  # all of spool.1 and 2 lines of spool
    assert spool.recover().requests == 2
    assert requests(ledger) == {"b": 2}
    assert not spool.rotated.exists() and not spool.path.exists()


def test_a_count_beyond_the_file_charges_nothing(tmp_path: Path, ledger: SqliteLedger) -> None:
    spool, book, _ = make_spool(tmp_path, ledger)
    write_lines(spool.path, ["a"] * 5)
    book.count_spooled(9)  # the gRPC log had lines the file never got (an Envoy that crashed)
    assert spool.recover() == Spend()
    assert ledger.spool_state().covered == 0 and not spool.path.exists()


def test_a_failed_recovery_changes_nothing(tmp_path: Path, ledger: SqliteLedger) -> None:
    spool, book, _ = make_spool(tmp_path, ledger)
    write_lines(spool.path, ["a"] * 3)
    book.add(T, "chat", "a", "m", 1, 1, 0.5)
    book.count_spooled(1)
    ledger.close()  # every write fails now
    assert spool.recover() == Spend()
    assert spool.path.exists() and spool.covered == 1 and spool.generation == 0
    assert book.pending == 1 and book.recovered == Spend()


def test_entries_of_an_envoy_whose_spool_was_recovered_are_dropped(tmp_path: Path, ledger: SqliteLedger) -> None:
    spool, _, service = make_spool(tmp_path, ledger)
    old = Stream(1, "envoy-1")
    service.opened = 1
    assert spool.count(old, 4) and spool.covered == 4
    write_lines(spool.path, ["a"] * 6)
    assert spool.recover().requests == 2
    assert not spool.count(old, 2), "a late batch of the old Envoy: its lines were charged from the file"
    assert spool.late == 2 and spool.covered == 0
    assert spool.count(Stream(2, "envoy-1"), 3) and spool.covered == 3, "the new Envoy's stream counts"


def test_files_already_accounted_for_are_deleted_after_a_crash_never_read(tmp_path: Path,
                                                                          ledger: SqliteLedger) -> None:
    write_lines(tmp_path / SPOOL_NAME, ["a"] * 5)
    # a recovery committed, then the process died before it deleted the file
    ledger.set_spool([], generation=3, covered=0, done=[SPOOL_NAME])
    spool, _, _ = make_spool(tmp_path, ledger)
    assert spool.recover() == Spend()
    assert not spool.path.exists() and ledger.spool_state().done == ()
    assert requests(ledger) == {}


# -- the count and the spend in one transaction --------------------------------------------------------------

class FailingLedger:
    def __init__(self, real: SqliteLedger) -> None:
        self.real = real
        self.failing = True

    def add(self, rows: list[Any], spool: tuple[int, int] | None = None) -> None:
        if self.failing:
            raise OSError("disk full")
        self.real.add(rows, spool=spool)


def test_the_flusher_writes_the_count_with_the_spend_or_neither(ledger: SqliteLedger) -> None:
    book = SpendBook()
    book.set_spool(0, 0)
    failing = FailingLedger(ledger)
    flusher = SpendFlusher(book, failing, interval=lambda: 1.0)  # type: ignore[arg-type]

    async def main() -> None:
        book.add(T, "chat", "a", "m", 1, 1, 0.5)
        book.count_spooled(1)
        await flusher.flush()
        assert flusher.failures == 1
        assert ledger.spool_state().covered == 0 and requests(ledger) == {}, "neither"
        book.add(T, "chat", "b", "m", 1, 1, 0.5)
        book.count_spooled(1)
        failing.failing = False
        await flusher.flush()
        assert ledger.spool_state().covered == 2 and requests(ledger) == {"a": 1, "b": 1}, "both"
        book.count_spooled(1)  # an entry without spend (a failure): the count alone is written
        await flusher.flush()
        assert ledger.spool_state().covered == 3
        flusher.wait_written()

    asyncio.run(main())


def test_a_write_of_an_older_generation_moves_no_count(ledger: SqliteLedger) -> None:
    ledger.set_spool([], generation=2, covered=5)
    ledger.add([(T // 3600, "chat", "a", "m", "", 1, 1, 1, 1.0)], spool=(1, 99))
    assert ledger.spool_state().covered == 5 and requests(ledger) == {"a": 1}, "the spend lands, the count not"
    ledger.add([], spool=(2, 7))
    assert ledger.spool_state().covered == 7


def test_the_spool_row_persists(tmp_path: Path) -> None:
    db = SqliteLedger(tmp_path / "l.sqlite3")
    db.set_spool([], generation=4, covered=9, done=["spool.1.jsonl"], recovered=Spend(2, 3, 4, 0.5))
    db.set_spool([], generation=5, covered=1, recovered=Spend(1, 1, 1, 0.25))  # recovered sums up
    db.close()
    again = SqliteLedger(tmp_path / "l.sqlite3")
    try:
        assert again.spool_state() == SpoolState(5, 1, (), Spend(3, 4, 5, 0.75))
    finally:
        again.close()


# -- rotation ------------------------------------------------------------------------------------------------

class FakeEnvoyAdmin:
    """Answers POST /reopen_logs as Envoy does: the spool path is opened anew (created)."""

    def __init__(self, spool_path: Path) -> None:
        self.reopens = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                if self.path == "/reopen_logs":
                    outer.reopens += 1
                    spool_path.touch()
                self.send_response(200)
                self.send_header("content-length", "3")
                self.end_headers()
                self.wfile.write(b"OK\n")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[FakeEnvoyAdmin]:
    fake = FakeEnvoyAdmin(tmp_path / SPOOL_NAME)
    yield fake
    fake.close()


def test_rotation_renames_reopens_and_retires_the_covered_file(tmp_path: Path, ledger: SqliteLedger,
                                                               admin: FakeEnvoyAdmin) -> None:
    spool, book, _ = make_spool(tmp_path, ledger, admin=admin.url, max_bytes=2000)
    write_lines(spool.path, ["a"] * 4)
    asyncio.run(spool.maintain())
    assert admin.reopens == 0 and not spool.rotated.exists(), "under the cap: nothing"
    write_lines(spool.path, ["a"] * 6)  # 10 lines, over 2000 bytes
    asyncio.run(spool.maintain())
    assert admin.reopens == 1 and count_lines(spool.rotated) == 10 and spool.path.exists()
    write_lines(spool.path, ["b"] * 3)
    book.add(T, "chat", "a", "m", 1, 1, 0.5)
    book.count_spooled(9)  # one line of spool.1 not yet in
    asyncio.run(spool.maintain())
    assert spool.rotated.exists(), "not all of it covered yet: kept"
    book.count_spooled(2)  # all 10 of spool.1, 1 of spool
    asyncio.run(spool.maintain())
    assert not spool.rotated.exists()
    state = ledger.spool_state()
    assert (state.generation, state.covered, state.done) == (1, 1, ()), "its 10 lines taken off the count"
    assert requests(ledger) == {"a": 1}, "the pending spend in the same transaction"
    assert state.recovered == Spend()
    assert spool.recover().requests == 2, "then recovery skips the 1 covered line of the new file"


def test_a_rotated_file_never_covered_is_retired_when_the_next_is_full(tmp_path: Path, ledger: SqliteLedger,
                                                                       admin: FakeEnvoyAdmin) -> None:
    spool, book, _ = make_spool(tmp_path, ledger, admin=admin.url, max_bytes=2000)
    write_lines(spool.path, ["a"] * 10)
    asyncio.run(spool.maintain())
    book.count_spooled(8)  # Envoy dropped 2 gRPC entries of spool.1 (logs_dropped)
    write_lines(spool.path, ["b"] * 10)  # the new file is full too
    asyncio.run(spool.maintain())
    assert not spool.rotated.exists()
    assert spool.covered == 0 and ledger.spool_state().recovered.requests == 2, "the 2 charged from the file"
    asyncio.run(spool.maintain())
    assert spool.rotated.exists() and admin.reopens == 2, "and the full file is rotated in turn"


def test_rotation_without_envoy_keeps_trying(tmp_path: Path, ledger: SqliteLedger) -> None:
    spool, _, _ = make_spool(tmp_path, ledger, admin="http://127.0.0.1:9", max_bytes=100)
    write_lines(spool.path, ["a"] * 3)
    asyncio.run(spool.maintain())
    assert spool.rotated.exists() and not spool.path.exists()
    asyncio.run(spool.maintain())  # asks again; nothing else
    assert spool.rotated.exists()
    assert spool.recover().requests == 3, "a recovery reads the rotated file"


# -- the access-log stream names its node --------------------------------------------------------------------

def test_the_stream_passes_its_node_and_entry_count_to_the_sink() -> None:
    seen: list[tuple[str, int, int, int]] = []

    def sink(batch: list[Observation], stream: Stream, received: int) -> int:
        seen.append((stream.node, stream.seq, len(batch), received))
        return 0

    service = AccessLogService(sink)

    def message(entries: int, node: str | None = None) -> als_pb2.StreamAccessLogsMessage:
        m = als_pb2.StreamAccessLogsMessage()
        if node is not None:
            m.identifier.node.CopyFrom(base_pb2.Node(id=node))
            m.identifier.log_name = "llm_lb"
        for _ in range(entries):
            m.http_logs.log_entry.add().common_properties.upstream_cluster = "chat"
        return m

    async def stream(messages: list[als_pb2.StreamAccessLogsMessage]
                     ) -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        for m in messages:
            yield m
            await asyncio.sleep(0)
        assert service.open_streams("envoy-1") == 1

    async def main() -> None:
        await service.StreamAccessLogs(stream([message(2, "envoy-1"), message(3)]), None)
        await service.StreamAccessLogs(stream([message(1, "envoy-1")]), None)
        assert service.open_streams("envoy-1") == 0

    asyncio.run(main())
    assert seen == [("envoy-1", 1, 2, 2), ("envoy-1", 1, 3, 3), ("envoy-1", 2, 1, 1)]
    assert service.streams == {"envoy-1": 2} and service.entries == 6


# -- visible -------------------------------------------------------------------------------------------------

def test_the_cost_report_shows_what_was_recovered() -> None:
    book = SpendBook()
    book.recovered = Spend(12, 100, 200, 1.234567891)
    views = SimpleNamespace(spend=book, budgets=BudgetVerdict, state=lambda: DesiredState(config=CONFIG))
    report = cost_report(views, T)  # type: ignore[arg-type]
    assert report["recovered_requests"] == 12 and report["recovered_cost"] == 1.234568
