"""The hand-written OpenAPI 3.1 document of the HTTP API (served at /openapi.json).

Written out rather than generated so it states the contract of DESIGN.md
exactly; a unit test checks it names every route the app serves.
"""

from __future__ import annotations

from typing import Any

from broker import __version__
from broker.audit import Action, Outcome

__all__ = ["OPENAPI"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str, *codes: str) -> dict[str, Any]:
    schema: dict[str, Any] = _ref("Error")
    if codes:
        schema = {"allOf": [_ref("Error"), {"properties": {"error": {"enum": list(codes)}}}]}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(schema)}}}


_REQUEST_ID = {"$ref": "#/components/parameters/RequestId"}
_USER_PATH = {"name": "user_id", "in": "path", "required": True, "schema": _ref("UserId")}
_COMMON = {
    "401": _error("Missing or wrong service bearer key", "unauthorized"),
    "422": _error("Invalid input; the message names the field", "invalid_request"),
    "500": _error("Internal error, no detail", "internal_error"),
    "503": _error("Store disabled (no master key), a backing service is down, or a flight reached a worker "
                  "of another servers configuration", "store_disabled", "unavailable", "config_mismatch"),
}
_OPEN: list[dict[str, list[str]]] = []  # no security requirement

_INSTANT = {"oneOf": [{"type": "string", "format": "date-time"}, {"type": "number", "minimum": 0}],
            "description": "ISO 8601 (no offset means UTC) or unix seconds"}
_TS = {"type": ["string", "null"], "format": "date-time"}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string", "description": "stable error code", "enum": [
                "invalid_request", "unauthorized", "unknown_server", "policy_denied", "store_disabled",
                "unavailable", "timeout", "upstream_error", "not_connected", "subject_token_missing",
                "no_credential", "not_found", "method_not_allowed", "internal_error", "config_error",
                "config_mismatch", "invalid_state", "connect_user_mismatch", "connect_failed"]},
            "message": {"type": "string", "description": "coarse and secret-free"},
            "connect_url": {"type": ["string", "null"], "description": "not_connected only"},
            "reason": {"type": "string", "enum": ["never_connected", "reconnect_required"],
                       "description": "not_connected only"},
            "status": {"type": ["integer", "null"], "description": "upstream_error only: the server's HTTP status"},
            "oauth_error": {"type": ["string", "null"], "description": "upstream_error only: allow-listed OAuth code"},
        },
    },
    "UserId": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": "^[^/]+$",
               "description": "opaque printable user id without '/' or control characters"},
    "ServerName": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[^/]+$"},
    "SubjectTokenRequest": {
        "type": "object", "additionalProperties": False, "required": ["token"],
        "properties": {"token": {"type": "string", "minLength": 1, "maxLength": 32768},
                       "expires_at": {"oneOf": [_INSTANT, {"type": "null"}]},
                       "warm": {"type": "boolean", "description": "also warm every token_exchange/entra_obo server"}},
    },
    "ResolveRequest": {
        "type": "object", "additionalProperties": False, "required": ["user_id", "server"],
        "properties": {"user_id": _ref("UserId"), "server": _ref("ServerName"),
                       "timeout": {"type": "number", "exclusiveMinimum": 0,
                                   "description": "seconds; capped at CREDBROKER_RESOLVE_TIMEOUT"},
                       "method": {"type": "string", "examples": ["POST"],
                                  "description": "DPoP servers (required there): the upstream request's method"},
                       "url": {"type": "string", "format": "uri",
                               "description": "DPoP servers (required there): the upstream request's URL"},
                       "dpop_nonce": {"type": "string", "maxLength": 512,
                                      "description": "DPoP servers: the resource server's latest DPoP-Nonce"}},
    },
    "Resolved": {
        "type": "object",
        "required": ["server", "header", "value", "token_type", "expires_at", "obtained_via"],
        "properties": {
            "server": {"type": "string"}, "header": {"type": "string", "examples": ["Authorization"]},
            "value": {"type": "string", "description": "the header value to inject, e.g. 'Bearer ...'"},
            "token_type": {"type": "string"}, "expires_at": _TS,
            "obtained_via": {"type": "string", "enum": ["token_exchange", "entra_obo", "connect_flow", "identity_assertion"]},
            "dpop": {"type": "object", "required": ["header", "value"],
                     "description": "DPoP servers only: a fresh single-use proof for the method and url given",
                     "properties": {"header": {"const": "DPoP"}, "value": {"type": ["string", "null"]}}},
        },
    },
    "ConnectRequest": {
        "type": "object", "additionalProperties": False, "required": ["user_id", "server"],
        "properties": {"user_id": _ref("UserId"), "server": _ref("ServerName")},
    },
    "ConnectStart": {
        "type": "object", "required": ["connect_url", "expires_at"],
        "properties": {"connect_url": {"type": "string", "format": "uri"},
                       "expires_at": {"type": "string", "format": "date-time"}},
    },
    "CredentialListing": {
        "type": "object",
        "required": ["server", "mode", "status", "expires_at", "obtained_via", "scopes"],
        "properties": {
            "server": {"type": "string"},
            "mode": {"type": "string", "enum": ["token_exchange", "entra_obo", "oauth_connect", "identity_assertion"]},
            "status": {"type": "string", "enum": ["connected", "degraded", "expired", "needs_reconnect",
                                                  "not_connected"]},
            "expires_at": _TS,
            "obtained_via": {"type": ["string", "null"]},
            "scopes": {"type": "array", "items": {"type": "string"}},
            "last_used_at": _TS,
        },
    },
    "AuditEvent": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"}, "ts": {"type": "string", "format": "date-time"},
            "user_id": {"type": ["string", "null"]}, "server": {"type": ["string", "null"]},
            "method": {"type": ["string", "null"]},
            # From the enums themselves, so a new action (erase) cannot drift from the document.
            "action": {"type": "string", "enum": [a.value for a in Action]},
            "outcome": {"type": "string", "enum": [o.value for o in Outcome]},
            "reason": {"type": ["string", "null"]}, "request_id": {"type": ["string", "null"]},
        },
    },
    "Readiness": {
        "type": "object",
        "properties": {"status": {"type": "string", "enum": ["ready", "unavailable"]},
                       "checks": {"type": "object", "additionalProperties": {"type": "string",
                                                                            "enum": ["ok", "failed"]}}},
    },
}

_PAGE = {"description": "", "content": {"text/html": {"schema": {"type": "string"}}}}

PATHS: dict[str, Any] = {
    "/v1/users/{user_id}/subject-token": {"put": {
        "summary": "Store the user's IdP token (the subject of token exchange and OBO)",
        "parameters": [_USER_PATH, _REQUEST_ID],
        "requestBody": _body("SubjectTokenRequest"),
        "responses": {"204": {"description": "stored"}, **_COMMON},
    }, "delete": {
        "summary": "Forget the user's IdP token (no more minting until a new one is stored)",
        "parameters": [_USER_PATH, _REQUEST_ID],
        "responses": {"204": {"description": "deleted (also when none was stored)"}, **_COMMON},
    }},
    "/v1/users/{user_id}": {"delete": {
        "summary": "Erase the user: revoke upstream, delete credentials, subject token and pending links",
        "parameters": [_USER_PATH, _REQUEST_ID],
        "responses": {"204": {"description": "erased (also when nothing was stored); audited as erase"},
                      **_COMMON},
    }},
    "/v1/resolve": {"post": {
        "summary": "The header to inject for (user, server) now",
        "parameters": [_REQUEST_ID],
        "requestBody": _body("ResolveRequest"),
        "responses": {
            "200": _json("The credential, as a header", _ref("Resolved")),
            "403": _error("Denied by the policy hook", "policy_denied"),
            "404": _error("Server not configured", "unknown_server"),
            "409": _error("The user has no usable credential", "not_connected", "subject_token_missing",
                          "no_credential"),
            "502": _error("The authorization server failed or refused", "upstream_error"),
            "504": _error("No result within the timeout", "timeout"),
            **_COMMON,
        },
    }},
    "/v1/connect": {"post": {
        "summary": "Start the connect flow; send the user's browser to connect_url",
        "parameters": [_REQUEST_ID],
        "requestBody": _body("ConnectRequest"),
        "responses": {"200": _json("Started", _ref("ConnectStart")),
                      "404": _error("Server not configured", "unknown_server"), **_COMMON},
    }},
    "/v1/connect/open": {"get": {
        "summary": "Browser mode: the connect link; binds this browser (cookie) and redirects to the "
                   "authorization server (no bearer key)",
        "security": _OPEN,
        "parameters": [{"name": "state", "in": "query", "required": True, "schema": {"type": "string"}}],
        "responses": {"302": {"description": "to the authorization server, with Set-Cookie"},
                      "400": dict(_PAGE, description="Failed: unknown, used, expired or already opened link")},
    }},
    "/v1/connect/confirm": {"post": {
        "summary": "Browser mode: the user's confirming click; redeems the code and stores (no bearer key; "
                   "needs the link's cookie)",
        "security": _OPEN,
        "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
            "type": "object", "required": ["state"], "properties": {"state": {"type": "string"}}}}}},
        "responses": {"200": dict(_PAGE, description="Connected: names the server and the masked broker user"),
                      "400": dict(_PAGE, description="Failed: a coarse reason, never a secret")},
    }},
    "/v1/connect/complete": {"post": {
        "summary": "Gateway mode: complete a flow for the user the gateway authenticated",
        "parameters": [_REQUEST_ID],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["state", "code", "user_id"], "additionalProperties": False,
            "properties": {"state": {"type": "string"}, "code": {"type": "string"},
                           "user_id": _ref("UserId")}}}}},
        "responses": {"200": _json("Connected", {"type": "object", "required": ["server", "status"], "properties": {
                          "server": {"type": "string"}, "status": {"const": "connected"}}}),
                      "400": _error("Unknown, used or expired state", "invalid_state", "connect_failed"),
                      "403": _error("The state was made for another user; it is burned", "connect_user_mismatch"),
                      "502": _error("The authorization server refused the code", "upstream_error"),
                      **_COMMON},
    }},
    "/v1/connect/callback": {"get": {
        "summary": "Browser callback from the authorization server (no bearer key); browser mode shows "
                   "the confirmation page, nothing is stored before the confirming POST",
        "security": _OPEN,
        "parameters": [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                       for n in ("state", "code", "error")],
        "responses": {"200": dict(_PAGE, description="Confirm: names the server and the masked broker user"),
                      "400": dict(_PAGE, description="Failed: a coarse reason, never a secret"),
                      "500": dict(_PAGE, description="Internal error: a page without detail"),
                      "503": dict(_PAGE, description="Store disabled or a backing service is down")},
    }},
    "/v1/oauth/client-metadata.json": {"get": {
        "summary": "The broker's OAuth Client ID Metadata Document (its URL is the client_id; no bearer key)",
        "security": _OPEN,
        "responses": {"200": {"description": "client metadata (RFC 7591 fields)",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      "404": {"description": "PUBLIC_URL is not https (nor loopback)",
                              "content": {"application/json": {"schema": {"type": "object"}}}}},
    }},
    "/v1/users/{user_id}/credentials": {"get": {
        "summary": "Every configured server with the user's credential status; no secrets",
        "parameters": [_USER_PATH, _REQUEST_ID],
        "responses": {"200": _json("One entry per configured server",
                                   {"type": "array", "items": _ref("CredentialListing")}), **_COMMON},
    }},
    "/v1/users/{user_id}/credentials/{server}": {"delete": {
        "summary": "Disconnect: revoke upstream where configured (oauth_connect), then delete",
        "parameters": [_USER_PATH, {"name": "server", "in": "path", "required": True,
                                    "schema": _ref("ServerName")}, _REQUEST_ID],
        "responses": {"204": {"description": "deleted (also when there was nothing to delete)"},
                      "404": _error("Server not configured", "unknown_server"), **_COMMON},
    }},
    "/v1/audit": {"get": {
        "summary": "Audit events, newest first",
        "parameters": [
            {"name": "user_id", "in": "query", "schema": _ref("UserId")},
            {"name": "server", "in": "query", "schema": _ref("ServerName")},
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000,
                                                        "default": 100}},
            {"name": "since", "in": "query", "schema": {"type": "string"}, "description": _INSTANT["description"]},
            {"name": "until", "in": "query", "schema": {"type": "string"}, "description": _INSTANT["description"]},
            _REQUEST_ID,
        ],
        "responses": {"200": _json("Events", {"type": "array", "items": _ref("AuditEvent")}), **_COMMON},
    }},
    "/healthz": {"get": {"summary": "Liveness", "security": _OPEN,
                         "responses": {"200": _json("Alive", {"type": "object"})}}},
    "/readyz": {"get": {"summary": "Readiness: database, Redis and a worker answer", "security": _OPEN,
                        "responses": {"200": _json("Ready", _ref("Readiness")),
                                      "503": _json("Not ready; checks name what failed", _ref("Readiness"))}}},
    "/metrics": {"get": {"summary": "Prometheus metrics of this process",
                         "responses": {"200": {"description": "Prometheus text format",
                                               "content": {"text/plain": {"schema": {"type": "string"}}}},
                                       "401": _COMMON["401"]}}},
    "/openapi.json": {"get": {"summary": "This document", "security": _OPEN,
                              "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})}}},
}

SCHEMAS.update({
    "WarmRequest": {
        "type": "object", "additionalProperties": False, "required": ["user_id"],
        "properties": {"user_id": _ref("UserId"),
                       "servers": {"type": "array", "items": _ref("ServerName"), "maxItems": 256,
                                   "description": "omitted: every configured server"}},
    },
    "WarmResult": {
        "type": "object",
        "properties": {"queued": {"type": "array", "items": {"type": "string"}},
                       "skipped": {"type": "array", "items": {
                           "type": "object", "properties": {
                               "server": {"type": "string"},
                               "reason": {"type": "string", "enum": ["never_connected", "needs_reconnect",
                                                                     "subject_token_missing", "policy_denied"]}}}}},
    },
    "ConnectionEvent": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "type": {"type": "string", "enum": ["connection.connected", "connection.degraded", "connection.recovered",
                                                "connection.needs_reconnect", "connection.disconnected",
                                                "connection.expired"]},
            "user_id": {"type": "string"}, "server": {"type": "string"}, "status": {"type": "string"},
            "reason": {"type": ["string", "null"]}, "at": {"type": "string", "format": "date-time"},
        },
    },
})
PATHS.update({
    "/v1/warm": {"post": {
        "summary": "Warm a user's credentials now (ordinary flights; returns without waiting)",
        "parameters": [_REQUEST_ID],
        "requestBody": _body("WarmRequest"),
        "responses": {"202": _json("Flights queued; skipped servers with the reason", _ref("WarmResult")),
                      "404": _error("Server not configured", "unknown_server"), **_COMMON},
    }},
    "/v1/events": {"get": {
        "summary": "Connection lifecycle events after a cursor, oldest first",
        "parameters": [
            {"name": "after", "in": "query", "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"},
             "description": "the `next` of the previous page; omitted: from the start"},
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000,
                                                        "default": 100}},
            _REQUEST_ID,
        ],
        "responses": {"200": _json("A page of events", {
            "type": "object", "properties": {"events": {"type": "array", "items": _ref("ConnectionEvent")},
                                             "next": {"type": "string"}}}), **_COMMON},
    }},
})

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "credential-broker",
        "version": __version__,
        "description": "Per-user upstream credentials: resolve, connect flow, listings and audit. "
                       "Errors are {\"error\": code, \"message\": ...}; every response has X-Request-ID.",
    },
    "security": [{"serviceKey": []}],
    "paths": PATHS,
    "components": {
        "securitySchemes": {"serviceKey": {"type": "http", "scheme": "bearer",
                                           "description": "a key from CREDBROKER_API_KEYS"}},
        "parameters": {"RequestId": {"name": "X-Request-ID", "in": "header", "required": False,
                                     "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:@/+=-]{1,128}$"},
                                     "description": "kept if it matches, else replaced; echoed and audited"}},
        "schemas": SCHEMAS,
    },
}
