"""The control plane's HTTP API: health, metrics and status (loopback by default)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from . import metrics, reports
from .views import Actions, Views


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
                body = await request.json()
            except ValueError:
                return _error(400, "body must be JSON, e.g. {\"force\": true}")
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
            body = await request.json()
        except ValueError:
            return _error(400, 'body must be JSON: {"request_id": "...", "score": 0.0-1.0}')
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object")
        request_id, score = body.get("request_id"), body.get("score")
        if not isinstance(request_id, str) or not request_id or len(request_id) > 256:
            return _error(400, "'request_id' must be the x-request-id Envoy returned (a non-empty string)")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
            return _error(400, "'score' must be a number from 0 to 1")
        unknown = sorted(set(body) - {"request_id", "score"})
        if unknown:
            return _error(400, f"unknown field(s): {', '.join(unknown)}")
        result = actions.feedback(request_id, float(score))
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

    web_app = web.Application()
    web_app.add_routes(routes)
    return web_app


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


async def start_api(views: Views, actions: Actions, address: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(make_app(views, actions), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, address, port).start()
    return runner
