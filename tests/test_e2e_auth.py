"""The control plane's gRPC port: only the Envoy holding the token gets resources or writes spend."""

from __future__ import annotations

import asyncio
import http.client
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2

from controlplane.xds import typeurls

from .harness import ControlPlane, chat_body, http_json, wait_for

pytestmark = pytest.mark.e2e

SECRET = "sk-this-key-must-never-leave-0123"


async def ads_first_response(target: str, metadata: tuple[tuple[str, str], ...] | None) -> grpc.StatusCode | str:
    async with grpc.aio.insecure_channel(target) as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(metadata=metadata)
        try:
            await call.write(discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id="attacker"),
                                                            type_url=typeurls.CLUSTER))
            response = await asyncio.wait_for(call.read(), 10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        except Exception:  # noqa: BLE001 - the write can fail on a call the server already ended
            return await asyncio.wait_for(call.code(), 10)
        if response is grpc.aio.EOF:
            return await asyncio.wait_for(call.code(), 10)
        return str(response)  # resources: the test fails on this


def forged_log(pool: str, backend: str) -> als_pb2.StreamAccessLogsMessage:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    common = entry.common_properties
    common.upstream_cluster = pool
    common.custom_tags["backend"] = backend
    common.upstream_remote_address.socket_address.address = "127.0.0.1"
    common.upstream_remote_address.socket_address.port_value = 1
    usage = struct_pb2.Struct()
    usage.update({"prompt_tokens": 20_000, "completion_tokens": 2_000})  # plausible: counted if let in
    common.metadata.filter_metadata["llm_lb.usage"].CopyFrom(usage)
    entry.response.response_code.value = 200
    entry.request.request_id = "forged"
    message = als_pb2.StreamAccessLogsMessage()
    message.identifier.node.id = "attacker"
    message.identifier.log_name = "llm_lb"
    message.http_logs.log_entry.append(entry)
    return message


async def send_log(target: str, metadata: tuple[tuple[str, str], ...] | None) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = als_pb2_grpc.AccessLogServiceStub(channel)
        try:
            await asyncio.wait_for(stub.StreamAccessLogs(iter([forged_log("chat", "a")]), metadata=metadata), 10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


def spend(cp: ControlPlane) -> float:
    code, body = http_json("GET", f"{cp.api}/v1/cost")
    assert code == 200, body
    return float(body["pools"]["chat"]["backends"]["a"]["total"])


def test_unauthenticated_streams_get_no_resources_and_change_no_spend(tmp_path, mocks):
    a = mocks("a")
    pools = {"chat": {"match": {"prefix": "/v1/"}, "backends": {
        "a": {"url": a.url, "api_key": "${BACKEND_KEY}", "cost": {"input_per_1k": 1.0, "output_per_1k": 1.0}}}}}
    cp = ControlPlane(tmp_path, pools, env={"BACKEND_KEY": SECRET})
    try:
        state = tmp_path / "state"
        for private in ("xds-token", "envoy-bootstrap.json"):
            assert (state / private).stat().st_mode & 0o077 == 0, f"{private} must be owner-only"
        token = (state / "xds-token").read_text().strip()
        conn = http.client.HTTPConnection(cp.listener, timeout=10)
        conn.request("POST", "/v1/chat/completions", chat_body(), {"content-type": "application/json"})
        assert conn.getresponse().status == 200  # the managed Envoy authenticates
        target = f"127.0.0.1:{cp.ports['xds']}"

        for metadata in (None, (("authorization", "Bearer not-the-token-000000000"),)):
            assert asyncio.run(ads_first_response(target, metadata)) == grpc.StatusCode.UNAUTHENTICATED
        wait_for(lambda: spend(cp) > 0, what="the real request's spend")
        before = spend(cp)
        assert asyncio.run(send_log(target, None)) == grpc.StatusCode.UNAUTHENTICATED
        status = cp.status()
        assert status["grpc_auth"]["unauthenticated_refused"] == {
            "AggregatedDiscoveryService": 2, "AccessLogService": 1}
        _, metrics = http_json("GET", f"{cp.api}/metrics")
        assert 'llm_lb_grpc_unauthenticated_total{service="AccessLogService"} 1.0' in str(metrics)
        assert spend(cp) == before, "an unauthenticated access log changed the spend"
        assert SECRET not in cp.log_text()

        # The same message with the token is taken: the refusal above is what kept the spend unchanged.
        auth = (("authorization", f"Bearer {token}"),)
        assert "chat" in asyncio.run(ads_first_response(target, auth))
        assert asyncio.run(send_log(target, auth)) == grpc.StatusCode.OK
        wait_for(lambda: spend(cp) > before, what="the authenticated message to be counted")
    finally:
        cp.stop()


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_pki(tmp: Path) -> dict[str, str]:
    """A CA, the control plane's certificate (for 127.0.0.1) and Envoy's client certificate."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=llm-lb test CA",
            "-keyout", str(tmp / "ca.key"), "-out", str(tmp / "ca.pem"))
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("envoy", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(tmp / f"{name}.key"),
                "-out", str(tmp / f"{name}.csr"))
        (tmp / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", str(tmp / f"{name}.csr"), "-CA", str(tmp / "ca.pem"), "-CAkey",
                str(tmp / "ca.key"), "-CAcreateserial", "-days", "1", "-extfile", str(tmp / f"{name}.ext"),
                "-out", str(tmp / f"{name}.pem"))
    return {"ca_file": str(tmp / "ca.pem"), "cert_file": str(tmp / "server.pem"), "key_file": str(tmp / "server.key"),
            "envoy_cert_file": str(tmp / "envoy.pem"), "envoy_key_file": str(tmp / "envoy.key")}


def test_mutual_tls_between_envoy_and_control_plane(tmp_path, mocks):
    a = mocks("a")
    tls = make_pki(tmp_path)
    cp = ControlPlane(tmp_path, None, start=False)
    doc = cp.document({"chat": {"match": {"prefix": "/v1/"}, "backends": {"a": {"url": a.url}}}})
    doc["controlplane"]["xds"]["tls"] = tls
    cp.write_config(text=yaml.safe_dump(doc))
    try:
        cp.start()  # waits until the managed Envoy, over mTLS, accepted the snapshot
        assert cp.status()["grpc_auth"]["mtls"] is True
        conn = http.client.HTTPConnection(cp.listener, timeout=10)
        conn.request("POST", "/v1/chat/completions", chat_body(), {"content-type": "application/json"})
        assert conn.getresponse().status == 200
        wait_for(lambda: spend(cp) > 0 or http_json("GET", f"{cp.api}/v1/cost")[1]["pools"]["chat"]["backends"]["a"]
                 ["requests"] > 0, what="the access log over mTLS")
        # Plaintext, even with the token, gets nothing: the port speaks TLS only.
        token = (tmp_path / "state" / "xds-token").read_text().strip()
        result = asyncio.run(ads_first_response(f"127.0.0.1:{cp.ports['xds']}", (("authorization", f"Bearer {token}"),)))
        assert result == grpc.StatusCode.UNAVAILABLE
    finally:
        cp.stop()
