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
from .clientauth import AssertionCheck, ClientCredentials, authenticate, extract_client
from .errors import OAuthError
from .faults import fault_response, hang
from .grants import JWT_BEARER, TOKEN_EXCHANGE, handle_token_request
from .jwt import JWTError
from .pop import verify_client_assertion, verify_dpop_proof
from .profiles import shape_error, shape_success
from .revocation import introspect, revoke
from .state import SandboxProvider

__all__ = ["create_app", "metadata"]

Form = ImmutableMultiDict[str, Any]
# RFC 6749 §5.1: token responses must not be cached.
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_AUTH_METHODS = ["client_secret_post", "client_secret_basic", "private_key_jwt", "none"]


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
        "token_endpoint_auth_signing_alg_values_supported": ["ES256", "RS256"],
        "dpop_signing_alg_values_supported": ["ES256", "RS256"],
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


def _counted(provider: SandboxProvider, endpoint: str, handler: Any) -> Any:
    """``handler`` with its requests counted from arrival (before any latency: a
    test can see a call in progress) until answered (``max_in_flight``)."""

    async def run(request: Request) -> Response:
        provider.count_arrival(endpoint)
        try:
            return await handler(request)
        finally:
            provider.count_departure(endpoint)

    return run


def _assertion_check(provider: SandboxProvider, endpoint_url: str) -> AssertionCheck:
    """private_key_jwt for clients with a registered JWK; ``aud`` may name the
    issuer, the token endpoint or the endpoint called (as servers accept)."""

    def check(presented: ClientCredentials) -> str:
        with provider.lock:
            client_id = presented.client_id or ""
            jwk = provider.client_jwks.get(client_id)
            if jwk is None or presented.assertion is None:
                raise OAuthError("invalid_client", "unknown client", status=401)
            verify_client_assertion(
                presented.assertion, client_id=client_id, jwk=jwk, now=provider.now(),
                audiences={provider.issuer, f"{provider.issuer}/token", endpoint_url},
                seen=provider.seen_assertion_jtis,
            )
            return client_id

    return check


def _nonce_headers(provider: SandboxProvider) -> dict[str, str]:
    return {"DPoP-Nonce": provider.dpop_nonce} if provider.dpop_nonce else {}


def _bound_token_key(provider: SandboxProvider, request: Request) -> str | None:
    """The thumbprint of the request's verified DPoP proof, or None without one."""
    proof = request.headers.get("dpop")
    if proof is None:
        return None
    with provider.lock:
        return verify_dpop_proof(proof, method=request.method, url=f"{provider.issuer}/token",
                                 now=provider.now(), seen=provider.seen_proof_jtis, nonce=provider.dpop_nonce)


def _resource_error(provider: SandboxProvider, error: str, description: str,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    provider.count_resource_call(False)
    return JSONResponse({"error": error, "error_description": description}, status_code=401,
                        headers={"WWW-Authenticate": f'DPoP error="{error}", algs="ES256 RS256"', **(headers or {})})


def _resource(provider: SandboxProvider, request: Request) -> Response:
    """A protected resource: a sandbox access token, and for a DPoP-bound one a
    proof for this very request by the bound key (RFC 9449 section 7)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    with provider.lock:
        try:
            claims = provider.decode_token(provider.store.opaque.get(token, token))
        except JWTError:
            return _resource_error(provider, "invalid_token", "not a sandbox access token")
        if (claims.get("token_use") != "access" or claims.get("exp", 0) <= provider.now()
                or claims.get("jti") in provider.store.revoked_jtis):
            return _resource_error(provider, "invalid_token", "token expired, revoked or not an access token")
        jkt = (claims.get("cnf") or {}).get("jkt")
        if jkt is None:
            if scheme.lower() != "bearer":
                return _resource_error(provider, "invalid_token", "a Bearer token goes with the Bearer scheme")
        else:
            if scheme.lower() != "dpop":
                return _resource_error(provider, "invalid_token", "a DPoP-bound token needs the DPoP scheme")
            proof = request.headers.get("dpop")
            if proof is None:
                return _resource_error(provider, "invalid_dpop_proof", "missing DPoP proof")
            try:
                thumbprint = verify_dpop_proof(proof, method=request.method, url=str(request.url),
                                               now=provider.now(), seen=provider.seen_proof_jtis,
                                               access_token=token, status=401, nonce=provider.resource_dpop_nonce)
            except OAuthError as err:
                return _resource_error(provider, err.error, err.description or "", err.headers)
            if thumbprint != jkt:
                return _resource_error(provider, "invalid_dpop_proof", "proof key is not the token's key")
    provider.count_resource_call(True)
    return JSONResponse({"sub": claims.get("sub"), "scope": claims.get("scope"), "jkt": jkt})


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
            jkt = _bound_token_key(provider, request)
            body = handle_token_request(provider, front.presented(), front.form, jkt=jkt,
                                        check_assertion=_assertion_check(provider, f"{provider.issuer}/token"))
        except OAuthError as err:
            err.headers = {**_nonce_headers(provider), **err.headers}
            shaped = shape_error(behaviour, err, _NO_STORE)
            if shaped is not None:
                provider.count_error(err.error)
                return shaped
            return _oauth_error(provider, err)
        if behaviour.opaque_access_tokens:
            body["access_token"] = provider.opaque_for(body["access_token"])
        return JSONResponse(shape_success(behaviour, body, str(front.form.get("grant_type"))),
                            headers={**_NO_STORE, **_nonce_headers(provider)})

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
            client_id = authenticate(front.presented(), provider.clients, allow_public=True,
                                     check_assertion=_assertion_check(provider, f"{provider.issuer}/revoke"))
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
            authenticate(front.presented(), provider.clients, allow_public=True,
                         check_assertion=_assertion_check(provider, f"{provider.issuer}/introspect"))
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

    async def resource(request: Request) -> Response:
        provider.record_request({
            "endpoint": "resource", "method": request.method, "path": request.url.path, "form": {},
            "client_auth": "none", "client_id": None, "grant_type": None, "fault": None, "at": time.time(),
        })
        return _resource(provider, request)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Lets a stopping server end hanging requests instead of waiting them out.
        app.state.loop = asyncio.get_running_loop()
        app.state.stopping = asyncio.Event()
        yield

    routes = [
        Route("/.well-known/oauth-authorization-server", _counted(provider, "metadata", well_known),
              methods=["GET"]),
        Route("/.well-known/openid-configuration", _counted(provider, "metadata", well_known), methods=["GET"]),
        Route("/token", _counted(provider, "token", token), methods=["POST"]),
        Route("/authorize", _counted(provider, "authorize", authorize_endpoint), methods=["GET", "POST"]),
        Route("/revoke", _counted(provider, "revoke", revoke_endpoint), methods=["POST"]),
        Route("/introspect", _counted(provider, "introspect", introspect_endpoint), methods=["POST"]),
        Route("/test/subject-token", subject_token, methods=["POST"]),
        Route("/test/resource", resource, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        *admin_routes(provider),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.provider = provider
    return app
