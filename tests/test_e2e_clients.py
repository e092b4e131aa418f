"""End to end with real clients: the official OpenAI SDK through Envoy, and per-endpoint credentials."""

from __future__ import annotations

import http.client
import json
import subprocess
from collections import Counter

import openai
import pytest
import yaml

from .harness import ControlPlane, MockBackend, chat_body, http_json, spread, wait_for

pytestmark = pytest.mark.e2e

KEY_A = "sk-e2e-key-for-backend-a-0001"
KEY_B = "sk-e2e-key-for-backend-b-0002"


@pytest.fixture
def cp_with_keys(tmp_path):
    env = {"E2E_KEY_A": KEY_A, "E2E_KEY_B": KEY_B}
    a = MockBackend("a", args=["--require-key-env", "E2E_KEY_A"], env=env)
    b = MockBackend("b", args=["--require-key-env", "E2E_KEY_B"], env=env)
    plain = MockBackend("plain")
    pools = {
        "chat": {
            "match": {"prefix": "/v1/"},
            "backends": {
                "a": {"url": a.url, "api_key": "${E2E_KEY_A}"},
                "b": {"url": b.url, "api_key": "${E2E_KEY_B}"},
                "plain": {"url": plain.url},
            },
        }
    }
    cp = ControlPlane(tmp_path, pools, env=env)
    yield cp
    cp.stop()
    for backend in (a, b, plain):
        backend.stop()


def test_openai_sdk_completion_and_stream_through_envoy(cp_with_keys):
    client = openai.OpenAI(base_url=f"http://{cp_with_keys.listener}/v1", api_key="app-never-holds-backend-keys")
    seen = set()
    for _ in range(6):
        completion = client.chat.completions.create(
            model="mock-model", messages=[{"role": "user", "content": "Say hi"}]
        )
        assert completion.choices[0].message.content
        assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
        seen.add(completion.id.split("-")[1])
    assert seen == {"a", "b", "plain"}, "every backend answered, keyed or not"

    stream = client.chat.completions.create(
        model="mock-model", messages=[{"role": "user", "content": "Stream please"}],
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_each_endpoint_gets_its_own_key_and_keys_never_leak(cp_with_keys):
    cp = cp_with_keys
    counts, statuses = spread(cp.listener, 300, clients=3)
    # a and b answer 401 unless Envoy injected exactly their own key; the app sent none.
    assert statuses == Counter({200: 300}), statuses
    assert set(counts) == {"a", "b", "plain"}

    # An app that sends its own Authorization header still cannot reach a keyed backend with it.
    conn = http.client.HTTPConnection(cp.listener, timeout=10)
    for _ in range(6):
        conn.request("POST", "/v1/chat/completions", body=chat_body(),
                     headers={"content-type": "application/json", "authorization": "Bearer wrong"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.getheader("x-backend") in ("a", "b"):
            assert resp.status == 200, body
    conn.close()

    status_text = json.dumps(cp.status())
    metrics_text = http.client.HTTPConnection(cp.api.split("//")[1], timeout=5)
    metrics_text.request("GET", "/metrics")
    scraped = metrics_text.getresponse().read().decode()
    for secret in (KEY_A, KEY_B):
        assert secret not in status_text
        assert secret not in scraped
        assert secret not in cp.log_text()


def test_https_backend_gets_tls_with_sni_its_own_host_and_key(tmp_path):
    """An https URL: Envoy verifies the backend's certificate for its host name and sends the key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    env = {"E2E_TLS_KEY": KEY_A}
    secure = MockBackend("secure", args=["--tls-cert", str(cert), "--tls-key", str(key),
                                         "--require-key-env", "E2E_TLS_KEY"], env=env)
    cp = ControlPlane(tmp_path, None, env=env, start=False)
    doc = cp.document({"chat": {"match": {"prefix": "/v1/"}, "deep_health": {"interval": "200ms"}, "backends": {
        "secure": {"url": f"https://localhost:{secure.port}", "api_key": "${E2E_TLS_KEY}"}}}})
    doc["envoy"]["ca_file"] = str(cert)
    cp.write_config(text=yaml.safe_dump(doc))
    try:
        cp.start()
        assert cp.status()["pools"]["chat"]["backends"]["secure"]["address"] == "127.0.0.1"
        counts, statuses = spread(cp.listener, 20, clients=2)
        assert statuses == Counter({200: 20}) and counts == Counter({"secure": 20})
        wait_for(lambda: http_json("GET", f"{cp.api}/v1/pools/chat/weights")[1]["backends"]["secure"]["health"]
                 ["status"] == "healthy", what="the deep health probe over TLS, trusting envoy.ca_file")
        ssl_stats = cp.envoy_stats("cluster.chat.ssl.")
        assert ssl_stats["cluster.chat.ssl.handshake"] >= 1 and ssl_stats["cluster.chat.ssl.fail_verify_san"] == 0

        # The same server under a name its certificate does not carry: refused, not trusted.
        doc["pools"]["chat"]["backends"]["secure"]["url"] = f"https://127.0.0.1:{secure.port}"
        cp.write_config(text=yaml.safe_dump(doc))
        cp.wait_applied()
        _, statuses = spread(cp.listener, 4, clients=1)
        assert statuses == Counter({503: 4})
        assert cp.envoy_stats("cluster.chat.ssl.fail_verify_san")["cluster.chat.ssl.fail_verify_san"] > 0
    finally:
        cp.stop()
        secure.stop()
