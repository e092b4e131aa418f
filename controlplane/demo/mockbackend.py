"""Mock OpenAI-compatible LLM / RAG backend for demos and end-to-end tests.

Standard library only, so it can run anywhere the control plane runs.  Behaviour
(latency, injected errors, health, token counts) is set by CLI flags and can be
changed live through ``POST /admin/config`` so tests can steer the load balancer.

    python -m controlplane.demo.mockbackend --port 9001 --name local-a
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import hmac
import json
import math
import os
import random
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import urlsplit

HEALTH = {"healthy": ("ok", 200), "degraded": ("degraded", 200), "unhealthy": ("down", 503)}
MAX_BODY = 32 * 1024 * 1024  # above the listener's default 16 MiB, so Envoy's limit is the one seen


class InvalidInputError(ValueError):
    """Client-supplied value rejected; the message is safe to send back."""


@dataclass
class MockSettings:
    """Behaviour knobs; the fields in ``LIVE_FIELDS`` may change at runtime."""

    name: str = "mock"
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    error_rate: float = 0.0
    error_status: int = 503
    retry_after: float = 0.0  # seconds sent as Retry-After with injected errors; 0: no header
    prompt_tokens: int = 0  # 0 = estimate from message text
    completion_tokens: int = 16
    stream_chunks: int = 4
    chunk_delay_ms: float = 5.0
    health_status: str = "healthy"
    require_key_env: str | None = None  # name of the env var holding the key, never the key
    tls_cert: str | None = None  # PEM files: serve HTTPS, as hosted providers do
    tls_key: str | None = None
    seed: int = 0
    verbose: bool = False


def _number(lo: float, hi: float, integer: bool) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        # bool is an int subclass; JSON true must not silently become 1.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInputError("must be a number")
        if integer and value != int(value):
            raise InvalidInputError("must be an integer")
        if not lo <= value <= hi:
            raise InvalidInputError(f"must be between {lo:g} and {hi:g}")
        return int(value) if integer else float(value)

    return check


def _health(value: Any) -> str:
    if value not in HEALTH:
        raise InvalidInputError(f"must be one of {', '.join(HEALTH)}")
    return str(value)


LIVE_FIELDS: dict[str, Callable[[Any], Any]] = {
    "latency_ms": _number(0, 3_600_000, False),
    "latency_jitter_ms": _number(0, 3_600_000, False),
    "error_rate": _number(0, 1, False),
    "error_status": _number(400, 599, True),
    "retry_after": _number(0, 86_400, False),
    "health_status": _health,
    "prompt_tokens": _number(0, 10**9, True),
    "completion_tokens": _number(0, 10**9, True),
    "chunk_delay_ms": _number(0, 3_600_000, False),
    "stream_chunks": _number(1, 10_000, True),
}


def error_body(message: str, type_: str = "invalid_request_error", code: Any = None) -> dict[str, Any]:
    """OpenAI-style error envelope, so SDKs surface a readable message."""
    return {"error": {"message": message, "type": type_, "code": code}}


class MockServer(ThreadingHTTPServer):
    """HTTP server holding the shared, lock-protected state of one mock backend."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, settings: MockSettings, host: str, port: int) -> None:
        self.settings = settings
        self.api_key: str | None = None
        if settings.require_key_env:
            self.api_key = os.environ.get(settings.require_key_env) or None
            if self.api_key is None:
                raise ValueError(f"environment variable {settings.require_key_env} is not set")
        self.lock = threading.Lock()
        self.rng = random.Random(settings.seed)
        self.counter = 0
        self.stats = dict.fromkeys(
            ("requests", "completions", "errors", "in_flight", "prompt_tokens", "completion_tokens"), 0
        )
        self.models: dict[str, int] = {}  # the `model` of each chat request, as this backend received it
        # sha256 prefixes of the credentials requests arrived with (authorization, x-api-key), never the values:
        # a test can check that a client's own key never reached a backend.
        self.credentials: dict[str, int] = {}
        super().__init__((host, port), MockHandler)
        if settings.tls_cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(settings.tls_cert, settings.tls_key)
            self.socket = context.wrap_socket(self.socket, server_side=True)

    def bump(self, **deltas: int) -> None:
        with self.lock:
            for key, delta in deltas.items():
                self.stats[key] += delta

    def snapshot(self) -> MockSettings:
        with self.lock:
            return dataclasses.replace(self.settings)

    def update(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Validate all fields first so a bad request changes nothing."""
        clean = {}
        for key, value in changes.items():
            if key not in LIVE_FIELDS:
                raise InvalidInputError(f"unknown field '{key}'")
            try:
                clean[key] = LIVE_FIELDS[key](value)
            except InvalidInputError as exc:
                raise InvalidInputError(f"{key}: {exc}") from None
        with self.lock:
            self.settings = dataclasses.replace(self.settings, **clean)
            return dataclasses.asdict(self.settings)


class MockHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Buffered writes: a response goes out in one send, as real servers mostly
    # do; streams flush each event themselves. With Nagle on, keep-alive
    # clients would wait for a delayed ACK (~40 ms) on every response.
    wbufsize = -1
    disable_nagle_algorithm = True
    server: MockServer

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.settings.verbose:
            sys.stderr.write(f"[{self.server.settings.name}] {format % args}\n")

    def end_headers(self) -> None:
        # Hooked here so every response, including base-class errors, is tagged.
        self.send_header("x-backend", self.server.settings.name)
        headers = getattr(self, "headers", None)
        if headers is not None and headers.get("x-request-id"):
            self.send_header("x-request-id", headers["x-request-id"])
        super().end_headers()

    def _dispatch(self) -> None:
        method = self.command
        try:
            body = self._read_body()
        except ValueError as exc:  # bad framing; we can't trust the stream any more
            self.close_connection = True
            status = 413 if isinstance(exc, InvalidInputError) else 400
            return self._json(status, error_body(str(exc) if status == 413 else "malformed request body"))
        path = urlsplit(self.path).path
        routes: dict[str, dict[str, Callable[[bytes], None]]] = {
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/models": {"GET": self._models},
            "/health": {"GET": self._health},
            "/admin/config": {"GET": self._config, "POST": self._config},
            "/admin/stats": {"GET": self._stats},
        }
        if path.startswith("/v1/"):
            self.server.bump(requests=1, in_flight=1)
            self._note_credentials()
        try:
            if path not in routes:
                return self._json(404, error_body(f"no route for {path}", code="not_found"))
            handler = routes[path].get(method)
            if handler is None:
                allowed = ", ".join(routes[path])
                return self._json(405, error_body(f"{method} not allowed"), {"Allow": allowed})
            if path.startswith("/v1/") and not self._authorized():
                return self._json(401, error_body("Incorrect API key provided.", code="invalid_api_key"))
            handler(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            if path.startswith("/v1/"):
                self.server.bump(in_flight=-1)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch  # noqa: N815 - http.server naming

    def _read_body(self) -> bytes:
        """Read the whole body (also chunked) so keep-alive stays in sync."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts, total = [], 0
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                total += size
                if total > MAX_BODY:
                    raise InvalidInputError("request body too large")
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise InvalidInputError("request body too large")
        return self.rfile.read(length) if length > 0 else b""

    def _note_credentials(self) -> None:
        for header in ("Authorization", "X-Api-Key"):
            value = self.headers.get(header)
            if value:
                digest = hashlib.sha256(value.removeprefix("Bearer ").encode()).hexdigest()[:16]
                with self.server.lock:
                    if digest in self.server.credentials or len(self.server.credentials) < 64:
                        self.server.credentials[digest] = self.server.credentials.get(digest, 0) + 1

    def _authorized(self) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _models(self, _body: bytes) -> None:
        data = [{"id": "mock-model", "object": "model", "owned_by": self.server.settings.name}]
        self._json(200, {"object": "list", "data": data})

    def _health(self, _body: bytes) -> None:
        s = self.server.snapshot()
        llm, status = HEALTH[s.health_status]
        body = {"status": s.health_status, "backend": s.name, "llm_status": llm, "graph_db_status": "ok"}
        self._json(status, body)

    def _config(self, body: bytes) -> None:
        if self.command == "GET":
            return self._json(200, dataclasses.asdict(self.server.snapshot()))
        try:
            changes = json.loads(body or b"{}")
            if not isinstance(changes, dict):
                raise InvalidInputError("body must be a JSON object")
            self._json(200, self.server.update(changes))
        except ValueError as exc:  # InvalidInputError or JSONDecodeError
            self._json(400, error_body(str(exc)))

    def _stats(self, _body: bytes) -> None:
        with self.server.lock:
            stats = {"name": self.server.settings.name, **self.server.stats, "models": dict(self.server.models),
                     "credentials": dict(self.server.credentials)}
        self._json(200, stats)

    def _chat(self, body: bytes) -> None:
        try:
            req = _parse_chat(body)
        except InvalidInputError as exc:
            return self._json(400, error_body(str(exc)))
        s = self.server.snapshot()
        with self.server.lock:
            model = str(req["model"])[:128] if "model" in req else None
            if model is not None and (model in self.server.models or len(self.server.models) < 100):
                self.server.models[model] = self.server.models.get(model, 0) + 1
            failed = s.error_rate > 0 and self.server.rng.random() < s.error_rate
            jitter = self.server.rng.uniform(0, s.latency_jitter_ms) if s.latency_jitter_ms else 0.0
            self.server.counter += 1
            counter = self.server.counter
        if failed:
            self.server.bump(errors=1)
            msg = f"injected failure from {s.name}"
            headers = {"Retry-After": f"{s.retry_after:g}"} if s.retry_after else None
            return self._json(s.error_status, error_body(msg, "server_error", s.error_status), headers)
        time.sleep((s.latency_ms + jitter) / 1000)
        chars = sum(len(m["content"]) for m in req["messages"])
        prompt = s.prompt_tokens or max(1, math.ceil(chars / 4))
        usage = {"prompt_tokens": prompt, "completion_tokens": s.completion_tokens,
                 "total_tokens": prompt + s.completion_tokens}
        base = {"id": f"chatcmpl-{s.name}-{counter}", "created": int(time.time()),
                "model": req.get("model", "mock-model")}
        pieces = _reply_pieces(s.name, s.stream_chunks)
        if req.get("stream"):
            include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
            self._stream(s, base, pieces, usage if include_usage else None)
        else:
            message = {"role": "assistant", "content": "".join(pieces)}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            self._json(200, {**base, "object": "chat.completion", "choices": [choice], "usage": usage})
        self.server.bump(completions=1, prompt_tokens=prompt, completion_tokens=s.completion_tokens)

    def _stream(self, s: MockSettings, base: dict[str, Any], pieces: list[str], usage: dict[str, Any] | None) -> None:
        chunked = self.request_version != "HTTP/1.0"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self.end_headers()

        def send(raw: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw) if chunked else raw)
            self.wfile.flush()

        def event(choices: list[Any], **extra: Any) -> None:
            obj = {**base, "object": "chat.completion.chunk", "choices": choices, **extra}
            send(b"data: " + json.dumps(obj).encode() + b"\n\n")

        event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        for i, piece in enumerate(pieces):
            if i:
                time.sleep(s.chunk_delay_ms / 1000)
            event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
        event([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        if usage is not None:
            event([], usage=usage)
        send(b"data: [DONE]\n\n")
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


def _parse_chat(body: bytes) -> dict[str, Any]:
    """Validate just enough of the request to catch what a real API rejects."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInputError("request body is not valid JSON") from None
    if not isinstance(req, dict):
        raise InvalidInputError("request body must be a JSON object")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidInputError("'messages' must be a non-empty list")
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        raise InvalidInputError("each message must be an object with string 'content'")
    if not isinstance(req.get("model", ""), str):
        raise InvalidInputError("'model' must be a string")
    if not isinstance(req.get("stream", False), bool):
        raise InvalidInputError("'stream' must be a boolean")
    if not isinstance(req.get("stream_options") or {}, dict):
        raise InvalidInputError("'stream_options' must be an object")
    return req


def _reply_pieces(name: str, n: int) -> list[str]:
    """Split a fixed reply into n pieces (trailing ones empty if the text is short)."""
    text = f"Mock reply from {name}: the quick brown fox jumps over the lazy dog."
    size, extra = divmod(len(text), n)
    bounds = [i * size + min(i, extra) for i in range(n + 1)]
    return [text[bounds[i]:bounds[i + 1]] for i in range(n)]


class MockBackend:
    """In-process mock backend: ``start()`` serves from a daemon thread, ``stop()`` ends it."""

    def __init__(self, settings: MockSettings | None = None, host: str = "127.0.0.1", port: int = 0):
        self.server = MockServer(settings or MockSettings(), host, port)
        self.host = host
        self.port: int = self.server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        # The socket is already bound and listening, so clients may connect at once.
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.server.server_close()

    def configure(self, **changes: Any) -> dict[str, Any]:
        return self.server.update(changes)

    def stats(self) -> dict[str, Any]:
        with self.server.lock:
            return {"name": self.server.settings.name, **self.server.stats, "models": dict(self.server.models)}

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_args(argv: list[str] | None = None) -> tuple[MockSettings, str, int]:
    p = argparse.ArgumentParser(prog="python -m controlplane.demo.mockbackend", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default="mock")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--latency-jitter-ms", type=float, default=0.0, help="extra uniform 0..N ms")
    p.add_argument("--error-rate", type=float, default=0.0, help="probability 0..1")
    p.add_argument("--error-status", type=int, default=503)
    p.add_argument("--retry-after", type=float, default=0.0, metavar="SECONDS",
                   help="send Retry-After: SECONDS with injected errors (0: none)")
    p.add_argument("--prompt-tokens", type=int, default=0, help="0 = estimate chars/4")
    p.add_argument("--completion-tokens", type=int, default=16)
    p.add_argument("--stream-chunks", type=int, default=4)
    p.add_argument("--chunk-delay-ms", type=float, default=5.0)
    p.add_argument("--health-status", choices=list(HEALTH), default="healthy")
    p.add_argument("--require-key-env", metavar="VAR", help="env var holding the required API key")
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (and --tls-key)")
    p.add_argument("--tls-key", metavar="PEM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    a = p.parse_args(argv)
    if not 0 <= a.port <= 65535:
        p.error("--port: must be between 0 and 65535")
    for field, check in LIVE_FIELDS.items():
        try:
            check(getattr(a, field))
        except InvalidInputError as exc:
            p.error(f"--{field.replace('_', '-')}: {exc}")
    if bool(a.tls_cert) != bool(a.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if a.require_key_env and not os.environ.get(a.require_key_env):
        p.error(f"--require-key-env: environment variable {a.require_key_env} is not set")
    names = {f.name for f in dataclasses.fields(MockSettings)}
    settings = MockSettings(**{k: v for k, v in vars(a).items() if k in names})
    return settings, a.host, a.port


def main(argv: list[str] | None = None) -> None:
    settings, host, port = parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        backend = MockBackend(settings, host, port).start()
    except OSError as exc:  # e.g. port in use: one clear line instead of a traceback
        sys.exit(f"mockbackend {settings.name}: cannot listen on {host}:{port}: {exc}")
    scheme = "https" if settings.tls_cert else "http"
    print(f"mockbackend {settings.name} listening on {scheme}://{host}:{backend.port}", flush=True)
    while not stop.wait(0.5):
        pass
    backend.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
