"""The HTTP API: resolve and the connect flow for non-Python callers (Starlette).

Routes are the contract table of DESIGN.md, plus the operational ones:

* every ``/v1`` route except the browser's connect routes (open, callback,
  confirm), and ``/metrics``, need a
  service bearer key from ``CREDBROKER_API_KEYS``; with no key configured they
  answer 401 (and a warning is logged at start): there is no unauthenticated
  mode, a development setup sets a key like any other.
* ``/healthz``, ``/readyz`` and ``/openapi.json`` are open, for probes that
  cannot hold a secret; they show no user data.

Every response carries ``X-Request-ID`` (an authenticated caller's, if it is a
plain short id, else a fresh one), which also goes into the audit events of the call.
Blocking work (store, Redis, flights) runs in worker threads, never on the
event loop. Input rules are in ``input``, auth, request ids and error
mapping in ``edge``, the connect-flow routes in ``connect``, the
browser pages in ``pages``, the OpenAPI
document in ``openapi``.
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
from starlette.convertors import Convertor, register_url_convertor
from starlette.routing import Route

from broker.audit import AUDIT_MAX_LIMIT, Action, Outcome, SqlAuditLog, record_event
from broker.errors import BrokerError, InvalidRequest, ServiceUnavailable
from broker.models import SubjectToken
from broker.resolved import check_nonce, check_request_target
from broker.servers import ServerConfig
from broker.oauth.mcp_discovery import CLIENT_METADATA_PATH, client_metadata_document, client_metadata_url
from broker.settings import Settings, load_settings
from broker.validation import validate_server_name, validate_user_id

from workers.actions.credentials import credential_listing, remove_credential
from workers.actions.erasure import delete_subject_token, erase_user
from workers.client import BrokerClient
from workers.common.constants import cache_key
from workers.common.metrics import METRICS, render_cluster
from workers.common.runtime import Runtime, build_runtime
from workers.common.tracing import instrument_api
from . import events as api_events
from .connect import connect_callback, connect_complete, connect_confirm, connect_open, connect_start
from .edge import REQUEST_ID_KEY, Edge, broker_error, http_error
from .edge import json_body as _json_body
from .edge import no_store as _no_store
from .events import warm_for
from .input import (
    echo_names,
    check_fields,
    parse_instant,
    parse_limit,
    parse_timeout,
    parse_token,
)
from .openapi import OPENAPI

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

METRICS.describe("credbroker_readyz_probes_total", "counter", "Readiness probe rounds actually run (not cached)")
# /readyz is open and pings every worker: serve one result to every caller for this long.
READY_CACHE_SECONDS = 1.5


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
        self._ready_lock: anyio.Lock | None = None
        self.ready_cache: tuple[float, tuple[int, dict[str, Any]]] | None = None

    def ready_lock(self) -> anyio.Lock:
        """One probe round at a time; callers arriving meanwhile get its result."""
        if self._ready_lock is None:
            self._ready_lock = anyio.Lock()
        return self._ready_lock

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


class _UserIdConvertor(Convertor[str]):
    """Any text as a user id, newlines and encoded slashes included, so a bad id
    gets ``validate_user_id``'s 422 naming the field rather than a bare 404."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("userid", _UserIdConvertor())


# -- /v1 -------------------------------------------------------------------------


async def put_subject_token(request: Request) -> Response:
    api = _api(request)
    user_id = validate_user_id(request.path_params["user_id"])
    body = await _json_body(request)
    check_fields(body, ("token",), ("expires_at", "warm"))
    token = parse_token(body["token"])
    expires_at = None if body.get("expires_at") is None else parse_instant(body["expires_at"], "expires_at")
    warm = body.get("warm", False)
    if not isinstance(warm, bool):
        raise InvalidRequest("warm: must be true or false")
    await run_in_threadpool(api.rt.store.put_subject_token, user_id, SubjectToken(token, expires_at))
    api.record(Action.SUBJECT_TOKEN, Outcome.SUCCESS, user_id, None, "subject_token", None, _rid(request))
    if warm:  # sign-in: mint every exchange/OBO credential now, without waiting
        await run_in_threadpool(partial(warm_for, api, user_id, None, _rid(request), exchange_only=True))
    return Response(status_code=204)


async def delete_subject_token_route(request: Request) -> Response:
    api = _api(request)
    user_id = validate_user_id(request.path_params["user_id"])
    await run_in_threadpool(delete_subject_token, api.rt, user_id, _rid(request))
    return Response(status_code=204)


async def erase(request: Request) -> Response:
    """Everything of the user, gone (README "Erasure")."""
    api = _api(request)
    user_id = validate_user_id(request.path_params["user_id"])
    await run_in_threadpool(erase_user, api.rt, user_id, _rid(request))
    return Response(status_code=204)


async def resolve(request: Request) -> Response:
    api = _api(request)
    body = await _json_body(request)
    check_fields(body, ("user_id", "server"), ("timeout", "method", "url", "dpop_nonce"))
    user_id = validate_user_id(body["user_id"])
    server = validate_server_name(body["server"])
    cap = api.settings.resolve_timeout
    timeout = cap if body.get("timeout") is None else parse_timeout(body["timeout"], cap)
    target: dict[str, str] = {}
    if body.get("method") is not None or body.get("url") is not None:
        check_request_target(body.get("method"), body.get("url"))
        target = {"method": body["method"], "url": body["url"]}
        if body.get("dpop_nonce") is not None:
            target["dpop_nonce"] = check_nonce(body["dpop_nonce"]) or ""
    elif server in api.rt.servers and api.rt.servers[server].auth_broker.dpop:
        # A DPoP token is useless without a proof, and only the caller knows the request.
        raise InvalidRequest(f"server {server!r} uses DPoP: give the upstream request's method and url")
    call = partial(api.client.resolve, user_id, server, timeout=timeout, request_id=_rid(request), **target)
    resolved = await anyio.to_thread.run_sync(call, limiter=api.limiter("resolve", _RESOLVE_THREADS))
    return _no_store(resolved.to_dict())




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
    """Cached for READY_CACHE_SECONDS: an open route must not let anyone ping every worker at will."""
    api = _api(request)
    async with api.ready_lock():
        cached = api.ready_cache
        now = anyio.current_time()
        if cached is None or now - cached[0] >= READY_CACHE_SECONDS:
            cached = (anyio.current_time(), await _readiness(api))
            api.ready_cache = cached
    status, body = cached[1]
    return JSONResponse(body, status_code=status)


async def _readiness(api: _Api) -> tuple[int, dict[str, Any]]:
    METRICS.inc("credbroker_readyz_probes_total")

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
        return 503, {"status": "unavailable", "error": "unavailable",
                     "message": f"not ready: {', '.join(failed)}", "checks": ordered}
    return 200, {"status": "ready", "checks": ordered}


async def metrics(request: Request) -> Response:
    """This process's metrics, plus the cluster-wide counters workers keep in Redis."""
    text = METRICS.render()
    try:
        text += await run_in_threadpool(render_cluster, _api(request).rt.redis)
    except redis.RedisError:
        text += "# cluster counters unavailable: Redis unreachable\n"
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def client_metadata(request: Request) -> Response:
    """The broker's Client ID Metadata Document (MCP servers added by URL fetch it)."""
    settings = _api(request).settings
    if client_metadata_url(settings.public_url) is None:
        return JSONResponse({"error": "not_found", "message": "PUBLIC_URL is not https"}, status_code=404)
    return JSONResponse(client_metadata_document(settings.public_url, settings.callback_url),
                        headers={"Cache-Control": "public, max-age=300"})


async def openapi(request: Request) -> Response:
    return JSONResponse(OPENAPI)


ROUTES = [
    Route("/v1/users/{user_id:userid}/subject-token", put_subject_token, methods=["PUT"]),
    Route("/v1/users/{user_id:userid}/subject-token", delete_subject_token_route, methods=["DELETE"]),
    Route("/v1/resolve", resolve, methods=["POST"]),
    Route("/v1/connect", connect_start, methods=["POST"]),
    Route("/v1/connect/open", connect_open, methods=["GET"]),
    Route("/v1/connect/callback", connect_callback, methods=["GET"]),
    Route("/v1/connect/confirm", connect_confirm, methods=["POST"]),
    Route("/v1/connect/complete", connect_complete, methods=["POST"]),
    Route("/v1/users/{user_id:userid}/credentials", list_credentials, methods=["GET"]),
    Route("/v1/users/{user_id:userid}/credentials/{server}", delete_credential, methods=["DELETE"]),
    Route("/v1/users/{user_id:userid}", erase, methods=["DELETE"]),
    Route("/v1/audit", audit, methods=["GET"]),
    Route("/v1/warm", api_events.warm, methods=["POST"]),
    Route("/v1/events", api_events.events, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    Route(CLIENT_METADATA_PATH, client_metadata, methods=["GET"]),
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
