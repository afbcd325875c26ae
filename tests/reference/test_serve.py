"""``trustplane.reference.serve``: the settings a serving process needs (a missing one is named),
the mandate found in a derived token's provenance, and the app built from settings (its lifespan
makes the store; the routes are behind the PEP)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import run_sync
from trustplane.reference.entitlement import MandateStatus
from trustplane.reference.serve import (
    ProvenanceMandateCheck,
    ServeSettings,
    create_reference_app,
    provenance_mandate,
)
from trustplane.reference.settings import ReferenceSettingsError

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


class Recording:
    def __init__(self) -> None:
        self.seen: list[Mapping[str, Any]] = []

    async def check(
        self, token: str | None, claims: Mapping[str, Any], trade_envelope: Mapping[str, Any]
    ) -> MandateStatus:
        self.seen.append(claims)
        return MandateStatus(True, "active", "")


def test_a_derived_token_is_checked_against_its_provenance_mandate() -> None:
    inner = Recording()
    check = ProvenanceMandateCheck(inner)
    derived = {"txn": "t", "prv": {"iss": "a", "mandate": MANDATE}}
    own = {"mandate": {"id": "mdt_2", "version": 3}, "prv": {"mandate": MANDATE}}
    for claims in (derived, own, {"txn": "t"}):
        run_sync(check.check("tok", claims, {"mandate": MANDATE}))
    assert inner.seen[0]["mandate"] == MANDATE  # taken from prv
    assert inner.seen[1]["mandate"] == {"id": "mdt_2", "version": 3}  # its own kept
    assert "mandate" not in inner.seen[2]  # nothing invented: the inner check says mismatch


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
    assert jwks.json()["keys"][0]["alg"] == "ES256"
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert (tmp_path / "trades.db").exists()
