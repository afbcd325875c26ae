"""A resource server for EXECUTION protected by the PEP SDK (DPoP and certificate binding checks),
served by the interop tests as its own uvicorn process: ``uvicorn tests.e2e.interop.pep_app:from_env
--factory``. The JWKS comes from the live issuer (``TP_ISSUER``) over real HTTP through the guarded
fetcher."""

from __future__ import annotations

import os
from typing import Any

from fastapi import Depends, FastAPI

from tests.conftest import EXECUTION
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.pep import DpopBinding, PolicyEnforcer, TokenValidator, TrustedIssuer
from trustplane.pep.http import Pep
from trustplane.policy.bundle import compile_bundle, default_bundle
from trustplane.policy.engine import PolicyEngine


def create_app(issuer: str) -> FastAPI:
    validator = TokenValidator(
        audience=EXECUTION,
        issuers=[TrustedIssuer(issuer)],
        fetcher=OutboundFetcher(OutboundPolicy.development()),
    )
    pdp = PolicyEngine(issuer=issuer, served_regions=["eu"])
    pdp.activate(compile_bundle(default_bundle()))
    pep = Pep(PolicyEnforcer(validator, pdp, realm="execution", dpop=DpopBinding()))
    app = FastAPI()
    pep.install(app)

    @app.get("/orders/{order_id}")
    async def read_order(order_id: str, token: Any = Depends(pep.token)) -> dict[str, str]:
        return {"order": order_id, "client": token.client_id}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def from_env() -> FastAPI:
    return create_app(os.environ["TP_ISSUER"])
