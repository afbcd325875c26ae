"""``trustplane.reference.serve``: the settings a serving process needs (a missing one is named),
the mandate found in a derived token's provenance (the entitlement check's own), and the app built
from settings (its lifespan makes each service's store; the routes are behind the PEP)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import run_sync
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.pep.client_auth import ClientAuth
from trustplane.reference import machine
from trustplane.reference.entitlement import (
    EntitlementUnavailable,
    IntrospectionMandateCheck,
    held_mandate,
    provenance_mandate,
)
from trustplane.reference.serve import ServeSettings, create_reference_app
from trustplane.reference.settings import ReferenceSettings, ReferenceSettingsError

MANDATE = {"id": "mdt_1", "version": 1}


def environment(tmp_path: Path, **overrides: str) -> dict[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "client.pem").write_bytes(pem)
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'trades.db'}",
        "EVENT_KEY_FILE": str(tmp_path / "events.pem"),
        "AUDIENCE": "https://settlement.example/api",
        "TRUSTED_ISSUERS": "http://127.0.0.1:9 , http://127.0.0.1:10",
        "PDP": "http://127.0.0.1:9",
        "PDP_CLIENT_ID": "c-pdp",
        "CLIENT_KEY_FILE": str(tmp_path / "client.pem"),
        "ALLOW_INSECURE_LOOPBACK": "true",
        **overrides,
    }
    return {f"TRUSTPLANE_REFERENCE_{k}": v for k, v in env.items() if v}


def test_settings_from_the_environment(tmp_path: Path) -> None:
    settings = ServeSettings.from_env(environment(tmp_path))
    assert settings.trusted_issuers == ("http://127.0.0.1:9", "http://127.0.0.1:10")
    # the introspection issuer and client default to the PDP's
    assert (settings.introspection, settings.introspection_client_id) == (
        "http://127.0.0.1:9",
        "c-pdp",
    )
    assert settings.allow_insecure_loopback is True
    assert settings.store.database_url.endswith("trades.db")


@pytest.mark.parametrize(
    "missing", ["AUDIENCE", "TRUSTED_ISSUERS", "PDP", "PDP_CLIENT_ID", "CLIENT_KEY_FILE"]
)
def test_a_missing_setting_is_named(tmp_path: Path, missing: str) -> None:
    with pytest.raises(ReferenceSettingsError, match=f"TRUSTPLANE_REFERENCE_{missing} is required"):
        ServeSettings.from_env(environment(tmp_path, **{missing: ""}))


def test_a_client_key_that_is_not_ec_is_refused(tmp_path: Path) -> None:
    env = environment(tmp_path)
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "client.pem").write_bytes(pem)
    with pytest.raises(ReferenceSettingsError, match="EC"):
        create_reference_app(ServeSettings.from_env(env))


def test_the_mandate_down_the_provenance_chain() -> None:
    assert provenance_mandate({"prv": {"iss": "a", "prv": {"mandate": MANDATE}}}) == MANDATE
    assert provenance_mandate({"prv": {"iss": "a"}}) is None
    assert provenance_mandate({"mandate": MANDATE}) is None  # only the provenance is searched
    deep: dict[str, Any] = {"mandate": MANDATE}
    for _ in range(5):
        deep = {"prv": deep}
    assert provenance_mandate(deep) is None  # bounded: at most four levels


class NoAuth:
    client_id = "c-introspect"

    def apply(self, form: dict[str, str], headers: dict[str, str]) -> None:
        form["client_id"] = self.client_id


def test_a_derived_token_is_checked_against_its_provenance_mandate() -> None:
    """A token derived at a partner names the mandate in ``prv.mandate``: the introspection check
    takes it as the token's mandate (no ``mandate_mismatch``) and asks the issuer about liveness;
    a token's own ``mandate`` wins over its provenance's."""
    derived = {"txn": "t", "prv": {"iss": "a", "mandate": MANDATE}}
    own = {"mandate": {"id": "mdt_2", "version": 3}, "prv": {"mandate": MANDATE}}
    assert held_mandate(derived) == MANDATE
    assert held_mandate(own) == {"id": "mdt_2", "version": 3}
    assert held_mandate({"txn": "t"}) is None
    fetcher = OutboundFetcher(OutboundPolicy.development())
    auth: ClientAuth = NoAuth()
    check = IntrospectionMandateCheck("http://127.0.0.1:9/introspect", auth, fetcher)

    async def scenario() -> list[Any]:
        found: list[Any] = []
        for claims in (own, {"txn": "t"}):
            found.append(await check.check("tok", claims, {"mandate": MANDATE}))
        try:  # the derived token matches: the issuer is asked (and here cannot be)
            await check.check("tok", derived, {"mandate": MANDATE})
        except EntitlementUnavailable as exc:
            found.append(exc)
        await fetcher.aclose()
        return found

    another, nothing, asked = run_sync(scenario())
    assert (another.reason, another.detail) == (
        "mandate_mismatch",
        "the acting token rests on another mandate",
    )
    assert nothing.reason == "mandate_mismatch"
    assert isinstance(asked, EntitlementUnavailable)


def test_each_service_has_its_own_database_and_key() -> None:
    settings = ReferenceSettings.from_env({})
    assert settings.database_url_of("execution") == (
        "sqlite+aiosqlite:///.trustplane/reference-execution.db"
    )
    assert str(settings.event_key_file_of("settlement")) == (
        ".trustplane/reference-events-settlement.pem"
    )
    env = {
        "TRUSTPLANE_REFERENCE_DATABASE_URL": "postgresql+asyncpg://db/ref",
        "TRUSTPLANE_REFERENCE_SETTLEMENT_DATABASE_URL": "postgresql+asyncpg://db/settlement",
        "TRUSTPLANE_REFERENCE_SERVICES": "settlement, reporting",
    }
    pg = ReferenceSettings.from_env(env)
    assert pg.database_url_of("settlement") == "postgresql+asyncpg://db/settlement"
    assert pg.services == ("settlement", "reporting")
    with pytest.raises(ReferenceSettingsError, match="EXECUTION_DATABASE_URL is required"):
        pg.database_url_of("execution")
    with pytest.raises(ReferenceSettingsError, match="unknown service clearing"):
        ReferenceSettings.from_env({"TRUSTPLANE_REFERENCE_SERVICES": "clearing"})
    shared = {
        "TRUSTPLANE_REFERENCE_EXECUTION_DATABASE_URL": "postgresql+asyncpg://db/trades",
        "TRUSTPLANE_REFERENCE_ALLOCATION_DATABASE_URL": "postgresql+asyncpg://db/allocation",
        "TRUSTPLANE_REFERENCE_SETTLEMENT_DATABASE_URL": " postgresql+asyncpg://db/trades ",
    }
    with pytest.raises(
        ReferenceSettingsError,
        match="EXECUTION_DATABASE_URL and TRUSTPLANE_REFERENCE_SETTLEMENT_DATABASE_URL name the "
        "same database",
    ):
        ReferenceSettings.from_env(shared)


def test_the_app_makes_its_store_and_guards_its_routes(tmp_path: Path) -> None:
    app = create_reference_app(ServeSettings.from_env(environment(tmp_path)))

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://ref") as http,
        ):
            jwks = await http.get("/jwks")
            refused = await http.post("/orders", json={}, headers={"Idempotency-Key": '"k"'})
        return jwks, refused

    jwks, refused = run_sync(scenario())
    assert jwks.status_code == 200
    keys = jwks.json()["keys"]
    assert [k["alg"] for k in keys] == ["ES256"] * 3  # one event key per owner
    assert len({k["kid"] for k in keys}) == 3
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    # DPoP-bound tokens (partners' default binding) are taken too: the challenge offers DPoP
    # (RFC 9449 §7.1); before, such a token was refused and no DPoP challenge was sent
    assert 'DPoP realm="reference", algs=' in refused.headers["www-authenticate"]
    for service in machine.SERVICES:  # each service's own database
        assert (tmp_path / f"trades-{service}.db").exists()
    assert not (tmp_path / "trades.db").exists()
    for service in machine.OWNERS:
        assert (tmp_path / f"events-{service}.pem").exists()
