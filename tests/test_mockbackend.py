"""Tests for the mock LLM backend used by demos and end-to-end tests."""

from __future__ import annotations

import http.client
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from controlplane.demo.mockbackend import MockBackend, MockSettings, main

ROOT = Path(__file__).resolve().parents[1]
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def backend() -> Iterator[MockBackend]:
    with MockBackend(MockSettings(name="local-a", chunk_delay_ms=0)) as b:
        yield b


def request(
    b: MockBackend, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=10)
    try:
        raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=raw, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def sse_events(data: bytes) -> list[str]:
    events = [e for e in data.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: "):] for e in events]


def test_non_streamed_completion_reports_configured_usage(backend: MockBackend) -> None:
    backend.configure(prompt_tokens=7, completion_tokens=5)
    status, headers, data = request(
        backend, "POST", CHAT, {"model": "m1", "messages": MESSAGES}, {"x-request-id": "req-42"}
    )
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["x-backend"] == "local-a"
    assert headers["x-request-id"] == "req-42"
    body = json.loads(data)
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-local-a-")
    assert body["model"] == "m1"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert "local-a" in body["choices"][0]["message"]["content"]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


def test_credentials_are_counted_by_digest_never_kept(backend: MockBackend) -> None:
    import hashlib

    for headers in ({"Authorization": "Bearer sk-secret-one"}, {"X-Api-Key": "sk-secret-two"},
                    {"Authorization": "Bearer sk-secret-one"}):
        request(backend, "POST", CHAT, {"messages": MESSAGES}, headers)
    raw = request(backend, "GET", "/admin/stats")[2]
    assert b"sk-secret" not in raw
    seen = json.loads(raw)["credentials"]
    assert seen == {hashlib.sha256(b"sk-secret-one").hexdigest()[:16]: 2,
                    hashlib.sha256(b"sk-secret-two").hexdigest()[:16]: 1}


def test_prompt_tokens_estimated_from_text(backend: MockBackend) -> None:
    msgs = [{"role": "system", "content": "abcde"}, {"role": "user", "content": "fghij"}]
    _, _, data = request(backend, "POST", CHAT, {"messages": msgs})
    body = json.loads(data)
    assert body["model"] == "mock-model"
    assert body["usage"]["prompt_tokens"] == 3  # ceil(10 / 4)
    stats = json.loads(request(backend, "GET", "/admin/stats")[2])
    assert stats == {"name": "local-a", "requests": 1, "completions": 1, "errors": 0,
                     "in_flight": 0, "prompt_tokens": 3, "completion_tokens": 16, "models": {},
                     "credentials": {}}


def test_streamed_completion_with_usage(backend: MockBackend) -> None:
    backend.configure(stream_chunks=3, completion_tokens=9, prompt_tokens=4)
    req = {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    status, headers, data = request(backend, "POST", CHAT, req)
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    assert headers["cache-control"] == "no-cache"
    assert headers["transfer-encoding"] == "chunked"
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:4]]
    assert "local-a" in "".join(content)
    assert chunks[4]["choices"][0]["finish_reason"] == "stop"
    assert chunks[5]["choices"] == []
    assert chunks[5]["usage"] == {"prompt_tokens": 4, "completion_tokens": 9, "total_tokens": 13}
    assert len(chunks) == 6


def test_stream_without_usage_has_no_usage_chunk(backend: MockBackend) -> None:
    _, _, data = request(backend, "POST", CHAT, {"messages": MESSAGES, "stream": True})
    chunks = [json.loads(e) for e in sse_events(data)[:-1]]
    assert all(c["choices"] and "usage" not in c for c in chunks)


def test_openai_sdk(backend: MockBackend) -> None:
    client = openai.OpenAI(base_url=f"{backend.url}/v1", api_key="unused", max_retries=0, timeout=10)
    resp = client.chat.completions.create(model="gpt-x", messages=MESSAGES)
    assert "local-a" in (resp.choices[0].message.content or "")
    assert resp.usage is not None and resp.usage.completion_tokens == 16

    stream = client.chat.completions.create(
        model="gpt-x", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == resp.choices[0].message.content
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + 16
    assert [m.id for m in client.models.list()] == ["mock-model"]


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b"{}", b'{"messages": []}', b'{"messages": [{"content": 3}]}'],
)
def test_bad_request_is_400(backend: MockBackend, body: bytes) -> None:
    status, headers, data = request(backend, "POST", CHAT, body)
    assert status == 400
    assert headers["x-backend"] == "local-a"
    err = json.loads(data)["error"]
    assert err["type"] == "invalid_request_error" and err["code"] is None and err["message"]


def test_error_rate_one_always_fails(backend: MockBackend) -> None:
    backend.configure(error_rate=1.0)
    for _ in range(3):
        status, headers, data = request(backend, "POST", CHAT, {"messages": MESSAGES})
        assert status == 503
        assert headers["x-backend"] == "local-a"
        assert "error" in json.loads(data)
    stats = backend.stats()
    assert (stats["requests"], stats["errors"], stats["completions"]) == (3, 3, 0)


def test_error_injection_is_reproducible_with_seed() -> None:
    def statuses(seed: int) -> list[int]:
        with MockBackend(MockSettings(error_rate=0.5, seed=seed)) as b:
            return [request(b, "POST", CHAT, {"messages": MESSAGES})[0] for _ in range(12)]

    first = statuses(7)
    assert first == statuses(7)
    assert set(first) == {200, 503}


@pytest.mark.parametrize(
    ("health", "llm", "code"),
    [("healthy", "ok", 200), ("degraded", "degraded", 200), ("unhealthy", "down", 503)],
)
def test_health(health: str, llm: str, code: int) -> None:
    with MockBackend(MockSettings(name="rag", health_status=health)) as b:
        status, headers, data = request(b, "GET", "/health")
    assert status == code
    assert headers["x-backend"] == "rag"
    assert json.loads(data) == {"status": health, "backend": "rag", "llm_status": llm, "graph_db_status": "ok"}


def test_admin_config_changes_behaviour_live(backend: MockBackend) -> None:
    status, _, data = request(backend, "POST", "/admin/config", {"latency_ms": 50, "health_status": "unhealthy"})
    assert status == 200
    current = json.loads(data)
    assert current["latency_ms"] == 50 and current["health_status"] == "unhealthy"
    assert request(backend, "GET", "/health")[0] == 503
    start = time.monotonic()
    assert request(backend, "POST", CHAT, {"messages": MESSAGES})[0] == 200
    assert time.monotonic() - start >= 0.05  # a lower bound only: sleep never returns early


@pytest.mark.parametrize(
    ("change", "field"),
    [({"error_rate": 2}, "error_rate"), ({"health_status": "meh"}, "health_status"),
     ({"stream_chunks": True}, "stream_chunks"), ({"bogus": 1}, "bogus")],
)
def test_admin_config_rejects_bad_values(backend: MockBackend, change: dict, field: str) -> None:
    status, _, data = request(backend, "POST", "/admin/config", {"latency_ms": 10, **change})
    assert status == 400
    assert field in json.loads(data)["error"]["message"]
    assert backend.server.snapshot().latency_ms == 0  # nothing applied


def test_require_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOCK_TEST_KEY", "s3cret-value")
    with MockBackend(MockSettings(require_key_env="MOCK_TEST_KEY")) as b:
        status, _, data = request(b, "POST", CHAT, {"messages": MESSAGES})
        assert status == 401
        assert json.loads(data)["error"]["code"] == "invalid_api_key"
        assert request(b, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        auth = {"Authorization": "Bearer s3cret-value"}
        assert request(b, "POST", CHAT, {"messages": MESSAGES}, auth)[0] == 200
        assert request(b, "GET", "/health")[0] == 200  # health is open
        assert b"s3cret" not in request(b, "GET", "/admin/config")[2]


def test_keep_alive_reuses_connection(backend: MockBackend) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", backend.port, timeout=10)
    try:
        bodies = [{"messages": MESSAGES, "stream": True}, {"messages": MESSAGES}, {"messages": MESSAGES}]
        sockets = []
        for body in bodies:
            conn.request("POST", CHAT, body=json.dumps(body), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
            sockets.append(conn.sock)
        assert sockets[0] is not None and all(s is sockets[0] for s in sockets)
        conn.request("GET", "/nope")
        resp = conn.getresponse()
        assert resp.status == 404 and resp.read()
        conn.request("GET", CHAT)
        resp = conn.getresponse()
        assert resp.status == 405 and resp.read()
        assert conn.sock is sockets[0]
    finally:
        conn.close()


def test_cli_rejects_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--port", "0", "--error-rate", "1.5"])
    assert exc.value.code == 2
    assert "--error-rate" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _readline(proc: subprocess.Popen[bytes], deadline: float) -> str:
    """Read one stdout line without blocking past the deadline."""
    assert proc.stdout is not None
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not buf.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                raise TimeoutError(f"no line from mockbackend, got {buf!r}")
            chunk = os.read(proc.stdout.fileno(), 1024)
            if not chunk:
                raise RuntimeError(f"mockbackend exited early: {buf!r}")
            buf += chunk
    return buf.decode().strip()


def test_cli_subprocess_serves_and_exits_cleanly_on_sigterm() -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "controlplane.demo.mockbackend", "--port", str(port), "--name", "cli-b"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = _readline(proc, time.monotonic() + 15)
        assert line == f"mockbackend cli-b listening on http://127.0.0.1:{port}"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", CHAT, body=json.dumps({"messages": MESSAGES}))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("x-backend") == "cli-b"
        resp.read()
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
