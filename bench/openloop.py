"""A fixed-rate (open-loop) HTTP/1.1 load generator, for latency at a given rate.

Closed-loop tools (wrk) wait for each answer before sending the next, so a
slow answer hides the requests that should have been sent meanwhile. Here
request i is due at start + i/rate whatever happened before, and its latency
counts from when it was due, so queueing shows in the percentiles.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

from .common import CHAT_BODY

TIMEOUT = 10.0  # seconds for one answer; a stuck request counts as an error, not a hang


@dataclass(frozen=True)
class OpenLoopResult:
    sent: int
    errors: int
    p50_ms: float
    p99_ms: float
    late: int  # requests that could not be started on time (no free connection)


async def _session(host: str, port: int, path: str, due: list[float], latencies: list[float],
                   counters: dict[str, int], next_index: list[int]) -> None:
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(CHAT_BODY)}\r\n\r\n").encode() + CHAT_BODY
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while next_index[0] < len(due):
            i = next_index[0]
            next_index[0] += 1
            wait = due[i] - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            elif wait < -0.001:
                counters["late"] += 1
            try:
                writer.write(request)
                ok = await asyncio.wait_for(_answer(reader), TIMEOUT)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                ok = False
                writer.close()  # a closed or stuck connection: the next request gets a new one
                reader, writer = await asyncio.open_connection(host, port)
            latencies.append((time.perf_counter() - due[i]) * 1000)
            if not ok:
                counters["errors"] += 1
    finally:
        writer.close()


async def _answer(reader: asyncio.StreamReader) -> bool:
    """Read one response; True if it was a 200."""
    status_line = await reader.readline()
    if not status_line:
        raise asyncio.IncompleteReadError(b"", None)
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status_line.startswith(b"HTTP/1.1 200")


async def _run(host: str, port: int, path: str, rate: float, seconds: float, connections: int) -> OpenLoopResult:
    start = time.perf_counter() + 0.05
    due = [start + i / rate for i in range(int(rate * seconds))]
    latencies: list[float] = []
    counters = {"errors": 0, "late": 0}
    next_index = [0]
    await asyncio.gather(*(_session(host, port, path, due, latencies, counters, next_index)
                           for _ in range(connections)))
    cuts = statistics.quantiles(latencies, n=100)
    return OpenLoopResult(len(latencies), counters["errors"], cuts[49], cuts[98], counters["late"])


def open_loop(url: str, rate: float, seconds: float, connections: int = 32) -> OpenLoopResult:
    """`rate` requests per second for `seconds`, over up to `connections` keep-alive connections."""
    hostport, _, path = url.removeprefix("http://").partition("/")
    host, _, port = hostport.partition(":")
    return asyncio.run(_run(host, int(port), "/" + path, rate, seconds, connections))
