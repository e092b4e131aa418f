"""Streamed (SSE) responses pass through Envoy as they are produced, not buffered."""

from __future__ import annotations

import http.client
import json
import statistics
import time

import pytest

from .harness import ControlPlane, MockBackend

pytestmark = pytest.mark.e2e

CHUNKS, DELAY_MS = 4, 200


def timed_stream(host_port: str) -> tuple[float, float, bytes]:
    """Seconds to the first SSE event and to the end of the stream, and the body."""
    conn = http.client.HTTPConnection(host_port, timeout=30)
    try:
        body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
        resp = conn.getresponse()
        first = resp.readline()
        first_at = time.perf_counter() - start
        rest = resp.read()
        return first_at, time.perf_counter() - start, first + rest
    finally:
        conn.close()


def test_time_to_first_byte_through_envoy_matches_the_backend(tmp_path):
    backend = MockBackend("s", args=["--stream-chunks", str(CHUNKS), "--chunk-delay-ms", str(DELAY_MS)])
    cp = ControlPlane(tmp_path, {"chat": {"match": {"prefix": "/v1/"}, "backends": {"s": {"url": backend.url}}}})
    try:
        direct, proxied = [], []
        for _ in range(6):
            for target, samples in ((f"127.0.0.1:{backend.port}", direct), (cp.listener, proxied)):
                first_at, end_at, body = timed_stream(target)
                assert body.startswith(b"data: ") and body.rstrip().endswith(b"data: [DONE]")
                # Not buffered: the first event arrived while the backend was still producing.
                assert end_at - first_at >= (CHUNKS - 1) * DELAY_MS / 1000 * 0.9
                samples.append(first_at)
        added_ms = (statistics.median(proxied) - statistics.median(direct)) * 1000
        print(f"time to first byte: direct {statistics.median(direct) * 1000:.2f} ms, through Envoy {statistics.median(proxied) * 1000:.2f} ms")
        assert added_ms < 20, f"Envoy added {added_ms:.1f} ms to the time to first byte"
    finally:
        cp.stop()
        backend.stop()
