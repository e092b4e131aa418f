"""Streamed (SSE) responses pass through Envoy as they are produced, not buffered.

Proved by ordering, not by timing: the backend holds the rest of its stream until the client
has the first event through Envoy. Time to first byte is printed; speed targets belong in benchmarks.
"""

from __future__ import annotations

import http.client
import http.server
import json
import statistics
import threading
import time

import pytest

from .harness import ControlPlane, MockBackend, free_port

pytestmark = pytest.mark.e2e

CHUNKS, DELAY_MS = 4, 20
HOLD_SECONDS = 20  # how long the held backend waits to be released before it ends the stream anyway


def stream_body() -> str:
    return json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})


def timed_stream(host_port: str) -> tuple[float, float, bytes]:
    """Seconds to the first SSE event and to the end of the stream, and the body."""
    conn = http.client.HTTPConnection(host_port, timeout=30)
    try:
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=stream_body(), headers={"content-type": "application/json"})
        resp = conn.getresponse()
        first = resp.readline()
        first_at = time.perf_counter() - start
        rest = resp.read()
        return first_at, time.perf_counter() - start, first + rest
    finally:
        conn.close()


def sse(delta: dict, finish: str | None = None) -> bytes:
    chunk = {"id": "held-1", "object": "chat.completion.chunk", "model": "m",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class HeldStream:
    """An SSE backend that sends its first event, then holds the rest of the stream until `release`."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.finished = threading.Event()
        held = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("content-length", 0)))
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("cache-control", "no-cache")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                self._chunk(sse({"role": "assistant", "content": "first"}))
                held.release.wait(HOLD_SECONDS)
                self._chunk(sse({"content": " and the rest"}))
                self._chunk(sse({}, finish="stop"))
                self._chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                held.finished.set()

            def _chunk(self, raw: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
                self.wfile.flush()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_first_event_reaches_the_client_while_the_backend_still_holds_the_rest(tmp_path):
    held = HeldStream()
    cp = ControlPlane(tmp_path, {"chat": {"match": {"prefix": "/v1/"}, "backends": {"held": {"url": held.url}}}})
    try:
        conn = http.client.HTTPConnection(cp.listener, timeout=HOLD_SECONDS + 10)
        conn.request("POST", "/v1/chat/completions", body=stream_body(), headers={"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("content-type") == "text/event-stream"
        first = resp.readline()
        # Not buffered: the backend cannot end the stream before it is released (or gives up after
        # HOLD_SECONDS), so a buffering proxy would have delivered nothing yet.
        assert not held.finished.is_set(), f"Envoy delivered the first event only once the stream had ended: {first!r}"
        assert first.startswith(b"data: ") and b'"first"' in first
        held.release.set()
        rest = resp.read()
        conn.close()
        assert b" and the rest" in rest and rest.rstrip().endswith(b"data: [DONE]")
    finally:
        cp.stop()
        held.stop()


def test_streams_arrive_whole_and_time_to_first_byte_is_reported(tmp_path):
    backend = MockBackend("s", args=["--stream-chunks", str(CHUNKS), "--chunk-delay-ms", str(DELAY_MS)])
    cp = ControlPlane(tmp_path, {"chat": {"match": {"prefix": "/v1/"}, "backends": {"s": {"url": backend.url}}}})
    try:
        direct, proxied = [], []
        for _ in range(6):
            for target, samples in ((f"127.0.0.1:{backend.port}", direct), (cp.listener, proxied)):
                first_at, _, body = timed_stream(target)
                assert body.startswith(b"data: ") and body.rstrip().endswith(b"data: [DONE]")
                samples.append(first_at)
        # Reported, not asserted: Envoy's added latency is a benchmark's question.
        added_ms = (statistics.median(proxied) - statistics.median(direct)) * 1000
        print(f"time to first byte: direct {statistics.median(direct) * 1000:.2f} ms, "
              f"through Envoy {statistics.median(proxied) * 1000:.2f} ms (added {added_ms:.2f} ms)")
    finally:
        cp.stop()
        backend.stop()
