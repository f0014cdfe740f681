"""The simulated upstream login and consent at ``/authorize``.

``consent=approve|deny`` in the query answers at once, for tests and
benchmarks; without it a small HTML page lets a person click through, for
the demo.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from urllib.parse import urlencode, urlsplit, urlunsplit

from starlette.responses import HTMLResponse, RedirectResponse, Response

from .profiles import authorize_problem, issues_refresh_token
from .state import SandboxProvider

__all__ = ["DEFAULT_USER", "authorize"]

DEFAULT_USER = "sandbox-user"
# The request parameters a consent form must carry through to its POST.
_CARRIED = ("response_type", "client_id", "redirect_uri", "state", "code_challenge",
            "code_challenge_method", "scope", "resource", "user_scope", "access_type", "prompt", "audience")


def _redirect(redirect_uri: str, params: dict[str, str]) -> RedirectResponse:
    parts = urlsplit(redirect_uri)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return RedirectResponse(urlunsplit(parts._replace(query=query)), status_code=302)


def _error_page(message: str) -> HTMLResponse:
    body = (
        "<!doctype html><title>Sandbox authorization error</title>"
        f"<h1>Authorization error</h1><p>{html.escape(message)}</p>"
    )
    return HTMLResponse(body, status_code=400)


def _consent_page(params: Mapping[str, str]) -> HTMLResponse:
    hidden = "".join(
        f'<input type="hidden" name="{name}" value="{html.escape(params[name], quote=True)}">'
        for name in _CARRIED
        if params.get(name)
    )
    client = html.escape(params.get("client_id", ""))
    scope = html.escape(params.get("scope", "") or "(none)")
    user = html.escape(params.get("user") or params.get("login_hint") or DEFAULT_USER, quote=True)
    body = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Sandbox sign-in</title></head>
<body style="font-family: sans-serif; max-width: 32em; margin: 3em auto">
<h1>Sandbox identity provider</h1>
<p>Application <b>{client}</b> asks for access: <code>{scope}</code></p>
<form method="post" action="/authorize">{hidden}
<label>Sign in as <input name="user" value="{user}"></label>
<p><button name="consent" value="approve">Approve</button>
<button name="consent" value="deny">Deny</button></p>
</form></body></html>"""
    return HTMLResponse(body)


def authorize(provider: SandboxProvider, params: Mapping[str, str], resources: list[str]) -> Response:
    """Validate an authorization request and answer with a page or a redirect."""
    client_id = params.get("client_id", "")
    redirect_uri = params.get("redirect_uri", "")
    # Without a known client and a usable redirect URI there is nowhere safe to redirect.
    if client_id not in provider.clients and client_id not in provider.client_jwks:
        provider.count_error("invalid_client")
        return _error_page("unknown client_id")
    if urlsplit(redirect_uri).scheme not in ("http", "https") or not urlsplit(redirect_uri).netloc:
        provider.count_error("invalid_request")
        return _error_page("redirect_uri must be an absolute http(s) URL")
    state = {"state": params["state"]} if params.get("state") else {}

    def error(code: str, description: str) -> RedirectResponse:
        provider.count_error(code)
        return _redirect(redirect_uri, {"error": code, "error_description": description, **state})

    if params.get("response_type") != "code":
        return error("unsupported_response_type", "only response_type=code")
    if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
        return error("invalid_request", "PKCE with code_challenge_method=S256 is required")
    behaviour = provider.behaviour(client_id)
    problem = authorize_problem(behaviour, params)
    if problem:
        return error("invalid_request", problem)
    consent = params.get("consent")
    if consent == "deny":
        return error("access_denied", "the user denied consent")
    if consent != "approve":
        return _consent_page(params)
    user = params.get("user") or params.get("login_hint") or DEFAULT_USER
    scope = provider.grant_scope(params.get(behaviour.authorize_scope_param, ""))
    with provider.lock:
        code = provider.store.new_code(
            provider.now(),
            client_id=client_id,
            redirect_uri=redirect_uri,
            code_challenge=params["code_challenge"],
            scope=scope,
            user=user,
            resource=resources,
            offline=issues_refresh_token(behaviour, params, scope),
        )
    return _redirect(redirect_uri, {"code": code.code, **state})
