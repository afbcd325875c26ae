"""The registry's verification API as token exchange will use it, partner key fetching, and the
subject namespacing scheme."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import jwks_for, make_settings, new_ec_key
from tests.federation.partners import TOKEN_TYPE_JWT, Partner
from trustplane.clients.remote_jwks import RemoteJwksCache
from trustplane.federation.profile import TOKEN_TYPE_ACCESS_TOKEN, inline_keys, validate_profile
from trustplane.federation.registry import (
    PartnerRegistry,
    PartnerTokenError,
    namespaced_subject,
    origin_of,
)
from trustplane.settings import Settings

OURS = "http://127.0.0.1:8000"
HOST = "keys.partner.example"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings("sqlite+aiosqlite:///unused.db", tmp_path, federation_jwks_hosts=(HOST,))


class Jwks:
    """A partner's jwks_uri: serves ``keys``, counts fetches."""

    def __init__(self, partner: Partner) -> None:
        self.keys = jwks_for(partner.key, partner.kid)
        self.fetches = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.fetches += 1
        return httpx.Response(200, json=self.keys)


def registry_for(
    settings: Settings,
    partner: Partner,
    jwks: Jwks | None = None,
    min_refetch: float = 60.0,
    **doc: object,
) -> PartnerRegistry:
    transport = httpx.MockTransport(jwks.handler if jwks else lambda r: httpx.Response(500))
    registry = PartnerRegistry(
        settings, RemoteJwksCache(min_refetch=min_refetch, transport=transport)
    )
    if jwks is not None:
        doc.setdefault("keys", {"jwks_uri": f"https://{HOST}/jwks"})
    profile = validate_profile(partner.profile(**doc), settings)
    registry.replace_all([profile])
    return registry


def test_namespaced_subjects_round_trip_and_local_subjects_are_not_partner_ones() -> None:
    subject = namespaced_subject("arranger-emea", "alice:with:colons")
    assert subject == "partner:arranger-emea:alice:with:colons"
    assert origin_of(subject) == ("arranger-emea", "alice:with:colons")
    assert origin_of("tp-abc123") is None
    assert origin_of("partner:") is None


async def test_access_token_type_for_token_exchange(settings: Settings) -> None:
    partner = Partner("partner-x", "https://idp.x.example", OURS)
    registry = registry_for(
        settings, partner, accepted_token_types=[TOKEN_TYPE_JWT, TOKEN_TYPE_ACCESS_TOKEN]
    )
    token = partner.assertion(_headers={"typ": "at+jwt"}, may_act={"sub": "broker"})

    verified = await registry.verify_partner_jwt(
        token, expected_audience=OURS, accepted_types={TOKEN_TYPE_ACCESS_TOKEN}
    )
    assert verified.token_type == TOKEN_TYPE_ACCESS_TOKEN
    assert verified.subject == "partner:partner-x:trader-42"
    assert verified.claims["may_act"] == {"sub": "broker"}
    assert verified.replay_use(60).issuer == "partner-assertion:https://idp.x.example"
    with pytest.raises(PartnerTokenError) as caught:
        await registry.verify_partner_jwt(
            token, expected_audience=OURS, accepted_types={TOKEN_TYPE_JWT}
        )
    assert caught.value.reason_id == "token_type"


async def test_other_expected_audience(settings: Settings) -> None:
    partner = Partner("partner-x", "https://idp.x.example", "https://clearing.example/api")
    registry = registry_for(settings, partner)
    verified = await registry.verify_partner_jwt(
        partner.assertion(),
        expected_audience="https://clearing.example/api",
        accepted_types={TOKEN_TYPE_JWT},
    )
    assert verified.origin == {"iss": partner.issuer, "sub": "trader-42"}
    with pytest.raises(PartnerTokenError, match="aud"):
        await registry.verify_partner_jwt(
            partner.assertion(), expected_audience=OURS, accepted_types={TOKEN_TYPE_JWT}
        )


async def test_partner_key_rotation_is_picked_up_on_an_unknown_kid(settings: Settings) -> None:
    partner = Partner("partner-r", "https://idp.r.example", OURS)
    jwks = Jwks(partner)
    registry = registry_for(settings, partner, jwks, min_refetch=0)
    await registry.verify_partner_jwt(
        partner.assertion(), expected_audience=OURS, accepted_types={TOKEN_TYPE_JWT}
    )
    partner.key, partner.kid = new_ec_key(), "p2"
    jwks.keys = jwks_for(partner.key, partner.kid)

    verified = await registry.verify_partner_jwt(
        partner.assertion(), expected_audience=OURS, accepted_types={TOKEN_TYPE_JWT}
    )
    assert verified.partner.partner_id == "partner-r"
    assert jwks.fetches == 2


async def test_a_flood_of_unknown_kids_fetches_at_most_once_per_interval(
    settings: Settings,
) -> None:
    partner = Partner("partner-f", "https://idp.f.example", OURS)
    jwks = Jwks(partner)
    registry = registry_for(settings, partner, jwks, min_refetch=60)
    for i in range(20):
        with pytest.raises(PartnerTokenError) as caught:
            await registry.verify_partner_jwt(
                partner.assertion(_headers={"kid": f"bogus-{i}"}),
                expected_audience=OURS,
                accepted_types={TOKEN_TYPE_JWT},
            )
        assert caught.value.reason_id == "signature"
    assert jwks.fetches == 1


async def test_a_jwks_host_removed_from_the_allow_list_is_no_longer_fetched(
    settings: Settings, tmp_path: Path
) -> None:
    partner = Partner("partner-h", "https://idp.h.example", OURS)
    jwks = Jwks(partner)
    registry = registry_for(settings, partner, jwks)
    profile = registry.get("partner-h")
    assert profile is not None
    stricter = make_settings("sqlite+aiosqlite:///unused.db", tmp_path)  # empty allow-list
    transport = httpx.MockTransport(jwks.handler)
    reloaded = PartnerRegistry(stricter, RemoteJwksCache(transport=transport))
    reloaded.replace_all([profile])

    with pytest.raises(PartnerTokenError) as caught:
        await reloaded.verify_partner_jwt(
            partner.assertion(), expected_audience=OURS, accepted_types={TOKEN_TYPE_JWT}
        )
    assert caught.value.reason_id == "signature"
    assert jwks.fetches == 0
    assert inline_keys(profile.document) == []


async def test_transaction_attributes_are_required_and_copied(settings: Settings) -> None:
    partner = Partner("partner-t", "https://idp.t.example", OURS)
    registry = registry_for(settings, partner, required_transaction_attributes=["account"])
    accepted = {TOKEN_TYPE_JWT}
    good = await registry.verify_partner_jwt(
        partner.assertion(txn="T-1", tctx={"account": "ACC-1", "note": "dropped"}),
        expected_audience=OURS,
        accepted_types=accepted,
    )
    assert good.issued_claims()["tctx"] == {"account": "ACC-1"}
    assert good.issued_claims()["txn"] == "T-1"
    for claims in (
        {"txn": "T-1"},
        {"tctx": {"account": "A"}},
        {"txn": "T-1", "tctx": {"other": 1}},
    ):
        with pytest.raises(PartnerTokenError) as caught:
            await registry.verify_partner_jwt(
                partner.assertion(**claims), expected_audience=OURS, accepted_types=accepted
            )
        assert caught.value.reason_id == "transaction"
