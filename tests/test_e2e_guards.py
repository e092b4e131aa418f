"""The listener guards the backends: normalised paths, Envoy's own request ids, uploads capped before upstream."""

from __future__ import annotations

import http.client
import socket

import pytest

from .harness import ControlPlane, chat_body, http_json, wait_for

pytestmark = pytest.mark.e2e


def backend_requests(url: str) -> int:
    return int(http_json("GET", f"{url}/admin/stats")[1]["requests"])


def raw_status(listener: str, method: str, path: str, headers: dict[str, str] | None = None,
               body: bytes | None = None) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection(listener, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def test_listener_guards_the_backends(tmp_path, mocks):
    a = mocks("a")
    pools = {"chat": {"match": {"prefix": "/v1/"}, "backends": {"a": {"url": a.url}}}}
    cp = ControlPlane(tmp_path, pools)
    try:
        json_headers = {"content-type": "application/json"}
        status, headers = raw_status(cp.listener, "POST", "/v1/chat/completions", {**json_headers,
                                     "x-request-id": "chosen-by-the-client"}, chat_body())
        assert status == 200
        assert headers["x-request-id"] != "chosen-by-the-client" and len(headers["x-request-id"]) == 36

        # Normalised before routing: these reach no `/v1/` pool (the backend counts nothing).
        before = backend_requests(a.url)
        for path in ("/v1/../admin/config", "/v1/%2e%2e/admin/config", "/v1/..%2Fadmin/config"):
            status, _ = raw_status(cp.listener, "GET", path)
            assert status in (400, 404), (path, status)
        assert backend_requests(a.url) == before
        status, _ = raw_status(cp.listener, "POST", "/v1//chat/completions", json_headers, chat_body())
        assert status == 200  # merged slashes still route
        assert backend_requests(a.url) == before + 1

        # An upload over the listener's limit (16 MiB): 413 from Envoy, nothing sent upstream.
        before = backend_requests(a.url)
        big = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * (17 << 20) + b'"}]}'
        for _ in range(3):
            status, _ = raw_status(cp.listener, "POST", "/v1/chat/completions", json_headers, big)
            assert status == 413
        # Uploads the client abandons halfway, chunked: the backend never answered, so it is not to blame.
        for _ in range(6):
            with socket.create_connection(("127.0.0.1", cp.ports["listener"]), timeout=10) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                          b"transfer-encoding: chunked\r\n\r\n" + b"100000\r\n" + b"x" * (1 << 19))
        assert backend_requests(a.url) == before
        status, _ = raw_status(cp.listener, "POST", "/v1/chat/completions", json_headers, chat_body())
        assert status == 200
        stats = cp.envoy_stats("cluster.chat.outlier_detection")
        assert stats.get("cluster.chat.outlier_detection.ejections_enforced_total", 0) == 0
        weights = wait_for(lambda: http_json("GET", f"{cp.api}/v1/pools/chat/weights")[1], what="weights")
        assert "a" in str(weights)
        assert all(h["health"].get("failed_outlier_check") is not True for h in cp.envoy_hosts("chat").values())
    finally:
        cp.stop()
