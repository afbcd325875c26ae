"""FastAPI/Starlette integration of the PEP: a dependency per protected operation.

    pep = Pep(enforcer)
    pep.install(app)   # renders refusals as RFC 6750 answers; bounds every request (413/431)

    @app.post("/orders")
    async def create_order(
        body: OrderIn,
        grant: Grant = Depends(pep.require("order:create", resource=order_of, context=context_of)),
    ): ...

``resource`` and ``context`` are functions of the request (sync or async); they may read the JSON
body (Starlette caches it, so FastAPI still parses it for the handler). The handler runs only after
the token validated and the PDP allowed the action on that resource.

Bounded requests (BRIEF, "Trust boundaries"): the PEP reads the body of a form-encoded request to
refuse an ``access_token`` there (RFC 6750 §2.2), and the resource and context functions may read
it too, all before the token is checked. So ``install`` also puts :class:`trustplane.limits.
BoundedRequests` in front of the app: a ``Content-Length`` over the cap is answered 413 before a
byte is read, a streamed body is cut at the cap, too many or too large headers are 431. The caps are
the ``limits`` given to :class:`Pep` (``RequestLimits()``: 64 KiB bodies, 100 headers, 32 KiB of
headers); ``limits=None`` leaves bounding to the application (a server or proxy of its own).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from trustplane.authzen.model import Decision, Entity
from trustplane.errors import OAuth2Error, wire_description
from trustplane.limits import BoundedRequests, RequestLimits
from trustplane.pep import metrics
from trustplane.pep.bearer import with_challenge
from trustplane.pep.binding import check_certificate_binding
from trustplane.pep.dpop import DpopBinding, DpopRequest
from trustplane.pep.enforcer import PolicyEnforcer
from trustplane.pep.keys import ConfigurationError
from trustplane.pep.txn_token import TXN_TOKEN_HEADER, TxnToken, TxnTokenValidator, bad_txn_token
from trustplane.pep.validator import AccessToken
from trustplane.tls import CertificateSource, client_certificate

ResourceFn = Callable[[Request], Entity | Awaitable[Entity]]
ContextFn = Callable[[Request, AccessToken], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]
FORM = "application/x-www-form-urlencoded"
_TXN_TOKEN_KEY = TXN_TOKEN_HEADER.encode("latin-1")


@dataclass(frozen=True, slots=True)
class Grant:
    """What a protected handler receives: the validated token and the PDP's allow decision."""

    token: AccessToken
    decision: Decision
    #: The validated ``Txn-Token`` of the request, if it carried one (its ``tctx`` went to the PDP).
    txn_token: TxnToken | None = None


class Refused(Exception):
    def __init__(self, error: OAuth2Error) -> None:
        super().__init__(error.error)
        self.error = error


def refusal_response(error: OAuth2Error) -> Response:
    """The refusal's JSON body; its ``error_description`` within RFC 6750 §3's characters (it may
    quote a scope, an action or a Txn-Token's claim), like the challenge's."""
    headers = {"Cache-Control": "no-store", **error.headers}
    body = error.body()
    if "error_description" in body:
        body["error_description"] = wire_description(body["error_description"])
    return Response(orjson.dumps(body), error.status_code, headers, "application/json")


async def _render(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refused)
    return refusal_response(exc.error)


async def _resolve(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class Pep:
    def __init__(
        self,
        enforcer: PolicyEnforcer,
        *,
        correlation_header: str = "x-request-id",
        limits: RequestLimits | None = RequestLimits(),
        certificates: CertificateSource = CertificateSource(),
        txn_tokens: TxnTokenValidator | None = None,
    ):
        self.enforcer = enforcer
        self._correlation = correlation_header
        self.limits = limits
        #: RFC 8705 §3: where a request's client certificate comes from (the TLS connection by
        #: default; a trusted proxy's header with ``CertificateSource.build(header, proxies)``).
        self.certificates = certificates
        #: Transaction Tokens (:mod:`trustplane.pep.txn_token`): a ``Txn-Token`` header, when a
        #: request carries one, is validated beside the access token and its ``tctx`` goes to the
        #: PDP; ``require(..., txn_token=True)`` makes it mandatory for a route.
        self.txn_tokens = txn_tokens

    def install(self, app: Starlette) -> None:
        """Register the refusal renderer on a FastAPI or Starlette app and bound its requests'
        headers and bodies (``limits``; see the module doc). Call it before the app starts."""
        app.add_exception_handler(Refused, _render)
        if self.limits is not None:
            app.add_middleware(BoundedRequests, limits=self.limits)

    async def token(self, request: Request) -> AccessToken:
        """Dependency: only the validated token (for handlers that decide nothing themselves)."""
        raw = request.headers.raw
        authorization = header_values(raw, b"authorization")
        try:
            token = await self.enforcer.authenticate(
                authorization[0] if authorization else None,
                header_count=len(authorization),
                token_elsewhere=await _token_elsewhere(request, raw),
                dpop=_dpop_request(self.enforcer.dpop, request),
            )
        except OAuth2Error as exc:
            raise Refused(exc) from None
        # RFC 8705 §3 (trustplane.pep.binding). The certificate is looked for only when it can
        # matter: a token with ``cnf``, or a proxy header whose presence from an untrusted peer is
        # counted. Otherwise the check would return without reading it.
        if "cnf" in token.claims or self.certificates.header:
            try:
                certificate = client_certificate(request.scope, self.certificates)
                check_certificate_binding(token, certificate)
            except OAuth2Error as exc:
                raise Refused(with_challenge(exc, self.enforcer.realm)) from None
        return token

    def require(
        self,
        action: str,
        *,
        resource: ResourceFn,
        context: ContextFn | None = None,
        scope: str | None = None,
        txn_token: bool = False,
    ) -> Callable[[Request], Awaitable[Grant]]:
        """Dependency: the token must carry ``scope`` (default: the action, which in trustplane's
        vocabulary is the scope name) and the PDP must allow ``action`` on ``resource``.
        ``txn_token``: the request must also carry a valid ``Txn-Token`` header; the decision
        context then has its ``tctx``."""
        required_scope = scope if scope is not None else action
        if txn_token and self.txn_tokens is None:
            raise ConfigurationError("txn_token=True needs Pep(txn_tokens=TxnTokenValidator(...))")

        async def dependency(request: Request) -> Grant:
            token = await self.token(request)
            txn = await self.txn_token(request, token, required=txn_token)
            try:
                target = await _resolve(resource(request))
                facts = await _resolve(context(request, token)) if context else {}
                if txn is not None:
                    facts = {**facts, "tctx": txn.tctx}
                decision = await self.enforcer.authorize(
                    token,
                    action,
                    target,
                    facts,
                    scope=required_scope,
                    correlation_id=request.headers.get(self._correlation),
                )
            except OAuth2Error as exc:
                raise Refused(exc) from None
            return Grant(token, decision, txn)

        return dependency

    async def txn_token(
        self, request: Request, token: AccessToken, *, required: bool = False
    ) -> TxnToken | None:
        """The request's validated ``Txn-Token`` (one header at most), None when it has none and
        none is ``required``; a missing required or a bad one is 401 ``invalid_token``."""
        values = header_values(request.headers.raw, _TXN_TOKEN_KEY)
        try:
            if not values:
                if required:
                    raise bad_txn_token("this operation requires a Txn-Token header", "missing")
                return None
            if len(values) > 1:
                raise bad_txn_token("more than one Txn-Token header", "malformed")
            if self.txn_tokens is None:
                raise bad_txn_token("this resource server does not accept Txn-Tokens", "disabled")
            return await self.txn_tokens.validate(values[0].strip(), token)
        except OAuth2Error as exc:
            metrics.PEP_REFUSED.labels(error=exc.error, reason=exc.debug[:64]).inc()
            raise Refused(with_challenge(exc, self.enforcer.realm)) from None


def _dpop_request(binding: DpopBinding | None, request: Request) -> DpopRequest | None:
    """The request as a DPoP proof must name it: the raw path as received (not the decoded one),
    under the app's ``root_path`` when a proxy stripped that prefix."""
    if binding is None:
        return None
    raw_path = (request.scope.get("raw_path") or request.url.path.encode()).decode("latin-1")
    root = request.scope.get("root_path", "")
    if root and not raw_path.startswith(root):
        raw_path = root + raw_path
    url = binding.request_url(request.url.scheme, request.url.netloc, raw_path)
    return DpopRequest(request.method, url, tuple(request.headers.getlist("dpop")))


def header_values(raw: list[tuple[bytes, bytes]], name: bytes) -> list[str]:
    """The values of header ``name`` (lower case, as ASGI servers give names), as Starlette's
    ``Headers.getlist`` reads them, in one pass over the raw list (``get`` and ``getlist`` of the
    same name were two)."""
    return [value.decode("latin-1") for key, value in raw if key == name]


async def _token_elsewhere(request: Request, raw: list[tuple[bytes, bytes]]) -> bool:
    """RFC 6750 §2.2/§2.3 methods, which this PEP refuses: an ``access_token`` query parameter, or
    an ``access_token`` field in a form-encoded body."""
    query: bytes = request.scope.get("query_string", b"")
    # parsed only if it could name the field: spelled out, or percent-encoded (``access%5Ftoken``)
    if (
        query
        and (b"access_token" in query or b"%" in query)
        and "access_token" in request.query_params
    ):
        return True
    content_type = next((value for key, value in raw if key == b"content-type"), b"")
    if content_type.decode("latin-1").split(";")[0].strip().lower() != FORM:
        return False
    body = await request.body()
    return b"access_token" in body and any(
        key == "access_token" for key, _ in parse_qsl(body.decode("latin-1"))
    )
