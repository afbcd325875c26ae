"""Sender-constrained tokens at the token endpoint (RFC 9449 §5, §6; RFC 8705 §3), over HTTP.

A ``DPoP`` header on a token request binds the access token to the proof's key (``cnf.jkt``,
``token_type: DPoP``); without one, tokens stay bearer tokens. Every refusal asserts status and
exact ``error``; the OpenID conformance-suite test that checks the same MUST is named where one
exists. Proofs are built with PyJWT (tests/dpop/conftest.py), never with trustplane's JOSE code.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio
from fastapi import Depends, FastAPI

from tests.bearer_guard.test_guarded_routes import APIS as GUARDED_APIS
from tests.bearer_guard.test_guarded_routes import call as call_guarded
from tests.bearer_guard.test_guarded_routes import challenge as guard_challenge
from tests.bearer_guard.test_guarded_routes import mint
from tests.conftest import EXECUTION, LEI, register_kit
from tests.dpop.conftest import ProofKey, ath_of, hs256_proof
from tests.protocol_server import Server, running_server
from trustplane import metrics
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.pep import DpopBinding, PolicyEnforcer, TokenValidator, TrustedIssuer
from trustplane.pep.http import Pep
from trustplane.policy.bundle import compile_bundle, default_bundle
from trustplane.policy.engine import PolicyEngine

pytestmark = pytest.mark.asyncio(loop_scope="module")


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def token_url(server: Server) -> str:
    return server.issuer + "/token"


async def dpop_token(
    server: Server, key: ProofKey, proof: str | list[str] | None = None, **form: Any
) -> httpx.Response:
    """A client_credentials request with ``DPoP`` header(s) (default: a valid proof of ``key``)."""
    proofs = [proof] if isinstance(proof, str) else proof
    if proofs is None:
        proofs = [key.proof(htu=token_url(server))]
    data = {
        "grant_type": "client_credentials",
        "scope": "order:create",
        "resource": EXECUTION,
        **server.kit.auth(),
        **form,
    }
    headers = [("DPoP", p) for p in proofs]
    return await server.http.post("/token", data=data, headers=headers)


# --------------------------------------------------------------------------- success


async def test_dpop_proof_binds_the_token_to_its_key(server: Server) -> None:
    key = ProofKey.generate()
    before = metrics.TOKENS_ISSUED_BY_BINDING.labels(binding="dpop")._value.get()
    response = await dpop_token(server, key)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "DPoP"  # RFC 9449 §5
    assert claims_of(body["access_token"])["cnf"] == {"jkt": key.jkt}  # §6.1
    assert metrics.TOKENS_ISSUED_BY_BINDING.labels(binding="dpop")._value.get() == before + 1

    # RFC 9449 §6.2 / RFC 7662: introspection shows the binding and the DPoP token type
    introspected = await server.http.post(
        "/introspect", data={"token": body["access_token"], **server.kit.auth()}
    )
    assert introspected.status_code == 200
    answer = introspected.json()
    assert answer["active"] is True
    assert (answer["token_type"], answer["cnf"]) == ("DPoP", {"jkt": key.jkt})


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "PS256"])
async def test_every_accepted_proof_algorithm(server: Server, alg: str) -> None:
    key = ProofKey.generate(alg)
    response = await dpop_token(server, key)
    assert response.status_code == 200, response.text
    assert claims_of(response.json()["access_token"])["cnf"] == {"jkt": key.jkt}


async def test_without_dpop_the_token_stays_a_bearer_token(server: Server) -> None:
    response = await server.token()
    assert response.status_code == 200
    assert response.json()["token_type"] == "Bearer"
    assert "cnf" not in claims_of(response.json()["access_token"])


async def test_metadata_lists_the_proof_algorithms(server: Server) -> None:
    doc = (await server.http.get("/.well-known/oauth-authorization-server")).json()
    assert doc["dpop_signing_alg_values_supported"] == ["ES256", "EdDSA", "PS256"]


async def test_the_issue_record_names_the_binding(server: Server) -> None:
    """The audit record of the issue carries the binding and the cnf thumbprint (durable before
    the response: it is in the ledger's pending entries or already integrated)."""
    key = ProofKey.generate()
    response = await dpop_token(server, key)
    assert response.status_code == 200
    async with server.services.db.read() as conn:
        rows = await conn.exec_driver_sql(
            "SELECT payload FROM audit_pending UNION ALL SELECT payload FROM audit_payloads"
        )
        payloads = [str(r[0]) for r in rows]
    recorded = [p for p in payloads if key.jkt in p]
    assert len(recorded) == 1, "the issue record must name the cnf thumbprint once"
    assert '"binding":"dpop"' in recorded[0].replace(" ", "")


# --------------------------------------------------------------------------- the MUSTs (negative)


def _table() -> list[Any]:
    """(id, how to build the proof from a key and the token URL). Every case: 400
    ``invalid_dpop_proof`` (RFC 9449 §4.3, §5)."""
    old = int(time.time()) - 3600
    ahead = int(time.time()) + 3600
    return [
        # the OpenID conformance suite's fapi2-security-profile-final-dpop-negative-tests sends
        # malformed, wrongly typed, wrongly signed and mismatching proofs like these;
        # fapi2-security-profile-final-check-dpop-proof-nbf-exp the iat window
        ("malformed", lambda k, u: "not.a.jwt"),
        ("typ_missing", lambda k, u: k.proof(htu=u, headers={"typ": "JWT"})),
        ("alg_hs256", lambda k, u: hs256_proof(k, b"0" * 32, htu=u)),
        ("alg_none", lambda k, u: _unsigned(k, u)),
        ("jwk_private", lambda k, u: k.proof(htu=u, headers={"jwk": {**k.jwk, "d": "AAAA"}})),
        ("jwk_missing", lambda k, u: k.proof(htu=u, drop_headers=("jwk",))),
        ("signature", lambda k, u: k.proof(htu=u)[:-8] + "AAAAAAAA"),
        ("two_jwts_in_one_value", lambda k, u: f"{k.proof(htu=u)}, {k.proof(htu=u)}"),
        ("typ_absent", lambda k, u: k.proof(htu=u, drop_headers=("typ",))),
        ("alg_rs256", lambda k, u: ProofKey.generate("PS256").proof(htu=u, alg="RS256")),
        (
            "jwk_symmetric",
            lambda k, u: k.proof(htu=u, headers={"jwk": {"kty": "oct", "k": "c2Vj"}}),
        ),
        ("jti_missing", lambda k, u: k.proof(htu=u, jti=None)),
        ("htm_missing", lambda k, u: k.proof(htu=u, htm=None)),
        ("htu_missing", lambda k, u: k.proof(htu=None)),
        # a jti no database column can hold (a NUL, a lone surrogate): refused, never a 500
        ("jti_nul", lambda k, u: k.proof(htu=u, jti="a\x00b")),
        ("jti_lone_surrogate", lambda k, u: k.proof(htu=u, jti="a\ud800b")),
        ("htm_get", lambda k, u: k.proof(htu=u, htm="GET")),
        ("htm_lowercase", lambda k, u: k.proof(htu=u, htm="post")),
        ("htu_other_endpoint", lambda k, u: k.proof(htu=u.replace("/token", "/par"))),
        ("htu_other_host", lambda k, u: k.proof(htu="https://attacker.example/token")),
        ("iat_missing", lambda k, u: k.proof(htu=u, iat=None)),
        ("iat_too_old", lambda k, u: k.proof(htu=u, iat=old)),
        ("iat_in_future", lambda k, u: k.proof(htu=u, iat=ahead)),
    ]


def _unsigned(key: ProofKey, url: str) -> str:
    import base64
    import json

    def enc(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    header = {"alg": "none", "typ": "dpop+jwt", "jwk": key.jwk}
    return f"{enc(header)}.{enc(key.claims(htu=url))}."


@pytest.mark.parametrize("case", _table(), ids=lambda c: c[0])
async def test_an_invalid_proof_is_refused(server: Server, case: Any) -> None:
    _name, build = case
    key = ProofKey.generate()
    response = await dpop_token(server, key, build(key, token_url(server)))
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_dpop_proof"
    assert response.headers["cache-control"] == "no-store"


async def test_two_dpop_headers_are_refused(server: Server) -> None:
    key = ProofKey.generate()
    url = token_url(server)
    response = await dpop_token(server, key, [key.proof(htu=url), key.proof(htu=url)])
    assert (response.status_code, response.json()["error"]) == (400, "invalid_dpop_proof")


async def test_a_replayed_proof_is_refused(server: Server) -> None:
    # RFC 9449 §11.1 (part of fapi2-security-profile-final-dpop-negative-tests)
    key = ProofKey.generate()
    proof = key.proof(htu=token_url(server))
    first = await dpop_token(server, key, proof)
    assert first.status_code == 200, first.text
    again = await dpop_token(server, key, proof)
    assert (again.status_code, again.json()["error"]) == (400, "invalid_dpop_proof")


async def test_a_refused_request_still_uses_up_its_proof(server: Server) -> None:
    """A proof sent with a request refused for another reason (an unknown scope) is spent: the
    same proof cannot be replayed with a corrected request."""
    key = ProofKey.generate()
    proof = key.proof(htu=token_url(server))
    refused = await dpop_token(server, key, proof, scope="no:such:scope")
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_scope"
    again = await dpop_token(server, key, proof)
    assert (again.status_code, again.json()["error"]) == (400, "invalid_dpop_proof")


# --------------------------------------------------------------------------- racing reuse


@pytest.mark.postgres
async def test_racing_reuse_of_one_proof_exactly_one_success(server: Server) -> None:
    """20 token requests with one proof (each with its own client assertion), concurrently: the proof
    ``jti`` is consumed in the outcome's transaction, so exactly one request gets a token."""
    key = ProofKey.generate()
    proof = key.proof(htu=token_url(server))
    responses = await asyncio.gather(*(dpop_token(server, key, proof) for _ in range(20)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == 1, statuses
    assert {r.json()["error"] for r in responses if r.status_code != 200} == {"invalid_dpop_proof"}


# --------------------------------------------------------------------------- a real resource server


def resource_server(server: Server) -> FastAPI:
    """A resource server protected by the PEP SDK, trusting this trustplane (JWKS fetched over the
    server's ASGI transport through the guarded fetcher)."""
    app = server.http._transport.app  # type: ignore[attr-defined]
    fetcher = OutboundFetcher(OutboundPolicy.development(), transport=httpx.ASGITransport(app=app))
    validator = TokenValidator(
        audience=EXECUTION, issuers=[TrustedIssuer(server.issuer)], fetcher=fetcher
    )
    pdp = PolicyEngine(issuer=server.issuer, served_regions=["eu"])
    pdp.activate(compile_bundle(default_bundle()))
    pep = Pep(PolicyEnforcer(validator, pdp, realm="execution", dpop=DpopBinding()))
    app = FastAPI()
    pep.install(app)

    @app.get("/orders/{order_id}")
    async def read_order(order_id: str, token: Any = Depends(pep.token)) -> dict[str, str]:
        return {"order": order_id, "client": token.client_id}

    return app


async def test_a_bound_token_is_accepted_with_its_proof_and_refused_as_bearer(
    server: Server,
) -> None:
    key = ProofKey.generate()
    token = (await dpop_token(server, key)).json()["access_token"]
    rs_url = "https://rs.example"
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=resource_server(server)), base_url=rs_url
    ) as rs:
        proof = key.proof(htm="GET", htu=f"{rs_url}/orders/1", ath=ath_of(token))
        ok = await rs.get("/orders/1", headers={"Authorization": f"DPoP {token}", "DPoP": proof})
        assert ok.status_code == 200, ok.text
        as_bearer = await rs.get("/orders/1", headers={"Authorization": f"Bearer {token}"})
        assert as_bearer.status_code == 401
        assert as_bearer.json()["error"] == "invalid_token"
        other = ProofKey.generate()
        wrong_key = other.proof(htm="GET", htu=f"{rs_url}/orders/1", ath=ath_of(token))
        stolen = await rs.get(
            "/orders/1", headers={"Authorization": f"DPoP {token}", "DPoP": wrong_key}
        )
        assert stolen.status_code == 401


@pytest.mark.parametrize("api", GUARDED_APIS, ids=[a.name for a in GUARDED_APIS])
@pytest.mark.parametrize("cnf", ["jkt", "malformed"])
async def test_our_own_apis_refuse_a_dpop_bound_token_as_bearer(
    server: Server, api: Any, cnf: str
) -> None:
    """RFC 9449 §7.2: trustplane's own bearer-protected APIs (one guard) take only the Bearer
    scheme, so they cannot check a DPoP proof: a DPoP-bound token sent there as a bearer token is
    refused (else a stolen bound token would work as a bearer token), and so is a ``cnf`` that is
    not an object (a malformed binding must not pass as none)."""
    binding = {"jkt": ProofKey.generate().jkt} if cnf == "jkt" else "jkt"
    token = mint(server, api, extra={"lei": LEI, "cnf": binding})
    response = await call_guarded(server, api, [("Authorization", f"Bearer {token}")])
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "invalid_token"
    assert guard_challenge(response)["error"] == "invalid_token"
    assert response.headers["cache-control"] == "no-store"


async def test_a_second_client_gets_its_own_binding(server: Server) -> None:
    kit = await register_kit(server.services)
    key = ProofKey.generate()
    data = {
        "grant_type": "client_credentials",
        "scope": "order:create",
        "resource": EXECUTION,
        **kit.auth(),
    }
    response = await server.http.post(
        "/token", data=data, headers={"DPoP": key.proof(htu=token_url(server))}
    )
    assert response.status_code == 200
    assert claims_of(response.json()["access_token"])["cnf"] == {"jkt": key.jkt}


# --------------------------------------------------------------------------- server nonces (§8)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def nonced(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    async with running_server(
        request, tmp_path_factory, "sqlite", dpop_nonce_required=True
    ) as started:
        yield started


async def test_a_nonce_is_required_then_accepted(nonced: Server) -> None:
    # RFC 9449 §8: use_dpop_nonce with a DPoP-Nonce header, then the retry with it succeeds
    key = ProofKey.generate()
    first = await dpop_token(nonced, key)
    assert (first.status_code, first.json()["error"]) == (400, "use_dpop_nonce")
    nonce = first.headers["dpop-nonce"]
    assert first.headers["cache-control"] == "no-store"
    retried = await dpop_token(nonced, key, key.proof(htu=token_url(nonced), nonce=nonce))
    assert retried.status_code == 200, retried.text
    assert claims_of(retried.json()["access_token"])["cnf"] == {"jkt": key.jkt}


async def test_a_foreign_nonce_is_refused_with_a_fresh_one(nonced: Server) -> None:
    key = ProofKey.generate()
    response = await dpop_token(nonced, key, key.proof(htu=token_url(nonced), nonce="x" * 32))
    assert (response.status_code, response.json()["error"]) == (400, "use_dpop_nonce")
    assert len(response.headers["dpop-nonce"]) == 32


async def test_nonces_do_not_touch_bearer_requests(nonced: Server) -> None:
    response = await nonced.token()
    assert response.status_code == 200
    assert response.json()["token_type"] == "Bearer"


# --------------------------------------------------------------------------- the mTLS alias (RFC 8705 §5)

MTLS_BASE = "https://mtls.as.example"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def aliased(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    async with running_server(
        request,
        tmp_path_factory,
        "sqlite",
        tls_client_cert_header="x-ssl-client-cert",
        trusted_proxies=("127.0.0.0/8",),
        mtls_base_url=MTLS_BASE,
    ) as started:
        yield started


async def test_a_proof_sent_to_the_mtls_alias_names_the_alias(aliased: Server) -> None:
    """A request that came in at ``mtls_endpoint_aliases.token_endpoint`` (its Host) must carry a
    proof whose ``htu`` is that URL, not the issuer's ``/token``."""
    doc = (await aliased.http.get("/.well-known/oauth-authorization-server")).json()
    alias = doc["mtls_endpoint_aliases"]["token_endpoint"]
    assert alias == MTLS_BASE + "/token"
    key = ProofKey.generate()
    data = {
        "grant_type": "client_credentials",
        "scope": "order:create",
        "resource": EXECUTION,
    }
    host = {"Host": "mtls.as.example"}
    ok = await aliased.http.post(
        "/token",
        data={**data, **aliased.kit.auth()},
        headers={**host, "DPoP": key.proof(htu=alias)},
    )
    assert ok.status_code == 200, ok.text
    assert claims_of(ok.json()["access_token"])["cnf"] == {"jkt": key.jkt}
    wrong = await aliased.http.post(
        "/token",
        data={**data, **aliased.kit.auth()},
        headers={**host, "DPoP": key.proof(htu=token_url(aliased))},
    )
    assert (wrong.status_code, wrong.json()["error"]) == (400, "invalid_dpop_proof")


# --------------------------------------------------------------------------- the fapi2 profile


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fapi2(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    async with running_server(
        request,
        tmp_path_factory,
        "sqlite",
        profile="fapi2",
        client_auth_methods=("private_key_jwt",),
    ) as started:
        yield started


async def test_fapi2_refuses_a_token_request_that_is_not_sender_constrained(fapi2: Server) -> None:
    # FAPI 2.0 §5.3.2.1: the authorization server shall only issue sender-constrained access
    # tokens (conformance: fapi2-security-profile-final-ensure-holder-of-key-required / the DPoP
    # variant's token request without a DPoP header)
    before = metrics.TOKEN_BINDING_REFUSED.labels(reason="sender_constraint_required")._value.get()
    data = {
        "grant_type": "client_credentials",
        "scope": "order:create",
        "resource": EXECUTION,
        **fapi2.kit.auth(),
    }
    response = await fapi2.http.post("/token", data=data)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")
    assert "sender-constrained" in response.json()["error_description"]
    after = metrics.TOKEN_BINDING_REFUSED.labels(reason="sender_constraint_required")._value.get()
    assert after == before + 1


async def test_fapi2_issues_a_dpop_bound_token(fapi2: Server) -> None:
    key = ProofKey.generate()
    response = await dpop_token(fapi2, key)
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "DPoP"
    assert claims_of(response.json()["access_token"])["cnf"] == {"jkt": key.jkt}
