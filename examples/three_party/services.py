"""The reference services of the three-party example, each a FastAPI app behind trustplane's PEP SDK,
served by uvicorn over HTTPS on its own loopback port (client certificates of the example's CA
optional at the handshake, read from the connection by the PEP):

- the ARRANGER's order intake (``POST /intake``): Alice's DPoP-bound token with a DPoP proof;
- the BROKER's execution API (``POST /orders``): accepts the arranger-issued, broker-audience token
  (trusting the arranger's issuer only), checks the order against the token's authorization_details,
  asks the BROKER's PDP over AuthZEN, executes, and emits ``trade.executed`` carrying the transaction
  envelope (who, for whom, through whom, under which mandate, by which token);
- the CLEARING broker's settlement API (``POST /settlements``): accepts the broker-issued,
  clearing-audience token (trusting the broker's issuer only), checks its provenance chain (the
  broker acting for the arranger, derived from an arranger token), asks the CLEARING's PDP over
  AuthZEN, and submits the settlement once per ``Idempotency-Key``: a retry returns the stored
  result, the same key with another body is refused.

The trade feed between them (``TradeFeed``) stands in for the event stream a deployment would use
(NATS JetStream); everything else crosses real HTTP.
"""

from __future__ import annotations

import secrets
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError

from trustplane.authzen.model import Entity
from trustplane.errors import InsufficientScopeError
from trustplane.jose.jwk import PrivateKey
from trustplane.pep import (
    AccessToken,
    AuthzenClient,
    ChainRequirement,
    DpopBinding,
    IdempotencyService,
    OutboundFetcher,
    OutboundPolicy,
    PolicyEnforcer,
    PrivateKeyJwt,
    SqlIdempotencyStore,
    TokenValidator,
    TrustedIssuer,
    client_subject,
)
from trustplane.pep.bearer import with_challenge
from trustplane.pep.http import Grant, Pep
from trustplane.pep.idempotency_http import IdempotentOperation
from trustplane.server import BoundedHttpToolsProtocol
from trustplane.storage.db import Database
from trustplane.tls.context import FAPI_TLS12_CIPHERS

DATA_REGION = "eu"
Body = TypeVar("Body", bound=BaseModel)


@dataclass(frozen=True)
class PdpAccess:
    """A resource server's registration at its own trustplane, allowed to ask the PDP over AuthZEN."""

    issuer: str
    client_id: str
    key: PrivateKey = field(repr=False)
    kid: str = "k1"

    def client(self, fetcher: OutboundFetcher) -> AuthzenClient:
        auth = PrivateKeyJwt(self.client_id, self.key, self.kid, self.issuer)
        return AuthzenClient(
            self.issuer, token_endpoint=f"{self.issuer}/token", auth=auth, fetcher=fetcher
        )


def sandbox_fetcher(ca_file: Path) -> OutboundFetcher:
    """Every party of this walk-through runs on this machine, so the PEP's guarded fetcher gets the
    development policy (loopback addresses) and trusts the example's private CA for the issuers'
    HTTPS; a deployment keeps the default (public addresses, the system's trust store)."""
    return OutboundFetcher(OutboundPolicy.development(verify=str(ca_file)))


@dataclass
class TradeFeed:
    """``trade.executed`` events by trade id, published by the broker and read by the clearing."""

    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.events[event["trade_id"]] = event

    def get(self, trade_id: str) -> dict[str, Any] | None:
        with self.lock:
            return self.events.get(trade_id)


async def parsed(request: Request, model: type[Body]) -> Body:
    """The JSON body as ``model`` for the PDP's resource and context functions, which run before
    FastAPI validates the body for the handler: a bad body is FastAPI's usual 422, not a 500."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def actor_chain(claims: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``act`` flattened, current actor first (RFC 8693 §4.1: inner ``act`` members are history)."""
    chain: list[dict[str, Any]] = []
    node = claims.get("act")
    while isinstance(node, dict) and len(chain) < 8:
        chain.append({k: v for k, v in node.items() if k != "act"})
        node = node.get("act")
    return chain


# --------------------------------------------------------------------------- arranger: order intake


class OrderIn(BaseModel):
    account: str = Field(max_length=64)
    instrument: str = Field(pattern="^[A-Z]{2}[A-Z0-9]{9}[0-9]$")
    side: str = Field(pattern="^(buy|sell)$")
    amount_minor: int = Field(gt=0, lt=2**62)
    currency: str = Field(pattern="^[A-Z]{3}$")


def order_intake_api(*, audience: str, issuer: str, pdp: PdpAccess, ca_file: Path) -> FastAPI:
    """The ARRANGER's order intake (``POST /intake``): where Alice's session at the order service
    hands in her order with her own token, which is DPoP-bound (``cnf.jkt``). With a
    ``DpopBinding`` the PEP accepts it only as ``Authorization: DPoP`` with a proof of that key for
    this request (RFC 9449 §7); as ``Bearer`` it is 401 ``invalid_token`` with a DPoP challenge.
    Her token is certificate-bound as well (the order service's tokens all are), so the request
    must also come over the order service's TLS client certificate (RFC 8705 §3)."""
    fetcher = sandbox_fetcher(ca_file)
    validator = TokenValidator(audience=audience, issuers=[TrustedIssuer(issuer)], fetcher=fetcher)
    enforcer = PolicyEnforcer(validator, pdp.client(fetcher), realm="orders", dpop=DpopBinding())
    pep = Pep(enforcer)
    app = FastAPI(title="arranger order intake")
    pep.install(app)

    @app.post("/intake", status_code=202)
    async def intake(body: OrderIn, token: AccessToken = Depends(pep.token)) -> dict[str, Any]:
        return {
            "accepted_for": token.subject,
            "mandate": token.claims.get("mandate"),
            "order": body.model_dump(),
        }

    return app


# --------------------------------------------------------------------------- broker: execution


@dataclass(frozen=True)
class Books:
    """Reference data: which legal entity owns an account; an instrument's class and restriction."""

    accounts: Mapping[str, str]
    instruments: Mapping[str, tuple[str, bool]]

    def account(self, account_id: str) -> Entity:
        owner = Entity("LegalEntity", self.accounts.get(account_id, "unknown"))
        return Entity("Account", account_id, {"owner": owner}, (owner,))

    def instrument(self, isin: str) -> Entity:
        kind, restricted = self.instruments.get(isin, ("unknown", True))
        return Entity("Instrument", isin, {"instrument_class": kind, "restricted": restricted})


def within_details(order: OrderIn, instrument_class: str, claims: Mapping[str, Any]) -> bool:
    """The order fits one ``trade_instruction`` of the token's authorization_details (RFC 9396 §2:
    the resource server enforces what the details grant): action, account, class, notional."""
    for detail in claims.get("authorization_details") or ():
        if not isinstance(detail, dict) or detail.get("type") != "trade_instruction":
            continue
        limit = detail.get("max_notional") or {}
        if (
            "create_order" in detail.get("actions", ())
            and order.account in detail.get("accounts", ())
            and instrument_class in detail.get("instrument_classes", ())
            and limit.get("currency") == order.currency
            and order.amount_minor <= limit.get("amount", -1)
        ):
            return True
    return False


def execution_api(
    *,
    audience: str,
    trusted_issuer: str,
    pdp: PdpAccess,
    books: Books,
    feed: TradeFeed,
    ca_file: Path,
) -> FastAPI:
    fetcher = sandbox_fetcher(ca_file)
    validator = TokenValidator(
        audience=audience, issuers=[TrustedIssuer(trusted_issuer)], fetcher=fetcher
    )
    # ``Pep``'s default certificate source is the TLS connection (the ASGI ``tls`` extension of
    # ``Served``'s protocol): a token with ``cnf.x5t#S256`` is accepted only over a connection
    # authenticated with that certificate (RFC 8705 §3)
    pep = Pep(PolicyEnforcer(validator, pdp.client(fetcher), realm="execution"))
    app = FastAPI(title="broker execution API")
    pep.install(app)

    async def order_of(request: Request) -> Entity:
        body = await parsed(request, OrderIn)
        account = books.account(body.account)
        owner = account.attributes["owner"]
        return Entity(
            "Order",
            "ORD-" + secrets.token_hex(6),
            {"owner": owner, "account": account, "instrument": books.instrument(body.instrument)},
        )

    async def context_of(request: Request, token: AccessToken) -> dict[str, Any]:
        """The PDP's context; first, the order must fit the token's authorization_details (so an
        order outside them never reaches the PDP and leaves no allow in its ledger)."""
        body = await parsed(request, OrderIn)
        instrument_class = books.instrument(body.instrument).attributes["instrument_class"]
        if not within_details(body, instrument_class, token.claims):
            raise with_challenge(
                InsufficientScopeError("the order is outside the token's authorization_details"),
                "execution",
                "order:create",
            )
        return {
            "data_region": DATA_REGION,
            "delegation_depth": len(actor_chain(token.claims)),
            "amount_minor": body.amount_minor,
            "currency": body.currency,
            "instrument_class": books.instrument(body.instrument).attributes["instrument_class"],
        }

    @app.post("/orders", status_code=201)
    async def create_order(
        body: OrderIn,
        grant: Grant = Depends(pep.require("order:create", resource=order_of, context=context_of)),
    ) -> dict[str, Any]:
        trade_id = "TRD-" + secrets.token_hex(6)
        event = {
            "type": "trade.executed",
            "trade_id": trade_id,
            "state": "executed",
            "order": body.model_dump(),
            "executed_at": int(time.time()),
            "envelope": envelope(grant),
        }
        feed.publish(event)  # a deployment publishes to its event stream
        return event

    @app.get("/healthz")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def envelope(grant: Grant) -> dict[str, Any]:
    """The transaction envelope that travels with the trade: the identity context of the request
    (after draft-ietf-oauth-transaction-tokens' ``txn``/``sub``/``rctx``), and the decision."""
    claims = grant.token.claims
    return {
        "txn": claims.get("txn"),
        "sub": grant.token.subject,
        "iss": grant.token.issuer,
        "client_id": grant.token.client_id,
        "act": actor_chain(claims),
        "mandate": claims.get("mandate"),
        "authorization_details": claims.get("authorization_details"),
        "token": {"iss": grant.token.issuer, "jti": grant.token.jti},
        "decision_id": grant.decision.decision_id,
    }


# --------------------------------------------------------------------------- clearing: settlement


class SettlementIn(BaseModel):
    trade_id: str = Field(max_length=64)
    amount_minor: int = Field(gt=0, lt=2**62)
    currency: str = Field(pattern="^[A-Z]{3}$")
    settlement_date: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True)
class Membership:
    """The clearing broker's view of its member: the issuer it trusts for the member's tokens, the
    member's legal entity and clearing account, and the upstream issuer the member acts for."""

    issuer: str
    lei: str
    account: str
    upstream_issuer: str


def chain_rule(member: Membership) -> ChainRequirement:
    """The clearing side's rule for the chain of authority, beyond what the signature proves: the
    member acts (outermost ``act``) for the upstream arranger's actor (inner ``act``); the token
    derives (``prv``) from an upstream token that itself derives from another upstream token (the
    user's), under a mandate reference; the origin is kept, not flattened; a transaction id."""
    upstream = member.upstream_issuer
    return ChainRequirement(
        actors=(member.issuer, upstream),
        provenance=(upstream, upstream),
        origin=upstream,
        mandate=True,
        transaction=True,
    )


def settlement_api(
    *,
    audience: str,
    member: Membership,
    pdp: PdpAccess,
    feed: TradeFeed,
    idempotency_db: str,
    ca_file: Path,
) -> FastAPI:
    fetcher = sandbox_fetcher(ca_file)
    validator = TokenValidator(
        audience=audience, issuers=[TrustedIssuer(member.issuer)], fetcher=fetcher
    )

    def member_subject(token: AccessToken) -> Entity:
        """The PDP's subject is the member (the current actor), in the member's legal entity."""
        subject = client_subject(token)
        legal_entity = Entity("LegalEntity", member.lei)
        attributes = {**subject.attributes, "legal_entity": legal_entity}
        return Entity("Client", subject.id, attributes, (legal_entity,))

    enforcer = PolicyEnforcer(
        validator,
        pdp.client(fetcher),
        realm="clearing",
        subject=member_subject,
        chain=chain_rule(member),
    )
    pep = Pep(enforcer)
    store = SqlIdempotencyStore(Database(idempotency_db))
    submit_once = IdempotentOperation(IdempotencyService(store), operation="settlement:submit")
    settlements: dict[str, dict[str, Any]] = {}
    app = FastAPI(title="clearing settlement API", on_startup=[store.create_schema])
    pep.install(app)

    def trade_for(body: SettlementIn, token: AccessToken) -> dict[str, Any] | None:
        """The executed trade this settlement is for, in the same transaction as the token."""
        trade = feed.get(body.trade_id)
        if trade is None or trade["envelope"]["txn"] != token.claims.get("txn"):
            return None
        return trade

    async def settlement_of(request: Request) -> Entity:
        owner = Entity("LegalEntity", member.lei)
        account = Entity("Account", member.account, {"owner": owner}, (owner,))
        attributes = {"owner": owner, "account": account}
        return Entity("Settlement", "STL-" + secrets.token_hex(6), attributes)

    async def context_of(request: Request, token: AccessToken) -> dict[str, Any]:
        body = await parsed(request, SettlementIn)
        trade = trade_for(body, token)
        return {
            "data_region": DATA_REGION,
            "delegation_depth": len(actor_chain(token.claims)),
            "amount_minor": body.amount_minor,
            "currency": body.currency,
            "trade_state": trade["state"] if trade else "unknown",
        }

    @app.post("/settlements", status_code=201)
    async def submit(
        body: SettlementIn,
        request: Request,
        grant: Grant = Depends(
            pep.require("settlement:submit", resource=settlement_of, context=context_of)
        ),
    ) -> Response:
        def settle() -> tuple[int, dict[str, Any]]:
            # the policy refused a trade that is not executed; checked again where it is used
            if trade_for(body, grant.token) is None:
                return 404, {"detail": "no executed trade with this id in this transaction"}
            settlement = {
                "settlement_id": "STL-" + secrets.token_hex(6),
                "trade_id": body.trade_id,
                "txn": grant.token.claims["txn"],
                "amount_minor": body.amount_minor,
                "currency": body.currency,
                "settlement_date": body.settlement_date,
                "submitted_by": grant.token.client_id,
                "on_behalf_of": grant.token.subject,
                "act": actor_chain(grant.token.claims),
                "decision_id": grant.decision.decision_id,
            }
            settlements[settlement["settlement_id"]] = settlement
            return 201, settlement

        return await submit_once.run(request, scope=grant.token.client_id, handler=settle)

    @app.get("/settlements")
    async def listed() -> list[dict[str, Any]]:
        return list(settlements.values())

    @app.get("/healthz")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


# --------------------------------------------------------------------------- serving


@dataclass(frozen=True)
class ServerTls:
    """A service's TLS listener: its certificate and key, and the CA its clients' certificates must
    chain to. A client certificate is optional at the handshake (a request without one is refused
    by the PEP when its token is certificate-bound) and verified against ``client_ca`` when sent."""

    certificate: Path
    key: Path
    client_ca: Path


class Served:
    """A FastAPI app served by uvicorn over HTTPS on a loopback port, in a thread of this process.

    uvicorn does not give applications the ASGI ``tls`` extension; trustplane's server protocol
    (``BoundedHttpToolsProtocol``, the one ``trustplane serve`` uses) adds it, so the PEP reads the
    verified client certificate of the connection from ``scope["extensions"]["tls"]``."""

    def __init__(self, app: FastAPI, port: int, tls: ServerTls) -> None:
        self.url = f"https://127.0.0.1:{port}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            http=BoundedHttpToolsProtocol,
            ssl_certfile=tls.certificate,
            ssl_keyfile=tls.key,
            ssl_ca_certs=str(tls.client_ca),
            ssl_cert_reqs=ssl.CERT_OPTIONAL,
            ssl_ciphers=":".join(FAPI_TLS12_CIPHERS),
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self, timeout: float = 20.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"{self.url} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
