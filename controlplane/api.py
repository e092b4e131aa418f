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

    web_app = web.Application()
    web_app.add_routes(routes)
    return web_app


async def start_api(app: App, address: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(make_app(app), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, address, port).start()
    return runner
