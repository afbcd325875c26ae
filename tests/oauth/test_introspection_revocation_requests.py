"""Malformed and unauthenticated requests at ``/introspect`` (RFC 7662 §2.1, §2.3) and ``/revoke``
(RFC 7009 §2.1, §2.2.1): each is refused with its exact status and error code, never a 500, and a
refused revocation revokes nothing (the token stays active). ``token_type_hint`` is only a hint: an
unknown value is ignored (RFC 7009 §2.1), never an error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy.exc import DBAPIError

from tests.conftest import ClientKit, register_kit
from tests.protocol_server import Server, basic, register_secret_client
from trustplane.audit.sink import recent_events
from trustplane.clients.model import ClientStatus
from trustplane.protocol.form import MAX_BODY

pytestmark = pytest.mark.asyncio(loop_scope="module")

ENDPOINTS = ["/introspect", "/revoke"]
FORM = "application/x-www-form-urlencoded"


async def is_active(server: Server, token: str) -> bool:
    response = await server.http.post("/introspect", data={"token": token, **server.kit.auth()})
    assert response.status_code == 200, response.text
    return bool(response.json()["active"])


def encoded(pairs: list[tuple[str, str]]) -> bytes:
    return str(httpx.QueryParams(pairs)).encode()


Send = Callable[[Server, str, str], Any]  # (server, path, token) -> awaitable response


async def _get_with_query(s: Server, path: str, token: str) -> httpx.Response:
    return await s.http.get(path, params={"token": token, **s.kit.auth()})


async def _put(s: Server, path: str, token: str) -> httpx.Response:
    return await s.http.put(path, data={"token": token, **s.kit.auth()})


async def _json_body(s: Server, path: str, token: str) -> httpx.Response:
    return await s.http.post(path, json={"token": token, **s.kit.auth()})


async def _no_content_type(s: Server, path: str, token: str) -> httpx.Response:
    return await s.http.post(path, content=encoded([("token", token), *s.kit.auth().items()]))


async def _token_in_query_only(s: Server, path: str, token: str) -> httpx.Response:
    return await s.http.post(path, params={"token": token}, data=s.kit.auth())


async def _form(s: Server, path: str, pairs: list[tuple[str, str]]) -> httpx.Response:
    return await s.http.post(path, content=encoded(pairs), headers={"content-type": FORM})


async def _token_twice(s: Server, path: str, token: str) -> httpx.Response:
    return await _form(s, path, [("token", token), ("token", token), *s.kit.auth().items()])


async def _token_empty(s: Server, path: str, token: str) -> httpx.Response:
    return await _form(s, path, [("token", ""), *s.kit.auth().items()])


async def _hint_twice(s: Server, path: str, token: str) -> httpx.Response:
    pairs = [("token_type_hint", "access_token"), ("token_type_hint", "refresh_token")]
    return await _form(s, path, [("token", token), *pairs, *s.kit.auth().items()])


async def _nul_in_token(s: Server, path: str, token: str) -> httpx.Response:
    return await _form(s, path, [("token", token + "\x00"), *s.kit.auth().items()])


async def _body_too_large(s: Server, path: str, token: str) -> httpx.Response:
    pairs = [("token", token), ("padding", "x" * MAX_BODY), *s.kit.auth().items()]
    return await _form(s, path, pairs)


async def _no_client_authentication(s: Server, path: str, token: str) -> httpx.Response:
    return await s.http.post(path, data={"token": token})


async def _unknown_client_assertion(s: Server, path: str, token: str) -> httpx.Response:
    kit = s.kit
    nobody = ClientKit("tp-nobody", kit.key, kit.issuer)
    return await s.http.post(path, data={"token": token, **nobody.auth()})


async def _disabled_caller(s: Server, path: str, token: str) -> httpx.Response:
    kit = await register_kit(s.services)
    await s.services.clients.set_status(kit.client_id, ClientStatus.DISABLED)
    return await s.http.post(path, data={"token": token, **kit.auth()})


async def _replayed_assertion(s: Server, path: str, token: str) -> httpx.Response:
    auth = s.kit.auth()
    first = await s.http.post("/introspect", data={"token": "x", **auth})
    assert first.status_code == 200, first.text
    return await s.http.post(path, data={"token": token, **auth})


async def _two_authentication_methods(s: Server, path: str, token: str) -> httpx.Response:
    client_id, secret = await register_secret_client(s.services, "client_secret_post")
    form = {"token": token, "client_id": client_id, "client_secret": secret, **s.kit.auth()}
    return await s.http.post(path, data=form)


async def _secret_post_wrong(s: Server, path: str, token: str) -> httpx.Response:
    client_id, _ = await register_secret_client(s.services, "client_secret_post")
    form = {"token": token, "client_id": client_id, "client_secret": "wrong"}
    return await s.http.post(path, data=form)


async def _bearer_authorization(s: Server, path: str, token: str) -> httpx.Response:
    """RFC 7662 §2.1 allows an access token as the caller's credential; we do not (see the docs)."""
    return await s.http.post(
        path, data={"token": token}, headers={"Authorization": f"Bearer {token}"}
    )


REFUSED = [
    pytest.param(_get_with_query, 405, None, id="GET-with-token-in-query"),
    pytest.param(_put, 405, None, id="PUT"),
    pytest.param(_json_body, 400, "invalid_request", id="json-body"),
    pytest.param(_no_content_type, 400, "invalid_request", id="no-content-type"),
    pytest.param(_token_in_query_only, 400, "invalid_request", id="token-in-query-only"),
    pytest.param(_token_twice, 400, "invalid_request", id="token-twice"),
    pytest.param(_token_empty, 400, "invalid_request", id="token-empty"),
    pytest.param(_hint_twice, 400, "invalid_request", id="hint-twice"),
    pytest.param(_nul_in_token, 400, "invalid_request", id="nul-in-token"),
    pytest.param(_body_too_large, 413, "invalid_request", id="body-over-64KiB"),
    pytest.param(_no_client_authentication, 401, "invalid_client", id="no-client-auth"),
    pytest.param(_unknown_client_assertion, 401, "invalid_client", id="unknown-client"),
    pytest.param(_disabled_caller, 401, "invalid_client", id="disabled-client"),
    pytest.param(_replayed_assertion, 401, "invalid_client", id="replayed-assertion"),
    # RFC 7521 §4.2.1: an assertion beside another method is invalid_client
    pytest.param(_two_authentication_methods, 401, "invalid_client", id="two-auth-methods"),
    pytest.param(_secret_post_wrong, 401, "invalid_client", id="client-secret-post-wrong"),
    pytest.param(_bearer_authorization, 401, "invalid_client", id="bearer-authorization"),
]


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize(("send", "status", "error"), REFUSED)
async def test_refused_request_changes_nothing(
    server: Server, path: str, send: Send, status: int, error: str | None
) -> None:
    token = await server.access_token()
    response = await send(server, path, token)
    assert response.status_code == status, response.text
    if status == 405:
        assert response.headers["allow"] == "POST"
    else:
        assert response.json()["error"] == error
        assert response.headers["cache-control"] == "no-store"
        assert "active" not in response.json()
    if status == 401 and send is not _bearer_authorization:  # form-based: no challenge
        assert "www-authenticate" not in response.headers
    if send is _bearer_authorization:  # RFC 6749 §5.2: an attempt via the header: a challenge
        assert response.headers["www-authenticate"].startswith("Basic ")
    assert await is_active(server, token)


async def _basic_wrong_secret(s: Server) -> dict[str, str]:
    client_id, _ = await register_secret_client(s.services)
    return basic(client_id, "wrong")


async def _basic_unknown_client(s: Server) -> dict[str, str]:
    return basic("tp-nobody", "whatever")


async def _basic_malformed(s: Server) -> dict[str, str]:
    return {"Authorization": "Basic not*base64"}


async def _basic_for_a_private_key_jwt_client(s: Server) -> dict[str, str]:
    return basic(s.kit.client_id, "guess")


BASIC_FAILURES = [
    pytest.param(_basic_wrong_secret, id="wrong-secret"),
    pytest.param(_basic_unknown_client, id="unknown-client"),
    pytest.param(_basic_malformed, id="malformed"),
    pytest.param(_basic_for_a_private_key_jwt_client, id="registered-for-another-method"),
]


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("headers", BASIC_FAILURES)
async def test_basic_authentication_failure_is_401_with_a_basic_challenge(
    server: Server, path: str, headers: Callable[[Server], Any]
) -> None:
    """RFC 6749 §5.2 (RFC 7009 §2.2.1 and RFC 7662 §2.3 defer to it): a client that authenticated
    with the Authorization header gets 401 and ``WWW-Authenticate`` for the scheme it used."""
    token = await server.access_token()
    response = await server.http.post(path, data={"token": token}, headers=await headers(server))
    assert (response.status_code, response.json()["error"]) == (401, "invalid_client")
    assert response.headers["www-authenticate"].startswith("Basic ")
    assert await is_active(server, token)


@pytest.mark.parametrize("hint", ["access_token", "refresh_token", "id_token", "no-such-type"])
async def test_introspection_ignores_the_hint(server: Server, hint: str) -> None:
    token = await server.access_token()
    response = await server.http.post(
        "/introspect", data={"token": token, "token_type_hint": hint, **server.kit.auth()}
    )
    assert response.status_code == 200, response.text
    assert response.json()["active"] is True


@pytest.mark.parametrize("hint", ["id_token", "no-such-type", "urn:example:unknown"])
async def test_revocation_with_an_unknown_hint_revokes(server: Server, hint: str) -> None:
    """RFC 7009 §2.1: an invalid token type hint value is ignored and does not influence the
    response; ``unsupported_token_type`` is only for a type the server cannot revoke."""
    token = await server.access_token()
    response = await server.http.post(
        "/revoke", data={"token": token, "token_type_hint": hint, **server.kit.auth()}
    )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert not await is_active(server, token)


async def test_a_large_unknown_token_is_inactive_and_a_200_no_op(server: Server) -> None:
    """60 000 characters of something that is no token of ours: RFC 7662 §2.2 and RFC 7009 §2.2."""
    token = "eyJ" + "A" * 60_000
    introspected = await server.http.post("/introspect", data={"token": token, **server.kit.auth()})
    assert (introspected.status_code, introspected.json()) == (200, {"active": False})
    revoked = await server.http.post("/revoke", data={"token": token, **server.kit.auth()})
    assert (revoked.status_code, revoked.content) == (200, b"")


async def test_a_jwt_introspection_response_is_not_offered(server: Server) -> None:
    """RFC 9701 (JWT introspection responses) is not implemented: a caller asking for one gets
    the plain RFC 7662 JSON, and the metadata does not advertise signing algorithms for it."""
    token = await server.access_token()
    response = await server.http.post(
        "/introspect",
        data={"token": token, **server.kit.auth()},
        headers={"Accept": "application/token-introspection+jwt"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["active"] is True
    metadata = (await server.http.get("/.well-known/oauth-authorization-server")).json()
    assert "introspection_signing_alg_values_supported" not in metadata


def _database_gone(*_args: object, **_kwargs: object) -> Any:
    raise DBAPIError("SELECT 1", {}, ConnectionResetError("gone"), connection_invalidated=True)


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_a_lost_database_is_503_and_fails_closed(
    server: Server, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Introspection cannot check revocation: 503 ``temporarily_unavailable`` with ``Retry-After``,
    never ``active: true``. Revocation cannot be recorded: 503 (RFC 7009 §2.2.1: the client must
    assume the token still exists and retry), and nothing is half-written."""
    token = await server.access_token()
    revoked = server.services.revoked
    monkeypatch.setattr(revoked, "is_revoked", _database_gone)
    monkeypatch.setattr(revoked, "revoke", _database_gone)
    response = await server.http.post(path, data={"token": token, **server.kit.auth()})
    monkeypatch.undo()
    assert (response.status_code, response.json()["error"]) == (503, "temporarily_unavailable")
    assert int(response.headers["retry-after"]) > 0
    assert response.headers["cache-control"] == "no-store"
    assert await is_active(server, token)
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    events = await recent_events(server.services.db, 10_000, "oauth:token:revoked")
    assert [e for e in events if e["jti"] == jti] == []


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded; charset=UTF-8", "Application/X-WWW-Form-URLEncoded"],
)
async def test_the_form_media_type_with_parameters_or_any_case_is_accepted(
    server: Server, path: str, content_type: str
) -> None:
    token = await server.access_token()
    pairs = [("token", token), *server.kit.auth().items()]
    response = await server.http.post(
        path, content=encoded(pairs), headers={"content-type": content_type}
    )
    assert response.status_code == 200, response.text
    assert await is_active(server, token) is (path == "/introspect")
