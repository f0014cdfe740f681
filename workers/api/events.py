"""HTTP routes for pre-warming and connection events (contract, second round).

``POST /v1/warm`` plans the warm from the store (what to skip and why) and
starts the flights without waiting; ``GET /v1/events`` pages the outbox
oldest first by cursor.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from broker.audit import Action, Outcome
from broker.errors import InvalidRequest, StoreDisabled
from broker.events import EventLog
from broker.validation import validate_server_name, validate_user_id

from workers.actions.warm import warm_user
from workers.celery.app import TASK_WARM
from .input import check_fields, echo_names, parse_limit

__all__ = ["warm", "events", "warm_for", "parse_cursor"]

_EVENT_PARAMS = frozenset({"after", "limit"})
_MAX_CURSOR_DIGITS = 19


def parse_cursor(value: str | None) -> int:
    if value is None or value == "":
        return 0
    if not (value.isascii() and value.isdigit()) or len(value) > _MAX_CURSOR_DIGITS:
        raise InvalidRequest("after: must be a cursor returned as `next` (a non-negative integer)")
    return int(value)


def warm_for(api: Any, user_id: str, servers: list[str] | None, request_id: str, *,
             exchange_only: bool = False) -> dict[str, Any]:
    """Plan and start a warm (blocking; run in a thread)."""
    if not api.rt.store.enabled:
        raise StoreDisabled()

    def send(name: str, args: list[Any], task_id: str) -> None:
        api.client.celery.send_task(name, args=args, task_id=task_id)

    plan, started = warm_user(api.rt, user_id, servers, send, TASK_WARM, exchange_only=exchange_only)
    api.record(Action.ACQUIRE, Outcome.SUCCESS, user_id, None, "none", "warm", request_id)
    return {"queued": plan.queued, "skipped": plan.skipped}


async def warm(request: Request) -> Response:
    from .app import _api, _json_body, _rid

    api = _api(request)
    body = await _json_body(request)
    check_fields(body, ("user_id",), ("servers",))
    user_id = validate_user_id(body["user_id"])
    servers = body.get("servers")
    if servers is not None:
        if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers) or len(servers) > 256:
            raise InvalidRequest("servers: must be a list of server names")
        servers = [api.rt.servers.get_server(validate_server_name(s)).name for s in dict.fromkeys(servers)]
    result = await run_in_threadpool(warm_for, api, user_id, servers, _rid(request))
    return JSONResponse(result, status_code=202, headers={"Cache-Control": "no-store"})


async def events(request: Request) -> Response:
    from .app import _api

    api = _api(request)
    q = request.query_params
    unknown = sorted(k for k in q if k not in _EVENT_PARAMS)
    if unknown:
        raise InvalidRequest(f"query: unknown parameter(s) {echo_names(list(unknown))}")
    after = parse_cursor(q.get("after"))
    limit = parse_limit(q.get("limit"))

    def read() -> dict[str, Any]:
        log = EventLog(api.rt.store.engine, _name_of(api))
        page = log.after(after, limit)
        return {"events": [e.to_dict() for e in page], "next": str(page[-1].id if page else after)}

    return JSONResponse(await run_in_threadpool(read), headers={"Cache-Control": "no-store"})


def _name_of(api: Any) -> Any:
    def name(key: str) -> str | None:
        server = api.rt.servers.by_key(key)
        return None if server is None else server.name

    return name
