"""Client authentication at the token endpoint, over HTTP: one table-driven case per MUST.

private_key_jwt follows RFC 7523 §3 as tightened by draft-ietf-oauth-rfc7523bis; the secret methods
follow RFC 6749 §2.3.1 (Basic credentials are form-urlencoded before base64) and §5.2 (a failed Basic
authentication is a 401 with a ``WWW-Authenticate: Basic`` challenge). Exactly one method per request.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tests.conftest import ASSERTION_TYPE, EXECUTION, LEI, ClientKit, new_ec_key, register_kit
from tests.protocol_server import (
    Server,
    basic,
    register_kit_for,
    register_secret_client,
    store_client,
)
from trustplane.clients.metadata import validate_metadata
from trustplane.clients.model import Client, ClientStatus, hash_secret, new_secret
from trustplane.jose.jws import b64url_encode
from trustplane.keys.crypto import public_jwk

pytestmark = pytest.mark.asyncio(loop_scope="module")

ATTACKER = new_ec_key()
ATTACKER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER_JWK = {**public_jwk(ATTACKER), "kid": "attacker", "alg": "ES256", "use": "sig"}
#: A client_id that needs form-urlencoding in Basic credentials (RFC 6749 client_id is VSCHAR).
COLON_ID = "tp:colon id"


@dataclass
class Tripwire:
    """A loopback HTTP server serving the attacker's JWKS; counts every connection made to it."""

    url: str = ""
    hits: int = 0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tripwire() -> AsyncIterator[Tripwire]:
    wire = Tripwire()
    body = orjson.dumps({"keys": [ATTACKER_JWK]})

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        wire.hits += 1
        await reader.readuntil(b"\r\n\r\n")
        head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
        writer.write(head.encode() + b"\r\nconnection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    wire.url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}/jwks.json"
    yield wire
    listener.close()
    await listener.wait_closed()


@dataclass
class SecretClients:
    basic_id: str
    basic_secret: str
    post_id: str
    post_secret: str
    colon_secret: str


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secret_clients(server: Server) -> SecretClients:
    basic_id, basic_secret = await register_secret_client(server.services, "client_secret_basic")
    post_id, post_secret = await register_secret_client(server.services, "client_secret_post")
    colon_secret = new_secret()
    raw = {
        "lei": LEI,
        "token_endpoint_auth_method": "client_secret_basic",
        "scope": "order:create",
        "allowed_resources": [EXECUTION],
    }
    metadata = validate_metadata(raw, server.services.settings, server.services.vocabulary)
    now = int(time.time())
    colon = Client.build(
        COLON_ID,
        metadata,
        ClientStatus.ACTIVE,
        secret_hash=hash_secret(colon_secret),
        created_at=now,
        updated_at=now,
    )
    await store_client(server.services, colon)
    return SecretClients(basic_id, basic_secret, post_id, post_secret, colon_secret)


async def token_request(
    server: Server, data: dict[str, str], headers: dict[str, str] | None = None
) -> httpx.Response:
    """A client_credentials request carrying exactly the given authentication."""
    form = {"grant_type": "client_credentials", "scope": "order:create", "resource": EXECUTION}
    return await server.http.post("/token", data={**form, **data}, headers=headers)


TOKEN_FORM = {"grant_type": "client_credentials", "scope": "order:create", "resource": EXECUTION}


def error_of(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json().get("error")


# --------------------------------------------------------------------------- private_key_jwt


def hs256_auth(kit: ClientKit, secret: bytes, now: int) -> dict[str, str]:
    """The algorithm-confusion assertion, built by hand: PyJWT refuses a JWK as an HMAC secret."""
    header = b64url_encode(orjson.dumps({"alg": "HS256", "typ": "JWT", "kid": kit.kid}))
    claims = {"iss": kit.client_id, "sub": kit.client_id, "aud": kit.issuer}
    claims.update(iat=now, exp=now + 60, jti=uuid.uuid4().hex)
    signing_input = f"{header}.{b64url_encode(orjson.dumps(claims))}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return {
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": f"{signing_input}.{b64url_encode(mac)}",
    }


Case = Callable[[ClientKit, str, int], dict[str, str]]

REFUSED_ASSERTIONS = [
    pytest.param(lambda k, u, now: k.auth(iss="tp-another-client"), id="iss-not-client_id"),
    pytest.param(lambda k, u, now: k.auth(sub="tp-another-client"), id="sub-not-client_id"),
    pytest.param(lambda k, u, now: k.auth(iss=None), id="iss-missing"),
    pytest.param(lambda k, u, now: k.auth(sub=None), id="sub-missing"),
    pytest.param(lambda k, u, now: k.auth(aud=k.issuer + "/token"), id="aud-token-endpoint-url"),
    pytest.param(lambda k, u, now: k.auth(aud=[k.issuer]), id="aud-array-of-issuer"),
    pytest.param(lambda k, u, now: k.auth(aud=[k.issuer, EXECUTION]), id="aud-array-with-issuer"),
    pytest.param(lambda k, u, now: k.auth(aud=k.issuer + "/"), id="aud-issuer-with-slash"),
    pytest.param(lambda k, u, now: k.auth(aud=None), id="aud-missing"),
    pytest.param(lambda k, u, now: k.auth(exp=None), id="exp-missing"),
    pytest.param(lambda k, u, now: k.auth(exp="soon"), id="exp-not-a-number"),
    pytest.param(lambda k, u, now: k.auth(exp=now + 420), id="exp-beyond-5-min-plus-skew"),
    pytest.param(lambda k, u, now: k.auth(iat=now - 300, exp=now - 120), id="exp-past-skew"),
    pytest.param(lambda k, u, now: k.auth(iat=now + 120), id="iat-beyond-skew"),
    pytest.param(lambda k, u, now: k.auth(nbf=now + 120), id="nbf-beyond-skew"),
    pytest.param(lambda k, u, now: k.auth(jti=None), id="jti-missing"),
    pytest.param(lambda k, u, now: k.auth(jti=""), id="jti-empty"),
    pytest.param(lambda k, u, now: k.auth(jti=42), id="jti-not-a-string"),
    pytest.param(lambda k, u, now: k.auth(jti="x" * 257), id="jti-too-long"),
    pytest.param(lambda k, u, now: k.auth(jti="nul\x00byte"), id="jti-with-NUL"),
    pytest.param(lambda k, u, now: k.auth(_alg="none", _key=None), id="alg-none"),
    pytest.param(lambda k, u, now: k.auth(_alg="HS256", _key="k" * 64), id="alg-HS256"),
    pytest.param(
        lambda k, u, now: hs256_auth(k, orjson.dumps(public_jwk(k.key)), now),
        id="alg-HS256-keyed-with-client-public-key",
    ),
    pytest.param(lambda k, u, now: k.auth(_alg="RS256", _key=ATTACKER_RSA), id="alg-RS256"),
    pytest.param(lambda k, u, now: k.auth(_headers={"typ": "at+jwt"}), id="typ-at+jwt"),
    pytest.param(lambda k, u, now: k.auth(_headers={"typ": "secevent+jwt"}), id="typ-secevent+jwt"),
    pytest.param(lambda k, u, now: k.auth(_headers={"typ": ["JWT"]}), id="typ-not-a-string"),
    pytest.param(lambda k, u, now: k.auth(_key=ATTACKER), id="signature-by-another-key"),
    pytest.param(lambda k, u, now: k.auth(_headers={"kid": "unknown"}), id="unknown-kid"),
    pytest.param(lambda k, u, now: k.auth(iss="tp-unknown", sub="tp-unknown"), id="unknown-client"),
    pytest.param(
        lambda k, u, now: k.auth(_key=ATTACKER, _headers={"kid": "attacker", "jwk": ATTACKER_JWK}),
        id="attacker-key-in-jwk-header",
    ),
    pytest.param(
        lambda k, u, now: k.auth(_key=ATTACKER, _headers={"kid": k.kid, "jwk": ATTACKER_JWK}),
        id="attacker-key-in-jwk-header-with-registered-kid",
    ),
    pytest.param(
        lambda k, u, now: k.auth(_key=ATTACKER, _headers={"kid": "attacker", "jku": u}),
        id="attacker-key-named-by-jku",
    ),
    pytest.param(
        lambda k, u, now: k.auth(_key=ATTACKER, _headers={"kid": "attacker", "x5u": u}),
        id="attacker-key-named-by-x5u",
    ),
    pytest.param(
        lambda k, u, now: {**k.auth(), "client_id": "tp-another-client"},
        id="client_id-param-differs",
    ),
    pytest.param(
        lambda k, u, now: {"client_assertion_type": ASSERTION_TYPE, "client_assertion": "a.b.c"},
        id="assertion-not-a-jws",
    ),
    pytest.param(
        lambda k, u, now: {
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": "x" * 20000,
        },
        id="assertion-oversized",
    ),
]


async def test_tripwire_counts_fetches(tripwire: Tripwire) -> None:
    """The no-fetch assertions below mean something only if a fetch would be counted."""
    async with httpx.AsyncClient() as client:
        assert (await client.get(tripwire.url)).json()["keys"][0]["kid"] == "attacker"
    assert tripwire.hits == 1
    tripwire.hits = 0


@pytest.mark.parametrize("case", REFUSED_ASSERTIONS)
async def test_refused_assertion_is_invalid_client(
    server: Server, tripwire: Tripwire, case: Case
) -> None:
    response = await token_request(server, case(server.kit, tripwire.url, int(time.time())))
    assert error_of(response) == (401, "invalid_client"), response.text
    assert tripwire.hits == 0, "a token header caused an outbound fetch"


ACCEPTED_ASSERTIONS = [
    pytest.param(lambda k, u, now: k.auth(_headers={"typ": None}), id="typ-absent"),
    pytest.param(lambda k, u, now: k.auth(_headers={"typ": "JWT"}), id="typ-JWT"),
    pytest.param(
        lambda k, u, now: k.auth(_headers={"typ": "client-authentication+jwt"}),
        id="typ-client-authentication+jwt",
    ),
    pytest.param(lambda k, u, now: k.auth(iat=now, exp=now + 300), id="exp-exactly-5-min"),
    pytest.param(lambda k, u, now: k.auth(iat=now + 30, nbf=now + 30), id="iat-nbf-within-skew"),
    pytest.param(lambda k, u, now: {**k.auth(), "client_id": k.client_id}, id="client_id-matches"),
    pytest.param(lambda k, u, now: k.auth(_headers={"jku": u, "x5u": u}), id="jku-x5u-ignored"),
]


@pytest.mark.parametrize("case", ACCEPTED_ASSERTIONS)
async def test_accepted_assertion(server: Server, tripwire: Tripwire, case: Case) -> None:
    response = await token_request(server, case(server.kit, tripwire.url, int(time.time())))
    assert response.status_code == 200, response.text
    assert tripwire.hits == 0, "a token header caused an outbound fetch"


@pytest.mark.parametrize(
    ("alg", "make_key"),
    [
        pytest.param("EdDSA", ed25519.Ed25519PrivateKey.generate, id="EdDSA"),
        pytest.param(
            "PS256",
            lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
            id="PS256",
        ),
    ],
)
async def test_other_allowed_algorithms(
    server: Server, alg: str, make_key: Callable[[], Any]
) -> None:
    kit = await register_kit_for(server.services, make_key(), alg)
    ok = await token_request(server, kit.auth(_alg=alg))
    assert ok.status_code == 200, ok.text
    if alg == "PS256":  # the same RSA key with PKCS#1 v1.5 is not PS256
        refused = await token_request(server, kit.auth(_alg="RS256"))
        assert error_of(refused) == (401, "invalid_client")


MALFORMED_ASSERTION_REQUESTS = [
    pytest.param(
        lambda k, u, now: {**k.auth(), "client_assertion_type": "urn:example:saml"},
        id="wrong-assertion-type",
    ),
    pytest.param(
        lambda k, u, now: {"client_assertion": k.assertion()}, id="assertion-without-type"
    ),
    pytest.param(
        lambda k, u, now: {"client_assertion_type": ASSERTION_TYPE}, id="type-without-assertion"
    ),
]


@pytest.mark.parametrize("case", MALFORMED_ASSERTION_REQUESTS)
async def test_malformed_assertion_request(server: Server, tripwire: Tripwire, case: Case) -> None:
    response = await token_request(server, case(server.kit, tripwire.url, int(time.time())))
    assert error_of(response) == (400, "invalid_request"), response.text


@pytest.mark.parametrize("replay", ["same-assertion", "same-jti-in-a-new-assertion"])
async def test_assertion_jti_is_single_use(server: Server, replay: str) -> None:
    jti = f"once-{time.time_ns()}"
    first = server.kit.auth(jti=jti)
    assert (await token_request(server, first)).status_code == 200
    again = first if replay == "same-assertion" else server.kit.auth(jti=jti)
    assert error_of(await token_request(server, again)) == (401, "invalid_client")


async def test_disabled_client_is_invalid_client(server: Server) -> None:
    kit = await register_kit(server.services)
    assert (await token_request(server, kit.auth())).status_code == 200
    await server.services.clients.set_status(kit.client_id, ClientStatus.DISABLED)
    assert error_of(await token_request(server, kit.auth())) == (401, "invalid_client")


# --------------------------------------------------------------------------- secret methods

SecretCase = Callable[[Server, SecretClients], tuple[dict[str, str], dict[str, str]]]


def raw_basic(credentials: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credentials).decode()}


REFUSED_SECRETS = [
    pytest.param(
        lambda s, c: ({}, basic(s.kit.client_id, "guess")),
        401,
        "invalid_client",
        True,
        id="private_key_jwt-client-sends-basic",
    ),
    pytest.param(
        lambda s, c: ({"client_id": s.kit.client_id, "client_secret": "guess"}, {}),
        401,
        "invalid_client",
        False,
        id="private_key_jwt-client-sends-post",
    ),
    pytest.param(
        lambda s, c: (s.kit.auth(iss=c.basic_id, sub=c.basic_id), {}),
        401,
        "invalid_client",
        False,
        id="secret-client-sends-assertion",
    ),
    pytest.param(
        lambda s, c: ({"client_id": c.basic_id, "client_secret": c.basic_secret}, {}),
        401,
        "invalid_client",
        False,
        id="basic-client-sends-post",
    ),
    pytest.param(
        lambda s, c: ({}, basic(c.post_id, c.post_secret)),
        401,
        "invalid_client",
        True,
        id="post-client-sends-basic",
    ),
    pytest.param(
        lambda s, c: ({}, basic(c.basic_id, c.basic_secret + "x")),
        401,
        "invalid_client",
        True,
        id="basic-wrong-secret",
    ),
    pytest.param(
        lambda s, c: ({}, basic("tp-unknown", c.basic_secret)),
        401,
        "invalid_client",
        True,
        id="basic-unknown-client",
    ),
    pytest.param(
        lambda s, c: ({}, {"Authorization": "Basic %%not*base64%%"}),
        401,
        "invalid_client",
        True,
        id="basic-malformed-base64",
    ),
    pytest.param(
        lambda s, c: ({}, raw_basic(b"\xff\xfe:\xff")),
        401,
        "invalid_client",
        True,
        id="basic-not-utf8",
    ),
    pytest.param(
        lambda s, c: ({}, raw_basic(c.basic_id.encode())),
        401,
        "invalid_client",
        True,
        id="basic-without-colon",
    ),
    pytest.param(
        lambda s, c: ({}, raw_basic(f"{COLON_ID}:{c.colon_secret}".encode())),
        401,
        "invalid_client",
        True,
        id="basic-colon-in-client_id-not-encoded",
    ),
    pytest.param(
        lambda s, c: ({"client_id": c.post_id}, basic(c.basic_id, c.basic_secret)),
        400,
        "invalid_request",
        False,
        id="basic-with-another-client_id-in-body",  # RFC 6749 §3.2.1: one request, one client
    ),
    pytest.param(
        lambda s, c: ({}, {"Authorization": "Basic"}),
        401,
        "invalid_client",
        True,
        id="basic-scheme-without-credentials",  # RFC 6749 §5.2: an attempt at Basic: challenge
    ),
    pytest.param(
        lambda s, c: ({}, {"Authorization": "BASIC"}),
        401,
        "invalid_client",
        True,
        id="basic-scheme-upper-case-without-credentials",
    ),
    pytest.param(
        lambda s, c: ({"client_id": c.post_id, "client_secret": c.post_secret + "x"}, {}),
        401,
        "invalid_client",
        False,
        id="post-wrong-secret",
    ),
    pytest.param(
        lambda s, c: ({}, {}),
        401,
        "invalid_client",
        False,
        id="no-client-authentication",
    ),
    pytest.param(
        lambda s, c: ({"client_secret": c.post_secret}, {}),
        400,
        "invalid_request",
        False,
        id="post-without-client_id",
    ),
    pytest.param(
        lambda s, c: (
            {"client_id": c.post_id, "client_secret": c.post_secret},
            basic(c.basic_id, c.basic_secret),
        ),
        400,
        "invalid_request",
        False,
        id="two-methods-basic-and-post",
    ),
    # RFC 7521 §4.2.1: with a client assertion among them, several methods are invalid_client
    pytest.param(
        lambda s, c: (s.kit.auth(), basic(c.basic_id, c.basic_secret)),
        401,
        "invalid_client",
        True,
        id="two-methods-basic-and-assertion",
    ),
    pytest.param(
        lambda s, c: ({**s.kit.auth(), "client_id": c.post_id, "client_secret": c.post_secret}, {}),
        401,
        "invalid_client",
        False,
        id="two-methods-post-and-assertion",
    ),
    pytest.param(
        lambda s, c: ({**s.kit.auth(), "client_secret": c.post_secret}, {}),
        401,
        "invalid_client",
        False,
        id="two-methods-assertion-and-client_secret",
    ),
]


@pytest.mark.parametrize(("case", "status", "error", "challenge"), REFUSED_SECRETS)
async def test_refused_secret_authentication(
    server: Server,
    secret_clients: SecretClients,
    case: SecretCase,
    status: int,
    error: str,
    challenge: bool,
) -> None:
    data, headers = case(server, secret_clients)
    response = await token_request(server, data, headers)
    assert error_of(response) == (status, error), response.text
    if challenge:
        assert response.headers["www-authenticate"].startswith("Basic ")


ACCEPTED_SECRETS = [
    pytest.param(lambda s, c: ({}, basic(c.basic_id, c.basic_secret)), id="basic"),
    pytest.param(
        lambda s, c: ({"client_id": c.basic_id}, basic(c.basic_id, c.basic_secret)),
        id="basic-with-its-own-client_id-in-body",
    ),
    pytest.param(
        lambda s, c: (
            {},
            {"Authorization": "bAsIc " + basic(c.basic_id, c.basic_secret)["Authorization"][6:]},
        ),
        id="basic-scheme-case-insensitive",  # RFC 7617 §2 via RFC 9110 §11.1
    ),
    pytest.param(
        lambda s, c: ({"client_id": c.post_id, "client_secret": c.post_secret}, {}), id="post"
    ),
    pytest.param(
        lambda s, c: ({}, basic(COLON_ID, c.colon_secret)), id="basic-client_id-form-urlencoded"
    ),
    pytest.param(
        lambda s, c: ({}, raw_basic(f"{quote(COLON_ID, safe='')}:{c.colon_secret}".encode())),
        id="basic-client_id-percent-encoded",
    ),
]


@pytest.mark.parametrize("case", ACCEPTED_SECRETS)
async def test_accepted_secret_authentication(
    server: Server, secret_clients: SecretClients, case: SecretCase
) -> None:
    data, headers = case(server, secret_clients)
    response = await token_request(server, data, headers)
    assert response.status_code == 200, response.text


async def test_credentials_in_the_query_string_authenticate_nobody(
    server: Server, secret_clients: SecretClients
) -> None:
    """RFC 6749 §2.3.1: client credentials MUST NOT be in the request URI; there they are not
    read at all, so the request is unauthenticated."""
    query = f"client_id={quote(secret_clients.post_id)}&client_secret={quote(secret_clients.post_secret)}"
    form = {"grant_type": "client_credentials", "scope": "order:create", "resource": EXECUTION}
    response = await server.http.post(f"/token?{query}", data=form)
    assert error_of(response) == (401, "invalid_client"), response.text
    assert "www-authenticate" not in response.headers


OTHER_SCHEMES = ["Bearer abc", "bearer abc", "DPoP abc", 'Digest username="x"', "Bearer", "N\u00e9"]


@pytest.mark.parametrize("endpoint", ["/token", "/introspect", "/revoke", "/par"])
@pytest.mark.parametrize("authorization", OTHER_SCHEMES)
@pytest.mark.parametrize("with_assertion", [False, True], ids=["alone", "with-assertion"])
async def test_an_authorization_header_of_another_scheme_is_401_with_a_basic_challenge(
    server: Server, endpoint: str, authorization: str, with_assertion: bool
) -> None:
    """RFC 6749 §5.2: "If the client attempted to authenticate via the Authorization request
    header field, the authorization server MUST respond with an HTTP 401 (Unauthorized) status
    code and include the WWW-Authenticate response header field". A ``Bearer`` (or any non-Basic)
    header is such an attempt; it was answered 401 without a challenge, and with a valid
    assertion beside it the request was accepted (two methods in one request, §2.3). The
    challenge is Basic: the one scheme that authenticates a client here."""
    auth = server.kit.auth() if with_assertion else {"client_id": server.kit.client_id}
    form = {"token": "x", "response_type": "code", **auth, **TOKEN_FORM}
    response = await server.http.post(
        endpoint, data=form, headers={"Authorization": authorization.encode("latin-1")}
    )
    assert error_of(response) == (401, "invalid_client"), response.text
    assert response.headers["www-authenticate"] == 'Basic realm="trustplane", charset="UTF-8"'
    description = response.json()["error_description"]
    assert "does not authenticate a client here" in description, description
    assert re.fullmatch(r"[\x20\x21\x23-\x5b\x5d-\x7e]*", description), description


@pytest.mark.parametrize("endpoint", ["/token", "/introspect", "/revoke"])
async def test_a_refusal_quoting_the_assertion_keeps_to_the_allowed_characters(
    server: Server, endpoint: str
) -> None:
    """RFC 6749 §5.2 (and RFC 7662 §2.3, RFC 7009 §2.2.1, which answer in its format):
    ``error_description`` holds only %x20-21 / %x23-5B / %x5D-7E; the description that names the
    assertion's ``typ`` held a quote, a backslash and non-ASCII as sent."""
    auth = server.kit.auth(_headers={"typ": 'at"\\é'})
    response = await server.http.post(endpoint, data={"token": "x", **auth, **TOKEN_FORM})
    assert error_of(response) == (401, "invalid_client"), response.text
    description = response.json()["error_description"]
    assert re.fullmatch(r"[\x20\x21\x23-\x5b\x5d-\x7e]*", description), description


async def test_racing_requests_with_one_assertion_exactly_one_wins(server: Server) -> None:
    """RFC 7523 §3 item 7 (jti single use): 16 concurrent token requests carrying the same
    assertion get exactly one token; the other 15 are 401 invalid_client (on PostgreSQL the
    conditional insert of the jti decides, in the outcome's transaction)."""
    auth = server.kit.auth()
    responses = await asyncio.gather(*(token_request(server, auth) for _ in range(16)))
    assert sorted(r.status_code for r in responses) == [200] + [401] * 15
    assert {error_of(r) for r in responses if r.status_code != 200} == {(401, "invalid_client")}


# --------------------------------------------------------------------------- RFC 7591 §2 signing alg


def _two_key_jwks(ec_key: Any, ed_key: Any) -> dict[str, Any]:
    return {
        "keys": [
            {**public_jwk(ec_key), "kid": "ec", "alg": "ES256", "use": "sig"},
            {**public_jwk(ed_key), "kid": "ed", "alg": "EdDSA", "use": "sig"},
        ]
    }


@pytest.mark.parametrize("registered", ["EdDSA", "ES256", None])
async def test_registered_token_endpoint_auth_signing_alg_is_the_only_one_accepted(
    server: Server, registered: str | None
) -> None:
    """Both keys are the client's own; once it registered one algorithm, an assertion signed with
    the other (by a valid key of the client) is 401 invalid_client."""
    ec_key, ed_key = new_ec_key(), ed25519.Ed25519PrivateKey.generate()
    extra = {"token_endpoint_auth_signing_alg": registered} if registered else {}
    kit = await register_kit(server.services, jwks=_two_key_jwks(ec_key, ed_key), **extra)
    client = server.services.clients.registry.get(kit.client_id)
    assert client is not None
    assert client.metadata.get("token_endpoint_auth_signing_alg") == registered  # stored
    by_ec = ClientKit(kit.client_id, ec_key, kit.issuer, kid="ec")
    by_ed = ClientKit(kit.client_id, ed_key, kit.issuer, kid="ed")  # type: ignore[arg-type]
    ec_answer = await token_request(server, by_ec.auth())
    ed_answer = await token_request(server, by_ed.auth(_alg="EdDSA"))
    expected = {
        "EdDSA": ((401, "invalid_client"), 200),
        "ES256": (200, (401, "invalid_client")),
        None: (200, 200),
    }[registered]
    observed = tuple(
        r.status_code if r.status_code == 200 else error_of(r) for r in (ec_answer, ed_answer)
    )
    assert observed == expected, (ec_answer.text, ed_answer.text)


# --------------------------------------------------------------------------- jwks_uri and SSRF


async def test_a_jwks_uri_resolving_to_a_private_address_is_refused_at_fetch_time(
    server: Server, tripwire: Tripwire, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registration accepted a public-looking name. When the token endpoint needs the keys, the
    name resolves to 10.0.0.1, or to the loopback tripwire: the fetch is refused on the resolved
    address, nothing is contacted, and the client gets 401 invalid_client."""
    from prometheus_client import REGISTRY

    from trustplane.outbound import addresses

    port = tripwire.url.split(":")[2].split("/")[0]
    kit = await register_kit(
        server.services, jwks=None, jwks_uri=f"https://keys.client.example:{port}/jwks.json"
    )
    labels = {"purpose": "client_jwks", "outcome": "refused_address"}
    before = REGISTRY.get_sample_value("trustplane_outbound_fetch_total", labels) or 0.0
    hits = tripwire.hits
    for address in ("10.0.0.1", "127.0.0.1", "169.254.169.254"):

        async def resolve(host: str, _port: int, address: str = address) -> list[str]:
            return [address]

        monkeypatch.setattr(addresses, "system_resolver", resolve)
        server.services.remote_jwks._cache.clear()
        response = await token_request(server, kit.auth())
        assert error_of(response) == (401, "invalid_client"), response.text
    assert tripwire.hits == hits
    after = REGISTRY.get_sample_value("trustplane_outbound_fetch_total", labels)
    assert after == before + 3
