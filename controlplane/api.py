"""The control plane's HTTP API: health, metrics and status (loopback by default).

Request bodies are small JSON objects: a body over MAX_BODY_BYTES is refused
(413) before it is parsed, and one that is not JSON, or nested too deep for
the parser, gets a 400; every error is JSON, {"error": {"message": ...}}.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from . import metrics, reports
from .telemetry.requests import MAX_REQUEST_ID_CHARS
from .views import Actions, Views

MAX_BODY_BYTES = 64 * 1024


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


def make_app(views: Views, actions: Actions) -> web.Application:
    registry = metrics.registry_for(views)
    routes = web.RouteTableDef()

    @routes.get("/healthz")
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    @routes.get("/metrics")
    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @routes.get("/v1/status")
    async def status(request: web.Request) -> web.Response:
        return web.json_response(reports.status(views))

    async def _drain(request: web.Request, draining: bool) -> web.Response:
        pool, backend = request.match_info["pool"], request.match_info["backend"]
        force = False
        if request.can_read_body:
            try:
                body = await _json(request, '{"force": true}')
            except _BodyError as bad:
                return bad.response
            if not isinstance(body, dict) or not isinstance(body.get("force", False), bool):
                return _error(400, "body must be an object whose 'force' is true or false")
            force = body.get("force", False)
        try:
            actions.set_draining(pool, backend, draining, force)
        except LookupError as exc:
            return _error(404, str(exc))
        except ValueError as exc:
            return _error(409, str(exc))
        return web.json_response({"pool": pool, "backend": backend, "draining": draining})

    @routes.post("/v1/pools/{pool}/backends/{backend}/drain")
    async def drain(request: web.Request) -> web.Response:
        return await _drain(request, True)

    @routes.post("/v1/pools/{pool}/backends/{backend}/undrain")
    async def undrain(request: web.Request) -> web.Response:
        return await _drain(request, False)

    @routes.post("/v1/feedback")
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

    @routes.get("/v1/cost")
    async def cost(request: web.Request) -> web.Response:
        return web.json_response(reports.cost_report(views))

    @routes.get("/v1/pools/{pool}/weights")
    async def weights(request: web.Request) -> web.Response:
        pool = request.match_info["pool"]
        if pool not in views.state().config.pools:
            return _error(404, f"no pool {pool!r}")
        budget = [w.as_dict() for w in views.budgets().windows.get(pool, ())]
        return web.json_response(views.explain(pool, budget or None))

    web_app = web.Application(client_max_size=MAX_BODY_BYTES)
    web_app.add_routes(routes)
    return web_app


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


async def start_api(views: Views, actions: Actions, address: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(make_app(views, actions), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, address, port).start()
    return runner
