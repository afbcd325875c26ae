"""Starlette/FastAPI integration of idempotency keys: one :class:`IdempotentOperation` per
operation, awaited inside the handler, after the PEP dependency has authorized the request::

    idem = IdempotentOperation(service, operation="settlement:submit")

    @app.post("/settlements", status_code=201)
    async def submit(request: Request, body: SettlementIn,
                     grant: Grant = Depends(pep.require("settlement:submit", ...))) -> Response:
        return await idem.run(request, scope=grant.token.client_id, handler=lambda: settle(body))

Authorization runs first on every request, replays included: a replay hands out the stored result
of an operation, so a caller whose token was revoked (or whose permission was withdrawn) since the
first request must not get it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response

from trustplane.pep.idempotency import (
    Execute,
    IdempotencyError,
    IdempotencyService,
    InTransaction,
    KeyTaken,
    StoredResponse,
    fingerprint,
)

HEADER = "idempotency-key"
REPLAYED = "Idempotency-Replayed"  # not standardised: tells a client (and its logs) it got a replay
PROBLEM = "application/problem+json"
HandlerResult = Response | tuple[int, Any]
Handler = Callable[[], HandlerResult | Awaitable[HandlerResult]]
TransactionHandler = Callable[[InTransaction], Awaitable[Response]]
#: What Starlette's ``request.url`` changes in a path: it escapes ``?``, ``#`` and ``\``, and the
#: ``urlsplit`` that reads its path back drops tab, CR and LF.
_REWRITTEN = re.compile(r"[?#\\\t\r\n]")


def request_path(request: Request) -> str:
    """``request.url.path``, the path a key's fingerprint has always hashed, without building the
    URL (a ``urlunsplit`` and a ``urlsplit`` per request) when it is the ASGI path as is: one that
    starts with a single ``/`` (without a host, ``//`` is rewritten) and has none of the
    characters the URL rewrites."""
    path: str = request.scope["path"]
    if path[:1] == "/" and path[1:2] != "/" and _REWRITTEN.search(path) is None:
        return path
    return request.url.path


def problem_response(error: IdempotencyError) -> Response:
    """The RFC 9457 problem details of a refusal; a 409 adds ``Retry-After``."""
    headers = {"Cache-Control": "no-store"}
    if error.status == 409:
        headers["Retry-After"] = "1"
    return Response(orjson.dumps(error.problem()), error.status, headers, PROBLEM)


def replay_response(stored: StoredResponse) -> Response:
    headers = {REPLAYED: "true"}
    if stored.content_type is not None:
        headers["Content-Type"] = stored.content_type
    if stored.location is not None:
        headers["Location"] = stored.location
    return Response(stored.body, stored.status, headers)


class IdempotentOperation:
    """``operation`` names what the key protects (e.g. ``settlement:submit``); with the caller's
    identity it forms the key's scope."""

    def __init__(self, service: IdempotencyService, *, operation: str) -> None:
        if not operation or any(char.isspace() for char in operation):
            raise ValueError("operation must be a non-empty name without whitespace")
        self.service, self.operation = service, operation

    async def run(self, request: Request, *, scope: str, handler: Handler) -> Response:
        """Execute ``handler`` once per (``scope``, key, payload) and return its response, or the
        stored response of an earlier execution, or the problem response of a refusal. ``scope``
        is the authenticated caller (its ``client_id``). ``handler`` returns a Starlette
        ``Response`` or ``(status, json_body)``; if it raises, the claim is released and the
        exception propagates, so a retry executes again."""
        payload = fingerprint(request.method, request_path(request), await request.body())
        try:
            outcome = await self.service.begin(
                f"{self.operation} {scope}", request.headers.getlist(HEADER), payload
            )
        except IdempotencyError as exc:
            return problem_response(exc)
        if not isinstance(outcome, Execute):
            return replay_response(outcome.response)
        try:
            response = await _call(handler)
            stored = _stored(response)
        except BaseException:
            with anyio.CancelScope(shield=True):  # release even when the request was cancelled
                await self.service.release(outcome.claim)
            raise
        await self.service.complete(outcome.claim, stored)
        return response

    async def run_in_transaction(
        self, request: Request, *, scope: str, handler: TransactionHandler
    ) -> Response:
        """As :meth:`run`, for a ``handler`` whose operation stores the key in its own
        transaction (:class:`~trustplane.pep.idempotency.InTransaction`, one statement instead
        of claim, operation and complete): it passes the key to that transaction, raises
        :class:`~trustplane.pep.idempotency.KeyTaken` when the transaction found the key held
        (nothing done: the holder's answer is returned), or returns a response its transaction
        did not store (a refusal decided before it), which is stored here, or replaced by the
        holder's answer if the key is held by then. A concurrent request with the same key runs
        the handler too, up to its transaction, where one of them wins the key."""
        payload = fingerprint(request.method, request_path(request), await request.body())
        try:
            pending = self.service.in_transaction(
                f"{self.operation} {scope}", request.headers.getlist(HEADER), payload
            )
            try:
                response = await handler(pending)
            except KeyTaken as taken:
                return replay_response(self.service.answer_taken(pending, taken.record).response)
            held = await self.service.settle(pending, _stored(response))
        except IdempotencyError as exc:
            return problem_response(exc)
        return response if held is None else replay_response(held.response)


async def _call(handler: Handler) -> Response:
    result = handler()
    if inspect.isawaitable(result):
        result = await result
    if isinstance(result, Response):
        return result
    status, body = result
    return Response(orjson.dumps(body), status, media_type="application/json")


def _stored(response: Response) -> StoredResponse:
    body = getattr(response, "body", None)
    if not isinstance(body, bytes):
        raise TypeError("an idempotent handler must return a Response with its body in memory")
    return StoredResponse(
        response.status_code,
        body,
        response.headers.get("content-type"),
        response.headers.get("location"),
    )
