"""``/_admin`` routes: the Python API over HTTP, for tests in other processes.

A Celery worker or a benchmark runs in its own process and cannot reach the
provider object, so counters, the request log, faults, latency and settings
are all reachable here too.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .state import SandboxProvider

__all__ = ["admin_routes"]

Handler = Callable[[Request], Awaitable[Response]]


def _bad(message: str) -> JSONResponse:
    return JSONResponse({"error": "invalid_request", "message": message}, status_code=400)


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("body must be JSON") from exc
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    return body


def _guarded(handler: Callable[[Request], Awaitable[Any]]) -> Handler:
    """Turn a handler's ValueError/TypeError/KeyError into a 400 with its message."""

    async def endpoint(request: Request) -> Response:
        try:
            result = await handler(request)
        except (ValueError, TypeError, KeyError) as exc:
            return _bad(str(exc))
        return result if isinstance(result, Response) else JSONResponse(result)

    return endpoint


def admin_routes(provider: SandboxProvider) -> list[Route]:
    """The admin routes bound to ``provider``."""

    async def health(request: Request) -> dict[str, Any]:
        return {"ok": True, "issuer": provider.issuer}

    async def stats(request: Request) -> dict[str, Any]:
        return provider.stats()

    async def requests(request: Request) -> Response:
        # default=str: a request log is for reading, never fail on an odd value.
        body = json.dumps(provider.requests(request.query_params.get("endpoint") or None), default=str)
        return Response(body, media_type="application/json")

    async def faults(request: Request) -> dict[str, Any]:
        if request.method == "GET":
            return provider.faults()
        body = await _json_object(request)
        provider.set_fault(
            body["endpoint"],
            body.get("mode"),
            count=body.get("count"),
            retry_after=body.get("retry_after", 1),
            hang_seconds=body.get("hang_seconds", 30),
        )
        return provider.faults()

    async def latency(request: Request) -> dict[str, Any]:
        body = await _json_object(request)
        provider.set_latency(body["endpoint"], int(body.get("ms") or 0))
        return {"endpoint": body["endpoint"], "ms": int(body.get("ms") or 0)}

    async def config(request: Request) -> dict[str, Any]:
        provider.configure(**await _json_object(request))
        return {
            "access_token_ttl": provider.access_token_ttl,
            "rotate_refresh_tokens": provider.rotate_refresh_tokens,
            "clock_skew": provider.clock_skew,
        }

    async def reset(request: Request) -> dict[str, Any]:
        provider.reset()
        return {"ok": True}

    return [
        Route("/_admin/health", _guarded(health), methods=["GET"]),
        Route("/_admin/stats", _guarded(stats), methods=["GET"]),
        Route("/_admin/requests", _guarded(requests), methods=["GET"]),
        Route("/_admin/faults", _guarded(faults), methods=["GET", "POST"]),
        Route("/_admin/latency", _guarded(latency), methods=["POST"]),
        Route("/_admin/config", _guarded(config), methods=["POST"]),
        Route("/_admin/reset", _guarded(reset), methods=["POST"]),
    ]
