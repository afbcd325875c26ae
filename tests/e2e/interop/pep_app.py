"""A resource server for EXECUTION protected by the PEP SDK (DPoP and certificate binding checks),
served by the interop tests as its own process. The JWKS comes from the live issuer (``TP_ISSUER``)
over real HTTP through the guarded fetcher (trusting ``TP_CA_FILE`` when set).

* plain HTTP: ``uvicorn tests.e2e.interop.pep_app:from_env --factory``;
* HTTPS with client certificates: ``python -m tests.e2e.interop.pep_app PORT`` with ``TP_TLS_CERT``,
  ``TP_TLS_KEY`` and ``TP_CA_FILE``: uvicorn with trustplane's ``BoundedHttpToolsProtocol`` (which sets
  the ASGI ``tls`` extension the PEP reads the certificate from) and a certificate optional at the
  handshake, verified against the CA (docs/operations.md)."""

from __future__ import annotations

import os
import ssl
import sys
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI

from tests.conftest import EXECUTION
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.pep import DpopBinding, PolicyEnforcer, TokenValidator, TrustedIssuer
from trustplane.pep.http import Pep
from trustplane.policy.bundle import compile_bundle, default_bundle
from trustplane.policy.engine import PolicyEngine
from trustplane.server import BoundedHttpToolsProtocol


def create_app(issuer: str, ca_file: str | None = None) -> FastAPI:
    policy = OutboundPolicy.development(**({"verify": ca_file} if ca_file else {}))
    validator = TokenValidator(
        audience=EXECUTION, issuers=[TrustedIssuer(issuer)], fetcher=OutboundFetcher(policy)
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
    return create_app(os.environ["TP_ISSUER"], os.environ.get("TP_CA_FILE"))


def main(port: int) -> None:
    config = uvicorn.Config(
        from_env(),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        http=BoundedHttpToolsProtocol,
        ssl_certfile=os.environ["TP_TLS_CERT"],
        ssl_keyfile=os.environ["TP_TLS_KEY"],
        ssl_ca_certs=os.environ["TP_CA_FILE"],
        ssl_cert_reqs=ssl.CERT_OPTIONAL,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
