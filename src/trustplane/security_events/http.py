"""``GET /events``: the security events, long-polled and resumable by cursor.

Needs a bearer access token issued by this server for the audience ``{issuer}/events`` with scope
``event:subscribe``, checked by the one bearer guard (RFC 6750: 401 ``invalid_token``, 403
``insufficient_scope``, 400 ``invalid_request`` for a token in the query string). The audience is
one of trustplane's own APIs, so only an operator can register a client for it
(``trustplane clients add``); dynamic registration refuses it.

``after``: the cursor (``next`` of the previous answer; absent or ``0``: from the start of the
ledger). ``wait``: seconds (0 to 30) to hold the request open while there is nothing new. ``limit``:
1 to 500 events per answer (default 100). Answer: ``{"events": [{"seq", "id", "type", "jws"}],
"next": "<cursor>", "more": bool}``; a cursor that is not a decimal integer, or beyond the ledger,
is 400 ``invalid_request``.
"""

from __future__ import annotations

import math

from fastapi import APIRouter, Request
from starlette.responses import Response

from trustplane.bearer_guard import BearerGuard
from trustplane.bearer_guard.http import NO_STORE, answered, caller
from trustplane.errors import ErrorTable, InvalidRequestError
from trustplane.protocol.responses import json_response
from trustplane.security_events.stream import (
    MAX_PAGE,
    MAX_WAIT,
    CursorError,
    SecurityEvents,
    parse_cursor,
)

SCOPE = "event:subscribe"
PARAMETERS = frozenset({"after", "wait", "limit"})
ERRORS = ErrorTable("events", {CursorError: lambda exc: InvalidRequestError(str(exc))})


def _number(request: Request, name: str, default: float, low: float, high: float) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # NaN fails both comparisons
        raise InvalidRequestError(f"{name} must be a number from {low:g} to {high:g}")
    return value


def events_router(events: SecurityEvents, guard: BearerGuard) -> APIRouter:
    router = APIRouter(tags=["security events"])
    route = guard.route("events", "/events", SCOPE)

    @router.get(
        "/events",
        summary="Signed security events after a cursor (long poll)",
        openapi_extra={
            "parameters": [
                {"name": "after", "in": "query", "schema": {"type": "string"}},
                {"name": "wait", "in": "query", "schema": {"type": "number", "maximum": MAX_WAIT}},
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "maximum": MAX_PAGE},
                },
            ]
        },
    )
    @answered(ERRORS)
    async def list_events(request: Request) -> Response:
        await caller(guard, request, route)
        unknown = set(request.query_params) - PARAMETERS
        if unknown:
            raise InvalidRequestError(f"unknown query parameter(s): {', '.join(sorted(unknown))}")
        after = parse_cursor(request.query_params.get("after"))
        wait = _number(request, "wait", 0.0, 0.0, MAX_WAIT)
        limit = _number(request, "limit", 100, 1, MAX_PAGE)
        if limit != int(limit):
            raise InvalidRequestError("limit must be an integer")
        page = await events.wait(after, int(limit), wait)
        body = {
            "events": [
                {
                    "seq": e.index,
                    "id": e.entry["event_id"],
                    "type": e.entry["type"],
                    "jws": events.sign(e),
                }
                for e in page.events
            ],
            "next": str(page.next),
            "more": page.more,
        }
        return json_response(body, 200, NO_STORE)

    return router
