"""The ledger's HTTP API.

Public, as transparency logs serve them: ``GET /audit/checkpoint`` (the latest signed checkpoint,
C2SP signed-note) and ``GET /audit/public-key`` (the note verifier key). Everything else (proofs,
entries, transactions, queries) needs a bearer access token issued by this server for the audience
``{issuer}/audit`` with scope ``audit:query``, checked by the one bearer guard
(``trustplane.bearer_guard``: RFC 6750 §2.1 header only; §3.1 errors). ``POST /audit/events`` (a
service's signed settlement events into the ledger, :mod:`trustplane.audit.ingest`) needs the scope
``audit:ingest`` for the same audience.

JSON shapes follow RFC 6962/9162 where they have one: ``audit_path`` for inclusion, ``consistency``
for consistency proofs, ``get-entries`` with an inclusive ``end``; hashes are standard base64.
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from fastapi import APIRouter, Request
from starlette.responses import Response

from trustplane.audit.ingest import MAX_EVENTS, EventRefused, IngestService
from trustplane.audit.ledger import MAX_ENTRIES, Ledger, LedgerError, b64, entry_record
from trustplane.audit.sink import emit_now
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.bearer_guard import BearerGuard, Protected
from trustplane.bearer_guard.http import NO_STORE, answered, authenticated, caller
from trustplane.clients.service import ClientRegistry
from trustplane.errors import (
    ErrorTable,
    InsufficientScopeError,
    InvalidRequestError,
    InvalidTokenError,
    TemporarilyUnavailableError,
)
from trustplane.limits import INGEST_BODY_BYTES, read_body
from trustplane.protocol.responses import json_response
from trustplane.protocol.tokens import VerifiedClaims
from trustplane.settings import Settings
from trustplane.storage.db import Database

log = structlog.get_logger("trustplane.audit")
SCOPE = "audit:query"
INGEST_SCOPE = "audit:ingest"
MAX_QUERY = 500
FILTERS = ("subject", "client_id", "partner", "type", "transaction_id")
ERRORS = ErrorTable(
    "audit",
    {
        LedgerError: lambda exc: InvalidRequestError(str(exc)),
        EventRefused: lambda exc: InvalidRequestError(str(exc)),
    },
)


class AuditAuth:
    """The bearer guard for the ledger API, and the record of who read the ledger."""

    def __init__(self, guard: BearerGuard, settings: Settings, db: Database) -> None:
        self._guard, self._settings, self._db = guard, settings, db
        self.route: Protected = guard.route("audit", "/audit", SCOPE)

    async def require(self, request: Request) -> VerifiedClaims:
        claims = await authenticated(self._guard, request, self.route)
        try:
            self._guard.require_scopes(claims, self.route)
        except InsufficientScopeError:
            await self._record(request, claims, "insufficient_scope")
            raise
        await self._record(request, claims, None)
        return claims

    async def _record(self, request: Request, claims: VerifiedClaims, refused: str | None) -> None:
        """Reading the ledger is itself recorded (who looked at what), durably, before answering.
        Only authenticated callers: anonymous junk must not be able to grow the ledger."""
        event = AuditEvent(
            type=AuditEventType.AUDIT_LEDGER_QUERIED,
            issuer=self._settings.issuer,
            subject=str(claims.get("sub")),
            client_id=str(claims.get("client_id")),
            audience=self.route.audience,
            jti=str(claims.get("jti")),
            decision="deny" if refused else "allow",
            reason=refused,
            service="trustplane.audit",
            payload={"path": request.url.path[:256], "query": str(request.query_params)[:512]},
        )
        await emit_now(self._db, event)


def _query(*names: str, integer: bool = True) -> dict[str, Any]:
    """OpenAPI description of query parameters parsed by hand (so bad values get RFC errors)."""
    schema = {"type": "integer", "minimum": 0} if integer else {"type": "string", "maxLength": 256}
    return {"parameters": [{"name": n, "in": "query", "schema": schema} for n in names]}


def _int(request: Request, name: str, default: int | None = None, minimum: int = 0) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        if default is None:
            raise InvalidRequestError(f"the query parameter {name} is required")
        return default
    if not raw.isdigit() or len(raw) > 18 or int(raw) < minimum:
        raise InvalidRequestError(f"{name} must be a decimal integer >= {minimum}")
    return int(raw)


def _filters(request: Request) -> dict[str, Any]:
    unknown = set(request.query_params) - {*FILTERS, "since", "until", "after", "limit"}
    if unknown:
        raise InvalidRequestError(f"unknown query parameter(s): {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {k: request.query_params[k] for k in FILTERS if k in request.query_params}
    if any(len(v) > 256 for v in out.values()):
        raise InvalidRequestError("a filter value is too long")
    for bound in ("since", "until"):
        if bound in request.query_params:
            out[bound] = _int(request, bound)
    return out


def _batch(body: bytes) -> list[Any]:
    """``{"events": ["<compact JWS>", ...]}``, at most :data:`MAX_EVENTS`."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequestError("the body must be a JSON object") from None
    events = document.get("events") if isinstance(document, dict) else None
    if not isinstance(events, list):
        raise InvalidRequestError('the body must be {"events": [<compact JWS>, ...]}')
    if len(events) > MAX_EVENTS:
        raise InvalidRequestError(f"at most {MAX_EVENTS} events per request")
    return events


class IngestEndpoint:
    """``POST /audit/events``: the guard (scope ``audit:ingest``), then the caller's registration."""

    def __init__(
        self,
        service: IngestService,
        guard: BearerGuard,
        clients: ClientRegistry,
        settings: Settings,
        db: Database,
    ) -> None:
        self._service, self._guard, self._clients = service, guard, clients
        self._settings, self._db = settings, db
        self.route: Protected = guard.route("audit_ingest", "/audit", INGEST_SCOPE)

    async def __call__(self, request: Request) -> Response:
        claims = await caller(self._guard, request, self.route)
        client = self._clients.get(str(claims.get("client_id")))
        if client is None or not client.active:  # removed since the guard looked
            raise InvalidTokenError("the access token's client is not active")
        batch = _batch(await read_body(request, INGEST_BODY_BYTES))
        try:
            results = await self._service.ingest(client, batch)
        except EventRefused as exc:
            await self._refused(claims, exc)
            raise
        recorded = sum(1 for r in results if r.status == "recorded")
        body = {
            "results": [r.as_dict() for r in results],
            "recorded": recorded,
            "duplicates": len(results) - recorded,
        }
        return json_response(body, 200, NO_STORE)

    async def _refused(self, claims: VerifiedClaims, exc: EventRefused) -> None:
        """A refused event (tampered, foreign key, wrong issuer) is itself recorded: who sent what
        kind of bad event. Only authenticated callers with the scope reach this."""
        log.warning("audit_event_refused", client_id=claims.get("client_id"), reason=str(exc))
        event = AuditEvent(
            type=AuditEventType.AUDIT_EVENTS_REFUSED,
            issuer=self._settings.issuer,
            subject=str(claims.get("sub")),
            client_id=str(claims.get("client_id")),
            audience=self.route.audience,
            jti=str(claims.get("jti")),
            decision="deny",
            reason=exc.reason_id,
            service="trustplane.audit",
            payload={"position": exc.position, "detail": str(exc)[:512]},
        )
        await emit_now(self._db, event)


def audit_router(
    ledger: Ledger,
    guard: BearerGuard,
    settings: Settings,
    db: Database,
    ingest: IngestEndpoint | None = None,
) -> APIRouter:
    router = APIRouter(prefix="/audit", tags=["audit ledger"])
    auth = AuditAuth(guard, settings, db)

    if ingest is not None:
        endpoint = ingest

        @router.post("/events", summary="Record one's own signed settlement events (audit:ingest)")
        @answered(ERRORS)
        async def ingest_events(request: Request) -> Response:
            return await endpoint(request)

    @router.get("/checkpoint", summary="The latest signed checkpoint (C2SP tlog-checkpoint)")
    @answered(ERRORS)
    async def checkpoint(request: Request) -> Response:
        latest = await ledger.checkpoint()
        if latest is None:
            raise TemporarilyUnavailableError("the log has no checkpoint yet")
        return Response(
            latest.note,
            media_type="text/plain; charset=utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    @router.get("/public-key", summary="The log's signed-note verifier key")
    @answered(ERRORS)
    async def public_key(request: Request) -> Response:
        return Response(await ledger.verifier_key() + "\n", media_type="text/plain; charset=utf-8")

    @router.get(
        "/proof/inclusion",
        summary="RFC 9162 inclusion proof (admin)",
        openapi_extra=_query("index", "tree_size"),
    )
    @answered(ERRORS)
    async def inclusion(request: Request) -> Response:
        await auth.require(request)
        index, size = _int(request, "index"), _int(request, "tree_size", minimum=1)
        path = await ledger.inclusion(index, size)
        body = {"leaf_index": index, "tree_size": size, "audit_path": [b64(h) for h in path]}
        return json_response(body, 200, NO_STORE)

    @router.get(
        "/proof/consistency",
        summary="RFC 9162 consistency proof (admin)",
        openapi_extra=_query("first", "second"),
    )
    @answered(ERRORS)
    async def consistency(request: Request) -> Response:
        await auth.require(request)
        first, second = _int(request, "first", minimum=1), _int(request, "second", minimum=1)
        path = await ledger.consistency(first, second)
        body = {"first": first, "second": second, "consistency": [b64(h) for h in path]}
        return json_response(body, 200, NO_STORE)

    @router.get(
        "/entries",
        summary="Entries start..end inclusive, at most 1000 (admin)",
        openapi_extra=_query("start", "end"),
    )
    @answered(ERRORS)
    async def entries(request: Request) -> Response:
        await auth.require(request)
        start, end = _int(request, "start"), _int(request, "end")
        if end < start:
            raise InvalidRequestError("end must be >= start")
        latest = await ledger.checkpoint()
        size = latest.size if latest else 0
        if start >= size:
            raise InvalidRequestError(f"start must be below the tree size {size}")
        found = await ledger.entries(start, min(end + 1, size, start + MAX_ENTRIES))
        return json_response({"entries": [entry_record(e) for e in found]}, 200, NO_STORE)

    @router.get("/transactions/{txn}", summary="The chain of authority of one transaction (admin)")
    @answered(ERRORS)
    async def transaction(txn: str, request: Request) -> Response:
        await auth.require(request)
        if not txn or len(txn) > 128:
            raise InvalidRequestError("the transaction id must be 1 to 128 characters")
        latest, found = await ledger.search({"transaction_id": txn}, 0, MAX_ENTRIES)
        body = {
            "transaction_id": txn,
            "tree_size": latest.size,
            "checkpoint": latest.note,
            "entries": [entry_record(p.entry, p.proof) for p in found],
        }
        return json_response(body, 200, NO_STORE)

    @router.get(
        "/events",
        summary="Filtered, paginated entries with inclusion proofs (admin)",
        openapi_extra={
            "parameters": _query(*FILTERS, integer=False)["parameters"]
            + _query("since", "until", "after", "limit")["parameters"]
        },
    )
    @answered(ERRORS)
    async def events(request: Request) -> Response:
        await auth.require(request)
        filters = _filters(request)
        after, limit = _int(request, "after", 0), _int(request, "limit", 100, minimum=1)
        latest, found = await ledger.search(filters, after, min(limit, MAX_QUERY))
        body = {
            "tree_size": latest.size,
            "checkpoint": latest.note,
            "entries": [entry_record(p.entry, p.proof) for p in found],
            "next": found[-1].entry.index + 1 if len(found) == min(limit, MAX_QUERY) else None,
        }
        return json_response(body, 200, NO_STORE)

    return router
