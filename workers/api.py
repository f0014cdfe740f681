"""The HTTP API: resolve and the connect flow for non-Python callers (Starlette).

Routes are the contract table of DESIGN.md, plus the operational ones:

* every ``/v1`` route except the browser callback, and ``/metrics``, need a
  service bearer key from ``CREDBROKER_API_KEYS``; with no key configured they
  answer 401 (and a warning is logged at start): there is no unauthenticated
  mode, a development setup sets a key like any other.
* ``/healthz``, ``/readyz`` and ``/openapi.json`` are open, for probes that
  cannot hold a secret; they show no user data.

Every response carries ``X-Request-ID`` (the caller's, if it is a plain short
id, else a fresh one), which also goes into the audit events of the call.
Blocking work (store, Redis, flights) runs in worker threads, never on the
event loop. Input rules are in ``api_input``, auth, request ids and error
mapping in ``api_edge``, the callback pages in ``api_pages``, the OpenAPI
document in ``api_openapi``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import redis
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from broker.audit import AUDIT_MAX_LIMIT, Action, Outcome, SqlAuditLog, record_event
from broker.connect import ConnectError
from broker.errors import BrokerError, InvalidRequest, ServiceUnavailable, StoreDisabled
from broker.models import SubjectToken
from broker.servers import ServerConfig
from broker.settings import Settings, load_settings
from broker.validation import validate_server_name, validate_user_id

from .api_edge import REQUEST_ID_KEY, Edge, broker_error, http_error
from .api_input import (
    echo_names,
    MAX_BODY_BYTES,
    check_fields,
    parse_instant,
    parse_json_object,
    parse_limit,
    parse_timeout,
    parse_token,
)
from .api_openapi import OPENAPI
from .api_pages import connected_page, failed_page
from .client import BrokerClient
from .constants import cache_key
from .credentials import credential_listing, remove_credential
from .tracing import instrument_api
from .metrics import METRICS, render_cluster
from .runtime import Runtime, build_runtime

__all__ = ["create_app", "serve_api"]

log = logging.getLogger(__name__)

# Resolves wait on flights for up to the resolve timeout: give them their own
# thread budget so a burst of slow ones cannot starve store calls and probes.
_RESOLVE_THREADS = 256
# A probe that times out leaves its thread behind (a hung connect cannot be
# interrupted): probes get a small budget of their own, so a backing-service
# outage under frequent probing cannot eat the threads requests need.
_READY_TIMEOUT = 2.0
_PROBE_THREADS = 8

METRICS.describe("credbroker_connect_callbacks_total", "counter", "Connect callbacks by outcome (ok or a coarse reason)")


class _Api:
    """What the endpoints share: settings, the runtime and the resolving client."""

    def __init__(self, settings: Settings, client: BrokerClient | None) -> None:
        self.settings = settings
        self.rt: Runtime = build_runtime(settings)
        self.owns_client = client is None
        self.client = client if client is not None else BrokerClient(
            settings=settings, connection=self.rt.redis, audit=self.rt.audit)
        self.audit_log = SqlAuditLog(self.rt.store.engine)
        self._limiters: dict[str, anyio.CapacityLimiter] = {}

    def limiter(self, name: str, tokens: int) -> anyio.CapacityLimiter:
        """A named thread budget, made on first use (inside the event loop)."""
        if name not in self._limiters:
            self._limiters[name] = anyio.CapacityLimiter(tokens)
        return self._limiters[name]

    def close(self) -> None:
        if self.owns_client:
            self.client.close()
        self.rt.close()

    def record(self, action: Action, outcome: Outcome, user_id: str, server: str | None, method: str,
               reason: str | None, request_id: str) -> None:
        record_event(self.rt.audit, self.rt.clock.now(), action, outcome, user_id=user_id, server=server,
                     method=method, reason=reason, request_id=request_id)

    def drop_cache(self, user_id: str, server: ServerConfig) -> None:
        """Clients must stop serving a credential that was replaced or removed."""
        try:
            self.rt.redis.delete(cache_key(user_id, server.key))
        except redis.RedisError:
            raise ServiceUnavailable("Redis unavailable: the cached credential was not cleared; retry") from None


def _api(request: Request) -> _Api:
    return request.app.state.api  # type: ignore[no-any-return]


def _rid(request: Request) -> str:
    return str(request.scope[REQUEST_ID_KEY])


async def _json_body(request: Request) -> dict[str, Any]:
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


def _no_store(body: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


# -- /v1 -------------------------------------------------------------------------


async def put_subject_token(request: Request) -> Response:
    api = _api(request)
    user_id = validate_user_id(request.path_params["user_id"])
    body = await _json_body(request)
    check_fields(body, ("token",), ("expires_at",))
    token = parse_token(body["token"])
    expires_at = None if body.get("expires_at") is None else parse_instant(body["expires_at"], "expires_at")
    await run_in_threadpool(api.rt.store.put_subject_token, user_id, SubjectToken(token, expires_at))
    api.record(Action.SUBJECT_TOKEN, Outcome.SUCCESS, user_id, None, "subject_token", None, _rid(request))
    return Response(status_code=204)


async def resolve(request: Request) -> Response:
    api = _api(request)
    body = await _json_body(request)
    check_fields(body, ("user_id", "server"), ("timeout",))
    user_id = validate_user_id(body["user_id"])
    server = validate_server_name(body["server"])
    cap = api.settings.resolve_timeout
    timeout = cap if body.get("timeout") is None else parse_timeout(body["timeout"], cap)
    call = partial(api.client.resolve, user_id, server, timeout=timeout, request_id=_rid(request))
    resolved = await anyio.to_thread.run_sync(call, limiter=api.limiter("resolve", _RESOLVE_THREADS))
    return _no_store(resolved.to_dict())


async def connect_start(request: Request) -> Response:
    api = _api(request)
    body = await _json_body(request)
    check_fields(body, ("user_id", "server"))
    user_id = validate_user_id(body["user_id"])
    server = api.rt.servers.get_server(validate_server_name(body["server"]))
    if api.rt.connect is None:
        raise StoreDisabled()
    start = await run_in_threadpool(api.rt.connect.start, user_id, server.name)
    api.record(Action.CONNECT, Outcome.SUCCESS, user_id, server.name, "connect", "started", _rid(request))
    return _no_store({"connect_url": start.connect_url, "expires_at": start.expires_at.isoformat()})


async def connect_callback(request: Request) -> Response:
    """The browser lands here from the authorization server: always a page."""
    api = _api(request)
    flow = api.rt.connect
    if flow is None:
        METRICS.inc("credbroker_connect_callbacks_total", outcome="store_disabled")
        return failed_page("store_disabled", 503)
    q = request.query_params
    try:
        result = await run_in_threadpool(flow.callback, q.get("state"), q.get("code"), q.get("error"),
                                         _rid(request))
        server = api.rt.servers.get_server(result.server)
        await run_in_threadpool(api.drop_cache, result.user_id, server)
    except ConnectError as exc:
        METRICS.inc("credbroker_connect_callbacks_total", outcome=exc.reason)
        return failed_page(exc.reason, 400)
    except BrokerError as exc:
        METRICS.inc("credbroker_connect_callbacks_total", outcome=exc.code)
        return failed_page(exc.code, exc.http_status if exc.http_status >= 500 else 400)
    except Exception as exc:  # noqa: BLE001 - the browser gets a page, the log gets the type only
        log.error("connect callback failed: %s", type(exc).__name__)
        METRICS.inc("credbroker_connect_callbacks_total", outcome="internal_error")
        return failed_page("internal_error", 500)
    METRICS.inc("credbroker_connect_callbacks_total", outcome="ok")
    return connected_page(result.server)


async def list_credentials(request: Request) -> Response:
    api = _api(request)
    user_id = validate_user_id(request.path_params["user_id"])
    stored = await run_in_threadpool(api.rt.store.list, user_id)
    by_key = {s.server_key: s for s in stored}
    now = api.rt.clock.now()
    servers = api.rt.servers
    # Every configured server, in config order; records of removed servers stay hidden.
    return _no_store([credential_listing(servers[name], by_key.get(servers[name].key), now) for name in servers])


async def delete_credential(request: Request) -> Response:
    api = _api(request)
    user_id = validate_user_id(request.path_params["user_id"])
    server = api.rt.servers.get_server(validate_server_name(request.path_params["server"]))
    await run_in_threadpool(remove_credential, api.rt, user_id, server.name, _rid(request))
    return Response(status_code=204)


_AUDIT_PARAMS = frozenset({"user_id", "server", "limit", "since", "until"})


async def audit(request: Request) -> Response:
    api = _api(request)
    q = request.query_params
    unknown = sorted(k for k in q if k not in _AUDIT_PARAMS)
    if unknown:
        raise InvalidRequest(f"query: unknown parameter(s) {echo_names(list(unknown))}")
    user_id = validate_user_id(q["user_id"]) if "user_id" in q else None
    server = validate_server_name(q["server"]) if "server" in q else None
    since = parse_instant(q["since"], "since") if "since" in q else None
    until = parse_instant(q["until"], "until") if "until" in q else None
    limit = parse_limit(q.get("limit"), maximum=AUDIT_MAX_LIMIT)
    rows = await run_in_threadpool(partial(api.audit_log.query, user_id=user_id, server=server, since=since,
                                           until=until, limit=limit))
    return _no_store(rows)


# -- operations ------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _probe(check: Callable[[], object], limiter: anyio.CapacityLimiter) -> str:
    try:
        with anyio.fail_after(_READY_TIMEOUT):
            ok = await anyio.to_thread.run_sync(check, abandon_on_cancel=True, limiter=limiter)
    except Exception:  # noqa: BLE001 - any failure, timeout included, is "not ready"
        return "failed"
    return "ok" if ok else "failed"


async def readyz(request: Request) -> Response:
    api = _api(request)

    def database() -> bool:
        with api.rt.store.engine.connect() as conn:
            return conn.execute(text("SELECT 1")).scalar_one() == 1

    def worker() -> bool:
        return bool(api.client.celery.control.ping(timeout=1.0, limit=1))

    checks = {"database": database, "redis": api.rt.redis.ping, "worker": worker}
    results: dict[str, str] = {}

    async def run(name: str, check: Callable[[], object]) -> None:
        results[name] = await _probe(check, api.limiter("probe", _PROBE_THREADS))

    async with anyio.create_task_group() as group:
        for name, check in checks.items():
            group.start_soon(run, name, check)
    ordered = {name: results[name] for name in checks}
    failed = [name for name, state in ordered.items() if state != "ok"]
    if failed:
        return JSONResponse({"status": "unavailable", "error": "unavailable",
                             "message": f"not ready: {', '.join(failed)}", "checks": ordered}, status_code=503)
    return JSONResponse({"status": "ready", "checks": ordered})


async def metrics(request: Request) -> Response:
    """This process's metrics, plus the cluster-wide counters workers keep in Redis."""
    text = METRICS.render()
    try:
        text += await run_in_threadpool(render_cluster, _api(request).rt.redis)
    except redis.RedisError:
        text += "# cluster counters unavailable: Redis unreachable\n"
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def openapi(request: Request) -> Response:
    return JSONResponse(OPENAPI)


ROUTES = [
    Route("/v1/users/{user_id:path}/subject-token", put_subject_token, methods=["PUT"]),
    Route("/v1/resolve", resolve, methods=["POST"]),
    Route("/v1/connect", connect_start, methods=["POST"]),
    Route("/v1/connect/callback", connect_callback, methods=["GET"]),
    Route("/v1/users/{user_id:path}/credentials", list_credentials, methods=["GET"]),
    Route("/v1/users/{user_id:path}/credentials/{server}", delete_credential, methods=["DELETE"]),
    Route("/v1/audit", audit, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]


def create_app(settings: Settings | None = None, *, client: BrokerClient | None = None) -> Starlette:
    """The API app; ``client`` overrides the resolving client (closed by its owner)."""
    settings = settings or load_settings()
    api = _Api(settings, client)
    if not settings.api_keys:
        log.warning("CREDBROKER_API_KEYS is not set: every /v1 call and /metrics will be refused with 401 "
                    "until at least one service key is configured")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(api.close)

    app = Starlette(
        routes=ROUTES,
        exception_handlers={BrokerError: broker_error, HTTPException: http_error},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False
    app.state.api = api
    app.add_middleware(Edge, keys=settings.api_keys, routes=ROUTES)
    instrument_api(app)  # OpenTelemetry, only when CREDBROKER_TRACING is set
    return app


def serve_api(settings: Settings | None = None, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve the API with uvicorn until interrupted (``credbroker api``)."""
    import uvicorn

    settings = settings or load_settings()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = create_app(settings)
    # No uvicorn access log: it prints query strings, and the callback's holds the authorization code.
    uvicorn.run(app, host=host, port=port, lifespan="on", access_log=False, log_config=None,
                log_level=settings.log_level.lower(), server_header=False, proxy_headers=False,
                timeout_graceful_shutdown=int(settings.resolve_timeout) + 5)
