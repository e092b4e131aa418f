"""Who may open a stream on the control plane's gRPC port: only an Envoy that presents the token.

Every ADS and access-log stream carries `authorization: Bearer <token>` as
initial metadata (the bootstrap and the access-log config put it there). A
stream without it is refused with UNAUTHENTICATED before any handler runs, so
it never receives a resource (and so never an API key), and it can never write
to the spend ledger. Refusals are counted per method.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from ..bootstrap import AUTH_HEADER
from ..config.model import XdsTls
from ..statefile import atomic_write

log = logging.getLogger("controlplane.xds")

_LOG_EVERY = 60.0  # seconds between warnings: a scanner must not flood the log
_FIRST_MESSAGE_WAIT = 1.0  # seconds a refused stream is given to deliver its first message (dropped)


class TokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, token: str, refused: dict[str, int] | None = None) -> None:
        """`refused` counts refusals by service (AggregatedDiscoveryService, AccessLogService)."""
        if not token:
            raise ValueError("an empty token would let anyone in")
        self._expected = f"Bearer {token}".encode()
        self.refused = refused if refused is not None else {}
        self._logged = 0.0

    def allows(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == AUTH_HEADER:
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or self.allows(details.invocation_metadata):
            return handler
        service = (details.method or "/?/").split("/")[1].rsplit(".", 1)[-1] or "?"
        self.refused[service] = self.refused.get(service, 0) + 1
        now = time.monotonic()
        if now - self._logged >= _LOG_EVERY:
            self._logged = now
            log.warning("refused an unauthenticated gRPC stream (%s); %d refused so far",
                        service, sum(self.refused.values()))
        return _refusal(handler)


async def _deny(request: Any, context: grpc.aio.ServicerContext) -> None:
    if hasattr(request, "__aiter__"):
        # A streaming client usually writes before it reads: refusing while its first message is still on its
        # way sometimes reached it as INTERNAL instead of the status (about 1 in 500 under load, seen). The
        # first message is taken (at most a second's wait) and dropped unread.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(anext(request), _FIRST_MESSAGE_WAIT)
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid 'authorization: Bearer <token>' is required")


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as the real one that only refuses (it takes at most the first message, as raw
    bytes, never parsed)."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_deny)
    return grpc.unary_unary_rpc_method_handler(_deny)


TOKEN_FILE = "xds-token"


def resolve_token(configured: str | None, state_dir: Path, fresh: bool) -> str:
    """The configured token, else the one in `<state_dir>/xds-token` (owner-only), made when needed.

    `fresh` (a managed Envoy, bootstrapped by this process): a new token at each
    start, so a copy of an old bootstrap stops working. Otherwise (Envoys run on
    their own) the file's token is kept across restarts, so they reconnect.
    """
    if configured:
        return configured
    path = state_dir / TOKEN_FILE
    if not fresh:
        try:
            kept = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            kept = ""
        if kept:
            return kept
    token = secrets.token_hex(32)
    atomic_write(path, token + "\n", private=True)
    return token


def server_credentials(tls: XdsTls) -> grpc.ServerCredentials:
    """mTLS: the control plane's certificate, and only clients whose certificate the CA signed."""
    def read(path: str, what: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"controlplane.xds.tls.{what}: cannot read {path}: {exc.strerror or exc}") from None

    return grpc.ssl_server_credentials(
        [(read(tls.key_file, "key_file"), read(tls.cert_file, "cert_file"))],
        root_certificates=read(tls.ca_file, "ca_file"),
        require_client_auth=True,
    )
