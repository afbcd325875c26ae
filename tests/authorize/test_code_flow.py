"""The authorization code flow in process: happy path, front-channel negatives (error page vs error
redirect), the consent page's content and protections, and the token endpoint's code and refresh
grants, each negative with its exact status and error code."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import orjson
import pytest
from sqlalchemy import update

from tests.authorize.conftest import Setup, register_code_client
from tests.authorize.flow import REDIRECT_URI, TRADE, hidden_fields, query_of
from tests.conftest import EXECUTION
from trustplane.authorize.pkce import s256
from trustplane.authorize.store import SqlCodeStore, authorization_codes, digest
from trustplane.protocol.tokens import read_access_token

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def introspect(setup: Setup, token: str) -> dict[str, object]:
    response = await setup.server.http.post(
        "/introspect", data={"token": token, **setup.kit.auth()}
    )
    assert response.status_code == 200
    return dict(response.json())


# --------------------------------------------------------------------------- happy path


async def alter_code(setup: Setup, code: str, **values: object) -> None:
    """Change the stored code row directly (what the endpoints cannot produce)."""
    async with setup.server.services.db.transaction() as conn:
        await conn.execute(
            update(authorization_codes)
            .where(authorization_codes.c.code_hash == digest(code))
            .values(**values)
        )


async def test_code_flow_issues_a_mandate_bound_token_and_a_refresh_token(setup: Setup) -> None:
    flow = setup.flow()
    code = await flow.code("alice")
    response = await setup.token(flow.redeem_form(code))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "order:create"
    assert body["authorization_details"] == [TRADE]
    assert body["refresh_token"]
    claims = read_access_token(
        setup.server.services.keys.ring, body["access_token"], issuer=setup.server.issuer
    )
    assert claims is not None
    assert claims["sub"] == setup.user.user_id
    assert claims["client_id"] == setup.kit.client_id
    assert claims["aud"] == EXECUTION
    assert claims["lei"] == setup.user.lei
    assert claims["authorization_details"] == [TRADE]
    assert claims["acr"] == "urn:trustplane:acr:password"
    assert isinstance(claims["auth_time"], int)
    mandate = await setup.server.services.mandates.get(claims["mandate"]["id"])
    assert (mandate.version, mandate.grantor_lei) == (claims["mandate"]["version"], setup.user.lei)
    assert mandate.grantee_client_id == setup.kit.client_id
    assert mandate.accepted_by == setup.user.user_id


async def test_second_consent_shows_and_reuses_the_covering_mandate(setup: Setup) -> None:
    flow = setup.flow()
    first = await setup.token(flow.redeem_form(await flow.code("alice")))
    mandate = read_access_token(
        setup.server.services.keys.ring, first.json()["access_token"], issuer=setup.server.issuer
    )["mandate"]  # type: ignore[index]
    page = await flow.start()  # same browser: the session skips the login page
    assert 'id="covering"' in page.text
    assert f"mandate {mandate['id']}, version {mandate['version']}" in page.text
    answer = await flow.decide(page)
    code = query_of(answer.headers["location"])["code"]
    second = await setup.token(flow.redeem_form(code))
    again = read_access_token(
        setup.server.services.keys.ring, second.json()["access_token"], issuer=setup.server.issuer
    )
    assert again is not None
    assert again["mandate"] == mandate


async def test_consent_page_states_the_terms_in_business_language(setup: Setup) -> None:
    flow = setup.flow()
    page = await flow.login(await flow.start(), "alice")
    text = page.text
    assert page.status_code == 200
    assert "Arranger Order Service" in text
    assert 'id="client-lei">LEI 5493001KJTIIGC8Y1R12<' in text
    assert "Create an order" in text  # the scope's description from the vocabulary
    assert "ACC-1" in text
    assert "bond" in text
    assert "EUR 5,000,000.00" in text  # 500,000,000 minor units of EUR
    assert 'id="effective-until"' in text
    assert page.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"


async def test_state_and_iss_are_returned_with_the_code(setup: Setup) -> None:
    flow = setup.flow()
    page = await flow.login(await flow.start(), "alice")
    answer = await flow.decide(page)
    assert answer.status_code == 303
    location = answer.headers["location"]
    assert location.startswith(REDIRECT_URI + "?")
    params = query_of(location)
    assert params["state"] == flow.state
    assert params["iss"] == setup.server.issuer


async def test_loopback_redirect_uri_may_use_another_port(setup: Setup) -> None:
    flow = setup.flow()
    flow.redirect_uri = "http://127.0.0.1:53124/callback"  # registered with port 4711
    code = await flow.code("alice")
    response = await setup.token(flow.redeem_form(code))
    assert response.status_code == 200, response.text


async def test_discovery_advertises_the_code_flow(setup: Setup) -> None:
    doc = (await setup.server.http.get("/.well-known/oauth-authorization-server")).json()
    assert doc["authorization_endpoint"] == setup.server.issuer + "/authorize"
    assert doc["response_types_supported"] == ["code"]
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["authorization_response_iss_parameter_supported"] is True
    assert {"authorization_code", "refresh_token"} <= set(doc["grant_types_supported"])


# --------------------------------------------------------------------------- error page, no redirect

REDIRECT_VARIANTS = [
    pytest.param("https://client.example/CB", id="case"),
    pytest.param("https://client.example/cb?x=1", id="added-query"),
    pytest.param("https://client.example/cb/../x", id="dot-segments"),
    pytest.param("https://client.example/cb/%252e%252e/x", id="double-encoded-dots"),
    pytest.param("https://client.example/cb/", id="trailing-slash"),
    pytest.param("https://other.example/cb", id="another-host"),
    pytest.param("https://client.example@evil.example/cb", id="userinfo-host"),
    pytest.param("https://evil.example@client.example/cb", id="userinfo-before"),
    pytest.param("https://client.example/cb#frag", id="fragment"),
    pytest.param("http://client.example/cb", id="http-scheme"),
    pytest.param("https://client.example:443/cb", id="explicit-port"),
    pytest.param("http://127.0.0.1:4711@evil.example/callback", id="loopback-userinfo"),
    pytest.param("http://127.0.0.1:4711/callback/x", id="loopback-other-path"),
    pytest.param("http://localhost:4711/callback", id="loopback-by-name"),
]


@pytest.mark.parametrize("redirect_uri", REDIRECT_VARIANTS)
async def test_redirect_uri_variants_get_an_error_page_and_no_redirect(
    setup: Setup, redirect_uri: str
) -> None:
    response = await setup.flow().start(redirect_uri=redirect_uri)
    assert response.status_code == 400
    assert "location" not in response.headers
    assert 'id="error"' in response.text
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"client_id": "no-such-client"}, id="unknown-client"),
        pytest.param({"client_id": None}, id="missing-client"),
        pytest.param({"redirect_uri": None}, id="missing-redirect-with-two-registered"),
    ],
)
async def test_unknown_client_or_missing_redirect_gets_an_error_page(
    setup: Setup, overrides: dict[str, str | None]
) -> None:
    response = await setup.flow().start(**overrides)
    assert response.status_code == 400
    assert "location" not in response.headers


async def test_repeated_parameter_gets_an_error_page(setup: Setup) -> None:
    flow = setup.flow()
    query = "&".join(f"{k}={v}" for k, v in flow.params().items() if k != "authorization_details")
    response = await flow.http.get(f"/authorize?{query}&state=again")
    assert response.status_code == 400
    assert "location" not in response.headers


# --------------------------------------------------------------------------- error redirects

REDIRECTED_ERRORS = [
    pytest.param({"code_challenge": None}, "invalid_request", id="pkce-missing"),
    pytest.param({"code_challenge_method": "plain"}, "invalid_request", id="pkce-plain"),
    pytest.param({"code_challenge_method": None}, "invalid_request", id="pkce-method-missing"),
    pytest.param({"code_challenge": "short"}, "invalid_request", id="pkce-malformed"),
    pytest.param({"response_type": "token"}, "unsupported_response_type", id="implicit"),
    pytest.param({"response_type": "code id_token"}, "unsupported_response_type", id="hybrid"),
    pytest.param({"response_type": None}, "invalid_request", id="response-type-missing"),
    pytest.param({"response_mode": "fragment"}, "invalid_request", id="response-mode"),
    pytest.param({"scope": "settlement:submit"}, "invalid_scope", id="scope-not-allowed"),
    pytest.param({"scope": None}, "invalid_scope", id="scope-missing"),
    pytest.param({"resource": "https://clearing.example/api"}, "invalid_target", id="resource"),
    pytest.param({"authorization_details": "[{"}, "invalid_authorization_details", id="rar-json"),
    pytest.param(
        {"authorization_details": '[{"type": "trade_instruction"}]'},
        "invalid_authorization_details",
        id="rar-malformed",
    ),
    pytest.param(
        {"authorization_details": '[{"type": "settlement_instruction", "accounts": ["A"]}]'},
        "invalid_authorization_details",
        id="rar-type-not-registered",
    ),
    pytest.param(
        {"authorization_details": '[{"type": "wire_transfer"}]'},
        "invalid_authorization_details",
        id="rar-unknown-type",
    ),
]


@pytest.mark.parametrize(("overrides", "error"), REDIRECTED_ERRORS)
async def test_request_errors_are_redirected_with_state_and_iss(
    setup: Setup, overrides: dict[str, str | None], error: str
) -> None:
    flow = setup.flow()
    response = await flow.start(**overrides)
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(REDIRECT_URI + "?")
    params = query_of(location)
    assert params["error"] == error
    assert params["state"] == flow.state
    assert params["iss"] == setup.server.issuer


async def test_over_broad_authorization_details_are_refused(setup: Setup) -> None:
    """A notional above the type's ceiling and an action the type does not know."""
    flow = setup.flow()
    for broad in (
        {**TRADE, "max_notional": {**TRADE["max_notional"], "amount": 10**19}},  # type: ignore[dict-item]
        {**TRADE, "actions": ["create_order", "any"]},
    ):
        flow.details = [broad]
        params = query_of((await flow.start()).headers["location"])
        assert params["error"] == "invalid_authorization_details"


async def test_client_without_the_code_grant_is_redirected_unauthorized(setup: Setup) -> None:
    kit = await register_code_client(
        setup.server, grant_types=["client_credentials"], redirect_uris=[REDIRECT_URI]
    )
    response = await setup.flow(kit).start()
    assert query_of(response.headers["location"])["error"] == "unauthorized_client"


async def test_denial_redirects_access_denied(setup: Setup) -> None:
    flow = setup.flow()
    page = await flow.login(await flow.start(), "alice")
    answer = await flow.decide(page, "deny")
    assert answer.status_code == 303
    params = query_of(answer.headers["location"])
    assert (params["error"], params["state"]) == ("access_denied", flow.state)
    assert params["iss"] == setup.server.issuer
    assert "code" not in params


# --------------------------------------------------------------------------- login, CSRF


async def test_wrong_password_shows_the_login_page_again(setup: Setup) -> None:
    flow = setup.flow()
    page = await flow.login(await flow.start(), "alice", password="wrong password!!")
    assert 'id="login-failed"' in page.text
    assert 'action="/authorize/login"' in page.text


async def test_unknown_user_looks_like_a_wrong_password(setup: Setup) -> None:
    flow = setup.flow()
    page = await flow.login(await flow.start(), "nobody-here")
    assert 'id="login-failed"' in page.text


async def count_codes(setup: Setup) -> int:
    from sqlalchemy import func, select

    async with setup.server.services.db.read() as conn:
        return int(
            (await conn.execute(select(func.count()).select_from(authorization_codes))).scalar_one()
        )


@pytest.mark.parametrize("csrf", [None, "forged"], ids=["missing", "wrong"])
async def test_consent_without_the_csrf_token_is_403_and_writes_nothing(
    setup: Setup, csrf: str | None
) -> None:
    flow = setup.flow()
    page = await flow.login(await flow.start(), "alice")
    before = await count_codes(setup)
    answer = await flow.decide(page, csrf=csrf)
    assert answer.status_code == 403
    assert "location" not in answer.headers
    assert await count_codes(setup) == before


async def test_login_without_the_csrf_token_is_403(setup: Setup) -> None:
    flow = setup.flow()
    page = await flow.start()
    data = {**hidden_fields(page.text), "username": "alice", "password": "x", "csrf": ""}
    del data["csrf"]
    answer = await flow.http.post("/authorize/login", data=data)
    assert answer.status_code == 403


async def test_a_pending_request_does_not_move_to_another_browser(setup: Setup) -> None:
    victim, attacker = setup.flow(), setup.flow()
    page = await attacker.login(await attacker.start(), "alice")
    answer = await victim.decide(page)  # the attacker's form, posted from the victim's browser
    assert answer.status_code == 403


# --------------------------------------------------------------------------- token endpoint: codes


async def test_code_reuse_is_invalid_grant_and_revokes_the_first_tokens(setup: Setup) -> None:
    flow = setup.flow()
    code = await flow.code("alice")
    first = await setup.token(flow.redeem_form(code))
    assert first.status_code == 200
    assert (await introspect(setup, first.json()["access_token"]))["active"] is True
    again = await setup.token(flow.redeem_form(code))
    assert (again.status_code, again.json()["error"]) == (400, "invalid_grant")
    assert (await introspect(setup, first.json()["access_token"]))["active"] is False
    refreshed = await setup.token(
        {"grant_type": "refresh_token", "refresh_token": first.json()["refresh_token"]}
    )
    assert (refreshed.status_code, refreshed.json()["error"]) == (400, "invalid_grant")


async def test_code_reuse_revocation_reaches_the_bearer_guard_at_once(setup: Setup) -> None:
    """The grants revoke through the process's one revocation store, the bearer guard's list: the
    revoked token is refused here without waiting for the next cache reload."""
    flow = setup.flow()
    code = await flow.code("alice")
    first = await setup.token(flow.redeem_form(code))
    claims = read_access_token(
        setup.server.services.keys.ring, first.json()["access_token"], issuer=setup.server.issuer
    )
    assert claims is not None
    assert claims["jti"] not in setup.server.services.revoked
    again = await setup.token(flow.redeem_form(code))
    assert (again.status_code, again.json()["error"]) == (400, "invalid_grant")
    assert claims["jti"] in setup.server.services.revoked


NARROWER = {**TRADE, "max_notional": {**TRADE["max_notional"], "amount": 1_000}}  # type: ignore[dict-item]
DETAILS_IN_THE_TOKEN_REQUEST = [
    pytest.param('[{"type": "wire_transfer"}]', id="unknown-type"),
    pytest.param('[{"type": "settlement_instruction", "actions": ["submit"]}]', id="not-granted"),
    pytest.param("[{", id="not-json"),
    pytest.param(
        orjson.dumps([{**TRADE, "accounts": ["ACC-2"]}]).decode(), id="wider-than-the-grant"
    ),
]


@pytest.mark.parametrize("details", DETAILS_IN_THE_TOKEN_REQUEST)
async def test_token_request_details_beyond_the_grant_are_refused_on_code_and_refresh(
    setup: Setup, details: str
) -> None:
    """RFC 9396 §6: authorization_details in the token request must be valid, registered and
    within the grant, on the code grant and the refresh grant alike; an unknown type is never
    silently dropped (§5). The refused request consumes nothing: the code still redeems."""
    flow = setup.flow()
    code = await flow.code("alice")
    refused = await setup.token(flow.redeem_form(code, authorization_details=details))
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_authorization_details")
    first = await setup.token(flow.redeem_form(code))
    assert first.status_code == 200, first.text
    refresh = {"grant_type": "refresh_token", "refresh_token": first.json()["refresh_token"]}
    again = await setup.token({**refresh, "authorization_details": details})
    assert (again.status_code, again.json()["error"]) == (400, "invalid_authorization_details")


async def test_token_request_details_may_narrow_the_grant(setup: Setup) -> None:
    flow = setup.flow()
    code = await flow.code("alice")
    narrowed = orjson.dumps([NARROWER]).decode()
    response = await setup.token(flow.redeem_form(code, authorization_details=narrowed))
    assert response.status_code == 200, response.text
    assert response.json()["authorization_details"] == [NARROWER]
    refresh = {"grant_type": "refresh_token", "refresh_token": response.json()["refresh_token"]}
    full = await setup.token(refresh)  # the refresh token keeps the whole grant
    assert full.json()["authorization_details"] == [TRADE]


CODE_ERRORS = [
    pytest.param({"code_verifier": None}, id="pkce-downgrade-no-verifier"),
    pytest.param({"code_verifier": "A" * 43}, id="wrong-verifier"),
    pytest.param({"code_verifier": "short"}, id="malformed-verifier"),
    pytest.param({"redirect_uri": "https://client.example/cb2"}, id="redirect-uri-mismatch"),
    pytest.param({"redirect_uri": None}, id="redirect-uri-missing"),
    pytest.param({"code": "not-a-code"}, id="unknown-code"),
]


@pytest.mark.parametrize("overrides", CODE_ERRORS)
async def test_code_redemption_errors_are_invalid_grant(
    setup: Setup, overrides: dict[str, str | None]
) -> None:
    flow = setup.flow()
    code = await flow.code("alice")
    form = {**flow.redeem_form(code), **overrides}
    response = await setup.token({k: v for k, v in form.items() if v is not None})
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")


async def test_code_from_another_client_is_invalid_grant_and_spends_the_code(
    setup: Setup,
) -> None:
    """RFC 6749 §4.1.3, §10.5: a code another client holds has leaked. Refused, and spent: the
    rightful client's redemption after that is ``invalid_grant`` too (it was 200: the foreign
    attempt left the code as it was)."""
    other = await register_code_client(setup.server)
    flow = setup.flow()
    code = await flow.code("alice")
    response = await setup.token(flow.redeem_form(code), kit=other)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")
    assert response.json()["error_description"] == (
        "the authorization code was issued to another client"
    )
    rightful = await setup.token(flow.redeem_form(code))
    assert (rightful.status_code, rightful.json()["error"]) == (400, "invalid_grant")
    assert rightful.json()["error_description"] == "the authorization code was already used"


async def test_code_from_another_client_after_redemption_revokes_what_it_issued(
    setup: Setup,
) -> None:
    """RFC 6749 §10.5: "SHOULD attempt to revoke all access tokens already granted based on the
    compromised authorization code": the access token and the refresh family of the rightful
    redemption end when another client presents the code (they stayed valid)."""
    other = await register_code_client(setup.server)
    flow = setup.flow()
    code = await flow.code("alice")
    first = await setup.token(flow.redeem_form(code))
    assert first.status_code == 200, first.text
    assert (await introspect(setup, first.json()["access_token"]))["active"] is True
    response = await setup.token(flow.redeem_form(code), kit=other)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")
    assert (await introspect(setup, first.json()["access_token"]))["active"] is False
    refresh = {"grant_type": "refresh_token", "refresh_token": first.json()["refresh_token"]}
    refused = await setup.token(refresh)
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_grant")


async def test_an_expired_code_from_another_client_is_invalid_grant_and_changes_nothing(
    setup: Setup,
) -> None:
    other = await register_code_client(setup.server)
    flow = setup.flow()
    code = await flow.code("alice")
    await alter_code(setup, code, expires_at=int(time.time()) - 1)
    response = await setup.token(flow.redeem_form(code), kit=other)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")
    async with setup.server.services.db.read() as conn:
        stored = await SqlCodeStore().get(conn, code)
    assert stored is not None
    assert stored.used_at is None  # not spent: an expired code cannot be redeemed anyway


async def test_expired_code_is_invalid_grant(setup: Setup) -> None:
    flow = setup.flow()
    code = await flow.code("alice")
    await alter_code(setup, code, expires_at=int(time.time()) - 1)
    response = await setup.token(flow.redeem_form(code))
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")


async def test_code_lifetime_is_at_most_60_seconds(setup: Setup) -> None:
    flow = setup.flow()
    code = await flow.code("alice")
    async with setup.server.services.db.read() as conn:
        from sqlalchemy import select

        expires = (
            await conn.execute(
                select(authorization_codes.c.expires_at).where(
                    authorization_codes.c.code_hash == digest(code)
                )
            )
        ).scalar_one()
    assert 0 < expires - time.time() <= 60


async def test_verifier_for_a_code_issued_without_challenge_is_refused(setup: Setup) -> None:
    """Cannot be produced through /authorize (PKCE is required); the grant checks it anyway."""
    flow = setup.flow()
    code = await flow.code("alice")
    await alter_code(setup, code, code_challenge=None)
    response = await setup.token(flow.redeem_form(code))
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")
    assert "without PKCE" in response.json()["error_description"]


# --------------------------------------------------------------------------- refresh tokens


async def tokens(setup: Setup) -> dict[str, str]:
    flow = setup.flow()
    response = await setup.token(flow.redeem_form(await flow.code("alice")))
    assert response.status_code == 200
    return dict(response.json())


def refresh_form(token: str, **extra: str) -> dict[str, str]:
    return {"grant_type": "refresh_token", "refresh_token": token, **extra}


async def test_refresh_rotates_and_keeps_the_mandate(setup: Setup) -> None:
    first = await tokens(setup)
    second = await setup.token(refresh_form(first["refresh_token"]))
    assert second.status_code == 200, second.text
    body = second.json()
    assert body["refresh_token"] != first["refresh_token"]
    ring, issuer = setup.server.services.keys.ring, setup.server.issuer
    old = read_access_token(ring, first["access_token"], issuer=issuer)
    new = read_access_token(ring, body["access_token"], issuer=issuer)
    assert old is not None
    assert new is not None
    assert new["mandate"] == old["mandate"]
    assert new["sub"] == old["sub"]
    third = await setup.token(refresh_form(body["refresh_token"]))
    assert third.status_code == 200


async def test_refresh_token_reuse_revokes_the_family(setup: Setup) -> None:
    first = await tokens(setup)
    second = (await setup.token(refresh_form(first["refresh_token"]))).json()
    reused = await setup.token(refresh_form(first["refresh_token"]))
    assert (reused.status_code, reused.json()["error"]) == (400, "invalid_grant")
    # the rotated successor is dead too, and so are the access tokens of the family
    successor = await setup.token(refresh_form(second["refresh_token"]))
    assert (successor.status_code, successor.json()["error"]) == (400, "invalid_grant")
    for access in (first["access_token"], second["access_token"]):
        assert (await introspect(setup, access))["active"] is False


async def test_refresh_may_narrow_but_not_widen(setup: Setup) -> None:
    first = await tokens(setup)
    wider = await setup.token(
        refresh_form(first["refresh_token"], scope="order:create order:cancel")
    )
    assert (wider.status_code, wider.json()["error"]) == (400, "invalid_scope")
    other = await setup.token(
        refresh_form(first["refresh_token"], resource="https://clearing.example/api")
    )
    assert (other.status_code, other.json()["error"]) == (400, "invalid_target")


async def test_refresh_by_another_client_is_invalid_grant(setup: Setup) -> None:
    other = await register_code_client(setup.server)
    first = await tokens(setup)
    response = await setup.token(refresh_form(first["refresh_token"]), kit=other)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")


@pytest.mark.parametrize("action", ["revoke", "suspend"])
async def test_refresh_after_mandate_revocation_or_suspension_is_invalid_grant(
    setup: Setup, action: str
) -> None:
    first = await tokens(setup)
    ring, issuer = setup.server.services.keys.ring, setup.server.issuer
    mandate = read_access_token(ring, first["access_token"], issuer=issuer)["mandate"]  # type: ignore[index]
    mandates = setup.server.services.mandates
    await getattr(mandates, action)(mandate["id"], actor="test", reason="test")
    response = await setup.token(refresh_form(first["refresh_token"]))
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")
    # a fresh consent now creates a new mandate instead of reusing the ended one
    again = await tokens(setup)
    renewed = read_access_token(ring, again["access_token"], issuer=issuer)
    assert renewed is not None
    assert renewed["mandate"]["id"] != mandate["id"]


async def test_authorization_endpoint_path_is_not_confused_by_hosts(setup: Setup) -> None:
    """The redirect location is the registered URI verbatim, host included."""
    flow = setup.flow()
    page = await flow.login(await flow.start(), "alice")
    answer = await flow.decide(page)
    assert urlsplit(answer.headers["location"]).netloc == "client.example"


async def test_revoking_a_refresh_token_ends_its_family(setup: Setup) -> None:
    """RFC 7009 §2.1: refresh tokens MUST be revocable; the access tokens of the grant go too."""
    first = await tokens(setup)
    other = await register_code_client(setup.server)
    refused = await setup.server.http.post(
        "/revoke", data={"token": first["refresh_token"], **other.auth()}
    )
    assert (refused.status_code, refused.json()["error"]) == (400, "unauthorized_client")
    for _ in range(2):  # the second revocation is a successful no-op
        revoked = await setup.server.http.post(
            "/revoke",
            data={
                "token": first["refresh_token"],
                "token_type_hint": "refresh_token",
                **setup.kit.auth(),
            },
        )
        assert revoked.status_code == 200
    response = await setup.token(refresh_form(first["refresh_token"]))
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")
    assert (await introspect(setup, first["access_token"]))["active"] is False


async def test_plain_downgrade_at_the_token_endpoint_is_invalid_grant(setup: Setup) -> None:
    """The challenge itself as verifier (what ``plain`` would accept) does not match S256."""
    flow = setup.flow()
    code = await flow.code("alice")
    response = await setup.token(flow.redeem_form(code, code_verifier=s256(flow.verifier)))
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")


async def test_code_redemption_checks_the_mandate(setup: Setup) -> None:
    flow = setup.flow()
    code = await flow.code("alice")
    async with setup.server.services.db.read() as conn:
        stored = await SqlCodeStore().get(conn, code)
    assert stored is not None
    await setup.server.services.mandates.suspend(stored.grant.mandate_id, actor="test")
    response = await setup.token(flow.redeem_form(code))
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")
    await setup.server.services.mandates.resume(stored.grant.mandate_id, actor="test")


async def test_refresh_after_amendment_is_refused_and_tokens_keep_their_version(
    setup: Setup,
) -> None:
    """Amending creates version 2: the refresh of a version-1 grant is refused (superseded); the
    next consent finds version 2 if it still covers the request."""
    first = await tokens(setup)
    ring, issuer = setup.server.services.keys.ring, setup.server.issuer
    claims = read_access_token(ring, first["access_token"], issuer=issuer)
    assert claims is not None
    mandate = claims["mandate"]
    amended = await setup.server.services.mandates.amend(
        mandate["id"], actor="test", changes={"scopes": ["order:create", "order:cancel"]}
    )
    assert amended.version == mandate["version"] + 1
    response = await setup.token(refresh_form(first["refresh_token"]))
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")
    again = read_access_token(ring, (await tokens(setup))["access_token"], issuer=issuer)
    assert again is not None
    assert again["mandate"] == {"id": mandate["id"], "version": amended.version}
