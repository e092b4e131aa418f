"""The control plane's HTTP API and live page (loopback by default).

Reads are open to whoever can reach the port; what changes the system (drain,
undrain, feedback) needs `Authorization: Bearer <controlplane.api.token>` when
a token is configured (compared in constant time, read from the live config
per request, so a reload rotates it). Without a token the config model allows
only a loopback address, so the open mutations reach local callers only.

Request bodies are small JSON objects: a body over MAX_BODY_BYTES is refused
(413) before it is parsed, and one that is not JSON, or nested too deep for
the parser, gets a 400; every error is JSON, {"error": {"message": ...}}.
The routes are declared once (ROUTES) and the OpenAPI document is built from
that table, so the two cannot drift apart.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from . import metrics, reports
from .telemetry.requests import MAX_REQUEST_ID_CHARS
from .views import Actions, Views

log = logging.getLogger("controlplane.api")

MAX_BODY_BYTES = 64 * 1024
PAGE_CSP = ("default-src 'self'; script-src 'unsafe-inline' 'self'; style-src 'unsafe-inline' 'self'; "
            "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    summary: str
    mutates: bool = False  # needs the API token when one is configured
    body: dict[str, Any] | None = None  # JSON schema of the request body
    responses: dict[int, str] = field(default_factory=lambda: {200: "OK"})
    content: str = "application/json"
    tag: str = "status"


_ERR = {400: "Bad request body", 401: "Missing or wrong API token", 404: "No such pool or backend",
        413: "Body too large"}
_EMPTY: dict[str, Any] = {"type": "object", "additionalProperties": False}
_POOL = {"name": "pool", "in": "path", "required": True, "schema": {"type": "string"}}
_BACKEND = {"name": "backend", "in": "path", "required": True, "schema": {"type": "string"}}

ROUTES = (
    Route("GET", "/", "The live page (self-contained HTML, refreshing itself from this API)",
          content="text/html", tag="page"),
    Route("GET", "/healthz", "The process is up"),
    Route("GET", "/readyz", "Ready: a snapshot is built and every connected Envoy has accepted it",
          responses={200: "Ready", 503: "Not ready (the body says what is missing)"}),
    Route("GET", "/metrics", "Prometheus metrics", content=CONTENT_TYPE_LATEST),
    Route("GET", "/openapi.json", "This document"),
    Route("GET", "/v1/status", "Config, snapshot, Envoys, alerts"),
    Route("GET", "/v1/pools", "Every pool with its backends: Envoy's view, weights, recent traffic, spend"),
    Route("GET", "/v1/pools/{pool}", "One pool", responses={200: "OK", 404: _ERR[404]}),
    Route("GET", "/v1/pools/{pool}/weights", "One pool's weights with the strategy's inputs and reasons",
          responses={200: "OK", 404: _ERR[404]}),
    Route("GET", "/v1/cost", "Spend per pool, backend and model against the budgets"),
    Route("POST", "/v1/pools/{pool}/backends/{backend}/drain",
          "Stop new requests to a backend; requests in flight finish", mutates=True,
          body={"type": "object", "properties": {"force": {"type": "boolean"}}, "additionalProperties": False},
          responses={200: "Draining", 400: _ERR[400], 401: _ERR[401], 404: _ERR[404],
                     409: "It is the pool's last backend in rotation (pass force)", 413: _ERR[413]},
          tag="operations"),
    Route("POST", "/v1/pools/{pool}/backends/{backend}/undrain", "Put a drained backend back in rotation",
          mutates=True, body={"type": "object", "additionalProperties": False},
          responses={200: "In rotation", 400: _ERR[400], 401: _ERR[401], 404: _ERR[404], 413: _ERR[413]},
          tag="operations"),
    Route("GET", "/v1/rollouts", "Every pool's rollout: stage, phase, step, gates, per-arm statistics"),
    Route("GET", "/v1/rollouts/{pool}", "One pool's rollout (an A/B test's readout, a shadow's report)",
          responses={200: "OK", 404: "No such pool, or it has no rollout"}),
    *(Route("POST", f"/v1/rollouts/{{pool}}/{action}", summary, mutates=True, body=body,
            responses={200: "Done: the rollout's report", 400: _ERR[400], 401: _ERR[401],
                       404: "No such pool, or it has no rollout", 409: "Not possible in the rollout's phase",
                       413: _ERR[413]}, tag="rollouts")
      for action, summary, body in (
          ("pause", "Hold the rollout where it is (the candidate keeps its share)", _EMPTY),
          ("resume", "Run a paused rollout again; the current step starts over", _EMPTY),
          ("promote", "The next step now, or with full: true, promote the candidate at once",
           {"type": "object", "properties": {"full": {"type": "boolean"}}, "additionalProperties": False}),
          ("abort", "Take the candidate out of traffic now (requests in flight finish)", _EMPTY),
          ("retry", "Start a failed, aborted or paused rollout again from its first step", _EMPTY))),
    Route("POST", "/v1/feedback", "Rate an answer by the x-request-id Envoy returned (once per request)",
          mutates=True,
          body={"type": "object", "required": ["request_id", "score"], "additionalProperties": False,
                "properties": {"request_id": {"type": "string", "maxLength": MAX_REQUEST_ID_CHARS},
                               "score": {"type": "number", "minimum": 0, "maximum": 1}}},
          responses={200: "Applied", 202: "Kept until the request's access-log entry arrives", 400: _ERR[400],
                     401: _ERR[401], 409: "Already rated", 413: _ERR[413]},
          tag="operations"),
)


class _BodyError(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response


async def _json(request: web.Request, example: str) -> Any:
    """The request's body as JSON; raises _BodyError with the error response (413 too large, 400 not JSON)."""
    try:
        raw = await request.read()  # the application's client_max_size stops it past MAX_BODY_BYTES
    except web.HTTPRequestEntityTooLarge:
        raise _BodyError(_error(413, f"body too large: at most {MAX_BODY_BYTES} bytes")) from None
    try:
        return json.loads(raw)
    except RecursionError:
        raise _BodyError(_error(400, f"body is nested too deeply; it must be JSON, e.g. {example}")) from None
    except ValueError:  # not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError)
        raise _BodyError(_error(400, f"body must be JSON, e.g. {example}")) from None


def openapi(routes: tuple[Route, ...] = ROUTES) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "tags": [route.tag],
            "responses": {str(code): {"description": text, **({"content": {route.content: {}}} if code < 300
                                                                else {})}
                          for code, text in route.responses.items()},
        }
        params = [p for name, p in (("{pool}", _POOL), ("{backend}", _BACKEND)) if name in route.path]
        if params:
            operation["parameters"] = params
        if route.body is not None:
            operation["requestBody"] = {"required": route.path == "/v1/feedback",
                                        "content": {"application/json": {"schema": route.body}}}
        if route.mutates:
            operation["security"] = [{"bearer": []}]
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "LLM load balancer control plane", "version": "1",
                 "description": "Mutations need `Authorization: Bearer <token>` when controlplane.api.token "
                                "is set; errors are {\"error\": {\"message\": ...}}."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }


def make_app(views: Views, actions: Actions) -> web.Application:
    registry = metrics.registry_for(views)
    page = resources.files("controlplane").joinpath("web/index.html").read_bytes()
    document = openapi()
    refused = _Refusals()

    def authorized(request: web.Request) -> web.Response | None:
        """None when the call may go on, else the 401 to answer."""
        token = views.state().config.controlplane.api.token
        if token is None:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        expected = token.get_secret_value().encode()
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected):
            return None
        refused.note(request)
        response = _error(401, "this call needs 'Authorization: Bearer <token>' with the API token "
                               "(controlplane.api.token)")
        response.headers["WWW-Authenticate"] = 'Bearer realm="llm-lb"'
        return response

    async def index(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8",
                            headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                     "Cache-Control": "no-store"})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        snapshot = views.snapshot()
        nodes = [n for n in views.xds.node_status() if n["connected"]]
        connected = [n["id"] for n in nodes]
        waiting = sorted(n["id"] for n in nodes if not n["in_sync"])
        problems = []
        if snapshot is None:
            problems.append("no snapshot built yet")
        if views.envoy() is not None and not connected:
            problems.append("the managed Envoy has not connected yet")
        if waiting:
            problems.append(f"not yet accepted by {', '.join(waiting)}")
        body = {"ready": not problems, "connected": len(connected), "in_sync": len(connected) - len(waiting),
                "problems": problems}
        return web.json_response(body, status=200 if not problems else 503)

    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def spec(request: web.Request) -> web.Response:
        return web.json_response(document)

    async def status(request: web.Request) -> web.Response:
        body = reports.status(views)
        body["api"]["unauthorized_refused"] = refused.count
        return web.json_response(body)

    async def pools(request: web.Request) -> web.Response:
        return web.json_response(reports.pools(views))

    async def one_pool(request: web.Request) -> web.Response:
        name = request.match_info["pool"]
        if name not in views.state().config.pools:
            return _error(404, f"no pool {name!r}")
        return web.json_response(reports.pool(views, name))

    async def weights(request: web.Request) -> web.Response:
        name = request.match_info["pool"]
        if name not in views.state().config.pools:
            return _error(404, f"no pool {name!r}")
        budget = [w.as_dict() for w in views.budgets().windows.get(name, ())]
        return web.json_response(views.explain(name, budget or None))

    async def cost(request: web.Request) -> web.Response:
        return web.json_response(reports.cost_report(views))

    async def _drain(request: web.Request, draining: bool) -> web.Response:
        pool, backend = request.match_info["pool"], request.match_info["backend"]
        force = False
        if request.can_read_body:
            try:
                body = await _json(request, '{"force": true}' if draining else "{}")
            except _BodyError as bad:
                return bad.response
            allowed = {"force"} if draining else set()
            if not isinstance(body, dict) or not isinstance(body.get("force", False), bool):
                return _error(400, "body must be an object whose 'force' is true or false" if draining
                              else "body must be empty or {}")
            unknown = sorted(set(body) - allowed)
            if unknown:
                return _error(400, f"unknown field(s): {', '.join(unknown)}; the body may hold only "
                                   + ("'force'" if draining else "nothing"))
            force = body.get("force", False)
        try:
            actions.set_draining(pool, backend, draining, force)
        except LookupError as exc:
            return _error(404, str(exc))
        except ValueError as exc:
            return _error(409, str(exc))
        return web.json_response({"pool": pool, "backend": backend, "draining": draining})

    async def drain(request: web.Request) -> web.Response:
        return await _drain(request, True)

    async def undrain(request: web.Request) -> web.Response:
        return await _drain(request, False)

    async def feedback(request: web.Request) -> web.Response:
        try:
            body = await _json(request, '{"request_id": "...", "score": 0.0-1.0}')
        except _BodyError as bad:
            return bad.response
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object")
        request_id, score = body.get("request_id"), body.get("score")
        if (not isinstance(request_id, str) or not request_id or len(request_id) > MAX_REQUEST_ID_CHARS
                or not request_id.isascii()):
            return _error(400, "'request_id' must be the x-request-id Envoy returned "
                               f"(1 to {MAX_REQUEST_ID_CHARS} ASCII characters)")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
            return _error(400, "'score' must be a number from 0 to 1")
        unknown = sorted(set(body) - {"request_id", "score"})
        if unknown:
            return _error(400, f"unknown field(s): {', '.join(unknown)}")
        result = actions.feedback(request_id, float(score))
        if result["status"] == "duplicate":
            return _error(409, f"request {request_id!r} was already rated; each request can be rated once")
        return web.json_response(result, status=200 if result["status"] == "applied" else 202)

    async def rollouts(request: web.Request) -> web.Response:
        return web.json_response(views.rollouts.status() if views.rollouts is not None else {})

    async def one_rollout(request: web.Request) -> web.Response:
        name = request.match_info["pool"]
        if views.rollouts is None or name not in views.rollouts.runs:
            return _error(404, f"pool {name!r} has no rollout" if name in views.state().config.pools
                          else f"no pool {name!r}")
        return web.json_response(views.rollouts.report(name))

    def rollout_action(action: str) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            name = request.match_info["pool"]
            full = False
            if request.can_read_body:
                try:
                    body = await _json(request, '{"full": true}' if action == "promote" else "{}")
                except _BodyError as bad:
                    return bad.response
                allowed = {"full"} if action == "promote" else set()
                if not isinstance(body, dict) or not isinstance(body.get("full", False), bool):
                    return _error(400, "body must be an object whose 'full' is true or false" if action == "promote"
                                  else "body must be empty or {}")
                unknown = sorted(set(body) - allowed)
                if unknown:
                    return _error(400, f"unknown field(s): {', '.join(unknown)}")
                full = body.get("full", False)
            if actions.rollout is None:
                return _error(404, "rollouts are not available here")
            try:
                return web.json_response(actions.rollout(name, action, full))
            except LookupError as exc:
                return _error(404, str(exc))
            except ValueError as exc:
                return _error(409, str(exc))
        return handle

    handlers: dict[tuple[str, str], Handler] = {
        ("GET", "/"): index, ("GET", "/healthz"): healthz, ("GET", "/readyz"): readyz,
        ("GET", "/metrics"): scrape, ("GET", "/openapi.json"): spec, ("GET", "/v1/status"): status,
        ("GET", "/v1/pools"): pools, ("GET", "/v1/pools/{pool}"): one_pool,
        ("GET", "/v1/pools/{pool}/weights"): weights, ("GET", "/v1/cost"): cost,
        ("POST", "/v1/pools/{pool}/backends/{backend}/drain"): drain,
        ("POST", "/v1/pools/{pool}/backends/{backend}/undrain"): undrain,
        ("POST", "/v1/feedback"): feedback,
        ("GET", "/v1/rollouts"): rollouts, ("GET", "/v1/rollouts/{pool}"): one_rollout,
        **{("POST", f"/v1/rollouts/{{pool}}/{a}"): rollout_action(a)
           for a in ("pause", "resume", "promote", "abort", "retry")},
    }
    web_app = web.Application(client_max_size=MAX_BODY_BYTES)
    for route in ROUTES:
        handler = handlers[(route.method, route.path)]
        if route.mutates:
            handler = _guarded(handler, authorized)
        web_app.router.add_route(route.method, route.path, handler)
    return web_app


def _guarded(handler: Handler, authorized: Callable[[web.Request], web.Response | None]) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        refusal = authorized(request)  # before the body is read: an unauthenticated caller sends nothing in
        return refusal if refusal is not None else await handler(request)
    return guarded


class _Refusals:
    """Counts 401s; logs the first and then at most one a minute (a scanner must not flood the log)."""

    def __init__(self) -> None:
        self.count = 0
        self._logged = 0.0

    def note(self, request: web.Request) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._logged >= 60:
            self._logged = now
            log.warning("API: refused %s %s from %s without a valid token (%d refused so far)",
                        request.method, request.path, request.remote, self.count)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


async def start_api(views: Views, actions: Actions, address: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(make_app(views, actions), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, address, port).start()
    return runner
