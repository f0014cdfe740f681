"""The connect-flow endpoints: start, and completion bound to the user.

Browser mode (the broker hosts the callback)::

    POST /v1/connect            -> {"connect_url": PUBLIC_URL/v1/connect/open?state=S}
    GET  /v1/connect/open?state=S        302 to the authorization server, Set-Cookie (binds this browser)
    GET  /v1/connect/callback?state&code  the confirmation page (needs the cookie); nothing stored yet
    POST /v1/connect/confirm  state=S     redeems and stores (needs the cookie; SameSite=Lax keeps
                                          a cross-site POST from carrying it)

Gateway mode (``CONNECT_CALLBACK_URL`` set)::

    POST /v1/connect            -> {"connect_url": the authorization server's URL, redirect_uri = the gateway}
    POST /v1/connect/complete {state, code, user_id}   (service key) -> {"server", "status": "connected"}

Failed unauthenticated steps are counted in metrics, never written to the audit
table before a genuine state is found, and never echo what was submitted.
"""

from __future__ import annotations

import hashlib
import logging
from urllib.parse import parse_qs

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from broker.audit import Action, Outcome
from broker.connect import ConnectError, ConnectFlow, mask_user
from broker.errors import BrokerError, InvalidRequest, StoreDisabled
from broker.validation import validate_server_name, validate_user_id

from workers.common.metrics import METRICS
from .edge import REQUEST_ID_KEY, json_body, no_store
from .input import MAX_BODY_BYTES, check_fields
from .pages import PAGE_HEADERS, confirm_page, connected_page, failed_page

__all__ = ["connect_start", "connect_open", "connect_callback", "connect_confirm", "connect_complete",
           "cookie_name"]

log = logging.getLogger("workers.api.app")

METRICS.describe("credbroker_connect_callbacks_total", "counter", "Connect callbacks by outcome (confirm: the confirmation page was shown; else a coarse reason)")
METRICS.describe("credbroker_connect_steps_total", "counter",
                 "Connect link opens, confirmations and gateway completions by outcome")


def cookie_name(state: str, secure: bool) -> str:
    """One cookie per link, so parallel connect flows in one browser do not clash."""
    tag = hashlib.sha256(state.encode()).hexdigest()[:16]
    return f"__Host-cbconnect-{tag}" if secure else f"cbconnect-{tag}"


def _secure(request: Request) -> bool:
    return str(request.app.state.api.settings.public_url).startswith("https://")


def _cookie_path(secure: bool) -> str:
    return "/" if secure else "/v1/connect"  # __Host- requires Path=/


def _flow(request: Request) -> ConnectFlow | None:
    return request.app.state.api.rt.connect  # type: ignore[no-any-return]


def _rid(request: Request) -> str:
    return str(request.scope[REQUEST_ID_KEY])


def _failed(step: str, exc: Exception) -> Response:
    """A page for a failed browser step, counted by a coarse reason."""
    if isinstance(exc, ConnectError):
        reason, status = exc.reason, 400
    elif isinstance(exc, BrokerError):
        reason, status = exc.code, (exc.http_status if exc.http_status >= 500 else 400)
    else:
        log.error("connect %s failed: %s", step, type(exc).__name__)
        reason, status = "internal_error", 500
    if step == "callback":
        METRICS.inc("credbroker_connect_callbacks_total", outcome=reason)
    else:
        METRICS.inc("credbroker_connect_steps_total", step=step, outcome=reason)
    return failed_page(reason, status)


async def connect_start(request: Request) -> Response:
    api = request.app.state.api
    body = await json_body(request)
    check_fields(body, ("user_id", "server"))
    user_id = validate_user_id(body["user_id"])
    server = api.rt.servers.get_server(validate_server_name(body["server"]))
    if api.rt.connect is None:
        raise StoreDisabled()
    start = await run_in_threadpool(api.rt.connect.start, user_id, server.name)
    api.record(Action.CONNECT, Outcome.SUCCESS, user_id, server.name, "connect", "started", _rid(request))
    return no_store({"connect_url": start.connect_url, "expires_at": start.expires_at.isoformat()})


async def connect_open(request: Request) -> Response:
    """Browser mode: bind the link to this browser, then on to the authorization server."""
    flow = _flow(request)
    if flow is None:
        return _failed("open", StoreDisabled())
    state = request.query_params.get("state")
    try:
        opened = await run_in_threadpool(flow.open, state)
    except Exception as exc:  # noqa: BLE001 - the browser gets a page
        return _failed("open", exc)
    assert state is not None
    secure = _secure(request)
    response = RedirectResponse(opened.authorize_url, status_code=302, headers=PAGE_HEADERS)
    response.set_cookie(cookie_name(state, secure), opened.cookie_value, max_age=opened.max_age,
                        path=_cookie_path(secure), secure=secure, httponly=True, samesite="lax")
    METRICS.inc("credbroker_connect_steps_total", step="open", outcome="ok")
    return response


async def connect_callback(request: Request) -> Response:
    """The browser lands here from the authorization server: always a page."""
    flow = _flow(request)
    if flow is None:
        return _failed("callback", StoreDisabled())
    q = request.query_params
    state = q.get("state")
    cookie = request.cookies.get(cookie_name(state, _secure(request))) if state else None
    try:
        prompt = await run_in_threadpool(flow.callback, state, q.get("code"), q.get("error"), cookie, _rid(request))
    except Exception as exc:  # noqa: BLE001
        return _failed("callback", exc)
    assert state is not None
    METRICS.inc("credbroker_connect_callbacks_total", outcome="confirm")
    action = request.app.state.api.settings.public_url.rstrip("/") + "/v1/connect/confirm"
    return confirm_page(prompt.server, prompt.masked_user, state, action)


async def _form_state(request: Request) -> str | None:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            return None
    try:
        values = parse_qs(body.decode("ascii", "replace"), max_num_fields=4).get("state")
    except ValueError:  # too many fields: not our form
        return None
    return values[0] if values else None


async def connect_confirm(request: Request) -> Response:
    """Browser mode: the confirming click; only now is the code redeemed and stored."""
    api = request.app.state.api
    flow = _flow(request)
    if flow is None:
        return _failed("confirm", StoreDisabled())
    try:
        state = await _form_state(request)
        secure = _secure(request)
        cookie = request.cookies.get(cookie_name(state, secure)) if state else None
        result = await run_in_threadpool(flow.confirm, state, cookie, _rid(request))
        await run_in_threadpool(api.drop_cache, result.user_id, api.rt.servers.get_server(result.server))
    except Exception as exc:  # noqa: BLE001
        return _failed("confirm", exc)
    assert state is not None
    METRICS.inc("credbroker_connect_steps_total", step="confirm", outcome="ok")
    response = connected_page(result.server, mask_user(result.user_id))
    response.delete_cookie(cookie_name(state, secure), path=_cookie_path(secure), secure=secure, httponly=True,
                           samesite="lax")
    return response


async def connect_complete(request: Request) -> Response:
    """Gateway mode: the gateway authenticated the browser as ``user_id``."""
    api = request.app.state.api
    flow = _flow(request)
    body = await json_body(request)
    check_fields(body, ("state", "code", "user_id"))
    user_id = validate_user_id(body["user_id"])
    state, code = body["state"], body["code"]
    if not isinstance(state, str) or not isinstance(code, str):
        raise InvalidRequest("state and code: must be strings")
    if flow is None:
        raise StoreDisabled()
    if not flow.gateway_mode:
        raise InvalidRequest("CREDBROKER_CONNECT_CALLBACK_URL is not set: connect flows complete in the browser")
    try:
        result = await run_in_threadpool(flow.complete, state, code, user_id, _rid(request))
    except BrokerError as exc:
        METRICS.inc("credbroker_connect_steps_total", step="complete", outcome=exc.code)
        raise
    await run_in_threadpool(api.drop_cache, result.user_id, api.rt.servers.get_server(result.server))
    METRICS.inc("credbroker_connect_steps_total", step="complete", outcome="ok")
    return no_store({"server": result.server, "status": "connected"})
