"""The control plane's HTTP API: health, metrics and status (loopback by default)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from . import metrics

if TYPE_CHECKING:
    from .app import App


def make_app(app: App) -> web.Application:
    registry = metrics.registry_for(app)
    routes = web.RouteTableDef()

    @routes.get("/healthz")
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    @routes.get("/metrics")
    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @routes.get("/v1/status")
    async def status(request: web.Request) -> web.Response:
        return web.json_response(app.status())

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
            app.set_draining(pool, backend, draining, force=force)
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

    web_app = web.Application()
    web_app.add_routes(routes)
    return web_app


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


async def start_api(app: App, address: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(make_app(app), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, address, port).start()
    return runner
