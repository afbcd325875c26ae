"""RFC 8705 §3 at the resource server: a token with ``cnf.x5t#S256`` passes the PEP only with the
certificate it is bound to (from the TLS connection or a trusted proxy's header), otherwise 401
``invalid_token`` with an RFC 6750 ``WWW-Authenticate`` challenge; the handler never runs."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import Depends, FastAPI
from prometheus_client import REGISTRY
from starlette.types import Receive, Scope, Send

from tests.pep.conftest import AUDIENCE, ISSUER, FakeIssuer
from tests.pep.test_http import CountingPdp, engine
from tests.tls.pki import Pki, build_pki, escaped_pem
from trustplane.pep import PolicyEnforcer, TokenValidator, TrustedIssuer
from trustplane.pep.binding import check_certificate_binding
from trustplane.pep.http import Pep
from trustplane.pep.validator import AccessToken, VerifiedClaims
from trustplane.tls import CertificateSource, certificate_thumbprint

HEADER = "x-ssl-client-cert"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Rs:
    proxy: httpx.AsyncClient  # the resource server's trusted proxy
    direct: httpx.AsyncClient  # anybody else
    issuer: FakeIssuer
    handled: list[AccessToken]

    async def get(
        self, token: str, cert: Any = None, *, via: httpx.AsyncClient | None = None
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"}
        if cert is not None:
            headers[HEADER] = escaped_pem(cert)
        return await (via or self.proxy).get("/positions", headers=headers)


@pytest.fixture
async def rs(issuer: FakeIssuer) -> AsyncIterator[Rs]:
    validator = TokenValidator(
        audience=AUDIENCE, issuers=[TrustedIssuer(ISSUER)], fetcher=issuer.fetcher()
    )
    pep = Pep(
        PolicyEnforcer(validator, CountingPdp(engine()), realm="execution"),
        certificates=CertificateSource.build(HEADER, ["10.0.0.0/8"]),
    )
    app = FastAPI()
    pep.install(app)
    handled: list[AccessToken] = []

    @app.get("/positions")
    async def positions(token: AccessToken = Depends(pep.token)) -> dict[str, str]:
        handled.append(token)
        return {"client_id": token.client_id}

    def client(peer: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, client=(peer, 4000))
        return httpx.AsyncClient(transport=transport, base_url="http://rs.test")

    async with client("10.0.0.5") as proxy, client("192.0.2.7") as direct:
        yield Rs(proxy, direct, issuer, handled)


def challenge(response: httpx.Response) -> dict[str, str]:
    value = response.headers["www-authenticate"]
    assert value.startswith("Bearer ")
    return dict(re.findall(r'(\w+)="([^"]*)"', value))


def refused(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "trustplane_pep_refused_total", {"error": "invalid_token", "reason": reason}
    )
    return value or 0.0


async def test_bound_token_with_its_certificate_passes(rs: Rs, pki: Pki) -> None:
    bound = {"x5t#S256": certificate_thumbprint(pki.client.certificate)}
    response = await rs.get(rs.issuer.token(cnf=bound), pki.client)

    assert response.status_code == 200
    assert len(rs.handled) == 1


async def test_unbound_token_needs_no_certificate(rs: Rs) -> None:
    assert (await rs.get(rs.issuer.token())).status_code == 200


def test_dpop_bound_token_is_not_this_checks_business() -> None:
    """``cnf.jkt`` is the DPoP verifier's (trustplane.pep.dpop): the certificate check passes it."""
    claims = VerifiedClaims({"cnf": {"jkt": "abc"}})
    token = AccessToken("t", ISSUER, "s", "c", AUDIENCE, frozenset(), "j", 0, claims)
    check_certificate_binding(token, None)


async def test_dpop_bound_token_presented_as_bearer_is_still_refused(rs: Rs) -> None:
    """...by the DPoP check, with the certificate source configured or not."""
    response = await rs.get(rs.issuer.token(cnf={"jkt": "abc"}))
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"


# (id, cnf claim, certificate sent (Pki attribute or None), sent by the proxy, metric reason)
# fmt: off
REFUSALS = [
    ("no-certificate", "client", None, True, "certificate_missing"),
    ("other-certificate-same-subject", "client", "stranger", True, "certificate_mismatch"),
    ("other-certificate", "client", "self_signed", True, "certificate_mismatch"),
    ("right-certificate-but-header-from-a-non-proxy", "client", "client", False, "certificate_missing"),
    ("cnf-not-an-object", "not-an-object", "client", True, "cnf_malformed"),
    ("x5t-not-a-string", "number", "client", True, "cnf_malformed"),
    ("x5t-empty", "empty", "client", True, "cnf_malformed"),
]
# fmt: on


@pytest.mark.parametrize(
    ("cnf", "cert", "from_proxy", "reason"), [pytest.param(*r[1:], id=r[0]) for r in REFUSALS]
)
async def test_refusals(
    rs: Rs, pki: Pki, cnf: str, cert: str | None, from_proxy: bool, reason: str
) -> None:
    claim: Any = {
        "client": {"x5t#S256": certificate_thumbprint(pki.client.certificate)},
        "not-an-object": "x5t",
        "number": {"x5t#S256": 7},
        "empty": {"x5t#S256": ""},
    }[cnf]
    before = refused(reason)
    response = await rs.get(
        rs.issuer.token(cnf=claim),
        getattr(pki, cert) if cert else None,
        via=None if from_proxy else rs.direct,
    )

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    params = challenge(response)
    assert params["realm"] == "execution"
    assert params["error"] == "invalid_token"
    assert params["error_description"]
    assert refused(reason) == before + 1
    assert rs.handled == []


def ignored_headers() -> float:
    value = REGISTRY.get_sample_value(
        "trustplane_client_cert_header_ignored_total", {"reason": "untrusted_peer"}
    )
    return value or 0.0


async def test_an_untrusted_peers_certificate_header_is_counted_with_an_unbound_token(
    rs: Rs, pki: Pki
) -> None:
    """The PEP looks for the certificate only when it can matter; a configured proxy header is
    one such case whatever the token: a non-proxy sending it is counted."""
    before = ignored_headers()
    response = await rs.get(rs.issuer.token(), pki.client, via=rs.direct)

    assert response.status_code == 200
    assert ignored_headers() == before + 1


@pytest.mark.parametrize(("over_tls", "status"), [(False, 401), (True, 200)])
async def test_without_a_proxy_header_a_bound_token_needs_the_connections_certificate(
    issuer: FakeIssuer, pki: Pki, over_tls: bool, status: int
) -> None:
    """The default source (the TLS connection, no header): a ``cnf`` token is checked against the
    connection's certificate, and refused without one."""
    validator = TokenValidator(
        audience=AUDIENCE, issuers=[TrustedIssuer(ISSUER)], fetcher=issuer.fetcher()
    )
    pep = Pep(PolicyEnforcer(validator, CountingPdp(engine()), realm="execution"))
    app = FastAPI()
    pep.install(app)

    @app.get("/positions")
    async def positions(token: AccessToken = Depends(pep.token)) -> dict[str, str]:
        return {"client_id": token.client_id}

    pem = pki.client.certificate.public_bytes(Encoding.PEM).decode("ascii")

    async def with_tls(scope: Scope, receive: Receive, send: Send) -> None:
        if over_tls:
            scope = {**scope, "extensions": {"tls": {"client_cert_chain": [pem]}}}
        await app(scope, receive, send)

    bound = {"x5t#S256": certificate_thumbprint(pki.client.certificate)}
    transport = httpx.ASGITransport(app=with_tls)
    async with httpx.AsyncClient(transport=transport, base_url="https://rs.test") as client:
        headers = {"Authorization": f"Bearer {issuer.token(cnf=bound)}"}
        response = await client.get("/positions", headers=headers)

    assert response.status_code == status
    if status == 401:
        assert challenge(response)["error"] == "invalid_token"
