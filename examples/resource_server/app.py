"""An execution and settlement API protected by trustplane's PEP SDK (see README.md next to this file).

- ``POST /orders``       needs a token for ``https://execution.example/api`` with ``order:create``;
- ``POST /settlements``  needs a token for ``https://clearing.example/api`` with ``settlement:submit``.

Each request is then decided by trustplane's PDP over OpenID AuthZEN: the subject is the calling
client (member of its legal entity), the resource is the order or settlement built from this service's
reference data (accounts, instruments, executed trades), the context carries amount, currency,
instrument class, trade state and data region. The handler runs only after an allow.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, ValidationError

from trustplane.authzen.model import DecisionPoint, Entity
from trustplane.jose.jwk import PrivateKey
from trustplane.pep import (
    AuthzenClient,
    OutboundFetcher,
    OutboundPolicy,
    PolicyEnforcer,
    PrivateKeyJwt,
    RevocationCheck,
    TokenValidator,
    TrustedIssuer,
)
from trustplane.pep.http import Grant, Pep

EXECUTION = "https://execution.example/api"
CLEARING = "https://clearing.example/api"
Body = TypeVar("Body", bound=BaseModel)


@dataclass(frozen=True)
class Config:
    """Everything the example needs; ``from_env`` reads ``RS_*`` variables (see README)."""

    issuer: str
    client_id: str
    client_key: PrivateKey = field(repr=False)
    client_kid: str
    lei: str
    other_lei: str = "529900T8BM49AURSDO55"
    data_region: str = "eu"
    introspect: bool = False
    pdp_url: str | None = None
    #: Development only: let the PEP's fetcher reach a trustplane on this machine (loopback).
    allow_loopback: bool = False

    @classmethod
    def from_env(cls) -> Config:
        key = load_pem_private_key(Path(os.environ["RS_CLIENT_KEY_FILE"]).read_bytes(), None)
        return cls(
            issuer=os.environ["RS_ISSUER"],
            client_id=os.environ["RS_CLIENT_ID"],
            client_key=key,  # type: ignore[arg-type]
            client_kid=os.environ["RS_CLIENT_KID"],
            lei=os.environ["RS_LEI"],
            data_region=os.environ.get("RS_DATA_REGION", "eu"),
            introspect=os.environ.get("RS_INTROSPECT", "") == "1",
            pdp_url=os.environ.get("RS_PDP_URL") or None,
            allow_loopback=os.environ.get("RS_ALLOW_LOOPBACK", "") == "1",
        )


class OrderIn(BaseModel):
    account: str = Field(max_length=64)
    instrument: str = Field(max_length=64)
    side: str = Field(pattern="^(buy|sell)$")
    amount_minor: int = Field(gt=0, lt=2**62)
    currency: str = Field(pattern="^[A-Z]{3}$")
    venue_mic: str | None = Field(default=None, pattern="^[A-Z0-9]{4}$")
    approval_id: str | None = Field(default=None, max_length=64)


class SettlementIn(BaseModel):
    order_id: str = Field(max_length=64)


@dataclass
class Books:
    """This service's own reference data and state (a real one has a database)."""

    accounts: dict[str, str]
    instruments: dict[str, tuple[str, bool]]
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    settlements: dict[str, dict[str, Any]] = field(default_factory=dict)

    def account(self, account_id: str) -> Entity:
        owner = Entity("LegalEntity", self.accounts.get(account_id, "unknown"))
        return Entity("Account", account_id, {"owner": owner}, (owner,))

    def instrument(self, isin: str) -> Entity:
        instrument_class, restricted = self.instruments.get(isin, ("unknown", True))
        return Entity(
            "Instrument", isin, {"instrument_class": instrument_class, "restricted": restricted}
        )


def build_pdp(config: Config, validator: TokenValidator) -> DecisionPoint:
    auth = PrivateKeyJwt(config.client_id, config.client_key, config.client_kid, config.issuer)
    return AuthzenClient(
        config.pdp_url or config.issuer,
        token_endpoint=f"{config.issuer}/token",
        auth=auth,
        fetcher=validator.fetcher,
    )


def enforcer_for(config: Config, audience: str, realm: str) -> PolicyEnforcer:
    # Every call to the issuer and the PDP goes through the guarded fetcher (trustplane.outbound).
    policy = OutboundPolicy.development() if config.allow_loopback else OutboundPolicy()
    fetcher = OutboundFetcher(policy)
    revocation = None
    if config.introspect:
        auth = PrivateKeyJwt(config.client_id, config.client_key, config.client_kid, config.issuer)
        revocation = RevocationCheck(f"{config.issuer}/introspect", auth, fetcher, ttl=5.0)
    validator = TokenValidator(
        audience=audience,
        issuers=[TrustedIssuer(config.issuer)],
        fetcher=fetcher,
        revocation=revocation,
    )
    return PolicyEnforcer(validator, build_pdp(config, validator), realm=realm)


async def parsed(request: Request, model: type[Body]) -> Body:
    """The JSON body as ``model``, parsed once per request; a bad body is FastAPI's usual 422."""
    cached = getattr(request.state, "parsed_body", None)
    if isinstance(cached, model):
        return cached
    try:
        body = model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    request.state.parsed_body = body
    return body


def create_app(config: Config) -> FastAPI:
    books = Books(
        accounts={"ACC-1": config.lei, "ACC-9": config.other_lei},
        instruments={"XS0000000001": ("bond", False), "XS0000000666": ("bond", True)},
    )
    execution = Pep(enforcer_for(config, EXECUTION, "execution"))
    clearing = Pep(enforcer_for(config, CLEARING, "clearing"))
    app = FastAPI(title="example execution and settlement API")
    execution.install(app)

    async def order_resource(request: Request) -> Entity:
        body = await parsed(request, OrderIn)
        account = books.account(body.account)
        request.state.order_id = "ORD-" + secrets.token_hex(6)
        return Entity(
            "Order",
            request.state.order_id,
            {
                "owner": account.attributes["owner"],
                "account": account,
                "instrument": books.instrument(body.instrument),
            },
        )

    async def order_context(request: Request, _token: Any) -> dict[str, Any]:
        body = await parsed(request, OrderIn)
        context: dict[str, Any] = {
            "data_region": config.data_region,
            "delegation_depth": 0,
            "amount_minor": body.amount_minor,
            "currency": body.currency,
            "instrument_class": books.instrument(body.instrument).attributes["instrument_class"],
        }
        if body.venue_mic:
            context["venue_mic"] = body.venue_mic
        if body.approval_id:
            context["approval_id"] = body.approval_id
        return context

    @app.post("/orders", status_code=201)
    async def create_order(
        body: OrderIn,
        request: Request,
        grant: Grant = Depends(
            execution.require("order:create", resource=order_resource, context=order_context)
        ),
    ) -> dict[str, Any]:
        order = {
            "order_id": request.state.order_id,
            **body.model_dump(exclude_none=True),
            "state": "executed",  # the example "executes" at once
            "client_id": grant.token.client_id,
            "decision_id": grant.decision.decision_id,
        }
        books.orders[order["order_id"]] = order
        return order

    async def settlement_resource(request: Request) -> Entity:
        order = books.orders.get((await parsed(request, SettlementIn)).order_id)
        account = books.account(order["account"] if order else "unknown")
        return Entity(
            "Settlement",
            "STL-" + secrets.token_hex(6),
            {"owner": account.attributes["owner"], "account": account},
        )

    async def settlement_context(request: Request, _token: Any) -> dict[str, Any]:
        order = books.orders.get((await parsed(request, SettlementIn)).order_id)
        return {
            "data_region": config.data_region,
            "delegation_depth": 0,
            "amount_minor": order["amount_minor"] if order else 0,
            "currency": order["currency"] if order else "XXX",
            "trade_state": order["state"] if order else "unknown",
        }

    @app.post("/settlements", status_code=201)
    async def submit_settlement(
        body: SettlementIn,
        grant: Grant = Depends(
            clearing.require(
                "settlement:submit", resource=settlement_resource, context=settlement_context
            )
        ),
    ) -> dict[str, Any]:
        order = books.orders.get(body.order_id)
        if (
            order is None
        ):  # unreachable in practice: the policy refuses a trade that is not executed
            raise HTTPException(404, "no such order")
        settlement = {
            "settlement_id": "STL-" + secrets.token_hex(6),
            "order_id": body.order_id,
            "client_id": grant.token.client_id,
            "decision_id": grant.decision.decision_id,
        }
        books.settlements[settlement["settlement_id"]] = settlement
        return settlement

    @app.get("/healthz")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.state.books = books
    return app


def create_app_from_env() -> FastAPI:
    """uvicorn factory: ``uvicorn app:create_app_from_env --factory``."""
    return create_app(Config.from_env())
