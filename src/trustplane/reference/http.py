"""The reference services over HTTP (FastAPI), thin: authenticate with the PEP SDK, require the
operation's scope, bind the caller's PDP, run the service call once per ``Idempotency-Key``.

==========================================  =====================  ===============================
route                                       scope                  transition / answer
==========================================  =====================  ===============================
POST /orders                                order:create           create (201, the trade)
POST /trades/{id}/execute                   trade:execute          execute
POST /trades/{id}/allocation                allocation:propose     propose_allocation
POST /trades/{id}/allocation/approve        allocation:approve     approve_allocation (four eyes)
POST /trades/{id}/settlement                settlement:submit      submit_settlement (entitlement)
POST /trades/{id}/settlement/amend          settlement:submit      amend#n (entitlement)
POST /trades/{id}/settlement/cancel         settlement:cancel      cancel_settlement
POST /trades/{id}/settlement/confirm        settlement:confirm     settle | fail
GET  /trades/{id}                           report:view            the trade and its transitions
GET  /exceptions                            exception:view         open / escalated / resolved
POST /exceptions/{id}/resolve               exception:resolve      reconsent | cancel | escalate
GET  /events?after=<seq>&wait=<s>           event:subscribe        long-poll of the events
GET  /jwks                                  (public)               the event signing keys
==========================================  =====================  ===============================

Refusals are RFC 9457 problems (``type`` ends with the code): 400 ``invalid-request`` (also a
NUL in any string of a body, which PostgreSQL cannot store), 415 ``unsupported-media-type`` (a
body not declared JSON), 403
``denied`` / ``four-eyes`` / ``settlement-exception``, 404 ``not-found`` (also a path that is no
route), 405 ``method-not-allowed`` (with ``Allow``), 409 ``duplicate-transition`` (names the transition that happened: when, by whom, which key) /
``out-of-order`` / ``already-resolved``, 503 ``unavailable``. Token refusals are the PEP's RFC 6750
answers.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from trustplane.authzen.model import Decision, Entity
from trustplane.errors import InsufficientScopeError, InvalidTokenError
from trustplane.limits import UnstorableText
from trustplane.pep import AccessToken, client_subject, parse_key
from trustplane.pep.bearer import with_challenge
from trustplane.pep.enforcer import transaction_of
from trustplane.pep.http import Pep
from trustplane.pep.http import Refused as TokenRefused
from trustplane.pep.idempotency import IdempotencyService, StoredResponse
from trustplane.pep.idempotency_http import HEADER, IdempotentOperation
from trustplane.pep.idempotency_store import SqlIdempotencyStore
from trustplane.reference import machine
from trustplane.reference.services import Caller, Refused, TradeServices
from trustplane.reference.store import DuplicateTransition, Key, KeyedAnswer, NotFound, OutOfOrder

PROBLEM_BASE = "https://trustplane.dev/problems/reference"
MAX_TIMEOUT = 30.0
SubjectMapper = Callable[[AccessToken], Entity]
Endpoint = Callable[[Request], Awaitable[Response]]


def problem(status: int, code: str, detail: str, **extra: Any) -> Response:
    body = {"type": f"{PROBLEM_BASE}/{code}", "title": code, "status": status, "detail": detail}
    body.update(extra)
    headers = {"Cache-Control": "no-store"}
    if status == 503:
        headers["Retry-After"] = "1"
    return Response(orjson.dumps(body), status, headers, "application/problem+json")


def refusal(exc: Exception) -> Response:
    if isinstance(exc, DuplicateTransition):
        record = exc.record
        return problem(
            409,
            "duplicate-transition",
            f"{record.transition} already happened to trade {record.trade_id}",
            transition=record.as_dict(),
        )
    if isinstance(exc, OutOfOrder):
        return problem(
            409,
            "out-of-order",
            str(exc),
            state=exc.state,
            transition=exc.transition,
            expected=exc.expected,
        )
    if isinstance(exc, NotFound):
        return problem(404, "not-found", f"no such trade or exception: {exc}")
    assert isinstance(exc, Refused)
    return problem(exc.status, exc.code, exc.detail, **exc.extra)


def _json(status: int, body: Any) -> Response:
    return Response(orjson.dumps(body), status, {"Cache-Control": "no-store"}, "application/json")


#: The service whose store keeps each operation's Idempotency-Keys (the route's owner).
OPERATION_SERVICE = {
    "order:create": machine.EXECUTION,
    "trade:execute": machine.EXECUTION,
    "allocation:propose": machine.ALLOCATION,
    "allocation:approve": machine.ALLOCATION,
}


def build_app(
    services: TradeServices,
    pep: Pep,
    idempotency: IdempotencyService | Mapping[str, IdempotencyService],
    *,
    subject: SubjectMapper = client_subject,
    title: str = "trustplane reference services",
) -> FastAPI:
    """``idempotency``: one service for every route, or one per service (``execution``,
    ``allocation``, ``settlement``: each route's keys in its owner's store)."""
    app = FastAPI(title=title, openapi_url=None, docs_url=None, redoc_url=None)
    pep.install(app)
    install_routing_problems(app)
    operations: dict[str, tuple[IdempotentOperation, bool]] = {}

    def operation(name: str) -> tuple[IdempotentOperation, bool]:
        """The operation's keys, and whether they are stored in its transition's own statement
        (the owner's store on PostgreSQL, the keys in its database: ``KeyedAnswer``)."""
        if name not in operations:
            owner = OPERATION_SERVICE.get(name, machine.SETTLEMENT)
            keys = (
                idempotency if isinstance(idempotency, IdempotencyService) else idempotency[owner]
            )
            store = keys.store
            in_transaction = isinstance(store, SqlIdempotencyStore) and store.in_transaction_on(
                services.stores.by_service()[owner].db
            )
            operations[name] = (IdempotentOperation(keys, operation=name), in_transaction)
        return operations[name]

    async def caller_of(request: Request, scope: str) -> tuple[AccessToken, Caller]:
        token = await pep.token(request)
        if scope not in token.scopes:
            error = InsufficientScopeError(f"the token lacks scope {scope}")
            raise TokenRefused(with_challenge(error, pep.enforcer.realm, scope))
        if _has_nul([token.claims.get(name) for name in STORED_CLAIMS]):
            refused = InvalidTokenError("the token's sub, txn, act or mandate holds a NUL")
            raise TokenRefused(with_challenge(refused, pep.enforcer.realm))
        pdp, correlation = pep.enforcer.pdp, request.headers.get("x-request-id")

        async def decide(action: str, resource: Entity, context: Mapping[str, Any]) -> Decision:
            return await pdp.decide(
                subject(token),
                action,
                resource,
                context,
                correlation_id=correlation,
                transaction_id=transaction_of(token),
            )

        return token, Caller(token.subject or token.client_id, token.claims, token.token, decide)

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            raw = await request.body()
        except UnstorableText as exc:  # the entry's check as the body is read (trustplane.limits)
            raise Refused(400, "invalid-request", exc.description) from None
        if not raw:
            return {}
        return json_object(raw, request.headers.get("content-type"))

    async def transition(
        request: Request,
        scope: str,
        call: Callable[[Caller, dict[str, Any], Key], Awaitable[Any]],
        status: int = 200,
        name: str | None = None,
    ) -> Response:
        """``name``: the operation the Idempotency-Key is scoped to (default: the scope)."""
        token, caller = await caller_of(request, scope)
        try:  # read here, once: the Idempotency-Key's fingerprint reads it too
            await request.body()
        except UnstorableText as exc:  # the entry's check as the body is read (trustplane.limits)
            return refusal(Refused(400, "invalid-request", exc.description))

        async def answer(key: Key) -> Response:
            try:
                result = await call(caller, await body_of(request), key)
            except (Refused, DuplicateTransition, OutOfOrder, NotFound) as exc:
                if isinstance(exc, Refused) and exc.status >= 500:
                    raise _Unavailable(exc) from None
                return refusal(exc)
            return _json(status, result.as_dict())

        def render(result: Any) -> StoredResponse:
            return StoredResponse(status, orjson.dumps(result.as_dict()), "application/json")

        idem, in_transaction = operation(name or scope)
        try:
            if in_transaction:
                return await idem.run_in_transaction(
                    request,
                    scope=token.client_id,
                    handler=lambda pending: answer(KeyedAnswer(pending, render)),
                )
            return await idem.run(
                request,
                scope=token.client_id,
                handler=lambda: answer(parse_key(request.headers[HEADER])),
            )
        except _Unavailable as exc:
            return refusal(exc.refused)

    def post(path: str) -> Callable[[Endpoint], Endpoint]:
        """A transition's route as Starlette's own (``Request`` in, ``Response`` out): FastAPI's
        parameter solving and its extra wrapping, a sizeable part of a step's framework CPU, are
        not used by these handlers (they read the body once themselves)."""

        def register(endpoint: Endpoint) -> Endpoint:
            app.add_route(path, endpoint, methods=["POST"], include_in_schema=False)
            return endpoint

        return register

    @post("/orders")
    async def create_order(request: Request) -> Response:
        return await transition(
            request,
            "order:create",
            lambda c, b, k: services.create_order(c, b, k),
            201,
        )

    @post("/trades/{trade_id}/execute")
    async def execute(request: Request) -> Response:
        trade_id = request.path_params["trade_id"]
        return await transition(
            request, "trade:execute", lambda c, b, k: services.execute(c, trade_id, k)
        )

    @post("/trades/{trade_id}/allocation")
    async def propose(request: Request) -> Response:
        trade_id = request.path_params["trade_id"]
        return await transition(
            request,
            "allocation:propose",
            lambda c, b, k: services.propose_allocation(c, trade_id, b.get("allocations"), k),
        )

    @post("/trades/{trade_id}/allocation/approve")
    async def approve(request: Request) -> Response:
        trade_id = request.path_params["trade_id"]
        return await transition(
            request,
            "allocation:approve",
            lambda c, b, k: services.approve_allocation(c, trade_id, k),
        )

    @post("/trades/{trade_id}/settlement")
    async def submit(request: Request) -> Response:
        trade_id = request.path_params["trade_id"]
        return await transition(
            request,
            "settlement:submit",
            lambda c, b, k: services.submit_settlement(c, trade_id, b.get("instructions"), k),
        )

    @post("/trades/{trade_id}/settlement/amend")
    async def amend(request: Request) -> Response:
        trade_id = request.path_params["trade_id"]
        return await transition(
            request,
            "settlement:submit",
            lambda c, b, k: services.amend_settlement(c, trade_id, b.get("instructions"), k),
            name="settlement:amend",
        )

    @post("/trades/{trade_id}/settlement/cancel")
    async def cancel(request: Request) -> Response:
        trade_id = request.path_params["trade_id"]
        return await transition(
            request,
            "settlement:cancel",
            lambda c, b, k: services.cancel_settlement(c, trade_id, k),
        )

    @post("/trades/{trade_id}/settlement/confirm")
    async def confirm(request: Request) -> Response:
        trade_id = request.path_params["trade_id"]
        return await transition(
            request,
            "settlement:confirm",
            lambda c, b, k: services.confirm_settlement(c, trade_id, b.get("outcome"), k),
        )

    @app.get("/trades/{trade_id}")
    async def report(request: Request, trade_id: str) -> Response:
        await caller_of(request, "report:view")
        try:
            return _json(200, await services.report(trade_id))
        except Refused as exc:
            return refusal(exc)

    @app.get("/exceptions")
    async def list_exceptions(request: Request, status: str | None = None) -> Response:
        await caller_of(request, "exception:view")
        if status not in (None, "open", "escalated", "resolved"):
            return problem(400, "invalid-request", "status is open, escalated or resolved")
        found = await services.list_exceptions(status)
        return _json(200, {"exceptions": [e.as_dict() for e in found]})

    @app.post("/exceptions/{exception_id}/resolve")
    async def resolve(request: Request, exception_id: str) -> Response:
        _token, caller = await caller_of(request, "exception:resolve")
        try:
            body = await body_of(request)
            note = body.get("note", "")
            if not isinstance(note, str) or len(note) > 1000:
                raise Refused(400, "invalid-request", "note must be a string (max 1000)")
            record = await services.resolve_exception(
                caller, exception_id, str(body.get("action")), note
            )
        except (Refused, DuplicateTransition, OutOfOrder, NotFound) as exc:
            return refusal(exc)
        return _json(200, record.as_dict())

    @app.get("/events")
    async def events(request: Request) -> Response:
        await caller_of(request, "event:subscribe")
        try:
            after, wait = events_query(request.query_params)
            found = await services.events(after, wait)
        except Refused as exc:
            return refusal(exc)
        return _json(
            200,
            {
                "events": [
                    {"seq": e.seq, "id": e.event_id, "type": e.type, "jws": e.jws} for e in found
                ],
                "next": found[-1].seq if found else after,
            },
        )

    @app.get("/jwks")
    async def jwks() -> Response:
        return Response(
            orjson.dumps(services.stores.jwks()),
            200,
            {"Cache-Control": "max-age=300"},
            "application/jwk-set+json",
        )

    return app


async def _routing_problem(_request: Request, exc: Exception) -> Response:
    """The router's own refusals in the API's problem shape (FastAPI's default is
    ``{"detail": ...}``): 404 ``not-found`` for a path that is no route, 405
    ``method-not-allowed`` with the route's ``Allow`` (RFC 9110 §15.5.6), any other status it
    raises as ``invalid-request``."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return problem(404, "not-found", "no such resource")
    if exc.status_code == 405:
        response = problem(405, "method-not-allowed", "the method is not allowed here")
        response.headers["Allow"] = (exc.headers or {}).get("Allow", "")
        return response
    return problem(exc.status_code, "invalid-request", str(exc.detail))


async def _invalid_parameters(_request: Request, exc: Exception) -> Response:
    """A parameter FastAPI could not read (its default: 422 ``{"detail": [...]}``): 400
    ``invalid-request``, like every other bad input of the API."""
    assert isinstance(exc, RequestValidationError)
    names = sorted({".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()})
    return problem(400, "invalid-request", f"invalid parameter(s): {', '.join(names)}")


def install_routing_problems(app: FastAPI) -> None:
    """Unknown paths, wrong methods and unreadable parameters answered as RFC 9457 problems."""
    app.add_exception_handler(HTTPException, _routing_problem)
    app.add_exception_handler(RequestValidationError, _invalid_parameters)


def json_object(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """A request body: declared JSON (RFC 9110 §15.5.16: anything else is 415), a JSON object,
    without NUL in any string (PostgreSQL's text and jsonb cannot hold one: refused here, 400,
    rather than by the database, 500)."""
    media = (content_type or "").partition(";")[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        raise Refused(415, "unsupported-media-type", "the body must be application/json")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Refused(400, "invalid-request", "the body is not JSON") from None
    if not isinstance(value, dict):
        raise Refused(400, "invalid-request", "the body must be a JSON object")
    if b"\\u0000" in raw and _has_nul(value):  # the only way JSON carries a NUL
        raise Refused(400, "invalid-request", "the body's strings must not contain NUL (U+0000)")
    return value


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


#: The claims of a caller's token that the stores keep (the actor, the envelope, what the trade
#: rests on): a NUL in one cannot be stored on PostgreSQL, so such a token is refused (401).
STORED_CLAIMS = ("sub", "client_id", "iss", "jti", "txn", "act", "mandate", "acting")
#: ``GET /events``' parameters; a cursor is a decimal ``seq`` this server gave out (<= 18 digits).
EVENTS_PARAMETERS = frozenset({"after", "wait"})


def events_query(params: Mapping[str, str]) -> tuple[int, float]:
    """``after`` and ``wait`` of ``GET /events``, or 400 ``invalid-request`` (an unknown
    parameter, a cursor that is not a decimal integer, a wait outside 0..30 s)."""
    unknown = set(params) - EVENTS_PARAMETERS
    if unknown:
        raise Refused(400, "invalid-request", f"unknown parameter(s): {', '.join(sorted(unknown))}")
    raw_after, raw_wait = params.get("after", "0"), params.get("wait", "0")
    if not (raw_after.isascii() and raw_after.isdigit() and len(raw_after) <= 18):
        raise Refused(400, "invalid-request", "after must be a cursor (next) this server gave out")
    try:
        wait = float(raw_wait)
    except ValueError:
        wait = math.nan
    if not 0 <= wait <= MAX_TIMEOUT:  # NaN fails both comparisons
        raise Refused(400, "invalid-request", f"wait must be a number from 0 to {MAX_TIMEOUT:g}")
    return int(raw_after), wait


class _Unavailable(Exception):
    """A 5xx from the service: its claim on the Idempotency-Key is released, so a retry runs."""

    def __init__(self, refused: Refused) -> None:
        super().__init__(refused.detail)
        self.refused = refused
