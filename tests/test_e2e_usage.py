"""Token usage is read from responses of any size and content type without breaking them."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .harness import ControlPlane, free_port, http_json, wait_for

pytestmark = pytest.mark.e2e


def embedding(size: int) -> bytes:
    """An OpenAI-style embeddings answer of about `size` bytes, with a usage block at its end."""
    floats = [0.123456789] * (size // 13)
    return json.dumps({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": floats}],
                       "usage": {"prompt_tokens": 7, "completion_tokens": 3}}).encode()


@pytest.fixture
def backend() -> Iterator[tuple[str, dict[str, tuple[str, bytes]]]]:
    """A real HTTP backend on loopback whose answer per path the test sets: (content type, body)."""
    answers: dict[str, tuple[str, bytes]] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers.get("content-length", 0)))
            ctype, body = answers[self.path]
            self.send_response(200)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", answers
    finally:
        server.shutdown()
        server.server_close()


def test_large_and_charset_json_responses_pass_whole_and_their_usage_is_counted(tmp_path, backend):
    url, answers = backend
    big = embedding(3_000_000)  # larger than Envoy's 1 MiB buffer limit: nothing may buffer it whole
    answers["/v1/embeddings"] = ("application/json", big)
    answers["/v1/chat/completions"] = ("application/json; charset=utf-8", json.dumps(
        {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 13}}).encode())
    cp = ControlPlane(tmp_path, {"chat": {"match": {"prefix": "/v1/"}, "backends": {"a": {"url": url}}}})
    try:
        for path, expected in (("/v1/embeddings", big), ("/v1/chat/completions", None)):
            conn = http.client.HTTPConnection(cp.listener, timeout=30)
            try:
                conn.request("POST", path, body=b'{"model": "m", "input": "x"}',
                             headers={"content-type": "application/json"})
                resp = conn.getresponse()
                body = resp.read()
            finally:
                conn.close()
            assert resp.status == 200, (path, resp.status, body[:200])
            if expected is not None:
                assert body == expected

        def spent() -> dict | None:
            a = http_json("GET", f"{cp.api}/v1/cost")[1]["pools"]["chat"]["backends"]["a"]
            return a if a["requests"] == 2 else None

        counted = wait_for(spent, what="both requests in the spend")
        assert (counted["prompt_tokens"], counted["completion_tokens"]) == (7 + 11, 3 + 13)
    finally:
        cp.stop()
