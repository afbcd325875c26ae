"""What a consumer refuses (``security_events.verify``): one case per check, each with its reason;
and the publisher's claim on PostgreSQL: while one process holds a round, another gets nothing."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.protocol_server import Server
from tests.security_events.helpers import alert, append_raw
from trustplane.jose.jwk import thumbprint
from trustplane.jose.jws import Signer
from trustplane.keys.crypto import public_jwk
from trustplane.security_events.publisher import LedgerOutbox
from trustplane.security_events.stream import EVENT_TYP, SecurityEvents
from trustplane.security_events.verify import EventRefused, verify_event

ISSUER = "https://as.example"


def keypair() -> tuple[ec.EllipticCurvePrivateKey, dict[str, Any]]:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = public_jwk(key)
    return key, {**jwk, "kid": thumbprint(jwk), "alg": "ES256", "use": "sig"}


KEY, JWK = keypair()
OTHER, OTHER_JWK = keypair()
JWKS = {"keys": [JWK]}


def claims(**changes: Any) -> dict[str, Any]:
    base = {"iss": ISSUER, "jti": secrets.token_hex(16), "iat": 1, "type": "x", "seq": 7}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def signed(
    payload: dict[str, Any], *, key: Any = KEY, kid: str | None = None, typ: str = EVENT_TYP
) -> str:
    return Signer(key, "ES256", kid or JWK["kid"], typ).sign(payload)


def test_a_good_event_verifies() -> None:
    assert verify_event(signed(claims()), JWKS, issuer=ISSUER)["seq"] == 7


CASES: list[tuple[str, Callable[[], str | bytes], str]] = [
    ("not a JWS", lambda: "abc.def", "not a compact JWS"),
    ("not ASCII", lambda: "é".encode("latin-1") + b".a.b", "not a compact JWS"),
    ("a SET", lambda: signed(claims(), typ="secevent+jwt"), "typ must be"),
    ("an access token", lambda: signed(claims(), typ="at+jwt"), "typ must be"),
    ("an unknown kid", lambda: signed(claims(), kid="nope"), "does not verify"),
    ("another key under our kid", lambda: signed(claims(), key=OTHER), "does not verify"),
    ("another issuer", lambda: signed(claims(iss="https://evil.example")), "wrong issuer"),
    ("no event id", lambda: signed(claims(jti=None)), "no event id"),
    ("no type", lambda: signed(claims(type=None)), "no event id or type"),
    ("no seq", lambda: signed(claims(seq=None)), "no ledger position"),
    ("a string seq", lambda: signed(claims(seq="7")), "no ledger position"),
    ("a tampered payload", lambda: _tamper(signed(claims())), "does not verify"),
]


def _tamper(token: str) -> str:
    head, payload, signature = token.split(".")
    flipped = "A" if payload[5] != "A" else "B"
    return f"{head}.{payload[:5]}{flipped}{payload[6:]}.{signature}"


@pytest.mark.parametrize(("name", "make", "reason"), CASES, ids=[c[0] for c in CASES])
def test_refused(name: str, make: Callable[[], str | bytes], reason: str) -> None:
    with pytest.raises(EventRefused, match=reason):
        verify_event(make(), JWKS, issuer=ISSUER)


def test_an_unusable_jwks_refuses_everything() -> None:
    with pytest.raises(EventRefused, match="unusable JWKS"):
        verify_event(signed(claims()), {"keys": []}, issuer=ISSUER)


@pytest.mark.asyncio(loop_scope="module")
async def test_one_publisher_round_at_a_time(server: Server) -> None:
    """PostgreSQL: a round holds the advisory lock; a second process's round gets nothing and
    moves nothing. SQLite (one process): both may read, the position moves by compare-and-set."""
    services = server.services
    await append_raw(services.db, alert(server.issuer), alert(server.issuer))
    await services.ledger.integrate_all()
    events = SecurityEvents(services.db, services.keys, issuer=server.issuer, origin="o")
    first = LedgerOutbox(services.db, events, prefix="p")
    second = LedgerOutbox(services.db, events, prefix="p")
    start = await first.position()
    async with first.claim(1000) as held:
        assert held.messages
        if services.db.is_sqlite:
            return
        async with second.claim(1000) as other:
            assert other.messages == []
        held.acked = len(held.messages)
    assert await first.position() > start
    async with second.claim(1000) as after:
        assert after.messages == []
