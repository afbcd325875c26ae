"""The maintenance gauges (``trustplane.expiry``): earliest expiry of signing keys, client and partner
certificates and mandates, and the ledger's pending entries; and the actor-chain depth histogram."""

from __future__ import annotations

import base64
import datetime
import math
import time
from collections.abc import Callable

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import REGISTRY

from tests.audit.ledger_helpers import append, event
from tests.conftest import EXECUTION, ClientKit, jwks_for, register_kit
from tests.mandates.conftest import grantee, terms
from trustplane import expiry
from trustplane.app import Services
from trustplane.keys.store import KeyState
from trustplane.settings import Settings


def _gauge(kind: str) -> float | None:
    return REGISTRY.get_sample_value("trustplane_earliest_expiry_timestamp_seconds", {"kind": kind})


def _certificate(key: ec.EllipticCurvePrivateKey, not_after: int) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime.fromtimestamp(not_after - 86400 * 30, datetime.UTC))
        .not_valid_after(datetime.datetime.fromtimestamp(not_after, datetime.UTC))
        .sign(key, hashes.SHA256())
    )
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


@pytest.fixture
async def rotating(settings_factory: Callable[..., Settings]) -> Services:
    svc = Services.build(settings_factory(key_rotation_interval=7 * 86400))
    await svc.start()
    return svc


async def test_nothing_that_expires_is_infinite(services: Services) -> None:
    await expiry.observe(services)
    for kind in expiry.KINDS:  # the test settings do not rotate keys; no certificates, no mandates
        assert _gauge(kind) == math.inf


async def test_the_active_signing_key_is_due_at_activation_plus_interval(
    rotating: Services,
) -> None:
    try:
        await expiry.observe(rotating)
        active = next(k for k in await rotating.keys.list_all() if k.state is KeyState.ACTIVE)
        assert active.activated_at is not None
        assert _gauge("signing_key") == active.activated_at + 7 * 86400
    finally:
        await rotating.stop()


async def test_the_earliest_client_certificate_and_mandate(services: Services) -> None:
    now = int(time.time())
    soon, later = now + 5 * 86400, now + 90 * 86400
    for not_after in (later, soon):
        key = ec.generate_private_key(ec.SECP256R1())
        jwks = jwks_for(key)
        jwks["keys"][0]["x5c"] = [_certificate(key, not_after)]
        await register_kit(services, jwks=jwks)
    await register_kit(services)  # a key without a certificate does not count
    client = await grantee(services)
    for until in (now + 40 * 86400, now + 3 * 86400):
        await services.mandates.create(
            terms(client.client_id, effective_until=until), actor="a", accepted_by="alice"
        )

    await expiry.observe(services)

    assert _gauge("client_certificate") == soon
    assert _gauge("mandate") == now + 3 * 86400
    assert _gauge("partner_certificate") == math.inf


async def test_pending_audit_entries_are_counted(services: Services) -> None:
    await services.ledger.integrate_all()
    await append(services.db, [event(i) for i in range(4)])
    await expiry.observe(services)
    assert REGISTRY.get_sample_value("trustplane_audit_pending_entries") == 4
    await services.ledger.integrate_all()
    await expiry.observe(services)
    assert REGISTRY.get_sample_value("trustplane_audit_pending_entries") == 0


def test_a_certificate_that_does_not_parse_does_not_count() -> None:
    assert (
        expiry._earliest_cert([{"keys": [{"x5c": ["bm90IGEgY2VydA=="]}]}, None, {"x": 1}]) is None
    )


async def test_tokens_issued_are_counted_per_client(
    http: httpx.AsyncClient, kit: ClientKit
) -> None:
    def issued() -> float:
        sample = REGISTRY.get_sample_value(
            "trustplane_tokens_issued_by_client_total", {"client_id": kit.client_id}
        )
        return sample or 0.0

    before = issued()
    for _ in range(2):
        form = {"grant_type": "client_credentials", "scope": "order:create", **kit.auth()}
        response = await http.post("/token", data={**form, "resource": EXECUTION})
        assert response.status_code == 200, response.text
    refused = await http.post("/token", data={"grant_type": "client_credentials", **kit.auth()})
    assert refused.status_code == 400  # no resource: refused, not counted
    assert issued() == before + 2
