"""The edge of the HTTP API: error mapping, bearer keys, request ids, metrics.

One handler turns every ``BrokerError`` into ``{"error": code, "message": ...,
extras}`` with its ``http_status``; anything else becomes a bare 500 whose
log line names only the exception type (its message or traceback could quote
a value).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.errors import BrokerError, InvalidRequest, Unauthorized
from broker.secret import Secret
from broker.validation import validate_request_id

from workers.common.metrics import METRICS
from .input import MAX_BODY_BYTES, bearer_matches, parse_json_object

__all__ = ["OPEN_PATHS", "REQUEST_ID_KEY", "Edge", "broker_error", "http_error", "json_body", "no_store"]

log = logging.getLogger("workers.api.app")

# Where the request id lives in the ASGI scope for the endpoints.
REQUEST_ID_KEY = "credbroker.request_id"
# No bearer key: the browser's callback, and probes that cannot hold a secret.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/v1/connect/callback", "/v1/connect/open",
                        "/v1/connect/confirm", "/v1/oauth/client-metadata.json"})
_QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
# What a refused caller needs to know: where keys come from, and where the demo keeps its key.
NO_KEYS_MESSAGE = ("no API keys configured: set CREDBROKER_API_KEYS (comma-separated, 16+ characters each) "
                   "and restart the API")
WRONG_KEY_MESSAGE = ("a valid service bearer key is required: send 'Authorization: Bearer KEY' with a key "
                     "from CREDBROKER_API_KEYS (credbroker up --demo prints its key and keeps it in "
                     ".credbroker/demo-api-key)")

METRICS.describe("credbroker_http_requests_total", "counter", "HTTP API requests by method, route and status")
METRICS.describe("credbroker_http_request_seconds", "histogram", "HTTP API latency by route")


async def json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object, read with a hard size cap."""
    length = request.headers.get("content-length")
    if length is not None and (not (length.isascii() and length.isdigit()) or int(length) > MAX_BODY_BYTES):
        raise InvalidRequest(f"body: larger than {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise InvalidRequest(f"body: larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return parse_json_object(b"".join(chunks))


def no_store(body: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


async def broker_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BrokerError)
    headers = {"Cache-Control": "no-store"}
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(exc.to_dict(), status_code=exc.http_status, headers=headers)


async def http_error(request: Request, exc: Exception) -> Response:
    """Routing errors (unknown path, wrong method) in the same JSON shape."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    body = {"error": code, "message": code.replace("_", " ")}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def route_label(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The route template (never the concrete path: it holds user ids)."""
    route = scope.get("route")
    if route is None:
        route = next((r for r in routes if r.matches(scope)[0] is not Match.NONE), None)
    return str(getattr(route, "path", "unmatched")).replace(":path}", "}").replace(":userid}", "}")


class Edge:
    """Request id, bearer keys, the last-resort 500, metrics and a path-free access log."""

    def __init__(self, app: ASGIApp, keys: tuple[Secret, ...], routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.keys = keys
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        # Unauthenticated callers do not choose the id their requests are recorded under.
        caller_rid = None if scope["path"] in OPEN_PATHS else validate_request_id(headers.get("x-request-id"))
        rid = caller_rid or uuid.uuid4().hex
        scope[REQUEST_ID_KEY] = rid
        started = time.perf_counter()
        sent: dict[str, int] = {}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                out = MutableHeaders(scope=message)
                out["X-Request-ID"] = rid
                if "cache-control" not in out:
                    out["Cache-Control"] = "no-store"
            await send(message)

        try:
            if scope["path"] not in OPEN_PATHS and not bearer_matches(headers.get("authorization"), self.keys):
                message = NO_KEYS_MESSAGE if not self.keys else WRONG_KEY_MESSAGE
                refusal = await broker_error(Request(scope), Unauthorized(message))
                await refusal(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception as exc:  # noqa: BLE001 - the message or traceback could quote a value
            log.error("unhandled %s in %s %s", type(exc).__name__, scope["method"], route_label(scope, self.routes))
            if "status" not in sent:
                body = {"error": "internal_error", "message": "internal error"}
                await JSONResponse(body, status_code=500)(scope, receive, send_with_id)
        finally:
            route = route_label(scope, self.routes)
            status = sent.get("status", 500)
            elapsed = time.perf_counter() - started
            METRICS.inc("credbroker_http_requests_total", method=scope["method"], route=route, status=str(status))
            METRICS.observe("credbroker_http_request_seconds", elapsed, route=route)
            level = logging.DEBUG if route in _QUIET_ROUTES else logging.INFO
            log.log(level, "%s %s %d %.1fms request_id=%s", scope["method"], route, status, elapsed * 1000, rid)
