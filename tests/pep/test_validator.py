"""TokenValidator: one table row per RFC 9068 §4 / RFC 8725 check, plus key discovery and rotation."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.pep.conftest import AUDIENCE, ISSUER, FakeIssuer, b64url
from trustplane.errors import InvalidTokenError
from trustplane.jose.jwk import PublicKey
from trustplane.jose.jws import ParsedJWS
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.pep import ConfigurationError, TokenValidator, TrustedIssuer
from trustplane.pep import validator as validator_module
from trustplane.pep.keys import KeySourceError


@pytest.fixture
async def validator(issuer: FakeIssuer) -> AsyncIterator[TokenValidator]:
    v = TokenValidator(audience=AUDIENCE, issuers=[TrustedIssuer(ISSUER)], fetcher=issuer.fetcher())
    yield v
    await v.fetcher.aclose()


async def test_valid_token_gives_its_claims(validator: TokenValidator, issuer: FakeIssuer) -> None:
    access = await validator.validate(issuer.token())

    assert access.issuer == ISSUER
    assert access.client_id == access.subject == "client-1"
    assert access.scopes == {"order:create", "order:cancel"}
    assert access.audience == AUDIENCE
    assert access.claims["lei"] == "5493001KJTIIGC8Y1R12"


def _foreign(issuer: FakeIssuer) -> str:
    other = FakeIssuer("https://other.example")
    return other.token(iss="https://other.example")


def _forged_signature(issuer: FakeIssuer) -> str:
    head, body, _ = issuer.token().split(".")
    return f"{head}.{body}.{b64url(bytes(64))}"


def _payload_swapped(issuer: FakeIssuer) -> str:
    head, _, sig = issuer.token().split(".")
    return f"{head}.{b64url(json.dumps(issuer.claims(scope='settlement:submit')).encode())}.{sig}"


REFUSALS: list[tuple[str, Any, str]] = [
    ("alg none", lambda i: i.unsigned_token(), "malformed"),
    ("HS256 keyed with the public key (PEM)", lambda i: i.hs256_with_public_key(), "malformed"),
    (
        "HS256 keyed with the public JWK",
        lambda i: i.hs256_with_public_key(json.dumps(i.jwks()["keys"][0]).encode()),
        "malformed",
    ),
    ("typ JWT (an ID token)", lambda i: i.token(typ="JWT", nonce="n", aud="client-1"), "typ"),
    ("no typ", lambda i: i.token(headers={"typ": None}), "typ"),
    ("wrong audience", lambda i: i.token(aud="https://clearing.example/api"), "audience"),
    ("audience prefix", lambda i: i.token(aud=AUDIENCE + "/x"), "audience"),
    ("two audiences", lambda i: i.token(aud=[AUDIENCE, "https://x.example"]), "audience"),
    ("untrusted issuer", _foreign, "untrusted_issuer"),
    ("issuer with trailing slash", lambda i: i.token(iss=ISSUER + "/"), "untrusted_issuer"),
    ("issuer not a string", lambda i: i.token(iss=[ISSUER]), "untrusted_issuer"),
    ("expired beyond skew", lambda i: i.token(exp=int(time.time()) - 61), "expired"),
    ("not yet valid", lambda i: i.token(nbf=int(time.time()) + 120), "not_yet_valid"),
    ("issued in the future", lambda i: i.token(iat=int(time.time()) + 120), "not_yet_valid"),
    ("no exp", lambda i: i.token(exp=None), "malformed"),
    ("no iat", lambda i: i.token(iat=None), "malformed"),
    ("no jti", lambda i: i.token(jti=None), "malformed"),
    ("no client_id", lambda i: i.token(client_id=None), "malformed"),
    ("scope not a string", lambda i: i.token(scope=["order:create"]), "malformed"),
    ("no sub", lambda i: i.token(sub=None), "malformed"),
    ("empty sub", lambda i: i.token(sub=""), "malformed"),
    ("sub not a string", lambda i: i.token(sub=7), "malformed"),
    ("empty jti", lambda i: i.token(jti=""), "malformed"),
    ("client_id not a string", lambda i: i.token(client_id=["client-1"]), "malformed"),
    ("exp a boolean", lambda i: i.token(exp=True), "malformed"),
    ("exp a string", lambda i: i.token(exp=str(int(time.time()) + 60)), "malformed"),
    ("nbf a string", lambda i: i.token(nbf="0"), "malformed"),
    ("iat a boolean", lambda i: i.token(iat=False), "malformed"),
    ("forged signature", _forged_signature, "signature"),
    ("payload swapped under a valid signature", _payload_swapped, "signature"),
    ("unknown kid", lambda i: i.token(kid="k1", headers={"kid": "nope"}), "signature"),
    ("not a JWS", lambda i: "abc.def", "malformed"),
]


@pytest.mark.parametrize(
    ("token_of", "reason"), [(r[1], r[2]) for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
async def test_refused_tokens(
    validator: TokenValidator, issuer: FakeIssuer, token_of: Any, reason: str
) -> None:
    with pytest.raises(InvalidTokenError) as caught:
        await validator.validate(token_of(issuer))

    assert caught.value.error == "invalid_token"
    assert caught.value.status_code == 401
    assert caught.value.debug == reason


async def test_clock_skew_tolerates_a_recently_expired_token(
    validator: TokenValidator, issuer: FakeIssuer
) -> None:
    access = await validator.validate(issuer.token(exp=int(time.time()) - 30))

    assert access.client_id == "client-1"


async def test_application_at_jwt_typ_is_accepted(
    validator: TokenValidator, issuer: FakeIssuer
) -> None:
    """RFC 9068 §4: ``at+jwt`` or ``application/at+jwt``."""
    assert (await validator.validate(issuer.token(typ="application/at+jwt"))).jti


async def test_verified_tokens_are_remembered_boundedly_oldest_first_out(
    validator: TokenValidator, issuer: FakeIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remembered token is not verified again; at capacity the oldest one is dropped."""
    monkeypatch.setattr(validator_module, "VERIFIED_CACHE_SIZE", 2)
    verified: list[bytes] = []
    original = ParsedJWS.verify

    def counting(self: ParsedJWS, key: PublicKey) -> bool:
        verified.append(self.signing_input)
        return original(self, key)

    monkeypatch.setattr(ParsedJWS, "verify", counting)
    a, b, c = issuer.token(), issuer.token(), issuer.token()
    for token in (a, b, a, c, b, a):
        await validator.validate(token)
    first = [t.rsplit(".", 1)[0].encode() for t in (a, b, c, a)]
    assert verified == first  # a, b verified; a remembered; c drops a; b remembered; a again


async def test_keys_come_from_the_issuers_own_metadata(
    validator: TokenValidator, issuer: FakeIssuer
) -> None:
    await validator.validate(issuer.token())
    await validator.validate(issuer.token())

    assert issuer.requests == ["/.well-known/oauth-authorization-server", "/jwks"]


async def test_metadata_naming_another_issuer_is_not_used(issuer: FakeIssuer) -> None:
    """RFC 8414 §3.3: the metadata's issuer must be identical to the configured one."""
    issuer.metadata_issuer = "https://evil.example"
    validator = TokenValidator(
        audience=AUDIENCE, issuers=[TrustedIssuer(ISSUER)], fetcher=issuer.fetcher()
    )

    with pytest.raises(KeySourceError):
        await validator.validate(issuer.token())

    assert "/jwks" not in issuer.requests


async def test_rotation_an_unknown_kid_refetches_once_then_is_rate_limited(
    issuer: FakeIssuer,
) -> None:
    validator = TokenValidator(
        audience=AUDIENCE,
        issuers=[TrustedIssuer(ISSUER, jwks_uri=f"{ISSUER}/jwks")],
        fetcher=issuer.fetcher(),
        jwks_min_refetch=0.0,
    )
    await validator.validate(issuer.token())
    issuer.add_key("k2")

    access = await validator.validate(issuer.token(kid="k2"))

    assert access.client_id == "client-1"
    assert issuer.requests == ["/jwks", "/jwks"]


async def test_bogus_kids_cost_one_fetch_per_refetch_interval(issuer: FakeIssuer) -> None:
    validator = TokenValidator(
        audience=AUDIENCE,
        issuers=[TrustedIssuer(ISSUER, jwks_uri=f"{ISSUER}/jwks")],
        fetcher=issuer.fetcher(),
        jwks_min_refetch=60.0,
    )
    await validator.validate(issuer.token())

    for n in range(20):
        with pytest.raises(InvalidTokenError):
            await validator.validate(issuer.token(headers={"kid": f"bogus-{n}"}))

    assert issuer.requests == ["/jwks"]


async def test_unreachable_issuer_before_any_key_is_an_outage_not_a_bad_token(
    issuer: FakeIssuer,
) -> None:
    issuer.down = True
    validator = TokenValidator(
        audience=AUDIENCE, issuers=[TrustedIssuer(ISSUER)], fetcher=issuer.fetcher()
    )

    with pytest.raises(KeySourceError):
        await validator.validate(issuer.token())


async def test_known_keys_survive_a_failed_refresh(issuer: FakeIssuer) -> None:
    validator = TokenValidator(
        audience=AUDIENCE,
        issuers=[TrustedIssuer(ISSUER, jwks_uri=f"{ISSUER}/jwks")],
        fetcher=issuer.fetcher(),
        jwks_ttl=0.0,
        jwks_min_refetch=0.0,
    )
    await validator.validate(issuer.token())
    issuer.down = True

    access = await validator.validate(issuer.token())

    assert access.client_id == "client-1"


async def test_algorithms_can_be_narrowed_per_issuer(issuer: FakeIssuer) -> None:
    validator = TokenValidator(
        audience=AUDIENCE,
        issuers=[TrustedIssuer(ISSUER, algorithms=frozenset({"EdDSA"}))],
        fetcher=issuer.fetcher(),
    )

    with pytest.raises(InvalidTokenError) as caught:
        await validator.validate(issuer.token())

    assert caught.value.debug == "algorithm"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"issuer": "http://as.example"}, "https"),
        ({"issuer": ISSUER, "jwks_uri": "ftp://as.example/jwks"}, "https"),
        ({"issuer": ISSUER, "algorithms": frozenset({"HS256"})}, "HS256"),
        ({"issuer": ISSUER, "algorithms": frozenset({"none"})}, "none"),
    ],
)
def test_unsafe_configuration_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        TrustedIssuer(**kwargs)


@pytest.mark.parametrize(
    ("issuer_url", "message"),
    [
        ("http://127.0.0.1:9", "must use https"),
        ("https://127.0.0.1:9", "host 127.0.0.1 is loopback"),
        ("https://localhost", "host localhost is a local name"),
    ],
)
async def test_a_loopback_issuer_needs_the_development_fetcher(
    issuer_url: str, message: str
) -> None:
    """The PEP's fetches go through the guarded fetcher: a loopback issuer is refused when the
    validator is configured, not at the first request; the development policy allows it."""
    with pytest.raises(ConfigurationError, match=message):
        TokenValidator(audience=AUDIENCE, issuers=[TrustedIssuer(issuer_url)])
    dev = OutboundFetcher(OutboundPolicy.development())
    TokenValidator(audience=AUDIENCE, issuers=[TrustedIssuer(issuer_url)], fetcher=dev)
    await dev.aclose()


@pytest.mark.parametrize(
    "jwks_uri",
    ["https://169.254.169.254/latest/jwks", "https://10.0.0.1/jwks", "https://[::1]/jwks"],
)
async def test_metadata_pointing_the_jwks_at_a_private_address_is_not_followed(
    issuer: FakeIssuer, jwks_uri: str
) -> None:
    """The issuer's metadata names where its keys are; the fetcher refuses a non-public address
    (nothing is requested there) and the validator fails closed."""
    issuer.metadata_jwks_uri = jwks_uri
    validator = TokenValidator(
        audience=AUDIENCE, issuers=[TrustedIssuer(ISSUER)], fetcher=issuer.fetcher()
    )
    with pytest.raises(KeySourceError):
        await validator.validate(issuer.token())
    assert issuer.requests == ["/.well-known/oauth-authorization-server"]
    await validator.fetcher.aclose()
