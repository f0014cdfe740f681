"""The sandbox authorization server as a Starlette app.

Every protocol endpoint goes through the same front door: injected latency,
then the request is recorded, then an armed fault may answer instead, and
only then does normal processing run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import ImmutableMultiDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .admin import admin_routes
from .authorize import authorize
from .clientauth import ClientCredentials, authenticate, extract_client
from .errors import OAuthError
from .faults import fault_response, hang
from .grants import JWT_BEARER, TOKEN_EXCHANGE, handle_token_request
from .profiles import shape_error, shape_success
from .revocation import introspect, revoke
from .state import SandboxProvider

__all__ = ["create_app", "metadata"]

Form = ImmutableMultiDict[str, Any]
# RFC 6749 §5.1: token responses must not be cached.
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_AUTH_METHODS = ["client_secret_post", "client_secret_basic", "none"]


def metadata(issuer: str) -> dict[str, Any]:
    """RFC 8414 authorization server metadata for a provider served at ``issuer``."""
    return {
        "issuer": issuer,
        "authorization_endpoint": f"{issuer}/authorize",
        "token_endpoint": f"{issuer}/token",
        "revocation_endpoint": f"{issuer}/revoke",
        "introspection_endpoint": f"{issuer}/introspect",
        "response_types_supported": ["code"],
        "grant_types_supported": [TOKEN_EXCHANGE, JWT_BEARER, "authorization_code", "refresh_token", "password"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": _AUTH_METHODS,
        "revocation_endpoint_auth_methods_supported": _AUTH_METHODS,
        "introspection_endpoint_auth_methods_supported": _AUTH_METHODS,
    }


def _flatten(form: Form) -> dict[str, Any]:
    """Form fields for the request log: a string, or a list when a field repeats."""
    out: dict[str, Any] = {}
    for key in form.keys():
        values = [str(v) for v in form.getlist(key)]
        out[key] = values[0] if len(values) == 1 else values
    return out


def _oauth_error(provider: SandboxProvider, err: OAuthError) -> JSONResponse:
    provider.count_error(err.error)
    return JSONResponse(err.body(), status_code=err.status, headers={**_NO_STORE, **err.headers})


class _Front:
    """What the front door learned: the parsed form, the client, or an early answer."""

    def __init__(self, form: Form, client: ClientCredentials | OAuthError, response: Response | None) -> None:
        self.form = form
        self.client = client
        self.response = response

    def presented(self) -> ClientCredentials:
        if isinstance(self.client, OAuthError):
            raise self.client
        return self.client


async def _front(provider: SandboxProvider, request: Request, endpoint: str) -> _Front:
    if not provider.issuer:
        provider.issuer = str(request.base_url).rstrip("/")
    provider.count_arrival(endpoint)  # before any latency: a test can see a call in progress
    # The whole request is read before the latency, as a real server has it before
    # it works on it: a client that dies during the delay loses the response, and
    # the request (a refresh token presented, maybe rotated) still counts.
    form: Form = await request.form() if request.method == "POST" else request.query_params
    delay = provider.latency_seconds(endpoint)
    if delay:
        await asyncio.sleep(delay)
    client: ClientCredentials | OAuthError
    try:
        client = extract_client(request.headers, form)
    except OAuthError as err:
        client = err
    fault = provider.take_fault(endpoint)
    method = "client_secret_basic" if "authorization" in request.headers else (
        client.method if isinstance(client, ClientCredentials) else "none"
    )
    provider.record_request({
        "endpoint": endpoint,
        "method": request.method,
        "path": request.url.path,
        "form": _flatten(form),
        "client_auth": method,
        "client_id": client.client_id if isinstance(client, ClientCredentials) else form.get("client_id"),
        "grant_type": form.get("grant_type"),
        "fault": fault.mode if fault else None,
        "at": time.time(),
    })
    response = None
    if fault is not None:
        if fault.mode == "hang":
            await hang(fault, getattr(request.app.state, "stopping", None))
        else:
            secret = client.client_secret if isinstance(client, ClientCredentials) else None
            response = fault_response(fault, form, secret)
    return _Front(form, client, response)


def create_app(provider: SandboxProvider) -> Starlette:
    """The sandbox's ASGI app, serving ``provider``."""

    async def well_known(request: Request) -> Response:
        front = await _front(provider, request, "metadata")
        return front.response or JSONResponse(metadata(provider.issuer))

    async def token(request: Request) -> Response:
        front = await _front(provider, request, "token")
        if front.response is not None:
            return front.response
        client_id = front.client.client_id if isinstance(front.client, ClientCredentials) else None
        behaviour = provider.behaviour(client_id or front.form.get("client_id"))
        try:
            body = handle_token_request(provider, front.presented(), front.form)
        except OAuthError as err:
            shaped = shape_error(behaviour, err, _NO_STORE)
            if shaped is not None:
                provider.count_error(err.error)
                return shaped
            return _oauth_error(provider, err)
        if behaviour.opaque_access_tokens:
            body["access_token"] = provider.opaque_for(body["access_token"])
        return JSONResponse(shape_success(behaviour, body, str(front.form.get("grant_type"))), headers=_NO_STORE)

    async def authorize_endpoint(request: Request) -> Response:
        front = await _front(provider, request, "authorize")
        if front.response is not None:
            return front.response
        params = {key: str(front.form[key]) for key in front.form.keys()}
        return authorize(provider, params, [str(r) for r in front.form.getlist("resource")])

    async def revoke_endpoint(request: Request) -> Response:
        front = await _front(provider, request, "revoke")
        if front.response is not None:
            return front.response
        try:
            client_id = authenticate(front.presented(), provider.clients, allow_public=True)
            token_value = front.form.get("token")
            if not token_value:
                raise OAuthError("invalid_request", "missing token")
        except OAuthError as err:
            return _oauth_error(provider, err)
        revoke(provider, client_id, str(token_value))
        return Response(status_code=200)

    async def introspect_endpoint(request: Request) -> Response:
        front = await _front(provider, request, "introspect")
        if front.response is not None:
            return front.response
        try:
            authenticate(front.presented(), provider.clients, allow_public=True)
            token_value = front.form.get("token")
            if not token_value:
                raise OAuthError("invalid_request", "missing token")
        except OAuthError as err:
            return _oauth_error(provider, err)
        return JSONResponse(introspect(provider, str(token_value)), headers=_NO_STORE)

    async def subject_token(request: Request) -> Response:
        try:
            body = await request.json()
            user_id = body["user_id"]
            ttl = int(body.get("ttl", 3600))
            if not isinstance(user_id, str) or not user_id:
                raise ValueError("user_id must be a non-empty string")
        except (ValueError, KeyError, TypeError, AttributeError):
            usage = 'expected {"user_id": "<non-empty>", "ttl": <seconds, optional>}'
            return JSONResponse({"error": "invalid_request", "error_description": usage}, status_code=400)
        provider.record_request({
            "endpoint": "subject_token", "method": "POST", "path": request.url.path,
            "form": {"user_id": user_id, "ttl": ttl}, "client_auth": "none", "client_id": None,
            "grant_type": None, "fault": None, "at": time.time(),
        })
        token_value = provider.issue_subject_token(user_id, ttl)
        return JSONResponse({"access_token": token_value, "token_type": "Bearer", "expires_in": ttl})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Lets a stopping server end hanging requests instead of waiting them out.
        app.state.loop = asyncio.get_running_loop()
        app.state.stopping = asyncio.Event()
        yield

    routes = [
        Route("/.well-known/oauth-authorization-server", well_known, methods=["GET"]),
        Route("/.well-known/openid-configuration", well_known, methods=["GET"]),
        Route("/token", token, methods=["POST"]),
        Route("/authorize", authorize_endpoint, methods=["GET", "POST"]),
        Route("/revoke", revoke_endpoint, methods=["POST"]),
        Route("/introspect", introspect_endpoint, methods=["POST"]),
        Route("/test/subject-token", subject_token, methods=["POST"]),
        *admin_routes(provider),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.provider = provider
    return app
