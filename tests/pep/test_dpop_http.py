"""DPoP-bound tokens at a real resource server: a FastAPI app protected by the PEP SDK with a
``DpopBinding``, served by uvicorn on loopback and called over HTTP with httpx. Tokens are minted by
the test issuer (PyJWT) with ``cnf.jkt``; proofs are built by PyJWT (tests/dpop/conftest.py).

Every refusal asserts the status, the body's ``error`` and the ``WWW-Authenticate: DPoP`` challenge
with its ``error`` and ``algs`` (RFC 9449 §7.1, RFC 6750 §3)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import Depends, FastAPI
from jwt.algorithms import ECAlgorithm

from tests.dpop.conftest import ProofKey, ath_of, hs256_proof
from tests.pep.conftest import AUDIENCE, ISSUER, FakeIssuer, free_port
from tests.pep.test_http import context_of, engine, order_of
from trustplane.pep import (
    ConfigurationError,
    DpopBinding,
    PolicyEnforcer,
    TokenValidator,
    TrustedIssuer,
)
from trustplane.pep.http import Grant, Pep

ALGS = "ES256 EdDSA PS256"
NONCE_SECRET = b"resource server nonce secret 32b"
ORDER = {"owner": "5493001KJTIIGC8Y1R12", "restricted": False, "amount_minor": 1000}


def build(issuer: FakeIssuer, dpop: DpopBinding | None) -> FastAPI:
    validator = TokenValidator(
        audience=AUDIENCE, issuers=[TrustedIssuer(ISSUER)], fetcher=issuer.fetcher()
    )
    pep = Pep(PolicyEnforcer(validator, engine(), realm="execution", dpop=dpop))
    app = FastAPI()
    pep.install(app)

    @app.post("/orders")
    async def create_order(
        grant: Grant = Depends(pep.require("order:create", resource=order_of, context=context_of)),
    ) -> dict[str, str]:
        return {"decision_id": grant.decision.decision_id}

    @app.get("/orders/{order_id}")
    async def read_order(order_id: str, token: Any = Depends(pep.token)) -> dict[str, str]:
        return {"order": order_id, "client": token.client_id}

    return app


@dataclass
class Live:
    client: httpx.AsyncClient
    base_url: str
    issuer: FakeIssuer
    key: ProofKey = field(default_factory=ProofKey.generate)

    def bound_token(self, key: ProofKey | None = None, **claims: Any) -> str:
        return self.issuer.token(cnf={"jkt": (key or self.key).jkt}, **claims)

    def proof(self, token: str | None, path: str = "/orders", htm: str = "POST", **kw: Any) -> str:
        if token is not None:
            kw.setdefault("ath", ath_of(token))
        return self.key.proof(htm=htm, htu=f"{self.base_url}{path}", **kw)

    async def order(
        self, token: str | None, proofs: list[str] | None = None, scheme: str = "DPoP"
    ) -> httpx.Response:
        headers: list[tuple[str, str]] = []
        if token is not None:
            headers.append(("Authorization", f"{scheme} {token}"))
        headers += [("DPoP", p) for p in proofs or []]
        return await self.client.post("/orders", json=ORDER, headers=headers)


@pytest.fixture
def binding() -> DpopBinding:
    return DpopBinding()


async def serve(app: FastAPI, issuer: FakeIssuer, root_path: str = "") -> AsyncIterator[Live]:
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        lifespan="off",
        ws="none",
        log_level="critical",
        root_path=root_path,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), task.result()
        await asyncio.sleep(0.01)
    base_url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=15) as client:
            yield Live(client, base_url, issuer)
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def live(issuer: FakeIssuer, binding: DpopBinding) -> AsyncIterator[Live]:
    async for started in serve(build(issuer, binding), issuer):
        yield started


def dpop_challenge(response: httpx.Response) -> dict[str, str]:
    value = response.headers["www-authenticate"]
    assert value.startswith("DPoP "), value
    return dict(re.findall(r'(\w+)="([^"]*)"', value))


def assert_refused(response: httpx.Response, error: str, status: int = 401) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    params = dpop_challenge(response)
    assert params["error"] == error
    assert params["algs"] == ALGS
    assert params["realm"] == "execution"


async def test_a_bound_token_with_its_proof_is_served(live: Live) -> None:
    token = live.bound_token()
    response = await live.order(token, [live.proof(token)])

    assert response.status_code == 200, response.text
    assert response.json()["decision_id"]


@pytest.mark.parametrize("alg", ["EdDSA", "PS256"])
async def test_other_algorithms_are_served(live: Live, alg: str) -> None:
    live.key = ProofKey.generate(alg)
    token = live.bound_token()

    response = await live.order(token, [live.proof(token)])

    assert response.status_code == 200, response.text


async def test_the_query_is_not_part_of_htu(live: Live) -> None:
    token = live.bound_token()
    proof = live.proof(token, path="/orders/o-1", htm="GET")
    response = await live.client.get(
        "/orders/o-1?fields=all", headers={"Authorization": f"DPoP {token}", "DPoP": proof}
    )

    assert response.status_code == 200, response.text
    assert response.json() == {"order": "o-1", "client": "client-1"}


async def test_an_unbound_token_still_works_as_bearer(live: Live) -> None:
    response = await live.order(live.issuer.token(), scheme="Bearer")

    assert response.status_code == 200, response.text


async def test_a_policy_refusal_of_a_bound_token_is_challenged_with_dpop(live: Live) -> None:
    """RFC 9449 §7.1: the 403 of a request made with the DPoP scheme carries a ``DPoP`` challenge
    (``insufficient_scope``, with ``algs``), not a ``Bearer`` one; a bearer request's 403 keeps
    ``Bearer``."""
    token = live.bound_token()
    restricted = {**ORDER, "restricted": True}
    response = await live.client.post(
        "/orders",
        json=restricted,
        headers={"Authorization": f"DPoP {token}", "DPoP": live.proof(token)},
    )

    assert_refused(response, "insufficient_scope", status=403)
    assert dpop_challenge(response)["scope"] == "order:create"

    bearer = await live.client.post(
        "/orders",
        json=restricted,
        headers={"Authorization": f"Bearer {live.issuer.token()}"},
    )
    assert bearer.status_code == 403, bearer.text
    assert bearer.json()["error"] == "insufficient_scope"
    assert bearer.headers["www-authenticate"].startswith('Bearer realm="execution", ')


async def test_no_authentication_is_challenged_with_both_schemes(live: Live) -> None:
    response = await live.order(None)

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == (
        f'Bearer realm="execution", DPoP realm="execution", algs="{ALGS}"'
    )


@dataclass(frozen=True)
class Case:
    id: str
    request: Callable[[Live], tuple[str, list[str]]]
    error: str = "invalid_dpop_proof"
    scheme: str = "DPoP"


def bound(live: Live, **proof: Any) -> tuple[str, list[str]]:
    token = live.bound_token()
    return token, [live.proof(token, **proof)]


def with_proof_of(live: Live, make: Callable[[ProofKey, str], str]) -> tuple[str, list[str]]:
    token = live.bound_token()
    return token, [make(live.key, token)]


def other_keys_token(live: Live) -> tuple[str, list[str]]:
    """The token is bound to another key than the one signing the (otherwise valid) proof."""
    token = live.bound_token(ProofKey.generate())
    return token, [live.proof(token)]


def two_proofs(live: Live) -> tuple[str, list[str]]:
    token = live.bound_token()
    return token, [live.proof(token), live.proof(token)]


CASES = [
    # RFC 9449 §7.2: a DPoP-bound token presented as a bearer token
    Case("bound-token-as-bearer", lambda lv: bound(lv), "invalid_token", scheme="Bearer"),
    Case(
        "bound-token-as-bearer-no-proof",
        lambda lv: (lv.bound_token(), []),
        "invalid_token",
        "Bearer",
    ),
    # §7.1: the DPoP scheme with a token that is not bound
    Case(
        "unbound-token-as-dpop", lambda lv: (lv.issuer.token(), [lv.proof(None)]), "invalid_token"
    ),
    # §4.3 step 1, 2
    Case("no-proof", lambda lv: (lv.bound_token(), [])),
    Case("two-proofs", two_proofs),
    Case("not-a-jwt", lambda lv: (lv.bound_token(), ["nota.a.jwt"])),
    # step 3
    Case("no-jti", lambda lv: bound(lv, jti=None)),
    Case("no-iat", lambda lv: bound(lv, iat=None)),
    Case("no-jwk", lambda lv: bound(lv, drop_headers=("jwk",))),
    # step 4, 5
    Case("typ-jwt", lambda lv: bound(lv, headers={"typ": "JWT"})),
    Case(
        "alg-hs256",
        lambda lv: with_proof_of(lv, lambda k, t: hs256_proof(k, b"s" * 32, ath=ath_of(t))),
    ),
    Case(
        "alg-none",
        lambda lv: with_proof_of(
            lv,
            lambda k, t: jwt.encode(
                k.claims(htu=f"{lv.base_url}/orders", ath=ath_of(t)),
                None,
                algorithm="none",
                headers={"typ": "dpop+jwt", "jwk": k.jwk},
            ),
        ),
    ),
    # step 3
    Case("no-htm", lambda lv: bound(lv, htm=None)),
    Case("no-htu", lambda lv: with_proof_of(lv, lambda k, t: k.proof(htu=None, ath=ath_of(t)))),
    # step 6, 7
    Case("jwk-symmetric", lambda lv: bound(lv, headers={"jwk": {"kty": "oct", "k": "c2Vj"}})),
    Case(
        "signed-by-another-key",
        lambda lv: bound(lv, key=ec.generate_private_key(ec.SECP256R1())),
    ),
    Case(
        "private-jwk",
        lambda lv: bound(lv, headers={"jwk": ECAlgorithm.to_jwk(lv.key.private, as_dict=True)}),
    ),
    # step 8, 9
    Case("htm-get-for-post", lambda lv: bound(lv, htm="GET")),
    Case("htu-other-path", lambda lv: bound(lv, path="/settlements")),
    Case(
        "htu-other-origin",
        lambda lv: with_proof_of(
            lv, lambda k, t: k.proof(htu="https://rs.example/orders", ath=ath_of(t))
        ),
    ),
    # step 11
    Case("iat-too-old", lambda lv: bound(lv, iat=int(time.time()) - 300)),
    Case("iat-in-the-future", lambda lv: bound(lv, iat=int(time.time()) + 300)),
    # step 12
    Case("ath-missing", lambda lv: bound(lv, ath=None)),
    Case("ath-of-another-token", lambda lv: bound(lv, ath=ath_of("another token"))),
    Case("proof-key-is-not-cnf-jkt", lambda lv: other_keys_token(lv), "invalid_token"),
]

#: What each refusal says (so each case fails at the check it is meant for).
SAID = {
    "bound-token-as-bearer": "this access token is DPoP-bound: use the DPoP scheme with a proof",
    "bound-token-as-bearer-no-proof": "this access token is DPoP-bound: use the DPoP scheme with a proof",
    "unbound-token-as-dpop": "the access token is not DPoP-bound",
    "no-proof": "a DPoP proof is required (DPoP header)",
    "two-proofs": "exactly one DPoP header is allowed",
    "not-a-jwt": "the DPoP header is not a well-formed JWT: header is not JSON",
    "no-jti": "the DPoP proof must carry a jti",
    "no-iat": "the DPoP proof must carry htm, htu and a numeric iat",
    "no-jwk": "the DPoP proof header must carry the public key (jwk)",
    "typ-jwt": "the DPoP proof typ must be dpop+jwt",
    "alg-hs256": "the DPoP header is not a well-formed JWT: algorithm 'HS256' is not allowed",
    "alg-none": "the DPoP header is not a well-formed JWT: algorithm 'none' is not allowed",
    "no-htm": "the DPoP proof must carry htm, htu and a numeric iat",
    "no-htu": "the DPoP proof must carry htm, htu and a numeric iat",
    "jwk-symmetric": "the DPoP proof jwk must not contain a private key",
    "signed-by-another-key": "the DPoP proof signature does not verify",
    "private-jwk": "the DPoP proof jwk must not contain a private key",
    "htm-get-for-post": "the DPoP proof htm does not match the request method",
    "htu-other-path": "the DPoP proof htu does not match the request URI",
    "htu-other-origin": "the DPoP proof htu does not match the request URI",
    "iat-too-old": "the DPoP proof is too old (iat)",
    "iat-in-the-future": "the DPoP proof is issued in the future (iat)",
    "ath-missing": "the DPoP proof must carry ath (the access token hash)",
    "ath-of-another-token": "the DPoP proof ath does not match the access token",
    "proof-key-is-not-cnf-jkt": "the DPoP proof key is not the key the access token is bound to",
}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_every_refusal_has_its_status_error_and_dpop_challenge(
    live: Live, case: Case
) -> None:
    token, proofs = case.request(live)

    response = await live.order(token, proofs, scheme=case.scheme)

    assert_refused(response, case.error)
    assert dpop_challenge(response)["error_description"] == SAID[case.id]


@pytest.mark.parametrize("cnf", [{"jkt": 42}, {"jkt": ""}, "jkt", ["jkt"]])
@pytest.mark.parametrize("scheme", ["Bearer", "DPoP"])
async def test_a_malformed_binding_is_not_taken_for_no_binding(
    live: Live, cnf: object, scheme: str
) -> None:
    token = live.issuer.token(cnf=cnf)
    response = await live.order(token, [live.proof(token)], scheme=scheme)

    assert response.status_code == 401
    assert response.json() == {
        "error": "invalid_token",
        "error_description": "the token's cnf claim is malformed"
        if not isinstance(cnf, dict)
        else "the token's cnf.jkt is malformed",
    }


async def test_a_replayed_proof_is_refused(live: Live) -> None:
    token = live.bound_token()
    proof = live.proof(token)
    first = await live.order(token, [proof])

    again = await live.order(token, [proof])

    assert first.status_code == 200
    assert_refused(again, "invalid_dpop_proof")


async def test_racing_one_proof_exactly_one_request_wins(live: Live) -> None:
    token = live.bound_token()
    proof = live.proof(token)

    responses = await asyncio.gather(*(live.order(token, [proof]) for _ in range(10)))

    assert sorted(r.status_code for r in responses) == [200] + [401] * 9


class TestNonces:
    @pytest.fixture
    def binding(self) -> DpopBinding:
        return DpopBinding(nonce_secret=NONCE_SECRET, nonce_lifetime=60)

    async def test_use_dpop_nonce_then_retry_with_it(self, live: Live) -> None:
        """RFC 9449 §9: 401, ``use_dpop_nonce``, the nonce in ``DPoP-Nonce``; the retry passes."""
        token = live.bound_token()
        first = await live.order(token, [live.proof(token)])

        assert_refused(first, "use_dpop_nonce")
        nonce = first.headers["dpop-nonce"]
        retry = await live.order(token, [live.proof(token, nonce=nonce)])
        assert retry.status_code == 200, retry.text

    async def test_a_stale_nonce_gets_a_fresh_one(self, live: Live) -> None:
        token = live.bound_token()
        stale = DpopBinding(nonce_secret=NONCE_SECRET, nonce_lifetime=60).verifier.fresh_nonce(
            time.time() - 180
        )
        response = await live.order(token, [live.proof(token, nonce=stale)])

        assert_refused(response, "use_dpop_nonce")
        assert response.headers["dpop-nonce"] != stale


class TestWithoutDpop:
    """A PEP not configured for DPoP cannot check a binding: bound tokens are refused (fail closed)."""

    @pytest.fixture
    async def live(self, issuer: FakeIssuer) -> AsyncIterator[Live]:
        async for started in serve(build(issuer, None), issuer):
            yield started

    async def test_a_bound_token_is_refused_as_bearer(self, live: Live) -> None:
        response = await live.order(live.bound_token(), scheme="Bearer")

        assert response.status_code == 401
        assert response.json()["error"] == "invalid_token"
        assert response.headers["www-authenticate"].startswith("Bearer ")

    async def test_a_malformed_binding_is_refused(self, live: Live) -> None:
        response = await live.order(live.issuer.token(cnf={"jkt": 42}), scheme="Bearer")

        assert response.status_code == 401
        assert response.json()["error"] == "invalid_token"

    async def test_the_dpop_scheme_is_not_understood(self, live: Live) -> None:
        token = live.bound_token()
        response = await live.order(token, [live.proof(token)])

        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Bearer realm="execution"'


class TestPublicOrigin:
    """Behind a proxy the client calls another origin than the one the server sees: the proof must
    name the configured public origin, and a proof naming the server's own address is refused."""

    @pytest.fixture
    def binding(self) -> DpopBinding:
        return DpopBinding(public_origin="https://Execution.example:443/")

    async def test_the_public_origin_is_what_the_proof_names(self, live: Live) -> None:
        token = live.bound_token()
        public = live.key.proof(htu="https://execution.example/orders", ath=ath_of(token))
        internal = live.proof(token)

        assert (await live.order(token, [public])).status_code == 200
        assert_refused(await live.order(token, [internal]), "invalid_dpop_proof")

    @pytest.mark.parametrize(
        "origin", ["https://execution.example/api", "ftp://execution.example", "execution.example"]
    )
    def test_an_origin_with_a_path_or_another_scheme_is_refused(self, origin: str) -> None:
        with pytest.raises(ConfigurationError):
            DpopBinding(public_origin=origin)


class TestRootPath:
    """A proxy forwards ``https://api.example/api/orders`` as ``/orders`` to a server started with
    ``--root-path /api``: the proof names the URL the client called, prefix included."""

    @pytest.fixture
    async def live(self, issuer: FakeIssuer) -> AsyncIterator[Live]:
        app = build(issuer, DpopBinding(public_origin="https://api.example"))
        async for started in serve(app, issuer, root_path="/api"):
            yield started

    async def test_the_stripped_prefix_is_part_of_htu(self, live: Live) -> None:
        token = live.bound_token()
        called = live.key.proof(htu="https://api.example/api/orders", ath=ath_of(token))
        without_prefix = live.key.proof(htu="https://api.example/orders", ath=ath_of(token))

        assert (await live.order(token, [called])).status_code == 200
        assert_refused(await live.order(token, [without_prefix]), "invalid_dpop_proof")


@pytest.mark.parametrize(
    ("raw_path", "root_path", "url"),
    [
        (b"/api/orders", "/api", "https://api.example/api/orders"),  # uvicorn: prefix kept
        (b"/orders", "/api", "https://api.example/api/orders"),  # a server that strips it
        (b"/orders%2Fx?q=1", "", "https://api.example/orders%2Fx"),  # raw, not decoded
    ],
)
def test_the_url_a_proof_must_name(raw_path: bytes, root_path: str, url: str) -> None:
    from starlette.requests import Request

    from trustplane.pep.http import _dpop_request

    scope = {
        "type": "http",
        "method": "POST",
        "scheme": "http",
        "server": ("10.0.0.5", 8000),
        "path": "/ignored",
        "raw_path": raw_path,
        "root_path": root_path,
        "query_string": b"",
        "headers": [(b"host", b"10.0.0.5:8000"), (b"dpop", b"p1")],
    }
    binding = DpopBinding(public_origin="https://api.example")

    presented = _dpop_request(binding, Request(scope))

    assert presented is not None
    assert (presented.method, presented.url, presented.proofs) == ("POST", url, ("p1",))
