"""The JWT-bearer grant (RFC 7523 §2.1, §3, §3.1) for partner assertions, over HTTP: one case per MUST,
each asserting the exact status and error code AND the deny record in the audit trail."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.conftest import (
    CLEARING,
    EXECUTION,
    PROTOCOL_DATABASES,
    ClientKit,
    jwks_for,
    register_kit,
)
from tests.federation.partners import (
    JWT_BEARER,
    PARTNER_LEI,
    TOKEN_TYPE_JWT,
    Partner,
    client_metadata,
)
from tests.oauth.test_token_endpoint import TRADE
from tests.protocol_server import Server, running_server
from trustplane.audit.sink import recent_events
from trustplane.clients.remote_jwks import RemoteJwksCache
from trustplane.federation.registry import REPLAY_NAMESPACE
from trustplane.oauth.exchange import TOKEN_EXCHANGE

pytestmark = pytest.mark.asyncio(loop_scope="module")
REMOTE_HOST = "keys.partner-c.example"


@dataclass
class Federation:
    server: Server
    kit: ClientKit
    a: Partner
    b: Partner
    remote: Partner
    disabled: Partner
    outbound: list[httpx.Request]

    async def grant(self, assertion: str, kit: ClientKit | None = None, **form: Any) -> Any:
        """POST /token with the jwt-bearer grant; returns (response, the client assertion's jti)."""
        auth = (kit or self.kit).auth()
        jti = jwt.decode(auth["client_assertion"], options={"verify_signature": False})["jti"]
        data = {
            "grant_type": JWT_BEARER,
            "assertion": assertion,
            "scope": "order:create",
            "resource": EXECUTION,
            **auth,
            **form,
        }
        data = {k: v for k, v in data.items() if v is not None}
        return await self.server.http.post("/token", data=data), jti

    async def refusal(self, client_jti: str) -> dict[str, Any]:
        """The audit record of the refused request (matched by its client assertion's jti)."""
        events = await recent_events(self.server.services.db, 20, "oauth:token:refused")
        (event,) = [e for e in events if e["jti"] == client_jti]
        return event


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=PROTOCOL_DATABASES)
async def fed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Federation]:
    async with running_server(
        request, tmp_path_factory, federation_jwks_hosts=(REMOTE_HOST,)
    ) as server:
        svc, issuer = server.services, server.issuer
        outbound: list[httpx.Request] = []

        remote = Partner("partner-c", "https://idp.partner-c.example", issuer)

        def recorded(req: httpx.Request) -> httpx.Response:
            """Every outbound request is recorded (tests assert on the list); only the partner's
            own jwks_uri gets an answer."""
            outbound.append(req)
            if str(req.url) == f"https://{REMOTE_HOST}/jwks":
                return httpx.Response(200, json=jwks_for(remote.key, remote.kid))
            return httpx.Response(404)

        svc.federation.registry.remote_jwks = RemoteJwksCache(
            transport=httpx.MockTransport(recorded)
        )
        a = Partner("partner-a", "https://idp.partner-a.example", issuer)
        b = Partner("partner-b", "https://idp.partner-b.example", issuer)
        disabled = Partner("partner-d", "https://idp.partner-d.example", issuer)
        for p in (a, disabled):
            await svc.federation.add(p.profile(), changed_by="test")
        await svc.federation.add(b.profile(allowed_scopes=["order:create"]), changed_by="test")
        await svc.federation.add(
            remote.profile(keys={"jwks_uri": f"https://{REMOTE_HOST}/jwks"}), changed_by="test"
        )
        await svc.federation.disable("partner-d", changed_by="test", reason="offboarded")
        kit = await register_kit(svc, **client_metadata())
        yield Federation(server, kit, a, b, remote, disabled, outbound)


def error_of(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json().get("error")


# --------------------------------------------------------------------------- success


async def test_issued_token_preserves_the_origin_and_adds_mapped_attributes(
    fed: Federation,
) -> None:
    assertion = fed.a.assertion(product_class="bond", txn="txn-0001")
    response, _ = await fed.grant(assertion, scope="order:create order:cancel")

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["token_type"], body["scope"]) == ("Bearer", "order:create order:cancel")
    jwks = jwt.PyJWKSet.from_dict((await fed.server.http.get("/jwks")).json())
    token = body["access_token"]
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(
        token,
        jwks[header["kid"]],
        algorithms=[header["alg"]],
        audience=EXECUTION,
        issuer=fed.server.issuer,
    )
    assert header["typ"] == "at+jwt"
    assert claims["sub"] == "partner:partner-a:trader-42"
    assert claims["origin"] == {"iss": fed.a.issuer, "sub": "trader-42"}
    assert claims["partner"] == "partner-a"
    assert claims["lei"] == PARTNER_LEI
    assert claims["client_id"] == fed.kit.client_id
    assert (claims["desk"], claims["product"], claims["txn"]) == ("rates-emea", "bond", "txn-0001")
    issued = await recent_events(fed.server.services.db, 1, "oauth:token:issued")
    assert issued[0]["jti"] == claims["jti"]
    assert issued[0]["partner"] == "partner-a"
    assert issued[0]["subject"] == "partner:partner-a:trader-42"
    assert issued[0]["payload"]["origin"] == claims["origin"]


async def test_same_sub_from_two_partners_gives_two_distinct_subjects(fed: Federation) -> None:
    subjects = []
    for partner in (fed.a, fed.b):
        response, _ = await fed.grant(partner.assertion(sub="same-user"))
        assert response.status_code == 200, response.text
        token = response.json()["access_token"]
        subjects.append(jwt.decode(token, options={"verify_signature": False})["sub"])
    assert subjects == ["partner:partner-a:same-user", "partner:partner-b:same-user"]


async def test_partner_jti_lives_in_its_own_replay_namespace(fed: Federation) -> None:
    """A partner jti equal to a client-assertion jti does not collide with it."""
    auth = fed.kit.auth()
    shared = jwt.decode(auth["client_assertion"], options={"verify_signature": False})["jti"]
    data = {
        "grant_type": JWT_BEARER,
        "assertion": fed.a.assertion(jti=shared),
        "scope": "order:create",
        "resource": EXECUTION,
        **auth,
    }
    response = await fed.server.http.post("/token", data=data)
    assert response.status_code == 200, response.text
    assert REPLAY_NAMESPACE.startswith("partner-assertion:")


# --------------------------------------------------------------------------- refusals


def _expired(f: Federation) -> str:
    now = int(time.time())
    return f.a.assertion(iat=now - 400, exp=now - 200)


def _too_long(f: Federation) -> str:
    now = int(time.time())
    return f.a.assertion(iat=now, exp=now + 301)


def _far_exp_without_iat(f: Federation) -> str:
    return f.a.assertion(iat=None, exp=int(time.time()) + 3600)


INVALID_GRANT_CASES = {
    "untrusted issuer": (
        lambda f: f.a.assertion(iss="https://idp.stranger.example"),
        "untrusted_issuer",
        None,
    ),
    "partner A's key with partner B's iss": (
        lambda f: f.a.assertion(iss=f.b.issuer),
        "signature",
        "partner-b",
    ),
    "partner B's key with partner B's kid and A's iss": (
        lambda f: f.b.assertion(iss=f.a.issuer, _headers={"kid": "p1"}),
        "signature",
        "partner-a",
    ),
    "expired": (_expired, "expired", "partner-a"),
    "lifetime over the profile maximum": (_too_long, "lifetime", "partner-a"),
    "exp beyond the maximum, no iat": (_far_exp_without_iat, "lifetime", "partner-a"),
    "iat in the future": (
        lambda f: f.a.assertion(iat=int(time.time()) + 600, exp=int(time.time()) + 700),
        "not_yet_valid",
        "partner-a",
    ),
    "missing required claim (profile)": (
        lambda f: f.a.assertion(desk=None),
        "missing_claim",
        "partner-a",
    ),
    "missing exp": (lambda f: f.a.assertion(exp=None), "missing_claim", "partner-a"),
    "missing sub": (lambda f: f.a.assertion(sub=None), "missing_claim", "partner-a"),
    "missing jti": (lambda f: f.a.assertion(jti=None), "missing_claim", "partner-a"),
    "wrong aud": (
        lambda f: f.a.assertion(aud="https://other-as.example"),
        "audience",
        "partner-a",
    ),
    "aud with a second audience": (
        lambda f: f.a.assertion(aud=[f.a.audience, "https://other-as.example"]),
        "audience",
        "partner-a",
    ),
    "disabled partner": (lambda f: f.disabled.assertion(), "partner_disabled", "partner-d"),
    "typ of an access token": (
        lambda f: f.a.assertion(_headers={"typ": "at+jwt"}),
        "token_type",
        "partner-a",
    ),
    "typ of an ID token": (
        lambda f: f.a.assertion(_headers={"typ": "id_token+jwt"}),
        "token_type",
        "partner-a",
    ),
    "HS256 with the partner's public key bytes": (
        lambda f: f.a.assertion(_alg="HS256", _key="not-a-key-but-a-secret-of-32-bytes!!"),
        "algorithm",
        None,
    ),
    "product outside the profile": (
        lambda f: f.a.assertion(product_class="equity"),
        "product_not_allowed",
        "partner-a",
    ),
    "not a JWT": (lambda f: "not.a.jwt", "malformed", None),
    "alg none": (lambda f: f.a.assertion(_alg="none", _key=None), "algorithm", None),
    "alg in the allow-list, not the partner's": (
        lambda f: f.a.assertion(_alg="EdDSA", _key=Ed25519PrivateKey.generate()),
        "algorithm",
        "partner-a",
    ),
    "signature altered": (lambda f: _altered(f.a.assertion()), "signature", "partner-a"),
    "unknown kid": (lambda f: f.a.assertion(_headers={"kid": "p9"}), "signature", "partner-a"),
    "over 16 KiB": (lambda f: f.a.assertion(pad="p" * 17_000), "malformed", None),
    "encrypted (JWE, five parts)": (lambda f: "e30.e30.e30.e30.e30", "malformed", None),
    "missing iss": (lambda f: f.a.assertion(iss=None), "untrusted_issuer", None),
    "missing aud": (lambda f: f.a.assertion(aud=None), "audience", "partner-a"),
    "aud is the token endpoint": (
        lambda f: f.a.assertion(aud=f"{f.a.audience}/token"),
        "audience",
        "partner-a",
    ),
    "aud differs in case": (
        lambda f: f.a.assertion(aud=f.a.audience.upper()),
        "audience",
        "partner-a",
    ),
    "exp is a string": (
        lambda f: f.a.assertion(exp=str(int(time.time()) + 60)),
        "missing_claim",
        "partner-a",
    ),
    "exp is a boolean": (lambda f: f.a.assertion(exp=True), "missing_claim", "partner-a"),
    "nbf in the future": (
        lambda f: f.a.assertion(nbf=int(time.time()) + 600, exp=int(time.time()) + 200),
        "not_yet_valid",
        "partner-a",
    ),
    "nbf is a string": (lambda f: f.a.assertion(nbf="0"), "claim_value", "partner-a"),
    "iat is a list": (lambda f: f.a.assertion(iat=[1]), "claim_value", "partner-a"),
    "iat too old for the profile's lifetime": (
        lambda f: f.a.assertion(iat=int(time.time()) - 3600),
        "lifetime",
        "partner-a",
    ),
    "sub not a string": (lambda f: f.a.assertion(sub=42), "missing_claim", "partner-a"),
    "sub with a NUL": (lambda f: f.a.assertion(sub="trader\x00-42"), "missing_claim", "partner-a"),
    "sub empty": (lambda f: f.a.assertion(sub=""), "missing_claim", "partner-a"),
    "jti over 256 characters": (
        lambda f: f.a.assertion(jti="j" * 257),
        "missing_claim",
        "partner-a",
    ),
    "jti with a NUL": (lambda f: f.a.assertion(jti="j\x00j"), "missing_claim", "partner-a"),
}


def _altered(token: str) -> str:
    """The same header and claims under another (valid-looking) signature."""
    header, payload, signature = token.split(".")
    flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
    return f"{header}.{payload}.{flipped}"


@pytest.mark.parametrize("case", list(INVALID_GRANT_CASES))
async def test_bad_assertion_is_invalid_grant_and_audited(fed: Federation, case: str) -> None:
    make, reason_id, partner = INVALID_GRANT_CASES[case]
    response, client_jti = await fed.grant(make(fed))

    assert error_of(response) == (400, "invalid_grant"), response.text
    event = await fed.refusal(client_jti)
    assert (event["decision"], event["reason"]) == ("deny", "invalid_grant")
    assert event["reason_ids"] == [reason_id]
    assert event["partner"] == partner
    assert event["client_id"] == fed.kit.client_id


@pytest.mark.parametrize("header", ["jku", "x5u", "jwk", "x5c"])
async def test_key_or_url_in_header_is_refused_without_any_outbound_request(
    fed: Federation, header: str
) -> None:
    values: dict[str, Any] = {
        "jku": "https://keys.partner-c.example/jwks",
        "x5u": "https://keys.partner-c.example/cert.pem",
        "jwk": {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"},
        "x5c": ["MIIB"],
    }
    response, client_jti = await fed.grant(fed.remote.assertion(_headers={header: values[header]}))

    assert error_of(response) == (400, "invalid_grant")
    event = await fed.refusal(client_jti)
    assert event["reason_ids"] == ["key_in_header"]
    assert fed.outbound == []


async def test_partner_with_jwks_uri_fetches_only_its_allow_listed_uri(fed: Federation) -> None:
    """Control for the test above: the remote partner's keys are fetched from its profile's URI
    (once: then cached), and a header URL is still never followed."""
    fed.outbound.clear()
    first, _ = await fed.grant(fed.remote.assertion())
    second, _ = await fed.grant(fed.remote.assertion())
    jku, _ = await fed.grant(fed.remote.assertion(_headers={"jku": "https://evil.example/k"}))

    assert first.status_code == second.status_code == 200, first.text
    assert error_of(jku) == (400, "invalid_grant")
    assert [str(r.url) for r in fed.outbound] == [f"https://{REMOTE_HOST}/jwks"]


async def test_replayed_partner_assertion_is_invalid_grant(fed: Federation) -> None:
    assertion = fed.a.assertion()
    first, _ = await fed.grant(assertion)
    again, client_jti = await fed.grant(assertion)

    assert first.status_code == 200, first.text
    assert error_of(again) == (400, "invalid_grant")
    event = await fed.refusal(client_jti)
    assert (event["reason_ids"], event["partner"]) == (["replay"], "partner-a")


async def test_scope_outside_the_profile_is_invalid_scope(fed: Federation) -> None:
    """order:cancel is allowed for the client and the resource, but not in partner B's profile."""
    response, client_jti = await fed.grant(fed.b.assertion(), scope="order:create order:cancel")
    assert error_of(response) == (400, "invalid_scope")
    assert "partner" in response.json()["error_description"]
    event = await fed.refusal(client_jti)
    assert (event["reason"], event["partner"]) == ("invalid_scope", "partner-b")


async def test_scope_the_resource_does_not_accept_is_invalid_scope(fed: Federation) -> None:
    response, client_jti = await fed.grant(fed.a.assertion(), scope="settlement:submit")
    assert error_of(response) == (400, "invalid_scope")
    event = await fed.refusal(client_jti)
    assert (event["reason"], event["partner"]) == ("invalid_scope", "partner-a")


async def test_audience_outside_the_profile_is_invalid_target(fed: Federation) -> None:
    """CLEARING is allowed for the client and accepts settlement:submit; not in partner A's profile."""
    response, client_jti = await fed.grant(
        fed.a.assertion(), scope="settlement:submit", resource=CLEARING
    )
    assert error_of(response) == (400, "invalid_target")
    assert "partner" in response.json()["error_description"]
    event = await fed.refusal(client_jti)
    assert (event["reason"], event["partner"]) == ("invalid_target", "partner-a")


async def test_a_refused_scope_does_not_consume_the_partner_assertion(fed: Federation) -> None:
    assertion = fed.a.assertion()
    refused, _ = await fed.grant(assertion, scope="settlement:submit", resource=CLEARING)
    accepted, _ = await fed.grant(assertion)
    assert error_of(refused) == (400, "invalid_target")
    assert accepted.status_code == 200, accepted.text


async def test_client_without_the_grant_type_is_unauthorized_client(fed: Federation) -> None:
    other = await register_kit(fed.server.services)  # client_credentials only
    response, client_jti = await fed.grant(fed.a.assertion(), kit=other)
    assert error_of(response) == (400, "unauthorized_client")
    assert (await fed.refusal(client_jti))["reason"] == "unauthorized_client"


@pytest.mark.parametrize("assertion", [None, ""])
async def test_missing_assertion_is_invalid_request(fed: Federation, assertion: str | None) -> None:
    """RFC 6749 §3.1: a parameter sent without a value is treated as omitted."""
    response, client_jti = await fed.grant(assertion)  # type: ignore[arg-type]
    assert error_of(response) == (400, "invalid_request")
    assert (await fed.refusal(client_jti))["reason"] == "invalid_request"


async def test_two_assertions_are_invalid_request(fed: Federation) -> None:
    """RFC 7521 §4.1: the assertion parameter MUST contain a single assertion; RFC 6749 §3.2: a
    parameter MUST NOT be repeated. Neither assertion is used up."""
    one, two = fed.a.assertion(), fed.a.assertion()
    auth = fed.kit.auth()
    pairs = [
        ("grant_type", JWT_BEARER),
        ("assertion", one),
        ("assertion", two),
        ("scope", "order:create"),
        ("resource", EXECUTION),
        *auth.items(),
    ]
    response = await fed.server.http.post(
        "/token",
        content=urlencode(pairs),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert error_of(response) == (400, "invalid_request"), response.text
    for assertion in (one, two):
        accepted, _ = await fed.grant(assertion)
        assert accepted.status_code == 200, accepted.text


async def test_unauthenticated_client_is_invalid_client(fed: Federation) -> None:
    data = {
        "grant_type": JWT_BEARER,
        "assertion": fed.a.assertion(),
        "scope": "order:create",
        "resource": EXECUTION,
    }
    response = await fed.server.http.post("/token", data=data)
    assert error_of(response) == (401, "invalid_client")


# --------------------------------------------------------------------------- typ, wire text, details


@pytest.mark.parametrize("typ", ["jwt", "application/jwt", "application/JWT", "Jwt"])
async def test_typ_is_compared_as_a_media_type(fed: Federation, typ: str) -> None:
    """RFC 7515 §4.1.9: ``typ`` is a media type, compared case-insensitively, and a value without
    a ``/`` is the ``application/`` one: each of these is the JWT type a partner assertion has."""
    response, _ = await fed.grant(fed.a.assertion(_headers={"typ": typ}))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("typ", ["application/at+jwt", "AT+JWT", "application/jwt; x=1", "jwt "])
async def test_typ_of_another_media_type_is_still_refused(fed: Federation, typ: str) -> None:
    response, client_jti = await fed.grant(fed.a.assertion(_headers={"typ": typ}))
    assert error_of(response) == (400, "invalid_grant"), response.text
    assert (await fed.refusal(client_jti))["reason_ids"] == ["token_type"]


#: RFC 6749 §5.2: error_description uses %x20-21 / %x23-5B / %x5D-7E only.
WIRE_SAFE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]+")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda f: f.a.assertion(_headers={"typ": 'x"\\\u00e9'}), id="typ"),
        pytest.param(lambda f: f.a.assertion(_headers={"typ": "x\x00y"}), id="typ-nul"),
        pytest.param(lambda f: f.a.assertion(product_class='equity"\\\u00e9'), id="claim-value"),
    ],
)
async def test_error_description_keeps_to_the_rfc6749_character_set(
    fed: Federation, make: Any
) -> None:
    """A refusal that names what the assertion carried shows no quote, backslash or non-ASCII
    character on the wire (RFC 6749 §5.2)."""
    response, _ = await fed.grant(make(fed))
    assert error_of(response) == (400, "invalid_grant"), response.text
    description = response.json()["error_description"]
    assert WIRE_SAFE.fullmatch(description), description


async def test_authorization_details_are_refused_not_dropped(fed: Federation) -> None:
    """RFC 9396 §6: the underlying grant decides which details a token may carry; a partner
    assertion grants none, so details on this grant are invalid_authorization_details (before,
    they were dropped and a token without them issued with a 200), and the assertion is not used
    up by the refusal."""
    kit = await register_kit(
        fed.server.services,
        **client_metadata(authorization_details_types=["trade_instruction"]),
    )
    assertion = fed.a.assertion()
    refused, client_jti = await fed.grant(
        assertion, kit=kit, authorization_details=json.dumps([TRADE])
    )
    accepted, _ = await fed.grant(assertion, kit=kit)

    assert error_of(refused) == (400, "invalid_authorization_details"), refused.text
    event = await fed.refusal(client_jti)
    assert (event["reason"], event["partner"]) == ("invalid_authorization_details", "partner-a")
    assert accepted.status_code == 200, accepted.text
    assert "authorization_details" not in accepted.json()


async def test_racing_uses_of_one_assertion_succeed_once(fed: Federation) -> None:
    """RFC 7523 §3 item 7 with the jti single-use: racing requests with one assertion (on
    PostgreSQL the group-commit batch and the primary key decide) give exactly one token; every
    other request is a replay refusal."""
    assertion = fed.a.assertion()
    results = await asyncio.gather(*(fed.grant(assertion) for _ in range(8)))

    statuses = sorted(error_of(r) if r.status_code != 200 else (200, "") for r, _ in results)
    assert statuses == [(200, "")] + [(400, "invalid_grant")] * 7
    for response, client_jti in results:
        if response.status_code != 200:
            assert (await fed.refusal(client_jti))["reason_ids"] == ["replay"]


async def test_a_partner_assertion_grants_no_authorization_details_by_exchange(
    fed: Federation,
) -> None:
    """The trust profile grants a partner's subjects scopes and audiences, never
    ``authorization_details`` (a mapped claim may not even be named so): details a partner writes
    into its assertion are not adopted by a token exchange (RFC 9396 §6: the underlying grant
    decides; before, they were copied unchecked into the token we issued), and asking for them
    is invalid_authorization_details."""
    kit = await register_kit(
        fed.server.services,
        **client_metadata(
            grant_types=["client_credentials", TOKEN_EXCHANGE],
            authorization_details_types=["trade_instruction"],
        ),
    )
    minted = {**TRADE, "max_notional": {"amount": 10**15, "currency": "EUR", "minor_units": 2}}

    async def exchange(**form: Any) -> httpx.Response:
        data = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": fed.a.assertion(authorization_details=[minted]),
            "subject_token_type": TOKEN_TYPE_JWT,
            "resource": EXECUTION,
            "scope": "order:create",
            **kit.auth(),
            **form,
        }
        return await fed.server.http.post("/token", data=data)

    issued = await exchange()
    asked = await exchange(authorization_details=json.dumps([TRADE]))

    assert issued.status_code == 200, issued.text
    claims = jwt.decode(issued.json()["access_token"], options={"verify_signature": False})
    assert "authorization_details" not in claims
    assert error_of(asked) == (400, "invalid_authorization_details"), asked.text


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"sub": "s" * 256}, id="sub"),
        pytest.param({"jti": "\u00e9" * 256}, id="jti"),
        pytest.param({"txn": "t" * 256}, id="txn"),
    ],
)
async def test_claims_at_their_length_limit_are_issued_and_recorded(
    fed: Federation, claims: dict[str, str]
) -> None:
    """A claim of the longest accepted length (256 characters, non-ASCII for the jti, which the
    replay store keeps) gives a token and its ledger record on both stores, never a 500."""
    assertion = fed.a.assertion(**claims)
    response, _ = await fed.grant(assertion)
    again, _ = await fed.grant(assertion)

    assert response.status_code == 200, response.text
    token = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    issued = await recent_events(fed.server.services.db, 5, "oauth:token:issued")
    (event,) = [e for e in issued if e["jti"] == token["jti"]]
    assert event["partner"] == "partner-a"
    assert error_of(again) == (400, "invalid_grant")


async def test_omitted_scope_is_invalid_scope_and_the_assertion_is_kept(fed: Federation) -> None:
    """RFC 7521 §4.1: scope is OPTIONAL; RFC 6749 §3.3 lets the server fail a request without one
    (we have no default scope): 400 invalid_scope, and the assertion stays usable."""
    assertion = fed.a.assertion()
    refused, client_jti = await fed.grant(assertion, scope=None)
    accepted, _ = await fed.grant(assertion)

    assert error_of(refused) == (400, "invalid_scope"), refused.text
    assert (await fed.refusal(client_jti))["partner"] == "partner-a"
    assert accepted.status_code == 200, accepted.text
