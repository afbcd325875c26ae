"""Dynamic client registration (RFC 7591) and management (RFC 7592) over HTTP.

Registration needs an initial access token (RFC 7591 §3); bad metadata is ``invalid_client_metadata``
or ``invalid_redirect_uri`` (§3.2.2) and writes nothing. Management needs the client's registration
access token; anything else is ``invalid_token`` (RFC 7592 §3).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from tests.conftest import EXECUTION, LEI, ClientKit, jwks_for, new_ec_key, register_kit
from tests.protocol_server import Server, basic
from trustplane.clients.model import hash_secret
from trustplane.clients.tables import initial_access_tokens

pytestmark = pytest.mark.asyncio(loop_scope="module")


def metadata(**overrides: Any) -> dict[str, Any]:
    """Valid private_key_jwt metadata; a member set to None is removed."""
    body: dict[str, Any] = {
        "client_name": "registered over http",
        "lei": LEI,
        "scope": "order:create order:cancel",
        "allowed_resources": [EXECUTION],
        "jwks": jwks_for(new_ec_key()),
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def secret_metadata(method: str = "client_secret_basic", **overrides: Any) -> dict[str, Any]:
    return metadata(**{"token_endpoint_auth_method": method, "jwks": None, **overrides})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def initial_token(server: Server, **kw: Any) -> str:
    """A token bound to ``LEI`` (the LEI ``metadata()`` registers) unless ``kw`` says otherwise."""
    bound = {} if "any_lei" in kw else {"lei": LEI}
    return await server.services.clients.create_initial_access_token("tests", **bound, **kw)


async def client_count(server: Server) -> int:
    return len(await server.services.clients.list())


def error_of(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json().get("error")


async def registered(server: Server, body: dict[str, Any] | None = None) -> dict[str, Any]:
    response = await server.http.post(
        "/register", json=body or metadata(), headers=bearer(await initial_token(server))
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


# --------------------------------------------------------------------------- RFC 7591: the token

AuthCase = Callable[[Server], Awaitable[dict[str, str]]]


async def _no_authorization(s: Server) -> dict[str, str]:
    return {}


async def _basic_scheme(s: Server) -> dict[str, str]:
    return basic("someone", await initial_token(s))


async def _empty_bearer(s: Server) -> dict[str, str]:
    return {"Authorization": "Bearer "}


async def _unknown_token(s: Server) -> dict[str, str]:
    return bearer("not-an-initial-access-token")


async def _expired_token(s: Server) -> dict[str, str]:
    return bearer(await initial_token(s, ttl=-1))


async def _used_up_token(s: Server) -> dict[str, str]:
    token = await initial_token(s, max_uses=1)
    first = await s.http.post("/register", json=metadata(), headers=bearer(token))
    assert first.status_code == 201, first.text
    return bearer(token)


async def _registration_access_token(s: Server) -> dict[str, str]:
    """A client's registration access token is not an initial access token."""
    return bearer((await registered(s))["registration_access_token"])


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(_no_authorization, id="no-authorization"),
        pytest.param(_basic_scheme, id="basic-scheme"),
        pytest.param(_empty_bearer, id="empty-bearer"),
        pytest.param(_unknown_token, id="unknown-token"),
        pytest.param(_expired_token, id="expired-token"),
        pytest.param(_used_up_token, id="used-up-token"),
        pytest.param(_registration_access_token, id="registration-access-token"),
    ],
)
async def test_registration_without_valid_initial_token(server: Server, case: AuthCase) -> None:
    headers = await case(server)
    before = await client_count(server)
    response = await server.http.post("/register", json=metadata(), headers=headers)
    assert error_of(response) == (401, "invalid_token"), response.text
    assert response.headers["www-authenticate"].startswith("Bearer ")
    assert await client_count(server) == before


# --------------------------------------------------------------------------- the token's legal entity

OTHER_LEI = "529900T8BM49AURSDO55"  # valid check digits, not the token's


async def test_a_token_bound_to_an_lei_registers_that_legal_entity_only(server: Server) -> None:
    """Trust boundary: a client's ``lei`` is what policies compare with a resource's owner and a
    mandate's grantee, so a token the operator bound to one legal entity (``registration-token
    create --lei``) cannot register a client of another one (400, token not spent, nothing
    written); without ``lei`` in the body the client gets the token's."""
    token = await initial_token(server, max_uses=2)
    before = await client_count(server)

    other = await server.http.post("/register", json=metadata(lei=OTHER_LEI), headers=bearer(token))

    assert error_of(other) == (400, "invalid_client_metadata"), other.text
    assert other.json()["error_description"].startswith("lei: this initial access token")
    assert await client_count(server) == before
    same = await server.http.post("/register", json=metadata(), headers=bearer(token))
    assert same.status_code == 201, same.text
    assert same.json()["lei"] == LEI
    omitted = await server.http.post("/register", json=metadata(lei=None), headers=bearer(token))
    assert omitted.status_code == 201, omitted.text
    assert omitted.json()["lei"] == LEI
    assert await client_count(server) == before + 2


async def test_an_explicitly_unbound_token_registers_any_legal_entity(server: Server) -> None:
    """``registration-token create --any-lei``: the operator's explicit choice."""
    token = await initial_token(server, any_lei=True)
    response = await server.http.post(
        "/register", json=metadata(lei=OTHER_LEI), headers=bearer(token)
    )
    assert response.status_code == 201, response.text
    assert response.json()["lei"] == OTHER_LEI


async def test_a_token_unbound_by_default_before_migration_0025_registers_nothing(
    server: Server,
) -> None:
    """Before migration 0025 a token created without ``--lei`` was unbound although nobody had
    asked for that: such a row (no ``lei``, ``any_lei`` false) is 401 like an unknown token,
    before the body is read, and is not spent."""
    token = await initial_token(server, max_uses=1)
    async with server.services.db.transaction() as conn:
        await conn.execute(
            update(initial_access_tokens)
            .where(initial_access_tokens.c.token_hash == hash_secret(token))
            .values(lei=None, any_lei=False)
        )
    before = await client_count(server)

    for body in (metadata(), metadata(lei=None)):
        response = await server.http.post("/register", json=body, headers=bearer(token))
        assert error_of(response) == (401, "invalid_token"), response.text
    assert await client_count(server) == before
    async with server.services.db.read() as conn:
        uses = await conn.scalar(
            select(initial_access_tokens.c.uses).where(
                initial_access_tokens.c.token_hash == hash_secret(token)
            )
        )
    assert uses == 0


async def test_an_unbound_token_needs_the_lei_in_the_body(server: Server) -> None:
    """Only a bound token fills the ``lei`` in; with an ``--any-lei`` token it is required."""
    token = await initial_token(server, any_lei=True, max_uses=1)
    before = await client_count(server)
    response = await server.http.post("/register", json=metadata(lei=None), headers=bearer(token))
    assert error_of(response) == (400, "invalid_client_metadata"), response.text
    assert response.json()["error_description"].startswith("lei: ")
    assert await client_count(server) == before


NEITHER = (
    "name the legal entity the token registers (--lei LEI), or pass --any-lei for a token that "
    "registers any legal entity"
)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        pytest.param({}, f"^{re.escape(NEITHER)}$", id="neither-lei-nor-any-lei"),
        pytest.param({"any_lei": False}, f"^{re.escape(NEITHER)}$", id="any-lei-false"),
        pytest.param(
            {"lei": LEI, "any_lei": True}, "^--lei and --any-lei exclude each other$", id="both"
        ),
        pytest.param({"lei": LEI.lower()}, "^--lei: ", id="lei-lower-case"),
        pytest.param({"lei": "5493001KJTIIGC8Y1R13"}, "^--lei: ", id="lei-check-digits"),
        pytest.param(
            {"lei": LEI, "description": "x" * 201}, "^--description: ", id="description-too-long"
        ),
        pytest.param({"lei": LEI, "description": ""}, "^--description: ", id="description-empty"),
        pytest.param(
            {"any_lei": True, "description": "a\nb"}, "^--description: ", id="description-newline"
        ),
    ],
)
async def test_token_creation_refuses_bad_input(
    server: Server, kw: dict[str, Any], message: str
) -> None:
    """Refused before anything is written (PostgreSQL would refuse a description over its
    VARCHAR(200) with a driver error; SQLite would store it). An initial access token names the
    legal entity it registers, or is unbound by the operator's explicit choice: neither is an
    error, not an unbound token."""
    args = {"description": "tests", **kw}
    async with server.services.db.read() as conn:
        before = await conn.scalar(select(func.count()).select_from(initial_access_tokens))
    with pytest.raises(ValueError, match=message):
        await server.services.clients.create_initial_access_token(**args)
    async with server.services.db.read() as conn:
        after = await conn.scalar(select(func.count()).select_from(initial_access_tokens))
    assert after == before


# --------------------------------------------------------------------------- RFC 7591: metadata


def _jwk(**extra: Any) -> dict[str, Any]:
    return {"keys": [{**jwks_for(new_ec_key())["keys"][0], **extra}]}


def body(doc: Any) -> dict[str, Any]:
    return {"json": doc}


BAD_METADATA = [
    pytest.param(
        body(metadata(jwks=_jwk(d="AAAA"))), "invalid_client_metadata", id="jwks-private-d"
    ),
    pytest.param(
        body(metadata(jwks={"keys": [{"kty": "oct", "k": "c2VjcmV0"}]})),
        "invalid_client_metadata",
        id="jwks-symmetric-key",
    ),
    pytest.param(
        body(metadata(jwks_uri="https://keys.example/jwks")),
        "invalid_client_metadata",
        id="jwks-and-jwks_uri",
    ),
    pytest.param(
        body(metadata(jwks=None, jwks_uri="http://keys.example/jwks")),
        "invalid_client_metadata",
        id="jwks_uri-not-https",
    ),
    pytest.param(
        body(metadata(jwks=_jwk(crv=["P-256"]))), "invalid_client_metadata", id="jwk-crv-array"
    ),
    pytest.param(
        body(metadata(jwks={"keys": ["x"]})), "invalid_client_metadata", id="jwk-not-object"
    ),
    pytest.param(
        body(metadata(jwks=None)), "invalid_client_metadata", id="private_key_jwt-no-keys"
    ),
    pytest.param(
        body(secret_metadata(jwks=jwks_for(new_ec_key()))),
        "invalid_client_metadata",
        id="secret-client-with-keys",
    ),
    pytest.param(
        body(metadata(lei="5493001KJTIIGC8Y1R13")), "invalid_client_metadata", id="lei-check-digits"
    ),
    pytest.param(body(metadata(lei="not-a-lei")), "invalid_client_metadata", id="lei-malformed"),
    pytest.param(
        body(metadata(scope="order:teleport")), "invalid_client_metadata", id="unknown-scope"
    ),
    pytest.param(
        body(metadata(allowed_resources=["https://unknown.example/api"])),
        "invalid_client_metadata",
        id="unknown-resource",
    ),
    pytest.param(
        body(metadata(grant_types=["password"])), "invalid_client_metadata", id="unsupported-grant"
    ),
    pytest.param(
        body(metadata(token_endpoint_auth_method="none")),
        "invalid_client_metadata",
        id="auth-method-none",
    ),
    pytest.param(
        body(metadata(client_name=42)), "invalid_client_metadata", id="client_name-number"
    ),
    *[
        pytest.param(
            body(metadata(client_name=f"Northwind{char}Bank")),
            "invalid_client_metadata",
            id=f"client_name-{label}",
        )
        for label, char in [
            ("newline", "\n"),
            ("bidi-override", "\u202e"),
            ("zero-width", "\u200b"),
        ]
    ],
    pytest.param(body(metadata(client_name="")), "invalid_client_metadata", id="client_name-empty"),
    pytest.param(body([metadata()]), "invalid_client_metadata", id="json-array"),
    pytest.param(
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        "invalid_client_metadata",
        id="non-json-body",
    ),
    pytest.param(
        {"content": b'{"lei": "\xff\xfe"}', "headers": {"content-type": "application/json"}},
        "invalid_client_metadata",
        id="invalid-utf8",
    ),
    pytest.param(
        {"data": {"lei": LEI, "scope": "order:create"}},
        "invalid_client_metadata",
        id="form-content-type",
    ),
    pytest.param({"content": b"", "headers": {}}, "invalid_client_metadata", id="no-content-type"),
    pytest.param(
        body(metadata(redirect_uris=["http://client.example/cb"])),
        "invalid_redirect_uri",
        id="redirect-http-not-loopback",
    ),
    pytest.param(
        body(metadata(redirect_uris=["https://client.example/cb#frag"])),
        "invalid_redirect_uri",
        id="redirect-fragment",
    ),
    pytest.param(
        body(metadata(redirect_uris=["https://*.client.example/cb"])),
        "invalid_redirect_uri",
        id="redirect-wildcard",
    ),
    pytest.param(
        body(metadata(redirect_uris=["/cb"])), "invalid_redirect_uri", id="redirect-relative"
    ),
    *[
        pytest.param(
            body(metadata(redirect_uris=[f"https://client.example/c{char}b"])),
            "invalid_redirect_uri",
            id=f"redirect-{label}",
        )
        for label, char in [("space", " "), ("tab", "\t"), ("newline", "\n"), ("del", "\x7f")]
    ],
    pytest.param(
        body(metadata(redirect_uris=["https://client.example/cb?state=fixed"])),
        "invalid_redirect_uri",
        id="redirect-query-holds-state",
    ),
    pytest.param(
        body(metadata(redirect_uris=["https://client.example/cb\r\n"])),
        "invalid_redirect_uri",
        id="redirect-trailing-crlf",
    ),
    pytest.param(body(metadata(lei=LEI.lower())), "invalid_client_metadata", id="lei-lower-case"),
    pytest.param(
        body(metadata(lei=f"{LEI[:4]} {LEI[4:]}")), "invalid_client_metadata", id="lei-spaced"
    ),
    pytest.param(
        body(metadata(grant_types=["authorization_code"], response_types=["token"])),
        "invalid_client_metadata",
        id="response-type-token",
    ),
    pytest.param(
        body(metadata(grant_types=["authorization_code"])),
        "invalid_client_metadata",
        id="code-grant-without-redirect_uris",
    ),
    # jwks_uri hosts that can never be fetched (trustplane.outbound): refused at registration
    *[
        pytest.param(
            body(metadata(jwks=None, jwks_uri=f"https://{host}/jwks")),
            "invalid_client_metadata",
            id=f"jwks_uri-{label}",
        )
        for label, host in [
            ("metadata-service", "169.254.169.254"),
            ("loopback", "127.0.0.1:8443"),
            ("loopback-decimal", "2130706433"),
            ("loopback-short", "127.1"),
            ("private-10", "10.1.2.3"),
            ("private-192-168", "192.168.0.10"),
            ("shared-100-64", "100.64.0.1"),
            ("ipv6-loopback", "[::1]"),
            ("ipv6-mapped-loopback", "[::ffff:127.0.0.1]"),
            ("ipv6-ula", "[fd00::1]"),
            ("unspecified", "0.0.0.0"),
            ("localhost", "localhost"),
            ("localhost-subdomain", "keys.localhost"),
            ("internal-name", "metadata.google.internal"),
        ]
    ],
    pytest.param(
        body(metadata(jwks=None, jwks_uri="https://user:pw@keys.client.example/jwks")),
        "invalid_client_metadata",
        id="jwks_uri-credentials",
    ),
    # RFC 7591 §2 token_endpoint_auth_signing_alg: only algorithms this server allows
    *[
        pytest.param(
            body(metadata(token_endpoint_auth_signing_alg=alg)),
            "invalid_client_metadata",
            id=f"signing-alg-{alg}",
        )
        for alg in ["none", "HS256", "RS256", "ES512", "es256"]
    ],
    pytest.param(
        body(metadata(token_endpoint_auth_signing_alg="EdDSA")),
        "invalid_client_metadata",
        id="signing-alg-without-a-key-for-it",
    ),
    pytest.param(
        body(secret_metadata(token_endpoint_auth_signing_alg="ES256")),
        "invalid_client_metadata",
        id="signing-alg-on-a-secret-client",
    ),
]


@pytest.mark.parametrize(("request_kwargs", "error"), BAD_METADATA)
async def test_bad_metadata_is_refused_and_nothing_is_written(
    server: Server, request_kwargs: dict[str, Any], error: str
) -> None:
    token = await initial_token(server, max_uses=1)
    before = await client_count(server)
    kwargs = {**request_kwargs, "headers": {**request_kwargs.get("headers", {}), **bearer(token)}}
    response = await server.http.post("/register", **kwargs)
    assert error_of(response) == (400, error), response.text
    assert await client_count(server) == before
    # the single-use initial access token was not spent either
    again = await server.http.post("/register", json=metadata(), headers=bearer(token))
    assert again.status_code == 201, again.text


async def test_a_body_over_64_kib_is_413_and_nothing_is_written(server: Server) -> None:
    """Bounded bodies (``trustplane.limits``): 413 ``invalid_request``, the token not spent."""
    token = await initial_token(server, max_uses=1)
    before = await client_count(server)
    response = await server.http.post(
        "/register",
        content=b'{"pad": "' + b"x" * 70_000 + b'"}',
        headers={"content-type": "application/json", **bearer(token)},
    )
    assert error_of(response) == (413, "invalid_request"), response.text
    assert await client_count(server) == before
    again = await server.http.post("/register", json=metadata(), headers=bearer(token))
    assert again.status_code == 201, again.text


# --------------------------------------------------------------------------- RFC 7591: success


async def test_registered_private_key_jwt_client_gets_tokens(server: Server) -> None:
    key = new_ec_key()
    sent = metadata(jwks=jwks_for(key))
    before = await client_count(server)
    response = await server.http.post(
        "/register", json=sent, headers=bearer(await initial_token(server))
    )
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    reg = response.json()
    client_id = reg["client_id"]
    assert reg["registration_client_uri"] == f"{server.issuer}/register/{client_id}"
    assert reg["registration_access_token"]
    assert "client_secret" not in reg
    assert {name: reg[name] for name in sent} == sent
    assert reg["token_endpoint_auth_method"] == "private_key_jwt"
    assert reg["grant_types"] == ["client_credentials"]
    assert await client_count(server) == before + 1
    kit = ClientKit(client_id, key, server.issuer)
    assert (await server.token(kit)).status_code == 200


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
async def test_registered_secret_client_gets_tokens(server: Server, method: str) -> None:
    reg = await registered(server, secret_metadata(method))
    client_id, secret = reg["client_id"], reg["client_secret"]
    assert reg["token_endpoint_auth_method"] == method
    assert reg["client_secret_expires_at"] == 0
    form = {"grant_type": "client_credentials", "scope": "order:create", "resource": EXECUTION}
    if method == "client_secret_basic":
        response = await server.http.post("/token", data=form, headers=basic(client_id, secret))
    else:
        form |= {"client_id": client_id, "client_secret": secret}
        response = await server.http.post("/token", data=form)
    assert response.status_code == 200, response.text


async def test_server_assigned_fields_in_the_request_are_not_taken(server: Server) -> None:
    """RFC 7591 §3.2.1: the server issues ``client_id`` and the secret; a client cannot choose them
    (an existing client's id, a secret it knows) nor a registration access token."""
    other = await registered(server)
    chosen = {
        "client_id": other["client_id"],
        "client_secret": "chosen-by-the-client",
        "client_secret_expires_at": 1,
        "client_id_issued_at": 1,
        "registration_access_token": "chosen-too",
    }

    reg = await registered(server, secret_metadata(**chosen))

    assert reg["client_id"] not in (other["client_id"], chosen["client_id"])
    assert reg["client_secret"] != chosen["client_secret"]
    assert reg["registration_access_token"] != chosen["registration_access_token"]
    assert reg["client_secret_expires_at"] == 0
    assert reg["client_id_issued_at"] > 1
    form = {"grant_type": "client_credentials", "scope": "order:create", "resource": EXECUTION}
    forged = await server.http.post(
        "/token", data=form, headers=basic(reg["client_id"], chosen["client_secret"])
    )
    assert error_of(forged) == (401, "invalid_client")
    read = await server.http.get(
        other["registration_client_uri"], headers=bearer(other["registration_access_token"])
    )
    assert read.json()["client_name"] == other["client_name"]


@pytest.mark.parametrize("response_types", [None, []])
async def test_code_grant_registers_the_code_response_type(
    server: Server, response_types: list[str] | None
) -> None:
    """RFC 7591 §2.1: ``authorization_code`` implies ``response_types`` ``code`` (the §2 default);
    the registration answer says so rather than an empty list the flow contradicts."""
    sent = metadata(
        grant_types=["authorization_code"],
        redirect_uris=["https://client.example/cb"],
        response_types=response_types,
    )

    reg = await registered(server, sent)

    assert reg["response_types"] == ["code"]


async def test_unknown_and_localized_members_are_ignored(server: Server) -> None:
    """RFC 7591 §2: metadata the server does not understand is ignored (not stored, not echoed):
    language-tagged names (§2.2), URIs shown to users (``logo_uri``, ``tos_uri``, ...) and a
    ``software_statement`` (§2.3: not implemented, so it can neither add nor override metadata)."""
    sent = metadata(
        **{
            "client_name#ja-Jpan-JP": "クライアント名",
            "logo_uri": "javascript:alert(1)",
            "tos_uri": "not a uri",
            "software_statement": "eyJhbGciOiJub25lIn0.eyJzY29wZSI6Im9yZGVyOmNhbmNlbCJ9.",
            "software_id": "4NRB1-0XZABZI9E6-5SM3R",
        }
    )

    reg = await registered(server, sent)

    ignored = {"client_name#ja-Jpan-JP", "logo_uri", "tos_uri", "software_statement", "software_id"}
    assert ignored & reg.keys() == set()
    assert reg["scope"] == sent["scope"]
    client = server.services.clients.registry.get(reg["client_id"])
    assert client is not None
    assert ignored & client.metadata.keys() == set()


# --------------------------------------------------------------------------- RFC 7592


async def test_read_with_registration_access_token(server: Server) -> None:
    reg = await registered(server, secret_metadata())
    response = await server.http.get(
        reg["registration_client_uri"], headers=bearer(reg["registration_access_token"])
    )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    read = response.json()
    assert read["client_id"] == reg["client_id"]
    assert read["registration_client_uri"] == reg["registration_client_uri"]
    assert read["scope"] == reg["scope"]
    assert "client_secret" not in read  # shown once, stored hashed
    assert read["client_secret_expires_at"] == 0
    # RFC 7592 §3: REQUIRED; the token the client presented (it is not rotated)
    assert read["registration_access_token"] == reg["registration_access_token"]


ManagementCase = Callable[[dict[str, Any], dict[str, Any]], tuple[str, dict[str, str]]]

REFUSED_MANAGEMENT = [
    pytest.param(lambda a, b: (a["client_id"], {}), id="no-token"),
    pytest.param(lambda a, b: (a["client_id"], bearer("wrong")), id="wrong-token"),
    pytest.param(
        lambda a, b: (a["client_id"], bearer(b["registration_access_token"])),
        id="another-clients-token",
    ),
    pytest.param(
        lambda a, b: ("tp-unknown", bearer(a["registration_access_token"])), id="unknown-client"
    ),
    # a NUL in the client_id is refused at the entry, 400 before any check (tests/test_unstorable_text.py)
    pytest.param(
        lambda a, b: ("x" * 300, bearer(a["registration_access_token"])), id="overlong-client_id"
    ),
]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
@pytest.mark.parametrize("case", REFUSED_MANAGEMENT)
async def test_management_without_the_clients_token(
    server: Server, case: ManagementCase, method: str
) -> None:
    a, b = await registered(server), await registered(server)
    client_id, headers = case(a, b)
    body = metadata(client_id=a["client_id"]) if method == "PUT" else None
    response = await server.http.request(
        method, f"/register/{client_id}", json=body, headers=headers
    )
    assert error_of(response) == (401, "invalid_token"), response.text
    assert response.headers["www-authenticate"].startswith("Bearer ")
    assert server.services.clients.registry.get(a["client_id"]) is not None


async def test_put_replaces_metadata(server: Server) -> None:
    key = new_ec_key()
    reg = await registered(server, metadata(jwks=jwks_for(key)))
    replacement = metadata(
        client_id=reg["client_id"], client_name="renamed", scope="order:create", jwks=jwks_for(key)
    )
    response = await server.http.put(
        reg["registration_client_uri"],
        json=replacement,
        headers=bearer(reg["registration_access_token"]),
    )
    assert response.status_code == 200, response.text
    updated = response.json()
    assert (updated["client_name"], updated["scope"]) == ("renamed", "order:create")
    kit = ClientKit(reg["client_id"], key, server.issuer)
    assert error_of(await server.token(kit, scope="order:cancel")) == (400, "invalid_scope")
    assert (await server.token(kit, scope="order:create")).status_code == 200


PutCase = Callable[[dict[str, Any]], dict[str, Any]]

REFUSED_PUT = [
    pytest.param(lambda r: metadata(client_id="tp-another"), id="client_id-differs"),
    pytest.param(lambda r: metadata(), id="client_id-missing"),
    pytest.param(
        lambda r: metadata(
            client_id=r["client_id"], registration_access_token=r["registration_access_token"]
        ),
        id="registration_access_token-sent",
    ),
    pytest.param(
        lambda r: metadata(client_id=r["client_id"], client_id_issued_at=r["client_id_issued_at"]),
        id="client_id_issued_at-sent",
    ),
    pytest.param(lambda r: secret_metadata(client_id=r["client_id"]), id="auth-method-changed"),
    pytest.param(
        lambda r: metadata(client_id=r["client_id"], lei="5493001KJTIIGC8Y1R13"), id="invalid-lei"
    ),
    pytest.param(lambda r: [r["client_id"]], id="json-array"),
    pytest.param(
        lambda r: metadata(
            client_id=r["client_id"], jwks=None, jwks_uri="https://169.254.169.254/latest"
        ),
        id="jwks_uri-metadata-service",
    ),
    pytest.param(
        lambda r: metadata(client_id=r["client_id"], token_endpoint_auth_signing_alg="none"),
        id="signing-alg-none",
    ),
]


@pytest.mark.parametrize("case", REFUSED_PUT)
async def test_put_refused_leaves_client_unchanged(server: Server, case: PutCase) -> None:
    reg = await registered(server)
    response = await server.http.put(
        reg["registration_client_uri"],
        json=case(reg),
        headers=bearer(reg["registration_access_token"]),
    )
    assert error_of(response) == (400, "invalid_client_metadata"), response.text
    client = server.services.clients.registry.get(reg["client_id"])
    assert client is not None
    assert client.metadata["client_name"] == reg["client_name"]
    assert client.auth_method == "private_key_jwt"


async def test_delete_ends_the_client(server: Server) -> None:
    key = new_ec_key()
    reg = await registered(server, metadata(jwks=jwks_for(key)))
    kit = ClientKit(reg["client_id"], key, server.issuer)
    assert (await server.token(kit)).status_code == 200
    before = await client_count(server)
    headers = bearer(reg["registration_access_token"])
    response = await server.http.delete(reg["registration_client_uri"], headers=headers)
    assert response.status_code == 204, response.text
    assert await client_count(server) == before - 1
    assert error_of(await server.token(kit)) == (401, "invalid_client")
    read = await server.http.get(reg["registration_client_uri"], headers=headers)
    assert error_of(read) == (401, "invalid_token")
    again = await server.http.delete(reg["registration_client_uri"], headers=headers)
    assert error_of(again) == (401, "invalid_token")


# --------------------------------------------------------------------------- trustplane's own APIs

INTERNAL_GRANTS = [
    pytest.param({"allowed_resources": ["{issuer}/audit"]}, id="audit-audience"),
    pytest.param(
        {"scope": "order:create event:subscribe", "allowed_resources": ["{issuer}/events"]},
        id="security-events-audience",
    ),
    pytest.param({"introspection_resources": ["{issuer}/mandates"]}, id="mandates-introspection"),
    pytest.param(
        {"scope": "order:create decision:evaluate", "allowed_resources": [EXECUTION]},
        id="pdp-scope",
    ),
]


def _with_issuer(changes: dict[str, Any], issuer: str) -> dict[str, Any]:
    def fill(value: Any) -> Any:
        return [fill(v) for v in value] if isinstance(value, list) else value.format(issuer=issuer)

    return {k: fill(v) for k, v in changes.items()}


@pytest.mark.parametrize("changes", INTERNAL_GRANTS)
async def test_dynamic_registration_cannot_grant_trustplanes_own_apis(
    server: Server, changes: dict[str, Any]
) -> None:
    """An initial access token is not an admin credential: the audit ledger, the PDP, the mandate
    store and the partner registry are granted only by an operator (`trustplane clients add`)."""
    issuer = server.services.settings.issuer.rstrip("/")
    before = await client_count(server)
    response = await server.http.post(
        "/register",
        json=metadata(**_with_issuer(changes, issuer)),
        headers=bearer(await initial_token(server)),
    )
    assert error_of(response) == (400, "invalid_client_metadata"), response.text
    assert "operator" in response.json()["error_description"]
    assert await client_count(server) == before

    reg = await registered(server)
    body = metadata(client_id=reg["client_id"], **_with_issuer(changes, issuer))
    put = await server.http.put(
        reg["registration_client_uri"], json=body, headers=bearer(reg["registration_access_token"])
    )
    assert error_of(put) == (400, "invalid_client_metadata"), put.text

    kit = await register_kit(server.services, **_with_issuer(changes, issuer))
    assert kit.client_id in {c.client_id for c in await server.services.clients.list()}


# --------------------------------------------------------------------------- rights over others' tokens

RS_GRANTS = [
    pytest.param({"introspection_resources": [EXECUTION]}, id="introspection_resources"),
    pytest.param({"resource_server_for": [EXECUTION]}, id="resource_server_for"),
]


@pytest.mark.parametrize("grant", RS_GRANTS)
async def test_dynamic_registration_cannot_make_itself_a_resource_server(
    server: Server, grant: dict[str, Any]
) -> None:
    """Issue 11 item 2: introspecting (and exchanging as resource server) other clients' tokens is
    granted by an operator only; RFC 7591 registration asking for it is refused and writes nothing."""
    before = await client_count(server)
    response = await server.http.post(
        "/register", json=metadata(**grant), headers=bearer(await initial_token(server))
    )

    assert error_of(response) == (400, "invalid_client_metadata"), response.text
    (field,) = grant
    assert response.json()["error_description"].startswith(
        f"{field}: rights over other parties' tokens"
    )
    assert "trustplane clients add --resource-server" in response.json()["error_description"]
    assert await client_count(server) == before


@pytest.mark.parametrize("grant", RS_GRANTS)
async def test_rfc7592_put_cannot_add_the_resource_server_role(
    server: Server, grant: dict[str, Any]
) -> None:
    reg = await registered(server)
    body = metadata(client_id=reg["client_id"], **grant)

    put = await server.http.put(
        reg["registration_client_uri"], json=body, headers=bearer(reg["registration_access_token"])
    )

    assert error_of(put) == (400, "invalid_client_metadata"), put.text
    stored = server.services.clients.registry.get(reg["client_id"])
    assert stored is not None
    assert stored.resource_server_for == frozenset()


async def test_rfc7592_put_does_not_keep_an_operator_grant(server: Server) -> None:
    """The role is not client metadata the client controls: its replacement metadata never carries
    it (operator clients from `trustplane clients add` have no registration access token at all)."""
    kit = await register_kit(
        server.services, resource_server_for=[EXECUTION], introspection_resources=[]
    )
    client = server.services.clients.registry.get(kit.client_id)
    assert client is not None
    assert client.resource_server_for == frozenset({EXECUTION})
    body = {**client.metadata, "client_id": kit.client_id}

    kept = await server.services.clients.update(
        client, {k: v for k, v in body.items() if k != "resource_server_for"}
    )

    assert kept.resource_server_for == frozenset()
    assert "resource_server_for" not in kept.metadata
