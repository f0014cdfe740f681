"""A test MCP server built on the ``mcp`` package's server-side authorization.

Everything OAuth-shaped here is the SDK's: protected resource metadata (RFC
9728) with the 401 ``WWW-Authenticate`` pointer, authorization server
metadata (RFC 8414), dynamic registration (RFC 7591), authorize, token and
revocation routes, bearer-token checking. This file only supplies the storage
(an ``OAuthAuthorizationServerProvider`` that approves every authorization
for the user named in the ``X-Test-User`` header, standing in for a login
page) and counters the tests read at ``/test/counts``.

Run: ``python -m tests.interop.mcp_server.app FD ACCESS_SECONDS [cimd]`` with a
listening socket inherited as FD. With ``cimd`` the authorization server also
advertises ``client_id_metadata_document_supported`` and accepts a client id
that is an http(s) URL by fetching that document: the SDK has no server side
for Client ID Metadata Documents, so this part (``get_client``) is ours.
"""

from __future__ import annotations

import contextvars
import secrets
import socket
import sys
import time
from collections import Counter
from typing import Any

import httpx
import uvicorn
from pydantic import AnyHttpUrl
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mcp.server.auth.middleware.auth_context import AuthContextMiddleware
from mcp.server.auth.middleware.bearer_auth import BearerAuthBackend, RequireAuthMiddleware
from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    ProviderTokenVerifier,
    RefreshToken,
    TokenError,
    construct_redirect_uri,
)
from mcp.server.auth.routes import (
    build_metadata,
    build_resource_metadata_url,
    create_auth_routes,
    create_protected_resource_routes,
)
from mcp.server.auth.settings import ClientRegistrationOptions, RevocationOptions
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

USER: contextvars.ContextVar[str] = contextvars.ContextVar("user", default="")
COUNTS: Counter[str] = Counter()
EVENTS: list[dict[str, Any]] = []


class Code(AuthorizationCode):
    user: str


class Refresh(RefreshToken):
    user: str
    resource: str | None = None


class Access(AccessToken):
    user: str = ""


class AutoApprove:
    """In-memory clients, codes and tokens; every authorization is approved."""

    def __init__(self, access_seconds: int, cimd: bool = False) -> None:
        self.access_seconds = access_seconds
        self.cimd = cimd
        self.clients: dict[str, OAuthClientInformationFull] = {}
        self.codes: dict[str, Code] = {}
        self.refresh: dict[str, Refresh] = {}
        self.access: dict[str, Access] = {}

    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        if self.cimd and client_id.startswith(("https://", "http://")) and client_id not in self.clients:
            COUNTS["cimd_fetch"] += 1
            async with httpx.AsyncClient(timeout=5) as http:
                response = await http.get(client_id)
            doc = response.json() if response.status_code == 200 else {}
            if doc.get("client_id") != client_id:  # the document must name its own URL
                return None
            self.clients[client_id] = OAuthClientInformationFull(
                client_id=client_id, redirect_uris=doc["redirect_uris"], grant_types=doc["grant_types"],
                response_types=doc["response_types"], token_endpoint_auth_method="none", scope="mcp",
                client_name=doc.get("client_name"))
        return self.clients.get(client_id)

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        COUNTS["register"] += 1
        assert client_info.client_id is not None
        self.clients[client_info.client_id] = client_info

    async def authorize(self, client: OAuthClientInformationFull, params: AuthorizationParams) -> str:
        code = secrets.token_urlsafe(32)
        self.codes[code] = Code(
            code=code, scopes=params.scopes or [], expires_at=time.time() + 300, client_id=client.client_id or "",
            code_challenge=params.code_challenge, redirect_uri=params.redirect_uri,
            redirect_uri_provided_explicitly=params.redirect_uri_provided_explicitly,
            resource=params.resource, user=USER.get() or "anonymous",
        )
        EVENTS.append({"event": "authorize", "user": USER.get(), "resource": params.resource,
                       "client_id": client.client_id})
        return construct_redirect_uri(str(params.redirect_uri), code=code, state=params.state)

    async def load_authorization_code(self, client: OAuthClientInformationFull, authorization_code: str) -> Code | None:
        code = self.codes.get(authorization_code)
        return code if code is not None and code.client_id == client.client_id else None

    def _issue(self, client_id: str, user: str, scopes: list[str], resource: str | None) -> OAuthToken:
        access, refresh = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self.access[access] = Access(token=access, client_id=client_id, scopes=scopes,
                                     expires_at=int(time.time()) + self.access_seconds, resource=resource, user=user)
        self.refresh[refresh] = Refresh(token=refresh, client_id=client_id, scopes=scopes, user=user,
                                        resource=resource)
        return OAuthToken(access_token=access, token_type="Bearer", expires_in=self.access_seconds,
                          refresh_token=refresh, scope=" ".join(scopes) or None)

    async def exchange_authorization_code(self, client: OAuthClientInformationFull, authorization_code: Code) -> OAuthToken:
        del self.codes[authorization_code.code]
        EVENTS.append({"event": "code", "user": authorization_code.user, "client_id": client.client_id,
                       "resource": authorization_code.resource})
        return self._issue(client.client_id or "", authorization_code.user, authorization_code.scopes,
                           authorization_code.resource)

    async def load_refresh_token(self, client: OAuthClientInformationFull, refresh_token: str) -> Refresh | None:
        token = self.refresh.get(refresh_token)
        return token if token is not None and token.client_id == client.client_id else None

    async def exchange_refresh_token(self, client: OAuthClientInformationFull, refresh_token: Refresh,
                                     scopes: list[str]) -> OAuthToken:
        if self.refresh.pop(refresh_token.token, None) is None:
            raise TokenError(error="invalid_grant", error_description="refresh token already used")
        EVENTS.append({"event": "refresh", "user": refresh_token.user, "client_id": client.client_id})
        return self._issue(client.client_id or "", refresh_token.user, scopes or refresh_token.scopes,
                           refresh_token.resource)

    async def load_access_token(self, token: str) -> Access | None:
        return self.access.get(token)

    async def revoke_token(self, token: Access | Refresh) -> None:
        user = getattr(token, "user", "")
        EVENTS.append({"event": "revoke", "user": user, "kind": type(token).__name__})
        for store in (self.access, self.refresh):
            for key in [k for k, v in store.items() if v.user == user and v.client_id == token.client_id]:
                del store[key]


class Count:
    """Counts every request by path (discovery documents, registration, token...)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            COUNTS[f"{scope['method']} {scope['path']}"] += 1
            for name, value in scope.get("headers", []):
                if name == b"x-test-user":
                    USER.set(value.decode())
        await self.app(scope, receive, send)


def build(base: str, access_seconds: int, cimd: bool = False) -> Starlette:
    provider = AutoApprove(access_seconds, cimd)
    resource = f"{base}/mcp"

    async def mcp_endpoint(scope: Any, receive: Any, send: Any) -> None:
        user = scope["user"].access_token
        await JSONResponse({"user": user.user, "client_id": user.client_id})(scope, receive, send)

    async def counts(_: Request) -> JSONResponse:
        return JSONResponse({"counts": dict(COUNTS), "events": EVENTS})

    async def forget_clients(_: Request) -> JSONResponse:
        forgotten = len(provider.clients)
        provider.clients.clear()
        return JSONResponse({"forgotten": forgotten})

    auth_routes = create_auth_routes(provider, AnyHttpUrl(base),
                                     client_registration_options=ClientRegistrationOptions(enabled=True),
                                     revocation_options=RevocationOptions(enabled=True))
    if cimd:
        metadata = build_metadata(AnyHttpUrl(base), None, ClientRegistrationOptions(enabled=True),
                                  RevocationOptions(enabled=True))
        document = {**metadata.model_dump(mode="json", exclude_none=True),
                    "client_id_metadata_document_supported": True}

        async def as_metadata(_: Request) -> JSONResponse:
            return JSONResponse(document)

        auth_routes = [Route("/.well-known/oauth-authorization-server", as_metadata)] + [
            r for r in auth_routes if getattr(r, "path", "") != "/.well-known/oauth-authorization-server"]
    routes = [
        *auth_routes,
        *create_protected_resource_routes(AnyHttpUrl(resource), [AnyHttpUrl(base)], scopes_supported=["mcp"]),
        Route("/mcp", endpoint=RequireAuthMiddleware(mcp_endpoint, [], build_resource_metadata_url(
            AnyHttpUrl(resource))), methods=["GET", "POST"]),
        Route("/test/counts", counts),
        Route("/test/forget-clients", forget_clients, methods=["POST"]),
    ]
    middleware = [
        Middleware(Count),
        Middleware(AuthenticationMiddleware, backend=BearerAuthBackend(ProviderTokenVerifier(provider))),
        Middleware(AuthContextMiddleware),
    ]
    return Starlette(routes=routes, middleware=middleware)


def main() -> None:
    fd, access_seconds = int(sys.argv[1]), int(sys.argv[2])
    sock = socket.socket(fileno=fd)
    host, port = sock.getsockname()[:2]
    app = build(f"http://{host}:{port}", access_seconds, cimd="cimd" in sys.argv[3:])
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
