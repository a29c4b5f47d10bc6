"""The gateway's aiohttp application: authentication, error bodies, metrics and the routes.

aiohttp because one maintained dependency gives the server, streaming responses and a test client,
and it cancels a request's handler when its client disconnects (``handler_cancellation``), which is
how a vanished HTTP client cancels its daemon job.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Awaitable, Callable

from aiohttp import web

from hermesd.gateway import ollama_api, openai_api
from hermesd.gateway.bridge import DaemonBridge
from hermesd.gateway.common import BRIDGE, METRICS, SETTINGS
from hermesd.gateway.config import GatewaySettings
from hermesd.gateway.errors import GatewayError
from hermesd.gateway.metrics import GatewayMetrics

log = logging.getLogger("hermesd.gateway")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Statuses aiohttp raises itself, as the gateway's error codes.
HTTP_CODES = {404: "not_found", 405: "bad_request", 413: "too_large"}


def create_app(settings: GatewaySettings, bridge: DaemonBridge | None = None) -> web.Application:
    """The application: Ollama routes under /api, OpenAI routes under /v1, and /metrics."""
    token = settings.bearer_token()
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=[_observe, _errors, _authenticate(token)])
    app[SETTINGS] = settings
    app[BRIDGE] = bridge or DaemonBridge(settings)
    app[METRICS] = GatewayMetrics(app[BRIDGE])
    app.router.add_get("/", _root)
    app.router.add_get("/metrics", _metrics)
    ollama_api.add_routes(app.router)
    openai_api.add_routes(app.router)
    app.on_cleanup.append(_close)
    return app


async def _close(app: web.Application) -> None:
    app[BRIDGE].close()


async def _root(request: web.Request) -> web.Response:
    return web.Response(text="hermesd gateway is running (Ollama API under /api, OpenAI API under /v1)")


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = await request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


def _authenticate(token: str | None):
    """Every request must carry ``Authorization: Bearer TOKEN`` when a token is configured."""
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise GatewayError("unauthorized", "missing or wrong bearer token (Authorization: Bearer TOKEN)")
        return await handler(request)

    return authenticate


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """GatewayErrors and aiohttp's own HTTP errors as JSON in the API's shape; a bug as a 500, logged."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return error_response(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(request, GatewayError(HTTP_CODES.get(exc.status, "bad_request"), exc.reason),
                              status=exc.status)
    except Exception as exc:  # a bug costs one request, never the gateway
        log.exception("%s %s failed", request.method, request.path)
        return error_response(request, GatewayError("internal", f"internal error: {type(exc).__name__}"))


def error_response(request: web.Request, exc: GatewayError, status: int | None = None) -> web.Response:
    """The error body each API's clients parse, with Retry-After when trying later may work."""
    headers = {"Retry-After": str(request.app[SETTINGS].retry_after_s)} if exc.retry_later else {}
    if exc.code == "unauthorized":
        headers["WWW-Authenticate"] = "Bearer"
    body = openai_api.error_body(exc) if request.path.startswith("/v1/") else ollama_api.error_body(exc)
    return web.json_response(body, status=status or exc.status, headers=headers)


@web.middleware
async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count requests by route and status, and time them."""
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        resource = getattr(request.match_info.route, "resource", None)
        name = resource.canonical if resource is not None else "other"
        request.app[METRICS].observe_request(name, status, time.monotonic() - started)
