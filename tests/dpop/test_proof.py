"""RFC 9449 §4.3 at the verifier: one negative case per MUST, each asserting the exact wire error, and
positive interop with proofs PyJWT built (ES256, EdDSA, PS256).

A proof is checked against (method, URL) of the request; at a resource server also against the
access token (``ath``) and the token's ``cnf.jkt``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from tests.dpop.conftest import URL, ProofKey, ath_of, hs256_proof
from trustplane.dpop import (
    DpopVerifier,
    InvalidDpopProofError,
    MemoryJtiStore,
    NonceSource,
    UseDpopNonceError,
)
from trustplane.errors import InvalidTokenError, OAuth2Error

ACCESS_TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJjbGllbnQtMSJ9.c2lnbmF0dXJl"
SECRET = b"a deployment secret of 32 bytes!"


@pytest.fixture(scope="module")
def es256() -> ProofKey:
    return ProofKey.generate("ES256")


def verifier(**kwargs: Any) -> DpopVerifier:
    return DpopVerifier(MemoryJtiStore(), **kwargs)


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "PS256"])
async def test_a_proof_built_by_pyjwt_verifies_and_names_its_key(alg: str) -> None:
    key = ProofKey.generate(alg)

    proof = await verifier().verify_for_token_endpoint([key.proof()], "POST", URL)

    assert proof.jkt == key.jkt  # RFC 7638, computed independently
    assert (proof.htm, proof.htu) == ("POST", URL)


@pytest.mark.parametrize("typ", ["dpop+jwt", "DPoP+JWT", "application/dpop+jwt"])
async def test_typ_is_the_media_type_in_any_spelling(es256: ProofKey, typ: str) -> None:
    """RFC 7515 §4.1.9: media types compare case-insensitively, and a ``typ`` without "/" is read
    with "application/" in front, so ``application/dpop+jwt`` is the same type (RFC 9449 §4.2)."""
    value = es256.proof(headers={"typ": typ})

    proof = await verifier().verify_for_token_endpoint([value], "POST", URL)

    assert proof.jkt == es256.jkt


async def test_a_resource_proof_with_ath_and_the_bound_key_verifies(es256: ProofKey) -> None:
    value = es256.proof(htm="GET", htu="https://rs.example/orders", ath=ath_of(ACCESS_TOKEN))

    proof = await verifier().verify_for_resource(
        [value], "GET", "https://rs.example/orders?page=2", ACCESS_TOKEN, es256.jkt
    )

    assert proof.ath == ath_of(ACCESS_TOKEN)


@dataclass(frozen=True)
class Case:
    """A proof (or header list) that must be refused with ``error``."""

    id: str
    headers: Callable[[ProofKey], list[str]]
    error: type[OAuth2Error] = InvalidDpopProofError
    resource: bool = False


def other_key_signature(key: ProofKey) -> list[str]:
    return [key.proof(key=ec.generate_private_key(ec.SECP256R1()))]


def private_jwk(key: ProofKey) -> list[str]:
    private = ECAlgorithm.to_jwk(key.private, as_dict=True)  # carries "d"
    return [key.proof(headers={"jwk": private})]


def none_alg(key: ProofKey) -> list[str]:
    header = {"typ": "dpop+jwt", "jwk": key.jwk}
    return [jwt.encode(key.claims(), None, algorithm="none", headers=header)]


def rs256(key: ProofKey) -> list[str]:
    rsa_key = ProofKey.generate("PS256")
    return [rsa_key.proof(alg="RS256")]


CASES = [
    # §4.3 step 1: not more than one DPoP header
    Case("no-header", lambda k: []),
    Case("two-headers", lambda k: [k.proof(), k.proof()]),
    # step 2: a single well-formed JWT
    Case("not-a-jwt", lambda k: ["not-a-jwt"]),
    Case("two-jwts-in-one-value", lambda k: [f"{k.proof()}, {k.proof()}"]),
    Case("json-not-jws", lambda k: ['{"typ":"dpop+jwt"}']),
    # step 3: required claims and header parameters
    Case("no-jti", lambda k: [k.proof(jti=None)]),
    Case("empty-jti", lambda k: [k.proof(jti="")]),
    Case("jti-too-long", lambda k: [k.proof(jti="j" * 129)]),
    Case("jti-nul", lambda k: [k.proof(jti="a\x00b")]),
    Case("jti-control", lambda k: [k.proof(jti="a\nb")]),
    Case("no-htm", lambda k: [k.proof(htm=None)]),
    Case("no-htu", lambda k: [k.proof(htu=None)]),
    Case("no-iat", lambda k: [k.proof(iat=None)]),
    Case("iat-not-a-number", lambda k: [k.proof(iat=str(int(time.time())))]),
    Case("iat-boolean", lambda k: [k.proof(iat=True)]),
    Case("no-jwk", lambda k: [k.proof(drop_headers=("jwk",))]),
    Case("jwk-not-an-object", lambda k: [k.proof(headers={"jwk": "key"})]),
    # step 4: typ is dpop+jwt
    Case("no-typ", lambda k: [k.proof(drop_headers=("typ",))]),
    Case("typ-jwt", lambda k: [k.proof(headers={"typ": "JWT"})]),
    Case("typ-at+jwt", lambda k: [k.proof(headers={"typ": "at+jwt"})]),
    Case("typ-other-prefix", lambda k: [k.proof(headers={"typ": "text/dpop+jwt"})]),
    Case("typ-not-a-string", lambda k: [k.proof(headers={"typ": ["dpop+jwt"]})]),
    # step 5: an asymmetric algorithm we support (never none, HS*, RS256)
    Case("alg-none", none_alg),
    Case("alg-hs256", lambda k: [hs256_proof(k, b"k" * 32)]),
    Case("alg-rs256", rs256),
    Case("alg-not-the-keys", lambda k: [k.proof(headers={"jwk": ProofKey.generate("EdDSA").jwk})]),
    # step 6: the signature verifies with the jwk of the header
    Case("signed-by-another-key", other_key_signature),
    # step 7: the jwk holds no private key
    Case("jwk-private-d", private_jwk),
    Case("jwk-symmetric", lambda k: [k.proof(headers={"jwk": {"kty": "oct", "k": "c2VjcmV0"}})]),
    # step 8: htm is the request method (case-sensitive)
    Case("htm-other-method", lambda k: [k.proof(htm="GET")]),
    Case("htm-lowercase", lambda k: [k.proof(htm="post")]),
    # step 9: htu is the request URI without query and fragment
    Case("htu-other-path", lambda k: [k.proof(htu="https://as.example/par")]),
    Case("htu-other-host", lambda k: [k.proof(htu="https://evil.example/token")]),
    Case("htu-other-scheme", lambda k: [k.proof(htu="http://as.example/token")]),
    Case("htu-other-port", lambda k: [k.proof(htu="https://as.example:8443/token")]),
    Case("htu-trailing-slash", lambda k: [k.proof(htu="https://as.example/token/")]),
    Case("htu-relative", lambda k: [k.proof(htu="/token")]),
    Case("htu-not-a-string", lambda k: [k.proof(htu=["https://as.example/token"])]),
    # step 11: iat within the window (60 s past, 10 s ahead by default)
    Case("iat-too-old", lambda k: [k.proof(iat=int(time.time()) - 120)]),
    Case("iat-in-the-future", lambda k: [k.proof(iat=int(time.time()) + 60)]),
    # step 12: at a resource server, ath is the token's hash and the key is the token's
    Case("ath-missing", lambda k: [k.proof()], resource=True),
    Case("ath-of-another-token", lambda k: [k.proof(ath=ath_of("another"))], resource=True),
    Case("ath-not-a-string", lambda k: [k.proof(ath=42)], resource=True),
]

#: Which check refused each case (the log and metric reason): each case fails where it is meant to.
REASONS = {
    "no-header": "dpop_missing",
    "two-headers": "dpop_repeated",
    "not-a-jwt": "dpop_malformed",
    "two-jwts-in-one-value": "dpop_malformed",
    "json-not-jws": "dpop_malformed",
    "no-jti": "dpop_jti",
    "empty-jti": "dpop_jti",
    "jti-too-long": "dpop_jti",
    "jti-nul": "dpop_jti",
    "jti-control": "dpop_jti",
    "no-htm": "dpop_claims",
    "no-htu": "dpop_claims",
    "no-iat": "dpop_claims",
    "iat-not-a-number": "dpop_claims",
    "iat-boolean": "dpop_claims",
    "no-jwk": "dpop_jwk",
    "jwk-not-an-object": "dpop_jwk",
    "no-typ": "dpop_typ",
    "typ-jwt": "dpop_typ",
    "typ-at+jwt": "dpop_typ",
    "typ-other-prefix": "dpop_typ",
    "typ-not-a-string": "dpop_typ",
    "alg-none": "dpop_malformed",
    "alg-hs256": "dpop_malformed",
    "alg-rs256": "dpop_malformed",
    "alg-not-the-keys": "dpop_algorithm",
    "signed-by-another-key": "dpop_signature",
    "jwk-private-d": "dpop_private_key",
    "jwk-symmetric": "dpop_private_key",
    "htm-other-method": "dpop_htm",
    "htm-lowercase": "dpop_htm",
    "htu-other-path": "dpop_htu",
    "htu-other-host": "dpop_htu",
    "htu-other-scheme": "dpop_htu",
    "htu-other-port": "dpop_htu",
    "htu-trailing-slash": "dpop_htu",
    "htu-relative": "dpop_htu",
    "htu-not-a-string": "dpop_claims",
    "iat-too-old": "dpop_iat_too_old",
    "iat-in-the-future": "dpop_iat_in_future",
    "ath-missing": "dpop_ath",
    "ath-of-another-token": "dpop_ath",
    "ath-not-a-string": "dpop_ath",
}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_every_check_of_section_4_3_refuses_with_its_error(
    es256: ProofKey, case: Case
) -> None:
    subject = verifier()
    call = (
        subject.verify_for_resource(case.headers(es256), "POST", URL, ACCESS_TOKEN, es256.jkt)
        if case.resource
        else subject.verify_for_token_endpoint(case.headers(es256), "POST", URL)
    )
    with pytest.raises(case.error) as refused:
        await call

    assert refused.value.error == "invalid_dpop_proof"
    assert refused.value.status_code == 400
    assert refused.value.body()["error"] == "invalid_dpop_proof"
    assert refused.value.debug == REASONS[case.id]


async def test_a_proof_by_another_key_than_the_tokens_is_invalid_token(es256: ProofKey) -> None:
    """RFC 9449 §4.3 step 12, second half; §7.1 example: ``invalid_token``."""
    other = ProofKey.generate("ES256")
    with pytest.raises(InvalidTokenError) as refused:
        await verifier().verify_for_resource(
            [other.proof(ath=ath_of(ACCESS_TOKEN))], "POST", URL, ACCESS_TOKEN, es256.jkt
        )

    assert refused.value.error == "invalid_token"


async def test_a_proof_is_accepted_once(es256: ProofKey) -> None:
    """RFC 9449 §11.1: the jti is single-use within the iat window."""
    subject = verifier()
    value = es256.proof()
    await subject.verify_for_token_endpoint([value], "POST", URL)

    with pytest.raises(InvalidDpopProofError) as refused:
        await subject.verify_for_token_endpoint([value], "POST", URL)

    assert refused.value.debug == "dpop_replay"


async def test_a_refused_proof_does_not_use_up_its_jti(es256: ProofKey) -> None:
    subject = verifier()
    jti = "same-jti"
    with pytest.raises(InvalidDpopProofError):
        await subject.verify_for_token_endpoint([es256.proof(jti=jti, htm="GET")], "POST", URL)

    await subject.verify_for_token_endpoint([es256.proof(jti=jti)], "POST", URL)


async def test_the_same_jti_under_two_keys_is_two_proofs(es256: ProofKey) -> None:
    subject = verifier()
    other = ProofKey.generate("EdDSA")
    await subject.verify_for_token_endpoint([es256.proof(jti="j-1")], "POST", URL)
    await subject.verify_for_token_endpoint([other.proof(jti="j-1")], "POST", URL)


@pytest.mark.parametrize(
    ("age", "accepted"), [(-10, True), (-11, False), (60, True), (61, False), (0, True)]
)
async def test_the_iat_window_edges(es256: ProofKey, age: int, accepted: bool) -> None:
    now = 1_800_000_000
    value = es256.proof(iat=now - age)
    call = verifier().verify_for_token_endpoint([value], "POST", URL, now=now)
    if accepted:
        await call
    else:
        with pytest.raises(InvalidDpopProofError):
            await call


@pytest.mark.parametrize(
    "htu",
    [
        "HTTPS://AS.EXAMPLE/token",
        "https://as.example:443/token",
        "https://as.example/token?x=1#frag",
        "https://as.example/%74oken",
        "https://as.example/a/../token",
    ],
)
async def test_htu_is_compared_after_normalization(es256: ProofKey, htu: str) -> None:
    """RFC 9449 §4.3 step 9 and its SHOULD on RFC 3986 §6.2.2/§6.2.3 normalization."""
    await verifier().verify_for_token_endpoint([es256.proof(htu=htu)], "POST", URL)


class TestNonce:
    """RFC 9449 §8: server nonces, valid on every instance of the deployment, rotated."""

    now = 1_800_000_000.0

    def nonces(self, secret: bytes = SECRET) -> NonceSource:
        return NonceSource(secret, 300)

    async def test_missing_nonce_is_use_dpop_nonce_with_a_fresh_one(self, es256: ProofKey) -> None:
        subject = verifier(nonces=self.nonces())
        with pytest.raises(UseDpopNonceError) as refused:
            await subject.verify_for_token_endpoint(
                [es256.proof(iat=int(self.now))], "POST", URL, now=self.now
            )

        assert refused.value.error == "use_dpop_nonce"
        assert refused.value.status_code == 400
        assert refused.value.headers["DPoP-Nonce"] == self.nonces().current(self.now)

    async def test_a_nonce_of_another_instance_is_accepted(self, es256: ProofKey) -> None:
        """Two instances, one secret: nothing shared per request."""
        issued = self.nonces().current(self.now)
        other_instance = verifier(nonces=self.nonces())

        proof = await other_instance.verify_for_token_endpoint(
            [es256.proof(iat=int(self.now), nonce=issued)], "POST", URL, now=self.now
        )

        assert proof.nonce == issued

    async def test_the_previous_windows_nonce_is_accepted(self, es256: ProofKey) -> None:
        issued = self.nonces().current(self.now)
        later = self.now + 300
        await verifier(nonces=self.nonces()).verify_for_token_endpoint(
            [es256.proof(iat=int(later), nonce=issued)], "POST", URL, now=later
        )

    @pytest.mark.parametrize(
        "nonce",
        ["stale", "forged", "another-deployment", "garbage", "not-a-string"],
    )
    async def test_a_stale_or_foreign_nonce_is_use_dpop_nonce(
        self, es256: ProofKey, nonce: str
    ) -> None:
        value: Any = {
            "stale": self.nonces().current(self.now - 600),
            "forged": self.nonces().current(self.now)[:-2] + "AA",
            "another-deployment": self.nonces(b"another secret of 32 bytes......").current(
                self.now
            ),
            "garbage": "x" * 32,
            "not-a-string": 12345,
        }[nonce]
        subject = verifier(nonces=self.nonces())
        with pytest.raises(UseDpopNonceError) as refused:
            await subject.verify_for_token_endpoint(
                [es256.proof(iat=int(self.now), nonce=value)], "POST", URL, now=self.now
            )

        assert refused.value.error == "use_dpop_nonce"
        assert refused.value.headers["DPoP-Nonce"] == self.nonces().current(self.now)

    def test_nonces_rotate(self) -> None:
        source = self.nonces()
        assert source.current(self.now) != source.current(self.now + 300)
        assert not source.accepts(source.current(self.now), self.now + 600)
        assert not source.accepts(source.current(self.now + 300), self.now)  # never ahead


async def test_a_proof_built_by_joserfc_verifies() -> None:
    """A second independent implementation: joserfc's own key generation and compact JWS (ES256;
    joserfc warns that "EdDSA" is deprecated by RFC 9864 in favour of "Ed25519", see the docs)."""
    from joserfc import jws
    from joserfc.jwk import ECKey

    key = ECKey.generate_key("P-256")
    public = key.as_dict(private=False)
    header = {"alg": "ES256", "typ": "dpop+jwt", "jwk": public}
    claims = {"jti": "joserfc-1", "htm": "POST", "htu": URL, "iat": int(time.time())}
    value = jws.serialize_compact(header, json.dumps(claims), key, algorithms=["ES256"])

    proof = await verifier().verify_for_token_endpoint([value], "POST", URL)

    assert proof.jkt == key.thumbprint()
