"""What the authorization server received, as the tests' ground truth.

For every request to the token and revocation endpoints, one JSON line: the
grant type, the form field NAMES (never values), how the client
authenticated, the response status and OAuth error code, and a short SHA-256
prefix of the refresh token presented and of the one issued. Tokens
themselves never reach the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from django.http import HttpRequest, HttpResponse

__all__ = ["RecorderMiddleware", "fingerprint", "ENDPOINTS"]

ENDPOINTS = {"/o/token/": "token", "/o/revoke_token/": "revoke"}
_LOCK = threading.Lock()


def fingerprint(token: str) -> str:
    """The first 16 hex digits of SHA-256: enough to tell tokens apart, useless to spend."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def _owner(endpoint: str, form: dict[str, str]) -> str | None:
    """The user whose grant the request spends, so tests can filter per user."""
    from oauth2_provider.models import get_access_token_model, get_grant_model, get_refresh_token_model

    presented = form.get("refresh_token") if endpoint == "token" else form.get("token")
    models: list[Any] = []
    if endpoint == "token" and form.get("grant_type") == "refresh_token":
        models = [get_refresh_token_model()]
    elif endpoint == "revoke":
        models = [get_refresh_token_model(), get_access_token_model()]
    elif endpoint == "token" and form.get("grant_type") == "authorization_code" and form.get("code"):
        grant = get_grant_model().objects.filter(code=form["code"]).select_related("user").first()
        return None if grant is None else str(grant.user.get_username())
    for model in models if presented else []:
        checksum = hashlib.sha256(presented.encode()).hexdigest()  # type: ignore[union-attr]
        row = model.objects.filter(token_checksum=checksum).select_related("user").first()
        if row is not None and row.user is not None:
            return str(row.user.get_username())
    return None


class RecorderMiddleware:
    """Appends one line per token/revocation request to ``$DOT_RECORD_PATH``."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.path = os.environ.get("DOT_RECORD_PATH", "")

    def __call__(self, request: HttpRequest) -> HttpResponse:
        endpoint = ENDPOINTS.get(request.path)
        if endpoint is None or not self.path:
            return self.get_response(request)
        form = dict(parse_qsl(request.body.decode("utf-8", "replace"), keep_blank_values=True))
        user = _owner(endpoint, form)  # before the view: rotation may delete the row
        response = self.get_response(request)
        entry = self._entry(endpoint, request, form, response)
        entry["user"] = user
        self._write(entry)
        return response

    def _entry(self, endpoint: str, request: HttpRequest, form: dict[str, str],
               response: HttpResponse) -> dict[str, Any]:
        authorization = request.headers.get("Authorization", "")
        entry: dict[str, Any] = {
            "endpoint": endpoint,
            "method": request.method,
            "grant_type": form.get("grant_type"),
            "fields": sorted(form),
            "auth": ("basic" if authorization.lower().startswith("basic ")
                     else "post" if "client_secret" in form else "none"),
            "status": response.status_code,
            # The tests' own direct calls say so, to keep them apart from the broker's.
            "actor": request.headers.get("X-Interop-Actor", "client"),
        }
        presented = form.get("refresh_token") if endpoint == "token" else form.get("token")
        if presented:
            entry["presented"] = fingerprint(presented)
        if endpoint == "revoke":
            entry["token_type_hint"] = form.get("token_type_hint")
        try:
            body = json.loads(response.content or b"{}")
        except ValueError:
            body = {}
        if isinstance(body, dict):
            if isinstance(body.get("error"), str):
                entry["error"] = body["error"]
            if isinstance(body.get("refresh_token"), str):
                entry["issued"] = fingerprint(body["refresh_token"])
            if isinstance(body.get("scope"), str):
                entry["scope_granted"] = body["scope"]
        return entry

    def _write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, sort_keys=True) + "\n"
        with _LOCK, open(self.path, "a", encoding="utf-8") as out:
            out.write(line)
